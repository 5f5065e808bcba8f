"""Readers for the revisited Oxford5k / Paris6k benchmarks and the revisitop 1M distractors.

Layout (as the revisitop project distributes it, http://cmp.felk.cvut.cz/revisitop/):

    DIR/roxford5k/gnd_roxford5k.pkl     {'imlist', 'qimlist', 'gnd': [{'bbx', 'easy', 'hard', 'junk'}]}
    DIR/roxford5k/jpg/<imname>.jpg      database and query images

DIR may also be the dataset folder itself. The ground-truth pickle is read with a restricted
unpickler that resolves only plain containers and numpy array reconstruction, so a tampered
file cannot run code. Query images are cropped to their box (SPEC 1.2) by `load_query`.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, SgengineError

__all__ = ["DatasetError", "RevisitedDataset", "load_revisited", "find_gnd", "read_gnd_pickle", "KNOWN_DATASETS",
           "load_descriptors", "load_distractors", "REVISITOP_URL"]

REVISITOP_URL = "http://cmp.felk.cvut.cz/revisitop/"
KNOWN_DATASETS = ("roxford5k", "rparis6k")
_PUBLISHED = (f"the revisited Oxford/Paris ground truth, images and the revisitop 1M distractor list are published by "
              f"the authors of \"Revisiting Oxford and Paris\" (Radenovic et al., CVPR 2018) at {REVISITOP_URL}")


class DatasetError(SgengineError, FileNotFoundError):
    """A benchmark file that is missing or malformed; the message names it, where it was expected and where to get it."""


# ----------------------------------------------------------------------------- safe pickle
# The only globals a revisited gnd pickle needs: builtin containers/scalars and what numpy
# emits to rebuild an ndarray (module paths of numpy 1.x and 2.x, and `_codecs.encode`, which
# Python 3 uses for bytes in protocol-2 pickles). Nothing here can call arbitrary code.
_SAFE_BUILTINS = {"list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str",
                  "bytes", "bytearray", "slice", "range"}
_SAFE_NUMPY = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            import builtins
            return getattr(builtins, name)
        if (module, name) in _SAFE_NUMPY:
            if module == "_codecs":
                import codecs
                return codecs.encode
            if module == "numpy":
                return getattr(np, name)
            # numpy 2 keeps numpy.core as an alias of numpy._core; import whichever exists.
            import importlib
            for mod in (module, module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
                try:
                    return getattr(importlib.import_module(mod), name)
                except (ImportError, AttributeError):
                    continue
        if module == "numpy.dtypes" and name.endswith("DType"):
            # Some numpy 2 pickles name dtype classes (numpy.dtypes.Float64DType): plain classes.
            import numpy.dtypes as npd
            if hasattr(npd, name):
                return getattr(npd, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a ground-truth file")


def read_gnd_pickle(path: str | os.PathLike) -> dict:
    """Load a revisited gnd_*.pkl with the restricted unpickler (containers and numpy arrays only)."""
    path = Path(path)
    data = path.read_bytes()
    err: Exception | None = None
    # Files written by Python 2 carry numpy buffers as str; latin1 maps them back byte for byte.
    for encoding in ("ASCII", "latin1"):
        try:
            obj = _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
            break
        except UnicodeDecodeError as e:
            err = e
        except pickle.UnpicklingError as e:
            raise DatasetError(f"{path}: refused to load: {e}. A revisited ground-truth file holds only lists, "
                               f"dicts and numpy arrays; get the original from {REVISITOP_URL}") from e
        except Exception as e:  # truncated or not a pickle at all
            raise DatasetError(f"{path}: not a readable ground-truth pickle ({type(e).__name__}: {e}); "
                               f"re-download it from {REVISITOP_URL}") from e
    else:
        raise DatasetError(f"{path}: cannot decode the pickle's strings ({err})")
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict with 'imlist', 'qimlist', 'gnd', got {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------- revisited datasets
def find_gnd(name: str, data_dir: str | os.PathLike) -> Path:
    """Locate DIR/<name>/gnd_<name>.pkl (or DIR/gnd_<name>.pkl when DIR is the dataset folder)."""
    d = Path(data_dir).expanduser()
    candidates = [d / name / f"gnd_{name}.pkl", d / f"gnd_{name}.pkl"]
    for c in candidates:
        if c.is_file():
            return c
    raise DatasetError(
        f"{name}: ground truth gnd_{name}.pkl not found (looked for {candidates[0]} and {candidates[1]}). "
        f"Expected layout: DIR/{name}/gnd_{name}.pkl and DIR/{name}/jpg/<image>.jpg; {_PUBLISHED}.")


@dataclass
class RevisitedDataset:
    """A revisited Oxford/Paris benchmark: database names, query names, boxes and ground truth."""

    name: str
    root: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]
    image_dir: Path = field(init=False)
    ext: str = ".jpg"

    def __post_init__(self) -> None:
        self.image_dir = self.root / "jpg"

    def __repr__(self) -> str:
        return f"RevisitedDataset({self.name!r}, {len(self.qimlist)} queries, {len(self.imlist)} images, root={str(self.root)!r})"

    def image_path(self, imname: str) -> Path:
        return self.image_dir / f"{imname}{self.ext}"

    def db_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.imlist]

    def query_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.qimlist]

    def query_box(self, i: int) -> tuple[float, float, float, float]:
        return tuple(float(v) for v in np.asarray(self.gnd[i]["bbx"], dtype=np.float64).reshape(-1)[:4])

    def load_query(self, i: int) -> np.ndarray:
        """Query i as BGR uint8, cropped to its box (SPEC 1.2), from the full-resolution decode."""
        from ..preprocess import crop_box, load_image
        path = self.query_paths()[i]
        # max_side=None: the box is in the original pixel grid, so crop before any size cap.
        bgr = load_image(path, max_side=None).bgr
        crop = crop_box(bgr, self.query_box(i))
        if crop.shape[0] == 0 or crop.shape[1] == 0:
            raise InputError(f"{path}: query box {self.query_box(i)} of {self.name} query {i} is empty on a "
                             f"{bgr.shape[1]}x{bgr.shape[0]} image")
        return np.ascontiguousarray(crop)

    def missing_images(self, *, queries: bool = True, database: bool = True) -> list[Path]:
        paths = (self.query_paths() if queries else []) + (self.db_paths() if database else [])
        return [p for p in dict.fromkeys(paths) if not p.is_file()]

    def check_images(self, *, queries: bool = True, database: bool = True) -> None:
        """Raise DatasetError listing missing image files (first few and the count)."""
        missing = self.missing_images(queries=queries, database=database)
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            raise DatasetError(
                f"{self.name}: {len(missing)} image file(s) missing under {self.image_dir} (e.g. {shown}). "
                f"Expected DIR/{self.name}/jpg/<image>.jpg for every name in gnd_{self.name}.pkl; {_PUBLISHED}.")


def _as_name_list(x, what: str, path: Path) -> list[str]:
    try:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in list(x)]
    except TypeError as e:
        raise DatasetError(f"{path}: '{what}' is not a list of image names") from e
    return names


def load_revisited(name: str, data_dir: str | os.PathLike) -> RevisitedDataset:
    """Read DIR/<name>/gnd_<name>.pkl (or DIR/gnd_<name>.pkl) and check its structure.

    Index lists ('easy', 'hard', 'junk') are converted to int64 arrays and checked against
    the database size; boxes to 4 floats. Images are not opened here (see check_images).
    """
    path = find_gnd(name, data_dir)
    raw = read_gnd_pickle(path)
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in raw]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {missing}; a revisited ground-truth file has 'imlist', "
                           f"'qimlist' and 'gnd' (got {sorted(map(str, raw))})")
    imlist = _as_name_list(raw["imlist"], "imlist", path)
    qimlist = _as_name_list(raw["qimlist"], "qimlist", path)
    gnd_raw = list(raw["gnd"])
    if len(gnd_raw) != len(qimlist):
        raise DatasetError(f"{path}: {len(qimlist)} query names but {len(gnd_raw)} ground-truth entries")
    n_db = len(imlist)
    gnd = []
    for i, g in enumerate(gnd_raw):
        if not isinstance(g, dict):
            raise DatasetError(f"{path}: gnd[{i}] is a {type(g).__name__}, expected a dict")
        lacking = [k for k in ("bbx", "easy", "hard", "junk") if k not in g]
        if lacking:
            raise DatasetError(f"{path}: gnd[{i}] (query {qimlist[i]}) lacks {lacking}")
        entry = {}
        for k in ("easy", "hard", "junk"):
            a = np.asarray(g[k]).reshape(-1)
            a = a.astype(np.int64) if a.size else np.empty(0, np.int64)
            if a.size and (a.min() < 0 or a.max() >= n_db):
                raise DatasetError(f"{path}: gnd[{i}]['{k}'] (query {qimlist[i]}) holds index {int(a.max())} "
                                   f"outside the {n_db} database images")
            entry[k] = a
        box = np.asarray(g["bbx"], dtype=np.float64).reshape(-1)
        if box.size != 4 or not np.all(np.isfinite(box)):
            raise DatasetError(f"{path}: gnd[{i}]['bbx'] (query {qimlist[i]}) must be 4 finite numbers "
                               f"(x1, y1, x2, y2), got {g['bbx']!r}")
        entry["bbx"] = box
        gnd.append(entry)
    return RevisitedDataset(name=name, root=path.parent, imlist=imlist, qimlist=qimlist, gnd=gnd)


# ----------------------------------------------------------------------------- descriptors on disk
def load_descriptors(path: str | os.PathLike, *, dim: int | None = None, what: str = "descriptors",
                     mmap: bool = True) -> np.ndarray:
    """[N, D] float array from .npy (memory-mapped), .npz (single array or 'database'/'desc' key) or a torch file.

    Torch files are read with torch.load(weights_only=True): a tensor, or a dict holding one.
    When `dim` is given and the array is [D, N] (the revisitop examples store vectors as
    columns), it is transposed. Non-finite values are an error naming the file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{what}: {p} does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            a = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.keys())
                key = next((k for k in ("database", "desc", "descriptors", "features", "vecs") if k in keys),
                           keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise DatasetError(f"{what}: {p} holds {keys}; expected one array or a 'database' key")
                a = z[key]
        else:
            import torch
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
                key = next((k for k in ("database", "desc", "descriptors", "features", "vecs") if k in tensors),
                           next(iter(tensors)) if len(tensors) == 1 else None)
                if key is None:
                    raise DatasetError(f"{what}: {p} is a dict with keys {list(obj)}; expected one tensor "
                                       "or a 'database' key")
                obj = tensors[key]
            if not isinstance(obj, torch.Tensor):
                raise DatasetError(f"{what}: {p} holds a {type(obj).__name__}, expected a tensor [N, D]")
            a = obj.detach().float().numpy()
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{what}: cannot read {p} ({type(e).__name__}: {e}); expected .npy, .npz or a "
                           "torch tensor file (read with weights_only=True)") from e
    if a.ndim != 2:
        raise DatasetError(f"{what}: {p} has shape {list(a.shape)}, expected [N, D]")
    if not np.issubdtype(a.dtype, np.floating):
        raise DatasetError(f"{what}: {p} has dtype {a.dtype}, expected floating point")
    if dim is not None and a.shape[1] != dim:
        if a.shape[0] == dim:
            a = a.T
        else:
            raise DatasetError(f"{what}: {p} has shape {list(a.shape)} but the queries are {dim}-d: "
                               "they must come from the same model")
    # Checked in chunks so a memory-mapped 8 GB file is not copied.
    for s in range(0, a.shape[0], 1 << 16):
        if not np.isfinite(a[s:s + (1 << 16)]).all():
            raise DatasetError(f"{what}: {p} contains NaN or Inf (rows {s}..{min(s + (1 << 16), a.shape[0]) - 1})")
    return a


def load_distractors(features: str | os.PathLike, *, dim: int | None = None,
                     image_list: str | os.PathLike | None = None,
                     bundle_fingerprint: str | None = None) -> tuple[np.ndarray, list[str] | None]:
    """revisitop 1M distractor descriptors [N, D] (and their names when an image list is given).

    features: .npy / .npz / torch file, or an sgengine index directory built from the
    revisitop 1M images. image_list: the revisitop list file (one name per line); when given,
    its length must match the number of descriptors. bundle_fingerprint: when given, an index
    built by another bundle is refused (plain arrays carry no fingerprint: the caller vouches).
    """
    p = Path(features).expanduser()
    how = ("compute them from the revisitop 1M images with the same bundle (e.g. `sgengine index build BUNDLE "
           "revisitop1m/jpg -o INDEX`, then pass the index directory)")
    if not p.exists():
        raise DatasetError(f"+1M distractor descriptors {p} not found; {how}. {_PUBLISHED}.")
    names: list[str] | None = None
    if p.is_dir():
        from ..index import Index
        idx = Index.open(p)
        if bundle_fingerprint and idx.bundle_fingerprint != bundle_fingerprint:
            raise DatasetError(f"+1M distractors: index {p} was built by bundle {idx.bundle_fingerprint[:12]}, "
                               f"not by the one that made the queries ({bundle_fingerprint[:12]})")
        feats = idx.vectors()  # memory-mapped when it is one segment; float16 stays float16 until read
        if dim is not None and feats.shape[1] != dim:
            raise DatasetError(f"+1M distractors: index {p} holds {feats.shape[1]}-d descriptors, queries are {dim}-d")
        names = [str(i) for i in idx.ids]
    else:
        feats = load_descriptors(p, dim=dim, what="+1M distractors")
    if image_list is not None:
        lp = Path(image_list).expanduser()
        if not lp.is_file():
            raise DatasetError(f"+1M image list {lp} not found (revisitop1m.txt, one name per line); {_PUBLISHED}.")
        names = [ln.strip() for ln in lp.read_text().splitlines() if ln.strip()]
        if len(names) != feats.shape[0]:
            raise DatasetError(f"+1M: image list {lp} has {len(names)} names but {p} holds {feats.shape[0]} descriptors")
    return feats, names
