"""The persisted index: descriptors, their external ids, and the bundle that made them.

Directory layout (format "sgengine-index", format_version 1)::

    index/
      manifest.json              the commit record: the only file that says what the index holds
      index.lock                 advisory lock taken by writers (add, compact); absent until one runs
      segments/
        seg-000000.npy           descriptor rows of one append, [count, dim], float32 or float16,
                                 plain .npy (memory-mapped on open)
        seg-000000.ids.json      the external string ids of those rows, in row order (a JSON list)
        seg-000001.npy ...

manifest.json::

    {"format": "sgengine-index", "format_version": 1,
     "bundle_fingerprint": "<hex>", "dim": 2048, "dtype": "float32", "count": 1234,
     "generation": 7,                      # +1 per commit
     "created": "<UTC ISO 8601>", "updated": "<UTC ISO 8601>",
     "segments": [{"file": "segments/seg-000000.npy", "ids_file": "segments/seg-000000.ids.json",
                   "count": 64, "sha256": "<of the .npy>", "ids_sha256": "<of the ids file>"}, ...]}

Rows are numbered in manifest order: segment 0's rows first, then segment 1's, and so on.

Commit protocol. `add` writes the new segment's two files under temporary names, fsyncs them,
renames them into place, fsyncs `segments/`, then writes `manifest.json.tmp`, fsyncs it and
`os.replace`s it over `manifest.json` (atomic on POSIX), then fsyncs the directory. Only the
last rename commits. A crash anywhere before it leaves the committed manifest, and so every
committed row, untouched; the files it had written are not listed in the manifest, are
ignored on open, and are deleted by the next `add` or `compact`. Writers hold an exclusive
`flock` on `index.lock`, and re-read the manifest under it, so two processes appending to one
index serialize instead of overwriting each other's commit. Readers take no lock: they see
either the old manifest or the new one.

The ids file's sha256 is checked on every open (it is read anyway); the descriptor files'
sha256 only by `verify()`, because hashing gigabytes on every open would defeat mmap. Their
shape and dtype are checked on open from the .npy header.

Test hook: the environment variable SGENGINE_INDEX_CRASH_AT, read only inside `add`, makes the
process `os._exit(77)` at one point of the commit: "after-segment" (segment files renamed into
place, manifest untouched), "before-manifest" (manifest.json.tmp written and fsynced, not yet
renamed) or "after-manifest" (committed). tests/test_index.py uses it to crash a real child
process mid-append.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .errors import IndexError_, IndexMismatchError, InputError
from .search import topk_similarity

__all__ = ["Index", "FORMAT", "FORMAT_VERSION", "NORM_TOLERANCE"]

FORMAT = "sgengine-index"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
# Rows must be L2-normalized (SPEC 5 ranks by the raw inner product; the reranker's Gram and
# its weights assume unit rows). float32 descriptors from the model are within ~1e-6 of 1;
# 1e-3 also admits descriptors that were rounded through float16 before they reached us.
NORM_TOLERANCE = 1e-3

_MANIFEST = "manifest.json"
_MANIFEST_TMP = "manifest.json.tmp"
_LOCK = "index.lock"
_SEGDIR = "segments"
HOST_FLOAT32_CACHE_BYTES = 1 << 30  # float16 indexes up to this size (as float32) are searched from a float32 copy
_SEG_RE = re.compile(r"^segments/seg-(\d{6,})\.npy$")
_CRASH_ENV = "SGENGINE_INDEX_CRASH_AT"
_CRASH_POINTS = ("after-segment", "before-manifest", "after-manifest")


DEVICE_HEADROOM_BYTES = 2 << 30  # left free beside a resident index: model, activations, rerank buffers


def _device_key(device: torch.device | str) -> str:
    """"cuda" and "cuda:0" name one GPU: key resident rows by the explicit index, or one GPU would hold two copies."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def device_room_shortfall(device: torch.device, nbytes: int, *, free_bytes: int | None = None) -> str | None:
    """Why `nbytes` of index rows should not be made resident on `device` (None when they fit):
    they must leave DEVICE_HEADROOM_BYTES and a tenth of the free memory for everything else."""
    if free_bytes is None:
        if device.type != "cuda":
            return None
        free_bytes, _ = torch.cuda.mem_get_info(device)
    room = int(free_bytes * 0.9) - DEVICE_HEADROOM_BYTES
    if nbytes <= room:
        return None
    return (f"{nbytes / 2**30:.2f} GiB of rows do not fit the {max(room, 0) / 2**30:.2f} GiB this device can spare "
            f"({free_bytes / 2**30:.2f} GiB free); searching in chunks from host memory")


def _utcnow() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory entry is; not possible on every OS (Windows).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _crash_point(where: str) -> None:
    if os.environ.get(_CRASH_ENV) == where:
        os._exit(77)


class _HashingWriter:
    """File-like wrapper: np.lib.format writes through it in chunks, so the sha256 comes for free."""

    def __init__(self, f) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def write(self, b) -> int:
        self.h.update(b)
        return self.f.write(b)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_durable(final: Path, write) -> str:
    """Write via `write(file_like)` to final + '.tmp', fsync, rename into place; return the sha256."""
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        write(w)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return w.h.hexdigest()


def _write_npy(final: Path, shape: tuple[int, int], dtype: np.dtype, blocks: Iterable[np.ndarray]) -> str:
    """Stream row blocks into one .npy (never holding the whole array); return its sha256."""
    def write(w) -> None:
        np.lib.format.write_array_header_1_0(
            w, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        for b in blocks:
            w.write(np.ascontiguousarray(b, dtype=dtype).tobytes())
    return _write_durable(final, write)


def _write_ids(final: Path, ids: Sequence[str]) -> str:
    data = json.dumps(list(ids), ensure_ascii=False).encode("utf-8")
    return _write_durable(final, lambda w: w.write(data))


@contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): single-writer use is the caller's job
        yield
        return
    with open(root / _LOCK, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class Index:
    """An append-only set of unit-norm descriptors with string ids, stored as described above.

    Build with `Index.create` or `Index.open`. Rows are numbered 0..len-1 in insertion order;
    `search` returns those row numbers, `ids[row]` the external id.
    """

    # ------------------------------------------------------------ construction
    def __init__(self, path: Path, manifest: dict, *, mmap: bool) -> None:
        self._path = path
        self._mmap = mmap
        self._load(manifest)

    @classmethod
    def create(cls, path: str | os.PathLike, *, dim: int, bundle_fingerprint: str, dtype: str = "float32",
               exist_ok: bool = False) -> "Index":
        """Make an empty index at `path` (a new or empty directory).

        With exist_ok=True an index already there is opened instead, provided it has the same
        bundle fingerprint, dim and dtype (IndexMismatchError otherwise).
        """
        root = Path(path)
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise InputError(f"index {root}: dim must be a positive integer, got {dim!r}")
        if dtype not in DTYPES:
            raise InputError(f"index {root}: dtype must be one of {DTYPES}, got {dtype!r}")
        if not isinstance(bundle_fingerprint, str) or not bundle_fingerprint:
            raise InputError(f"index {root}: bundle_fingerprint must be a non-empty string")
        if (root / _MANIFEST).exists():
            if not exist_ok:
                raise IndexError_(f"{root} already holds an index: use Index.open({str(root)!r}), "
                                  "or Index.create(..., exist_ok=True)")
            idx = cls.open(root, bundle_fingerprint=bundle_fingerprint)
            if idx.dim != dim or idx.dtype != dtype:
                raise IndexMismatchError(
                    f"index {root} holds {idx.dim}-d {idx.dtype} descriptors, not {dim}-d {dtype}: "
                    "use another directory")
            return idx
        if root.exists():
            if not root.is_dir():
                raise IndexError_(f"{root} exists and is not a directory: choose another index path")
            # An interrupted create leaves at most an empty segments/ and a manifest temp file.
            leftovers = {p.name for p in root.iterdir()} - {_SEGDIR, _MANIFEST_TMP, _LOCK}
            seg = root / _SEGDIR
            if leftovers or (seg.is_dir() and any(seg.iterdir())):
                raise IndexError_(f"{root} is not empty and holds no index ({_MANIFEST} missing): "
                                  "choose an empty or new directory")
        (root / _SEGDIR).mkdir(parents=True, exist_ok=True)
        now = _utcnow()
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "bundle_fingerprint": bundle_fingerprint, "dim": int(dim), "dtype": dtype,
                    "count": 0, "generation": 0, "created": now, "updated": now, "segments": []}
        _commit_manifest(root, manifest)
        return cls(root, manifest, mmap=True)

    @classmethod
    def open(cls, path: str | os.PathLike, *, bundle_fingerprint: str | None = None, mmap: bool = True) -> "Index":
        """Open an index; with `bundle_fingerprint`, refuse one built by another bundle.

        mmap=True maps the descriptor segments instead of reading them (the OS pages in what a
        search touches); mmap=False reads them into memory.
        """
        root = Path(path)
        last: Exception | None = None
        # A compaction by another process may delete a segment between our reading the
        # manifest and opening the segment; the manifest has then moved on, so read it again.
        for _ in range(3):
            manifest = _read_manifest(root)
            if bundle_fingerprint is not None and manifest["bundle_fingerprint"] != bundle_fingerprint:
                raise IndexMismatchError(
                    f"index {root} was built by bundle {manifest['bundle_fingerprint'][:12]}, not by the bundle "
                    f"given ({bundle_fingerprint[:12]}): its descriptors are not comparable. Rebuild the index "
                    "with this bundle (sgengine index build BUNDLE PHOTOS -o NEW_DIR), or load the bundle "
                    "that built it")
            try:
                return cls(root, manifest, mmap=mmap)
            except FileNotFoundError as e:
                last = e
                try:
                    if _read_manifest(root)["generation"] != manifest["generation"]:
                        continue
                except IndexError_:
                    pass
                break
        raise IndexError_(f"index {root}: segment file missing ({last.filename}); the index is damaged. "
                          "Rebuild it (sgengine index build)")

    def _load(self, manifest: dict) -> None:
        root = self._path
        self._manifest = manifest
        self._dim = int(manifest["dim"])
        self._dtype = str(manifest["dtype"])
        np_dtype = np.dtype(self._dtype)
        arrays: list[np.ndarray] = []
        ids: list[str] = []
        for seg in manifest["segments"]:
            npy, idf, cnt = root / seg["file"], root / seg["ids_file"], int(seg["count"])
            try:
                arr = np.load(npy, mmap_mode="r" if self._mmap else None, allow_pickle=False)
            except FileNotFoundError:
                raise
            except Exception as e:  # truncated / not an .npy
                raise IndexError_(f"index {root}: segment {npy.name} is unreadable ({e}); the index is damaged. "
                                  "Rebuild it (sgengine index build)") from e
            if arr.shape != (cnt, self._dim) or arr.dtype != np_dtype:
                raise IndexError_(f"index {root}: segment {npy.name} holds {arr.dtype} {list(arr.shape)}, the manifest "
                                  f"says {self._dtype} [{cnt}, {self._dim}]; the index is damaged. Rebuild it")
            data = idf.read_bytes()
            if hashlib.sha256(data).hexdigest() != seg["ids_sha256"]:
                raise IndexError_(f"index {root}: {idf.name} does not match its sha256 in the manifest; "
                                  "the index is damaged. Rebuild it")
            seg_ids = json.loads(data.decode("utf-8"))
            if not isinstance(seg_ids, list) or len(seg_ids) != cnt:
                raise IndexError_(f"index {root}: {idf.name} does not list {cnt} ids; the index is damaged")
            arrays.append(arr)
            ids.extend(seg_ids)
        self._arrays = arrays
        self._ids = ids
        self._row_of: dict[str, int] | None = None
        self._concat: np.ndarray | None = None
        self._device_rows: dict[str, torch.Tensor] = {}
        self._streamed: dict[str, str] = {}
        self._host_f32: np.ndarray | None = None

    # ------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        return self._path

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> str:
        """'float32' or 'float16': how rows are stored (search always accumulates in float32)."""
        return self._dtype

    @property
    def bundle_fingerprint(self) -> str:
        return self._manifest["bundle_fingerprint"]

    @property
    def segments(self) -> int:
        return len(self._arrays)

    @property
    def ids(self) -> list[str]:
        """External ids in row order. The index's own list (no copy per call): do not modify it."""
        return self._ids

    @property
    def manifest(self) -> dict:
        """A copy of the committed manifest."""
        return json.loads(json.dumps(self._manifest))

    def __len__(self) -> int:
        return len(self._ids)

    def _ids_map(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {s: i for i, s in enumerate(self._ids)}
        return self._row_of

    def __contains__(self, id_: object) -> bool:
        return isinstance(id_, str) and id_ in self._ids_map()

    def row_of(self, id_: str) -> int:
        try:
            return self._ids_map()[id_]
        except (KeyError, TypeError):
            raise InputError(f"id {id_!r} is not in index {self._path}") from None

    def __repr__(self) -> str:
        return (f"Index({str(self._path)!r}, count={len(self)}, dim={self._dim}, dtype={self._dtype}, "
                f"segments={self.segments}, bundle={self.bundle_fingerprint[:12]})")

    # ------------------------------------------------------------ data
    def vectors(self) -> np.ndarray:
        """All rows [N, D] in the stored dtype.

        One segment: the segment itself (an np.memmap when opened with mmap=True). Several: one
        concatenated in-memory array, built on first use and kept until the next add or compact
        (call `compact()` to get back to a single mapped segment).
        """
        if len(self._arrays) == 1:
            return self._arrays[0]
        if self._concat is None:
            if not self._arrays:
                self._concat = np.empty((0, self._dim), dtype=self._dtype)
            else:
                self._concat = np.concatenate(self._arrays, axis=0)
        return self._concat

    def search(self, queries, k: int, *, device: str | torch.device | None = None,
               impl: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Exact first-stage search (SPEC 5): scores float32 [nq, k] descending, rows int64 [nq, k].

        queries: [nq, D] or [D] (treated as nq = 1), numpy or torch, finite. k > len(self) is
        clamped to len(self); k <= 0 and an empty index are InputErrors. `device`: where the
        product runs (default: where the queries are, CPU for numpy). On a non-CPU device the
        stored rows are uploaded once, in the stored dtype, and kept there until the next add
        or compact (`release_device()` frees them). `impl`: see search.topk_similarity.
        """
        scores, rows = self.search_tensor(queries, k, device=device, impl=impl)
        return scores.cpu().numpy(), rows.cpu().numpy()

    def search_tensor(self, queries, k: int, *, device: str | torch.device | None = None,
                      impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """`search` without the copy back: scores float32 and rows int64 [nq, k] as tensors on the
        device the product ran on (the engine's GPU path copies only its final top-k to the host)."""
        n = len(self)
        if n == 0:
            raise InputError(f"index {self._path} is empty: add descriptors first (sgengine index build)")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise InputError(f"k must be a positive integer, got {k!r}")
        q = self._check_queries(queries)
        if device is not None:
            q = q.to(device)
        db = self._host_rows() if q.device.type == "cpu" else self._on_device(q.device)
        return topk_similarity(q, db, min(int(k), n), impl=impl)

    def _host_rows(self) -> np.ndarray:
        """Rows for a CPU search. float16 rows up to HOST_FLOAT32_CACHE_BYTES as float32 are
        converted once and kept: converting them on every query cost 33 ms at 5,000 x 2048 (2-core
        EPYC), against ~1 ms for the product itself. Larger float16 indexes stream in chunks."""
        rows = self.vectors()
        if rows.dtype != np.float16 or rows.shape[0] * rows.shape[1] * 4 > HOST_FLOAT32_CACHE_BYTES:
            return rows
        if self._host_f32 is None:
            self._host_f32 = rows.astype(np.float32)
        return self._host_f32

    def _on_device(self, device: torch.device) -> torch.Tensor | np.ndarray:
        # Streaming a memmap to the GPU on every query would cost a full host->device copy of
        # the index per query; one resident copy is the whole point of searching there. An
        # index larger than the device's free memory (less headroom for the model and the
        # rerank) stays on the host and is streamed chunk by chunk by topk_similarity: slower,
        # but it runs, and residency() says so.
        key = _device_key(device)
        t = self._device_rows.get(key)
        if t is not None:
            return t
        if key in self._streamed:
            return self.vectors()
        rows = self.vectors()
        reason = device_room_shortfall(device, rows.nbytes)
        if reason is not None:
            self._streamed[key] = reason
            return rows
        t = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
        self._device_rows[key] = t
        return t

    def residency(self, device: str | torch.device) -> str:
        """Where `search(device=...)` reads the rows from: "host" (CPU), "resident" (one copy on the
        device), "streamed: <why>" (too large for the device), or "not loaded yet"."""
        device = torch.device(device)
        if device.type == "cpu":
            return "host"
        key = _device_key(device)
        if key in self._device_rows:
            return "resident"
        if key in self._streamed:
            return f"streamed: {self._streamed[key]}"
        return "not loaded yet"

    def preload(self, device: str | torch.device) -> str:
        """Upload the rows to `device` now (at Engine.load) instead of on the first query; returns residency()."""
        device = torch.device(device)
        if device.type != "cpu" and len(self):
            self._on_device(device)
        return self.residency(device)

    def release_device(self) -> None:
        """Drop the rows uploaded to accelerators by `search(..., device=...)`."""
        self._device_rows = {}
        self._streamed = {}

    def _check_queries(self, queries) -> torch.Tensor:
        if isinstance(queries, torch.Tensor):
            q = queries.detach()
        elif isinstance(queries, np.ndarray):
            q = torch.from_numpy(np.ascontiguousarray(queries))
        else:
            raise InputError(f"queries must be a numpy array or torch tensor [nq, {self._dim}], "
                             f"got {type(queries).__name__}")
        if not q.is_floating_point():
            raise InputError(f"queries must be floating point, got {q.dtype}")
        if q.ndim == 1:
            q = q.reshape(1, -1)
        if q.ndim != 2 or q.shape[1] != self._dim:
            raise InputError(f"queries must be [{self._dim}] or [nq, {self._dim}] for index {self._path}, "
                             f"got shape {list(queries.shape)}")
        q = q.to(torch.float32)
        bad = ~torch.isfinite(q).all(dim=1)
        if bool(bad.any()):
            raise InputError(f"query {int(bad.nonzero()[0, 0])} contains NaN or Inf")
        return q

    def gather(self, rows) -> np.ndarray:
        """Stored rows as float32: rows [nq, M] int -> [nq, M, D] (any shape S -> S + (D,))."""
        r = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        if not np.issubdtype(r.dtype, np.integer):
            raise InputError(f"rows must be integers, got {r.dtype}")
        n = len(self)
        if r.size and (r.min() < 0 or r.max() >= n):
            bad = r[(r < 0) | (r >= n)].ravel()[0]
            raise InputError(f"row {int(bad)} is out of range for index {self._path} with {n} rows")
        flat = np.take(self.vectors(), r.reshape(-1), axis=0)
        return np.asarray(flat, dtype=np.float32).reshape(r.shape + (self._dim,))

    def gather_tensor(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows as float32 on rows' device: rows [nq, M] int64 tensor -> [nq, M, D].

        On a device that holds the rows (see residency) this is one index_select there, with no
        host round trip; otherwise the rows come from the host copy and only they are moved."""
        if not isinstance(rows, torch.Tensor) or rows.is_floating_point() or rows.is_complex():
            raise InputError(f"rows must be an integer tensor, got {getattr(rows, 'dtype', type(rows).__name__)}")
        resident = self._device_rows.get(_device_key(rows.device)) if rows.device.type != "cpu" else None
        if resident is None:
            return torch.from_numpy(self.gather(rows)).to(rows.device)
        n = len(self)
        flat = rows.reshape(-1)
        if flat.numel() and bool(((flat < 0) | (flat >= n)).any()):
            bad = flat[(flat < 0) | (flat >= n)][0]
            raise InputError(f"row {int(bad)} is out of range for index {self._path} with {n} rows")
        return resident.index_select(0, flat).to(torch.float32).reshape(tuple(rows.shape) + (self._dim,))

    def verify(self) -> None:
        """Hash every segment file against the manifest (reads everything: for `index info`, not for queries)."""
        for seg in self._manifest["segments"]:
            for key, hkey in (("file", "sha256"), ("ids_file", "ids_sha256")):
                f = self._path / seg[key]
                if _sha256_file(f) != seg[hkey]:
                    raise IndexError_(f"index {self._path}: {f.name} does not match its sha256 in the manifest; "
                                      "the index is damaged. Rebuild it")

    # ------------------------------------------------------------ writing
    def add(self, descriptors, ids: Sequence[str]) -> None:
        """Append rows [n, D] with their ids as one new segment, committed atomically.

        Everything is checked before anything is written: D, finite values, unit L2 norm per
        row (|norm - 1| <= NORM_TOLERANCE; zero rows refused), one non-empty str id per row,
        ids unique and not already in the index. Rows are stored as the index dtype. n = 0 is
        a no-op.
        """
        x = self._check_rows(descriptors)
        ids = self._check_id_list(ids, x.shape[0])
        if x.shape[0] == 0:
            return
        with _writer_lock(self._path):
            self._refresh()
            self._check_new_ids(ids)
            self._clean_orphans()
            num = self._next_segment_number()
            stem = f"seg-{num:06d}"
            seg_dir = self._path / _SEGDIR
            npy = seg_dir / f"{stem}.npy"
            idf = seg_dir / f"{stem}.ids.json"
            stored = x.astype(self._dtype, copy=False)
            sha = _write_npy(npy, stored.shape, stored.dtype, [stored])
            ids_sha = _write_ids(idf, ids)
            _fsync_dir(seg_dir)
            _crash_point("after-segment")
            m = json.loads(json.dumps(self._manifest))
            m["segments"].append({"file": f"{_SEGDIR}/{npy.name}", "ids_file": f"{_SEGDIR}/{idf.name}",
                                  "count": int(x.shape[0]), "sha256": sha, "ids_sha256": ids_sha})
            m["count"] = int(m["count"]) + int(x.shape[0])
            m["generation"] = int(m["generation"]) + 1
            m["updated"] = _utcnow()
            _commit_manifest(self._path, m, crash_hook=True)
            _crash_point("after-manifest")
            self._manifest = m
            self._arrays.append(np.load(npy, mmap_mode="r" if self._mmap else None, allow_pickle=False))
            start = len(self._ids)
            self._ids.extend(ids)
            if self._row_of is not None:
                self._row_of.update((s, start + i) for i, s in enumerate(ids))
            self._concat = None
            self._device_rows = {}
            self._streamed = {}
            self._host_f32 = None

    def compact(self) -> None:
        """Merge all segments into one (streamed, committed like an add); old files are then deleted."""
        with _writer_lock(self._path):
            self._refresh()
            self._clean_orphans()
            if len(self._arrays) <= 1:
                return
            num = self._next_segment_number()
            seg_dir = self._path / _SEGDIR
            npy = seg_dir / f"seg-{num:06d}.npy"
            idf = seg_dir / f"seg-{num:06d}.ids.json"
            n = len(self._ids)
            sha = _write_npy(npy, (n, self._dim), np.dtype(self._dtype), self._arrays)
            ids_sha = _write_ids(idf, self._ids)
            _fsync_dir(seg_dir)
            m = json.loads(json.dumps(self._manifest))
            m["segments"] = [{"file": f"{_SEGDIR}/{npy.name}", "ids_file": f"{_SEGDIR}/{idf.name}",
                              "count": n, "sha256": sha, "ids_sha256": ids_sha}]
            m["generation"] = int(m["generation"]) + 1
            m["updated"] = _utcnow()
            _commit_manifest(self._path, m)
            self._load(m)
            self._clean_orphans()

    def _check_rows(self, descriptors) -> np.ndarray:
        if isinstance(descriptors, torch.Tensor):
            x = descriptors.detach().cpu().numpy()
        elif isinstance(descriptors, np.ndarray):
            x = descriptors
        else:
            raise InputError(f"descriptors must be a numpy array or torch tensor [n, {self._dim}], "
                             f"got {type(descriptors).__name__}")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"descriptors must be floating point, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self._dim:
            raise InputError(f"descriptors must be [n, {self._dim}] for index {self._path}, got shape {list(x.shape)}")
        step = 1 << 16  # float64 copies of a block at a time: 1M x 2048 rows at once would take ~36 GiB
        for s0 in range(0, x.shape[0], step):
            x64 = x[s0:s0 + step].astype(np.float64)
            finite = np.isfinite(x64).all(axis=1)
            if not finite.all():
                raise InputError(f"descriptor row {s0 + int(np.argmin(finite))} contains NaN or Inf: nothing was added")
            norms = np.sqrt((x64 * x64).sum(axis=1))
            zero = norms < 1e-12
            if zero.any():
                raise InputError(f"descriptor row {s0 + int(np.argmax(zero))} is all zeros: nothing was added")
            off = np.abs(norms - 1.0) > NORM_TOLERANCE
            if off.any():
                i = int(np.argmax(off))
                raise InputError(f"descriptor row {s0 + i} has L2 norm {norms[i]:.6g}; rows must be L2-normalized "
                                 f"(|norm - 1| <= {NORM_TOLERANCE}): nothing was added")
        return x

    @staticmethod
    def _check_id_list(ids: Sequence[str], n: int) -> list[str]:
        if isinstance(ids, (str, bytes)):
            raise InputError("ids must be a sequence of strings, one per row, not a single string")
        ids = list(ids)
        if len(ids) != n:
            raise InputError(f"got {n} descriptor rows but {len(ids)} ids: nothing was added")
        seen: set[str] = set()
        for i, s in enumerate(ids):
            if not isinstance(s, str) or not s:
                raise InputError(f"id at row {i} must be a non-empty string, got {s!r}: nothing was added")
            if s in seen:
                raise InputError(f"id {s!r} appears twice in this batch (row {i}): nothing was added")
            seen.add(s)
        return ids

    def _check_new_ids(self, ids: list[str]) -> None:
        have = self._ids_map()
        for i, s in enumerate(ids):
            if s in have:
                raise InputError(f"id {s!r} (row {i} of this batch) is already in index {self._path} "
                                 f"(row {have[s]}): nothing was added")

    def _refresh(self) -> None:
        """Under the writer lock: pick up commits made by other processes since we opened."""
        m = _read_manifest(self._path)
        if m["generation"] != self._manifest["generation"] or m["segments"] != self._manifest["segments"]:
            if m["bundle_fingerprint"] != self.bundle_fingerprint or m["dim"] != self._dim or m["dtype"] != self._dtype:
                raise IndexMismatchError(f"index {self._path} was replaced by another index since it was opened")
            self._load(m)

    def _next_segment_number(self) -> int:
        nums = [int(_SEG_RE.match(s["file"]).group(1)) for s in self._manifest["segments"]]
        return max(nums, default=-1) + 1

    def _clean_orphans(self) -> None:
        """Delete files under segments/ that the manifest does not list (left by a crashed add/compact)."""
        keep = {Path(s[k]).name for s in self._manifest["segments"] for k in ("file", "ids_file")}
        seg_dir = self._path / _SEGDIR
        for p in seg_dir.iterdir():
            if p.name not in keep and p.is_file():
                p.unlink(missing_ok=True)
        (self._path / _MANIFEST_TMP).unlink(missing_ok=True)


def _read_manifest(root: Path) -> dict:
    f = root / _MANIFEST
    if not root.is_dir():
        raise IndexError_(f"no index at {root}: the directory does not exist (build one: sgengine index build)")
    if not f.is_file():
        raise IndexError_(f"{root} is not an index: {_MANIFEST} is missing (build one: sgengine index build)")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexError_(f"index {root}: {_MANIFEST} is corrupt ({e}); restore it or rebuild the index") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise IndexError_(f"{f} is not an sgengine index manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    v = m.get("format_version")
    if v != FORMAT_VERSION:
        raise IndexError_(f"index {root} has format_version {v!r}; this sgengine reads version {FORMAT_VERSION}"
                          + (": upgrade sgengine" if isinstance(v, int) and v > FORMAT_VERSION else ""))
    try:
        ok = (isinstance(m["bundle_fingerprint"], str) and isinstance(m["dim"], int) and m["dim"] > 0
              and m["dtype"] in DTYPES and isinstance(m["count"], int) and isinstance(m["generation"], int)
              and isinstance(m["segments"], list))
        if ok:
            for s in m["segments"]:
                ok = ok and (isinstance(s, dict) and isinstance(s.get("file"), str) and _SEG_RE.match(s["file"])
                             and s.get("ids_file") == s["file"][:-4] + ".ids.json"
                             and isinstance(s.get("count"), int) and s["count"] > 0
                             and isinstance(s.get("sha256"), str) and isinstance(s.get("ids_sha256"), str))
        ok = ok and sum(s["count"] for s in m["segments"]) == m["count"]
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise IndexError_(f"index {root}: {_MANIFEST} is corrupt (missing or inconsistent fields); "
                          "restore it or rebuild the index")
    return m


def _commit_manifest(root: Path, manifest: dict, *, crash_hook: bool = False) -> None:
    tmp = root / _MANIFEST_TMP
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if crash_hook:
        _crash_point("before-manifest")
    os.replace(tmp, root / _MANIFEST)
    _fsync_dir(root)
