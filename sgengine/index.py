"""The persisted index: descriptors, their external ids, and the bundle that made them.

Storage only: searching the rows, and keeping copies of them on a device, is the first stage's
job (sgengine.search).

Directory layout (format "sgengine-index", format_version 1)::

    index/
      manifest.json              the commit record: the only file that says what the index holds
      index.lock                 advisory lock taken by writers (add, compact, ANN commits); absent until one runs
      segments/
        seg-000000.npy           descriptor rows of one append, [count, dim], float32 or float16,
                                 plain .npy (memory-mapped on open)
        seg-000000.ids.json      the external string ids of those rows, in row order (a JSON list)
        seg-000001.npy ...
      ann/                       optional: the approximate first stage (sgengine.search.ann)
        ann-000009.faiss         faiss.write_index's bytes; the number is the generation that installed it
                                 (then the probe's, when it has one: sgengine.search.ann, "The probe")
        ann-000009.json          its sidecar: what it is and which index and revision it belongs to

manifest.json::

    {"format": "sgengine-index", "format_version": 1,
     "uid": "<32 hex>",                    # random, fixed at create: names this index in ANN sidecars
     "bundle_fingerprint": "<hex>", "dim": 2048, "dtype": "float32", "count": 1234,
     "generation": 7,                      # +1 per commit
     "created": "<UTC ISO 8601>", "updated": "<UTC ISO 8601>",
     "segments": [{"file": "segments/seg-000000.npy", "ids_file": "segments/seg-000000.ids.json",
                   "count": 64, "sha256": "<of the .npy>", "ids_sha256": "<of the ids file>"}, ...],
     "ann": {"file": "ann/ann-000009.faiss", "meta_file": "ann/ann-000009.json",   # optional
             "sha256": "<of the .faiss>", "meta_sha256": "<of the sidecar>", "bytes": 123456,
             "count": 1200, "generation": 9, "factory": "IVF256,SQ8"}}

Rows are numbered in manifest order: segment 0's rows first, then segment 1's, and so on. Rows
are only ever appended, and compaction keeps their order, so a row's number never changes.

The ANN record. "count" is how many rows the ANN covers: rows 0..count-1. The ANN is *fresh*
when count equals the index's count and *stale* otherwise (`ann_state()`): `add` carries the
record over unchanged, so the commit that appends rows is the commit that makes the ANN stale,
and a writer that knows nothing of ANNs (an older sgengine) cannot make a stale one look fresh.
This module records, hashes and verifies the ANN's two files and opens nothing FAISS-specific;
sgengine.search.ann builds, updates and searches them. The sidecar repeats the index's uid, bundle
fingerprint and dim, and the generation, count, sha256 and size of its .faiss file:
`ann_meta()` / `read_ann()` refuse a file whose sidecar names another index or another revision
(IndexMismatchError) and one whose bytes do not match the manifest (IndexError_), before a byte
of it is parsed. `commit_ann` installs a new ANN like an add: both files under new names, then the
manifest; the previous ANN's files are deleted only after that commit.

Commit protocol. `add` writes the new segment's two files under temporary names, fsyncs them,
renames them into place, fsyncs `segments/`, then writes `manifest.json.tmp`, fsyncs it and
`os.replace`s it over `manifest.json` (atomic on POSIX), then fsyncs the directory. Only the
last rename commits. A crash anywhere before it leaves the committed manifest, and so every
committed row, untouched; the files it had written are not listed in the manifest, are
ignored on open, and are deleted by the next `add` or `compact`. Writers hold an exclusive
`flock` on `index.lock`, and re-read the manifest under it, so two processes appending to one
index serialize instead of overwriting each other's commit. Readers take no lock: they see
either the old manifest or the new one.

`create` takes the same lock, so processes creating one index at once make exactly one: with
exist_ok=False the others get IndexError_ ("already holds an index"), with exist_ok=True they
open the one that won (same bundle, dim and dtype, else IndexMismatchError).

Checks on open (cheap: no descriptor byte is read). Every segment's .npy header (dtype, shape)
and its file size, which must be exactly the header plus the manifest's rows, so a truncated or
extended file is refused; the ids files' sha256 (they are read anyway); and the ids themselves:
one non-empty string per row, unique across the index. The descriptor files' sha256 is checked
only by `verify()` (`sgengine index verify`, `Index.open(..., verify=True)`), because hashing
gigabytes on every open would defeat mmap; `problems()` lists what a cheap look finds
(`sgengine index info`).

Snapshots. sgengine never writes into a committed segment: appends and compactions write new
files under new names and only the manifest is replaced, so an open Index (and an Engine over it)
serves the rows it opened, whatever later commits do; a compaction's deleted files stay readable
through the maps that hold them. Another program writing into a mapped segment is another
matter: truncating it would make the next read of a lost page kill the process with SIGBUS, and
rewriting it would silently change the rows. So each read of mapped rows (the first stage's scan
and gather, `vectors`, `gather`, `iter_rows`) first calls `check_unchanged()`, a stat per segment
(microseconds), and raises IndexError_ if a file this Index maps changed size or modification
time since it was mapped. A truncation that lands during a scan itself can still fault: no
mapping of a file survives that, short of copying the index into memory (`mmap=False`).

Test hook: the environment variable SGENGINE_INDEX_CRASH_AT, read only inside `add` and
`commit_ann`, makes the process `os._exit(77)` at one point of the commit: "after-segment"
(segment files renamed into place, manifest untouched), "before-manifest" (manifest.json.tmp
written and fsynced, not yet renamed) or "after-manifest" (committed); for an ANN commit
"ann-mid-file" (the .faiss temporary file partly written), "ann-after-file" (.faiss renamed into
place, no sidecar), "ann-before-manifest" and "ann-after-manifest". tests/test_index.py and
tests/test_ann.py use it to crash a real child process mid-commit.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from ._checks import check_choice, check_int
from ._io import display_path, os_error_text, sha256_file, write_bytes_atomic, write_json_atomic, write_stream_atomic
from .errors import IndexError_, IndexMismatchError, InputError

__all__ = ["Index", "FORMAT", "FORMAT_VERSION", "NORM_TOLERANCE", "ANN_FORMAT", "ANN_FORMAT_VERSION"]

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
_SEG_RE = re.compile(r"^segments/seg-(\d{6,})\.npy$")
_ANNDIR = "ann"
_ANN_RE = re.compile(r"^ann/ann-(\d{6,})\.faiss$")
ANN_FORMAT = "sgengine-ann"
ANN_FORMAT_VERSION = 1
_CRASH_ENV = "SGENGINE_INDEX_CRASH_AT"
_CRASH_POINTS = ("after-segment", "before-manifest", "after-manifest",
                 "ann-mid-file", "ann-after-file", "ann-before-manifest", "ann-after-manifest")
_T = TypeVar("_T")
_REVISIONS = itertools.count(1)  # Index.revision: unique in the process, so no two loads share one


def _utcnow() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _crash_point(where: str) -> None:
    if os.environ.get(_CRASH_ENV) == where:
        os._exit(77)


def _write_npy(final: Path, shape: tuple[int, int], dtype: np.dtype, blocks: Iterable[np.ndarray]) -> str:
    """Stream row blocks into one .npy (never holding the whole array); return its sha256."""
    def write(w) -> None:
        np.lib.format.write_array_header_1_0(
            w, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        for b in blocks:
            w.write(np.ascontiguousarray(b, dtype=dtype).tobytes())
    return write_stream_atomic(final, write)


class _CrashAfterFirstWrite:
    """A stream that dies after its first write: the "ann-mid-file" crash point."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, b) -> int:
        n = self._stream.write(b)
        _crash_point("ann-mid-file")
        return n


def _write_ids(final: Path, ids: Sequence[str]) -> str:
    return write_bytes_atomic(final, json.dumps(list(ids), ensure_ascii=False).encode("utf-8"))


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


def _fs_errors(fn: Callable) -> Callable:
    """For public entry points: an OSError from the file system (a permission, a name too long, a
    full disk) becomes IndexError_ naming the index, the file and the reason."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            owner = args[0]
            root = owner._path if isinstance(owner, Index) else (args[1] if len(args) > 1 else kwargs.get("path"))
            raise IndexError_(f"index {display_path(root)}: {os_error_text(e)}") from e
    return wrapper


_FIX = "The index is damaged: rebuild it (sgengine index build), or restore it from a copy"


def _damaged(root: Path, what: str) -> IndexError_:
    return IndexError_(f"index {root}: {what}. {_FIX}")


def _segment_offset(f: BinaryIO, name: str, root: Path, count: int, dim: int, dtype: np.dtype) -> int:
    """Where the rows of an open .npy segment start, after checking its header against the
    manifest's [count, dim] dtype and its size against exactly the bytes those rows need."""
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran, dt = read(f)
    except (ValueError, KeyError, SyntaxError, TypeError, EOFError) as e:
        raise _damaged(root, f"segment {name} is not a readable .npy file ({e})") from e
    if tuple(shape) != (count, dim) or dt != dtype or fortran:
        raise _damaged(root, f"segment {name} holds {dt} {list(shape)}"
                       f"{' (Fortran order)' if fortran else ''}, the manifest says {dtype} [{count}, {dim}]")
    offset = f.tell()
    size, need = os.fstat(f.fileno()).st_size, offset + count * dim * dtype.itemsize
    if size != need:
        raise _damaged(root, f"segment {name} has {size:,} bytes, its {count} rows need {need:,} "
                       f"({'truncated' if size < need else 'bytes appended'})")
    return offset


@dataclass(frozen=True)
class _Mapped:
    """A mapped segment file as it was when mapped: how `check_unchanged` recognizes a change."""
    path: Path
    dev: int
    ino: int
    size: int
    mtime_ns: int

    def change(self) -> str | None:
        """How the file at `path` differs from what was mapped (None: unchanged, or no longer
        ours: deleted or replaced by a compaction, while the map keeps the bytes it had)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):
            return None
        if st.st_size != self.size:
            return f"{self.path.name} is now {st.st_size:,} bytes, it was {self.size:,} when mapped"
        if st.st_mtime_ns != self.mtime_ns:
            return f"{self.path.name} was written to after it was mapped (same size, new modification time)"
        return None


def _map_segment(root: Path, npy: Path, count: int, dim: int, dtype: np.dtype, mmap: bool
                 ) -> tuple[np.ndarray, _Mapped | None]:
    """The rows of one segment, checked (`_segment_offset`): a read-only memory map (and what the
    file was like when mapped), or with mmap=False a copy in memory."""
    with open(npy, "rb") as f:
        offset = _segment_offset(f, npy.name, root, count, dim, dtype)
        if not mmap:
            arr = np.fromfile(f, dtype=dtype, count=count * dim)
            if arr.size != count * dim:
                raise _damaged(root, f"segment {npy.name} ended while it was read")
            return arr.reshape(count, dim), None
        st = os.fstat(f.fileno())
        arr = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=(count, dim))
    return arr, _Mapped(npy, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _parse_ids(root: Path, name: str, data: bytes, count: int) -> list:
    try:
        ids = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _damaged(root, f"{name} is not a JSON list of ids ({e})") from e
    if not isinstance(ids, list) or len(ids) != count:
        raise _damaged(root, f"{name} does not list {count} ids")
    return ids


def _reason(e: IndexError_, root: Path) -> str:
    """An IndexError_'s message without the "index ROOT: " prefix and the generic advice."""
    msg = str(e)
    prefix = f"index {root}: "
    msg = msg[len(prefix):] if msg.startswith(prefix) else msg
    return msg.removesuffix(f". {_FIX}")


def _row_of(root: Path, ids: list, starts: Sequence[int], names: Sequence[str]) -> dict[str, int]:
    """id -> row for stored ids, after checking they are one non-empty string per row, each once
    (IndexError_ naming the row and the ids file holding it; segment j holds rows starts[j]..)."""
    def where(row: int) -> str:
        j = int(np.searchsorted(np.asarray(starts), row, side="right")) - 1
        return f"row {row} ({names[j]})"

    if set(map(type, ids)) - {str}:
        row = next(i for i, s in enumerate(ids) if type(s) is not str)
        raise _damaged(root, f"the id of {where(row)} is {ids[row]!r}, not a string")
    row_of = dict(zip(ids, range(len(ids))))
    if "" in row_of:
        raise _damaged(root, f"the id of {where(ids.index(''))} is empty")
    if len(row_of) != len(ids):
        first: dict[str, int] = {}
        for i, s in enumerate(ids):
            if first.setdefault(s, i) != i:
                raise _damaged(root, f"id {s!r} is stored twice, at {where(first[s])} and {where(i)}")
    return row_of


def _check_creatable(root: Path) -> None:
    """Refuse to create an index at root unless it is a new or empty directory (IndexError_)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise IndexError_(f"{root} exists and is not a directory: choose another index path")
    # An interrupted create leaves at most an empty segments/, a manifest temp file and the lock;
    # a manifest that appeared since the caller looked is a concurrent create that won (the
    # caller's check under the lock finds it).
    leftovers = {p.name for p in root.iterdir()} - {_SEGDIR, _MANIFEST_TMP, _LOCK, _MANIFEST}
    seg = root / _SEGDIR
    if leftovers or (seg.is_dir() and any(seg.iterdir())):
        raise IndexError_(f"{root} is not empty and holds no index ({_MANIFEST} missing): "
                          "choose an empty or new directory")


class Index:
    """An append-only set of unit-norm descriptors with string ids, stored as described above.

    Build with `Index.create` or `Index.open`. Rows are numbered 0..len-1 in insertion order;
    the first stage (sgengine.search) returns those row numbers, `ids[row]` the external id.
    """

    # ------------------------------------------------------------ construction
    def __init__(self, path: Path, manifest: dict, *, mmap: bool) -> None:
        self._path = path
        self._mmap = mmap
        self._load(manifest)

    @classmethod
    @_fs_errors
    def create(cls, path: str | os.PathLike, *, dim: int, bundle_fingerprint: str, dtype: str = "float32",
               exist_ok: bool = False) -> "Index":
        """Make an empty index at `path` (a new or empty directory).

        With exist_ok=True an index already there is opened instead, provided it has the same
        bundle fingerprint, dim and dtype (IndexMismatchError otherwise). Processes creating one
        index at once serialize on the writer lock: one creates it, the others find it there and
        get IndexError_ ("already holds an index"), or with exist_ok=True open it.
        """
        root = Path(path)
        dim = check_int(dim, f"index {root}: dim", 1)
        check_choice(dtype, f"index {root}: dtype", DTYPES)
        if not isinstance(bundle_fingerprint, str) or not bundle_fingerprint:
            raise InputError(f"index {root}: bundle_fingerprint must be a non-empty string")
        # Refusals come before the first write (the lock file), so a refused create writes nothing.
        if (root / _MANIFEST).exists():
            return cls._existing(root, dim, bundle_fingerprint, dtype, exist_ok)
        _check_creatable(root)
        root.mkdir(parents=True, exist_ok=True)
        with _writer_lock(root):
            if (root / _MANIFEST).exists():  # another process created it meanwhile
                return cls._existing(root, dim, bundle_fingerprint, dtype, exist_ok)
            _check_creatable(root)
            (root / _SEGDIR).mkdir(exist_ok=True)
            now = _utcnow()
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "uid": secrets.token_hex(16),
                        "bundle_fingerprint": bundle_fingerprint, "dim": int(dim), "dtype": dtype,
                        "count": 0, "generation": 0, "created": now, "updated": now, "segments": []}
            _commit_manifest(root, manifest)
        return cls(root, manifest, mmap=True)

    @classmethod
    def _existing(cls, root: Path, dim: int, bundle_fingerprint: str, dtype: str, exist_ok: bool) -> "Index":
        """create() found an index at root: open it when exist_ok and it matches, else refuse."""
        if not exist_ok:
            raise IndexError_(f"{root} already holds an index: use Index.open({str(root)!r}), "
                              "or Index.create(..., exist_ok=True)")
        idx = cls.open(root, bundle_fingerprint=bundle_fingerprint)
        if idx.dim != dim or idx.dtype != dtype:
            raise IndexMismatchError(f"index {root} holds {idx.dim}-d {idx.dtype} descriptors, not {dim}-d {dtype}: "
                                     "use another directory")
        return idx

    @classmethod
    @_fs_errors
    def open(cls, path: str | os.PathLike, *, bundle_fingerprint: str | None = None, mmap: bool = True,
             verify: bool = False) -> "Index":
        """Open an index; with `bundle_fingerprint`, refuse one built by another bundle.

        mmap=True maps the descriptor segments instead of reading them (the OS pages in what a
        search touches); mmap=False reads them into memory. The cheap checks of the module
        docstring always run (IndexError_ names what is wrong); verify=True also runs `verify()`,
        which reads and hashes every file (the cost is in its docstring).
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
                idx = cls(root, manifest, mmap=mmap)
            except FileNotFoundError as e:
                last = e
                try:
                    if _read_manifest(root)["generation"] != manifest["generation"]:
                        continue
                except IndexError_:
                    pass
                break
            if verify:
                idx.verify()
            return idx
        raise _damaged(root, f"{Path(last.filename).name} is missing (listed in the manifest)")

    def _load(self, manifest: dict) -> None:
        root = self._path
        self._manifest = manifest
        self._dim = int(manifest["dim"])
        self._dtype = str(manifest["dtype"])
        np_dtype = np.dtype(self._dtype)
        arrays: list[np.ndarray] = []
        mapped: list[_Mapped] = []
        ids: list = []
        starts: list[int] = []
        for seg in manifest["segments"]:
            npy, idf, cnt = root / seg["file"], root / seg["ids_file"], int(seg["count"])
            arr, m = _map_segment(root, npy, cnt, self._dim, np_dtype, self._mmap)
            data = idf.read_bytes()
            if hashlib.sha256(data).hexdigest() != seg["ids_sha256"]:
                raise _damaged(root, f"{idf.name} does not match its sha256 in the manifest")
            starts.append(len(ids))
            ids.extend(_parse_ids(root, idf.name, data, cnt))
            arrays.append(arr)
            if m is not None:
                mapped.append(m)
        row_of = _row_of(root, ids, starts, [Path(s["ids_file"]).name for s in manifest["segments"]])
        self._arrays = arrays
        self._mapped = mapped
        self._ids = ids
        self._row_of: dict[str, int] | None = row_of
        self._concat: np.ndarray | None = None
        self._revision = next(_REVISIONS)

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
    def revision(self) -> int:
        """Changes whenever the rows this object serves change (add, compact, a reload of another
        process's commit); unique within the process. Copies of the rows kept elsewhere (the
        first stage's device and host copies) are valid while it is unchanged."""
        return self._revision

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

    @property
    def uid(self) -> str | None:
        """The random id fixed when the index was created (None for an index made before uids,
        until its first ANN commit gives it one)."""
        return self._manifest.get("uid")

    @property
    def ann(self) -> dict | None:
        """A copy of the manifest's ANN record (module docstring), or None when there is no ANN."""
        rec = self._manifest.get("ann")
        return None if rec is None else dict(rec)

    def ann_state(self) -> str:
        """"absent", "fresh" (the ANN covers every row) or "stale" (rows were added after it was
        built or last updated: it covers only the first `ann["count"]`)."""
        rec = self._manifest.get("ann")
        if rec is None:
            return "absent"
        return "fresh" if rec["count"] == len(self._ids) else "stale"

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
    def segment_arrays(self) -> list[np.ndarray]:
        """The stored segments [n_i, D] in row order, as this Index holds them (read-only memory
        maps when opened with mmap=True): nothing is read or concatenated. A map stays valid after
        another process's compaction deletes its file (the mapping keeps the data)."""
        self.check_unchanged()
        return list(self._arrays)

    def vectors(self) -> np.ndarray:
        """All rows [N, D] in the stored dtype.

        One segment: the segment itself (an np.memmap when opened with mmap=True). Several: one
        concatenated in-memory array, built on first use and kept until the next add or compact
        (call `compact()` to get back to a single mapped segment).
        """
        self.check_unchanged()
        if len(self._arrays) == 1:
            return self._arrays[0]
        if self._concat is None:
            if not self._arrays:
                self._concat = np.empty((0, self._dim), dtype=self._dtype)
            else:
                self._concat = np.concatenate(self._arrays, axis=0)
        return self._concat

    def gather(self, rows) -> np.ndarray:
        """Stored rows as float32: rows [nq, M] int -> [nq, M, D] (any shape S -> S + (D,))."""
        r = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        if not np.issubdtype(r.dtype, np.integer):
            raise InputError(f"rows must be integers, got {r.dtype}")
        n = len(self)
        if r.size and (r.min() < 0 or r.max() >= n):
            bad = r[(r < 0) | (r >= n)].ravel()[0]
            raise InputError(f"row {int(bad)} is out of range for index {self._path} with {n} rows")
        flat = r.reshape(-1)
        self.check_unchanged()
        if len(self._arrays) <= 1 or self._concat is not None:
            out = np.take(self.vectors(), flat, axis=0)
        else:  # straight from each segment: concatenating them all for a few rows would copy the index
            out = np.empty((flat.size, self._dim), dtype=self._dtype)
            offsets = self._offsets()
            seg = np.searchsorted(offsets, flat, side="right") - 1
            for s in np.unique(seg):
                pick = seg == s
                out[pick] = np.take(self._arrays[s], flat[pick] - offsets[s], axis=0)
        return np.asarray(out, dtype=np.float32).reshape(r.shape + (self._dim,))

    def _offsets(self) -> np.ndarray:
        """First row of each segment."""
        return np.cumsum([0] + [len(a) for a in self._arrays[:-1]]) if self._arrays else np.zeros(0, np.int64)

    def iter_rows(self, start: int = 0, stop: int | None = None, *, block_rows: int = 1 << 16
                  ) -> Iterator[tuple[int, np.ndarray]]:
        """Rows start..stop-1 as (first row, float32 block [<= block_rows, D]) in row order, read
        segment by segment (nothing is concatenated), for passes over a large index."""
        n = len(self._ids)
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise InputError(f"rows {start}..{stop} are out of range for index {self._path} with {n} rows")
        block_rows = check_int(block_rows, "block_rows", 1)
        base = 0
        for arr in self._arrays:
            lo, hi = max(start, base), min(stop, base + len(arr))
            for a in range(lo, hi, block_rows):
                self.check_unchanged()
                b = min(a + block_rows, hi)
                yield a, np.asarray(arr[a - base:b - base], dtype=np.float32)
            base += len(arr)

    @_fs_errors
    def check_unchanged(self) -> None:
        """Raise IndexError_ if a segment file this Index maps was truncated, extended or written
        to since it was mapped (module docstring: Snapshots). One stat per segment."""
        changed = [c for c in (m.change() for m in self._mapped) if c]
        if changed:
            raise IndexError_(
                f"index {self._path}: a segment changed on disk under this open index ({'; '.join(changed)}). "
                "sgengine never writes into a committed segment, so another program did; reading it could "
                f"return wrong rows or crash. Check it (sgengine index verify {self._path}), then open it again")

    @_fs_errors
    def problems(self, *, full: bool = False) -> list[str]:
        """What is wrong with the index on disk, one sentence per problem naming its file ([]: none).

        full=False (`sgengine index info`; a stat and a header read per file): the segments this
        Index maps are unchanged, every listed file is there, each .npy header and size fit the
        manifest, and the ANN's sidecar and file size match it. full=True (`verify`) also reads
        everything: the sha256 of every file, and the ids again (counts, non-empty strings,
        unique across the index).
        """
        return [msg for msg, _ in self._row_problems(full) + self._ann_problems(full)]

    def _row_problems(self, full: bool) -> list[tuple[str, type]]:
        """problems() of the segments and ids, each with the error type it would raise alone."""
        root, out = self._path, []
        out += [(f"changed under this open index: {c}", IndexError_) for c in (m.change() for m in self._mapped) if c]
        dtype = np.dtype(self._dtype)
        ids: list = []
        starts: list[int] = []
        names: list[str] = []
        for seg in self._manifest["segments"]:
            npy, idf, cnt = root / seg["file"], root / seg["ids_file"], int(seg["count"])
            missing = [f.name for f in (npy, idf) if not f.is_file()]
            if missing:
                out += [(f"{name} is missing", IndexError_) for name in missing]
                continue
            try:
                with open(npy, "rb") as f:
                    _segment_offset(f, npy.name, root, cnt, self._dim, dtype)
                if full:
                    if sha256_file(npy) != seg["sha256"]:
                        out.append((f"{npy.name} does not match its sha256 in the manifest (its rows were edited)",
                                    IndexError_))
                    data = idf.read_bytes()
                    if hashlib.sha256(data).hexdigest() != seg["ids_sha256"]:
                        out.append((f"{idf.name} does not match its sha256 in the manifest", IndexError_))
                    starts.append(len(ids))
                    names.append(idf.name)
                    ids.extend(_parse_ids(root, idf.name, data, cnt))
            except IndexError_ as e:
                out.append((_reason(e, root), type(e)))
        if full:
            try:
                _row_of(root, ids, starts, names)
            except IndexError_ as e:
                out.append((_reason(e, root), type(e)))
        return out

    def _ann_problems(self, full: bool) -> list[tuple[str, type]]:
        """problems() of the ANN's files (each names its own fix), with the error type: IndexMismatchError
        for an ANN of another index or revision."""
        if "ann" not in self._manifest:
            return []
        try:
            if full:
                self._verified_ann_file()
                return []
            self.ann_meta()
            rec = self._manifest["ann"]
            f = self._path / rec["file"]
            size = f.stat().st_size if f.is_file() else None
            if size == rec["bytes"]:
                return []
            return [(f"the ANN file {rec['file']} is "
                     + ("missing" if size is None else f"{size:,} bytes, the manifest says {rec['bytes']:,}")
                     + f"; {self._ann_fix()}", IndexError_)]
        except IndexError_ as e:
            return [(_reason(e, self._path), type(e))]

    def verify(self) -> dict:
        """Check everything against the manifest by reading it all (`problems(full=True)`):
        raises naming every problem found (IndexMismatchError when each is an ANN of another
        index or revision, else IndexError_), else returns {"rows", "files", "bytes", "seconds"}.

        Cost: one sha256 pass over every file: 1.5-1.8 s per GB read from the page cache on a
        2-core AMD EPYC VM (sha256 itself ~1 s/GB there), or the disk's read time when the files
        are not cached; a 1 GB index (131k 2048-d float32 rows) takes ~1.8 s, against 0.08 s for
        the cheap checks of `open`. For `sgengine index verify` and `Index.open(..., verify=True)`,
        not per query.
        """
        t0 = time.perf_counter()
        rows, anns = self._row_problems(True), self._ann_problems(True)
        found = rows + anns
        if found:
            cls = IndexMismatchError if all(t is IndexMismatchError for _, t in found) else IndexError_
            listed = found[0][0] if len(found) == 1 else " ".join(f"({i}) {m}" for i, (m, _) in enumerate(found, 1))
            raise cls(f"index {self._path} has {len(found)} problem(s): {listed}" + (f". {_FIX}" if rows else ""))
        files = [self._path / s[k] for s in self._manifest["segments"] for k in ("file", "ids_file")]
        if "ann" in self._manifest:
            files += [self._path / self._manifest["ann"][k] for k in ("file", "meta_file")]
        return {"rows": len(self._ids), "files": len(files), "bytes": sum(f.stat().st_size for f in files),
                "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------ the ANN's files
    def _ann_fix(self) -> str:
        return (f"rebuild it (sgengine index ann {self._path}), drop it (sgengine index ann {self._path} --drop), "
                "or search without it (ann='off')")

    def _ann_moved_on(self, rec: dict) -> str:
        """A hint when another process has committed another ANN since this object read the manifest."""
        try:
            now = _read_manifest(self._path).get("ann")
        except IndexError_:
            return ""
        return "" if now == rec else " (the manifest on disk now lists another ANN: reopen the index)"

    @_fs_errors
    def ann_meta(self) -> dict:
        """The ANN's sidecar, checked against the manifest (module docstring): IndexMismatchError
        for a sidecar of another index or another revision of this one, IndexError_ for a missing
        or damaged one, InputError when the index has no ANN. Cheap: reads the sidecar only."""
        rec = self._manifest.get("ann")
        if rec is None:
            raise InputError(f"index {self._path} has no ANN: build one with sgengine index ann {self._path}")
        f = self._path / rec["meta_file"]
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            raise IndexError_(f"index {self._path}: the ANN's sidecar {rec['meta_file']} is missing"
                              f"{self._ann_moved_on(rec)}; {self._ann_fix()}") from None
        try:
            meta = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != ANN_FORMAT:
            raise IndexError_(f"index {self._path}: {rec['meta_file']} is not an sgengine ANN sidecar; "
                              f"{self._ann_fix()}")
        theirs = (meta.get("index_uid"), meta.get("bundle_fingerprint"), meta.get("dim"))
        ours = (self._manifest.get("uid"), self.bundle_fingerprint, self._dim)
        if theirs != ours:
            raise IndexMismatchError(
                f"index {self._path}: the ANN in {rec['meta_file']} belongs to another index (index uid "
                f"{str(theirs[0])[:12]}, bundle {str(theirs[1])[:12]}, dim {theirs[2]}; this index is uid "
                f"{str(ours[0])[:12]}, bundle {ours[1][:12]}, dim {ours[2]}); {self._ann_fix()}")
        theirs = (meta.get("generation"), meta.get("count"), meta.get("sha256"), meta.get("bytes"))
        ours = (rec["generation"], rec["count"], rec["sha256"], rec["bytes"])
        if theirs != ours:
            raise IndexMismatchError(
                f"index {self._path}: {rec['meta_file']} describes another revision of this index's ANN "
                f"(generation {theirs[0]}, {theirs[1]} rows; the manifest lists generation {ours[0]}, "
                f"{ours[1]} rows){self._ann_moved_on(rec)}; {self._ann_fix()}")
        if hashlib.sha256(data).hexdigest() != rec["meta_sha256"]:
            raise IndexError_(f"index {self._path}: {rec['meta_file']} does not match its sha256 in the manifest; "
                              f"the ANN is damaged: {self._ann_fix()}")
        return meta

    def _verified_ann_file(self) -> tuple[Path, dict]:
        meta = self.ann_meta()
        rec = self._manifest["ann"]
        f = self._path / rec["file"]
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise IndexError_(f"index {self._path}: the ANN file {rec['file']} is missing{self._ann_moved_on(rec)}; "
                              f"{self._ann_fix()}") from None
        if size != rec["bytes"] or sha256_file(f) != rec["sha256"]:
            raise IndexError_(f"index {self._path}: {rec['file']} does not match its size and sha256 in the manifest "
                              f"(an ANN of another index copied in, or a damaged file); {self._ann_fix()}")
        return f, meta

    @_fs_errors
    def read_ann(self, read: Callable[[Callable[[int], bytes]], _T]) -> tuple[_T, dict]:
        """Verify the ANN (its sidecar as `ann_meta` does, then its file's size and sha256), then
        return (read(readinto), sidecar), where `readinto(n)` gives the file's next <= n bytes.

        The whole file is hashed before `read` sees a byte: a parser handed a foreign or corrupt
        file can allocate whatever a garbled header asks for, or crash. The second read comes from
        the page cache; files are never rewritten in place (writers use new names), so the bytes
        hashed are the bytes read.
        """
        f, meta = self._verified_ann_file()
        with open(f, "rb") as fh:
            return read(fh.read), meta

    @_fs_errors
    def commit_ann(self, prepare: Callable[["Index"], tuple[Callable[[Any], None], dict, int]]) -> dict:
        """Install a new ANN, committed like an add (module docstring); returns its manifest record.

        Under the writer lock, after picking up other writers' commits, `prepare(self)` returns
        (write, fields, count): `write(stream)` streams the .faiss file's bytes to `stream.write`,
        `fields` go into the sidecar beside the ones this method fills in (index uid, bundle, dim,
        generation, count, sha256, bytes); they are read after `write` returns, so `write` may
        complete them with what only writing tells (where a second part of the file starts), and `count` is how many rows the ANN covers (rows
        0..count-1, 1 <= count <= len(self); the index may have grown since the caller last looked:
        `prepare` is where to catch up). A crash at any point leaves the committed manifest, the
        rows and the previous ANN untouched; the files written so far are orphans that the next
        writer deletes.
        """
        with _writer_lock(self._path):
            self._refresh()
            self._clean_orphans()
            write, fields, count = prepare(self)
            count = check_int(count, "ANN row count", 1)
            if count > len(self._ids):
                raise InputError(f"an ANN of {count} rows cannot belong to index {self._path} of {len(self._ids)} rows")
            m = json.loads(json.dumps(self._manifest))
            m["generation"] = gen = int(m["generation"]) + 1
            m["updated"] = _utcnow()
            m.setdefault("uid", secrets.token_hex(16))
            ann_dir = self._path / _ANNDIR
            ann_dir.mkdir(exist_ok=True)
            f = ann_dir / f"ann-{gen:06d}.faiss"
            mf = ann_dir / f"ann-{gen:06d}.json"
            wrap = ((lambda w: write(_CrashAfterFirstWrite(w))) if os.environ.get(_CRASH_ENV) == "ann-mid-file"
                    else write)
            sha = write_stream_atomic(f, wrap)
            _crash_point("ann-after-file")
            size = f.stat().st_size
            meta = {"format": ANN_FORMAT, "format_version": ANN_FORMAT_VERSION, **fields,
                    "index_uid": m["uid"], "bundle_fingerprint": m["bundle_fingerprint"], "dim": self._dim,
                    "index_dtype": self._dtype, "generation": gen, "count": count, "file": f.name,
                    "sha256": sha, "bytes": size, "committed": m["updated"]}
            meta_sha = write_json_atomic(mf, meta)
            m["ann"] = {"file": f"{_ANNDIR}/{f.name}", "meta_file": f"{_ANNDIR}/{mf.name}", "sha256": sha,
                        "meta_sha256": meta_sha, "bytes": size, "count": count, "generation": gen,
                        "factory": str(fields.get("factory", ""))}
            _commit_manifest(self._path, m, crash_at="ann-before-manifest")
            _crash_point("ann-after-manifest")
            self._manifest = m
            self._clean_orphans()
            return dict(m["ann"])

    @_fs_errors
    def drop_ann(self) -> bool:
        """Remove the ANN (one commit, then its files are deleted). False when there was none."""
        with _writer_lock(self._path):
            self._refresh()
            if "ann" not in self._manifest:
                return False
            m = json.loads(json.dumps(self._manifest))
            del m["ann"]
            m["generation"] = int(m["generation"]) + 1
            m["updated"] = _utcnow()
            _commit_manifest(self._path, m)
            self._manifest = m
            self._clean_orphans()
            return True

    # ------------------------------------------------------------ writing
    @_fs_errors
    def add(self, descriptors, ids: Sequence[str], *, skip_existing: bool = False) -> int:
        """Append rows [n, D] with their ids as one new segment, committed atomically; returns
        how many rows were added.

        Everything is checked before anything is written: D, finite values, unit L2 norm per
        row (|norm - 1| <= NORM_TOLERANCE; zero rows refused), one non-empty id per row that is
        UTF-8 text (a str holding the undecodable bytes of a file name is refused), ids unique
        and not already in the index. With skip_existing=True, rows whose id is already
        committed (by this process or, seen under the writer lock, by another) are left out
        instead of refused: two builds of one folder then add each file once. Rows are stored as
        the index dtype. n = 0 is a no-op. An ANN recorded in the manifest is carried over as it
        is, so this commit makes it stale (module docstring); sgengine.search.ann.update brings
        it back in step.
        """
        x = self._check_rows(descriptors)
        ids = self._check_id_list(ids, x.shape[0])
        if x.shape[0] == 0:
            return 0
        with _writer_lock(self._path):
            self._refresh()
            if skip_existing:
                have = self._ids_map()
                keep = [i for i, s in enumerate(ids) if s not in have]
                if not keep:
                    return 0
                if len(keep) < len(ids):
                    x, ids = x[keep], [ids[i] for i in keep]
            else:
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
            _crash_point("after-segment")
            m = json.loads(json.dumps(self._manifest))
            m["segments"].append({"file": f"{_SEGDIR}/{npy.name}", "ids_file": f"{_SEGDIR}/{idf.name}",
                                  "count": int(x.shape[0]), "sha256": sha, "ids_sha256": ids_sha})
            m["count"] = int(m["count"]) + int(x.shape[0])
            m["generation"] = int(m["generation"]) + 1
            m["updated"] = _utcnow()
            _commit_manifest(self._path, m, crash_at="before-manifest")
            _crash_point("after-manifest")
            self._manifest = m
            arr, mapped = _map_segment(self._path, npy, len(ids), self._dim, np.dtype(self._dtype), self._mmap)
            self._arrays.append(arr)
            if mapped is not None:
                self._mapped.append(mapped)
            start = len(self._ids)
            self._ids.extend(ids)
            if self._row_of is not None:
                self._row_of.update((s, start + i) for i, s in enumerate(ids))
            self._concat = None
            self._revision = next(_REVISIONS)
        return len(ids)

    @_fs_errors
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
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"id at row {i} ({display_path(s)}) is not UTF-8 text "
                                 "(a file name with bytes that are not UTF-8 gives such a str): ids must be text; "
                                 "rename the file: nothing was added") from None
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
            if (m["bundle_fingerprint"] != self.bundle_fingerprint or m["dim"] != self._dim or m["dtype"] != self._dtype
                    or m.get("uid", self.uid) != self.uid):
                raise IndexMismatchError(f"index {self._path} was replaced by another index since it was opened")
            if m["segments"] != self._manifest["segments"]:
                self._load(m)
            else:  # an ANN commit: same rows, so the revision (and every copy of the rows) stays valid
                self._manifest = m

    def _next_segment_number(self) -> int:
        nums = [int(_SEG_RE.match(s["file"]).group(1)) for s in self._manifest["segments"]]
        return max(nums, default=-1) + 1

    def _clean_orphans(self) -> None:
        """Delete files under segments/ and ann/ that the manifest does not list (left by a crashed
        add, compact or ANN commit, or replaced by a newer ANN)."""
        keep = {Path(s[k]).name for s in self._manifest["segments"] for k in ("file", "ids_file")}
        seg_dir = self._path / _SEGDIR
        for p in seg_dir.iterdir():
            if p.name not in keep and p.is_file():
                p.unlink(missing_ok=True)
        ann_dir = self._path / _ANNDIR
        if ann_dir.is_dir():
            rec = self._manifest.get("ann")
            keep = set() if rec is None else {Path(rec["file"]).name, Path(rec["meta_file"]).name}
            for p in ann_dir.iterdir():
                if p.name not in keep and p.is_file():
                    p.unlink(missing_ok=True)
        (self._path / _MANIFEST_TMP).unlink(missing_ok=True)


def _read_manifest(root: Path) -> dict:
    f = root / _MANIFEST
    if not root.is_dir():
        if root.exists():
            raise IndexError_(f"{root} is a file, not an index directory: give the directory that "
                              "sgengine index build wrote")
        raise IndexError_(f"no index at {root}: the directory does not exist (build one: sgengine index build)")
    if not f.is_file():
        raise IndexError_(f"{root} is not an index: {_MANIFEST} is missing (build one: sgengine index build)")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexError_(f"index {root}: {_MANIFEST} is corrupt ({type(e).__name__}: {str(e)[:200]}); "
                          "restore it or rebuild the index") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise IndexError_(f"{f} is not an sgengine index manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    v = m.get("format_version")
    if v != FORMAT_VERSION:
        raise IndexError_(f"index {root} has format_version {v!r}; this sgengine reads version {FORMAT_VERSION}"
                          + (": upgrade sgengine" if isinstance(v, int) and v > FORMAT_VERSION else ""))

    def count(v, lo: int) -> bool:  # an int (not a bool, which JSON's true would give) >= lo
        return type(v) is int and v >= lo

    try:
        ok = (isinstance(m["bundle_fingerprint"], str) and count(m["dim"], 1) and m["dtype"] in DTYPES
              and count(m["count"], 0) and count(m["generation"], 0) and isinstance(m["segments"], list))
        if ok:
            for s in m["segments"]:
                ok = ok and (isinstance(s, dict) and isinstance(s.get("file"), str) and _SEG_RE.match(s["file"])
                             and s.get("ids_file") == s["file"][:-4] + ".ids.json" and count(s.get("count"), 1)
                             and isinstance(s.get("sha256"), str) and isinstance(s.get("ids_sha256"), str))
        ok = ok and sum(s["count"] for s in m["segments"]) == m["count"]
        ok = ok and len({s["file"] for s in m["segments"]}) == len(m["segments"])  # a file listed twice
        ok = ok and isinstance(m.get("uid", ""), str)
        a = m.get("ann")
        if ok and a is not None:
            ok = (isinstance(a, dict) and isinstance(a.get("file"), str) and _ANN_RE.match(a["file"])
                  and a.get("meta_file") == a["file"][:-6] + ".json"
                  and all(isinstance(a.get(f), str) for f in ("sha256", "meta_sha256", "factory"))
                  and all(count(a.get(f), 0) for f in ("bytes", "count", "generation"))
                  and 1 <= a["count"] <= m["count"])
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise IndexError_(f"index {root}: {_MANIFEST} is corrupt (missing or inconsistent fields); "
                          "restore it or rebuild the index")
    return m


def _commit_manifest(root: Path, manifest: dict, *, crash_at: str | None = None) -> None:
    # A fixed temporary name: writers hold the lock, and a crashed commit's leftover is found by name.
    write_json_atomic(root / _MANIFEST, manifest, indent=1, tmp=root / _MANIFEST_TMP,
                      before_replace=(lambda: _crash_point(crash_at)) if crash_at else None)
