"""Where the first stage reads an index's rows from: one copy resident on a GPU, or host memory.

`DeviceRows(index, device)` is the engine's view of an Index on one device. On the CPU the rows are
read where the index keeps them: its segments, memory-mapped, one array per .npy file, never
concatenated or converted up front ("cpu_native" scans them all in one pass, so opening and
searching a 1M-row float16 index costs no anonymous memory the size of the index; the OS pages the
files in as the scan reads them). On CUDA the stored rows are uploaded once, in their stored
dtype, segment by segment, when they fit beside the model (`device_room_shortfall`); an index
too large for the device stays on the host and the scan streams it chunk by chunk (slower, but
it runs, and `residency()` says so). Streaming a memmap to the GPU on every query would cost a
full host-to-device copy of the index per query. Every read of the host segments first asks the
Index whether a mapped file changed on disk (`Index.check_unchanged`, a stat per segment), so a
segment truncated or rewritten by another program gives an IndexError_ rather than SIGBUS or
wrong rows.

These copies belong to the pair (Index object, device), not to one DeviceRows: several engines
over one Index share one upload. They are dropped when the Index's `revision` changes (an add,
a compaction, a reload of another process's commit) and rebuilt on the next use.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from .._checks import check_int, parse_device
from ..errors import InputError
from ..index import Index
from .exact import as_rows_tensor, resolve_impl, segments_topk

__all__ = ["DeviceRows", "search_index", "device_room_shortfall", "index_segments", "DEVICE_HEADROOM_BYTES"]

DEVICE_HEADROOM_BYTES = 2 << 30  # left free beside a resident index: model, activations, rerank buffers


def index_segments(index: Index) -> list[np.ndarray]:
    """The index's rows as its stored segments [n_i, D] in row order (`Index.segment_arrays`):
    memory maps read in place, never concatenated (`Index.vectors()` would read them all). Empty: []."""
    return [a for a in index.segment_arrays() if len(a)]


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


def _device_key(device: torch.device) -> str:
    """"cuda" and "cuda:0" name one GPU: key copies by the explicit index, or one GPU would hold two."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


@dataclass
class _Copies:
    """The copies of one Index's rows for one device, valid while the Index's revision is `revision`."""
    revision: int
    resident: torch.Tensor | None = None  # [N, D] in the stored dtype, on the device
    streamed: str | None = None  # why the rows stay on the host (CUDA only)
    segments: list[np.ndarray] | None = None  # the stored segments, as index_segments gives them
    starts: np.ndarray | None = None  # [len(segments) + 1] first row of each segment, then N
    lock: threading.Lock = field(default_factory=threading.Lock)


_COPIES: "weakref.WeakKeyDictionary[Index, dict[str, _Copies]]" = weakref.WeakKeyDictionary()
_COPIES_LOCK = threading.Lock()


class DeviceRows:
    """An Index's rows as the first stage and the gather read them on one device.

    Methods trust their inputs (the engine and `search_index` check them): the device is a
    parsed torch.device, queries are float32 on it, k is in 1..len(index), rows are in range.
    """

    def __init__(self, index: Index, device: torch.device) -> None:
        self._index = index
        self._device = torch.device(device)
        self._key = _device_key(self._device)

    @property
    def index(self) -> Index:
        return self._index

    @property
    def device(self) -> torch.device:
        return self._device

    def _copies(self) -> _Copies:
        rev = self._index.revision
        with _COPIES_LOCK:
            per = _COPIES.setdefault(self._index, {})
            c = per.get(self._key)
            if c is None or c.revision != rev:
                c = per[self._key] = _Copies(rev)
            return c

    def _host_segments(self, c: _Copies) -> list[np.ndarray]:
        """The stored segments (mapped once per revision) and their first rows in c.starts."""
        if c.segments is None:
            with c.lock:
                if c.segments is None:
                    segs = index_segments(self._index)
                    c.starts = np.cumsum([0] + [len(a) for a in segs])
                    c.segments = segs
        return c.segments

    def _materialize(self, c: _Copies) -> None:
        """Map the segments, and on CUDA upload them (once) when they fit."""
        segs = self._host_segments(c)
        if self._device.type == "cpu" or c.resident is not None or c.streamed is not None:
            return
        with c.lock:
            if c.resident is not None or c.streamed is not None:
                return
            n, dim = int(c.starts[-1]), self._index.dim
            dtype = getattr(torch, self._index.dtype)
            reason = device_room_shortfall(self._device, n * dim * dtype.itemsize)
            if reason is not None:
                c.streamed = reason
                return
            resident = torch.empty(n, dim, dtype=dtype, device=self._device)
            for a, start in zip(segs, c.starts):
                resident[int(start):int(start) + len(a)].copy_(as_rows_tensor(np.ascontiguousarray(a)))
            c.resident = resident

    def preload(self) -> str:
        """Make the rows ready now (at Engine.load) instead of on the first query: map the
        segments, and upload them to a CUDA device when they fit. Returns residency()."""
        if len(self._index):
            self._materialize(self._copies())
        return self.residency()

    def residency(self) -> str:
        """Where topk reads the rows from: "host" (CPU), "resident" (one copy on the device),
        "streamed: <why>" (too large for the device), or "not loaded yet"."""
        if self._device.type == "cpu":
            return "host"
        c = self._copies()
        if c.resident is not None:
            return "resident"
        if c.streamed is not None:
            return f"streamed: {c.streamed}"
        return "not loaded yet"

    def release(self) -> None:
        """Drop this device's copy of the index's rows (for every DeviceRows over this Index)."""
        with _COPIES_LOCK:
            _COPIES.get(self._index, {}).pop(self._key, None)

    @torch.no_grad()
    def topk(self, q: torch.Tensor, k: int, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k (SPEC 5) of q [nq, D] float32 on the device over the index's rows: scores
        [nq, k] float32 descending and rows [nq, k] int64, on the device. impl: one of IMPLS
        ("auto" is resolved here for the stored dtype)."""
        resolved = ("upcast", "split", "cpu_native")
        mode = impl if impl in resolved else resolve_impl(impl, self._device, self._index.dtype)
        c = self._copies()
        self._materialize(c)
        if c.resident is not None:
            return segments_topk(q, [c.resident], k, mode)
        self._index.check_unchanged()  # a mapped file truncated under us would fault in the scan (SIGBUS)
        return segments_topk(q, c.segments, k, mode)

    @torch.no_grad()
    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows as float32 on rows' device: rows [nq, m] int64 -> [nq, m, D]. From the
        resident copy when there is one (one index_select, no host round trip); otherwise from
        the host segments, reading and converting only the gathered rows."""
        dim = self._index.dim
        c = self._copies()
        if c.resident is not None:
            return c.resident.index_select(0, rows.reshape(-1)).to(torch.float32).reshape(*rows.shape, dim)
        segs = self._host_segments(c)
        self._index.check_unchanged()
        flat = rows.reshape(-1).cpu().numpy()
        out = np.empty((flat.size, dim), dtype=np.float32)
        which = np.searchsorted(c.starts, flat, side="right") - 1
        for j in np.unique(which):
            sel = which == j
            out[sel] = np.take(segs[j], flat[sel] - c.starts[j], axis=0)
        return torch.from_numpy(out).reshape(*rows.shape, dim).to(rows.device)


def _check_queries(queries, index: Index) -> torch.Tensor:
    """queries [nq, D] or [D] (one query), numpy or torch, finite, as a float32 tensor [nq, D]."""
    if isinstance(queries, torch.Tensor):
        q = queries.detach()
    elif isinstance(queries, np.ndarray):
        q = torch.from_numpy(np.ascontiguousarray(queries))
    else:
        raise InputError(f"queries must be a numpy array or torch tensor [nq, {index.dim}], "
                         f"got {type(queries).__name__}")
    if not q.is_floating_point():
        raise InputError(f"queries must be floating point, got {q.dtype}")
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if q.ndim != 2 or q.shape[1] != index.dim:
        raise InputError(f"queries must be [{index.dim}] or [nq, {index.dim}] for index {index.path}, "
                         f"got shape {list(queries.shape)}")
    q = q.to(torch.float32)
    bad = ~torch.isfinite(q).all(dim=1)
    if bool(bad.any()):
        raise InputError(f"query {int(bad.nonzero()[0, 0])} contains NaN or Inf")
    return q


def search_index(index: Index, queries, k: int, *, device: str | torch.device | None = None,
                 impl: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact first-stage search (SPEC 5) over an Index: scores float32 [nq, k] descending, rows
    int64 [nq, k] (`index.ids[row]` is the external id), as numpy arrays.

    queries: [nq, D] or [D] (treated as nq = 1), numpy or torch, finite. k > len(index) is
    clamped to len(index); k <= 0 and an empty index are InputErrors. `device`: where the
    product runs (default: where the queries are, CPU for numpy); on CUDA the rows are uploaded
    once and reused until the index changes (DeviceRows). `impl`: one of IMPLS (resolve_impl).
    """
    if not isinstance(index, Index):
        raise InputError(f"index must be an sgengine Index, got {type(index).__name__}")
    n = len(index)
    if n == 0:
        raise InputError(f"index {index.path} is empty: add descriptors first (sgengine index build)")
    k = check_int(k, "k", 1)
    q = _check_queries(queries, index)
    dev = q.device if device is None else parse_device(device)
    mode = resolve_impl(impl, dev, index.dtype)
    scores, rows = DeviceRows(index, dev).topk(q.to(dev), min(k, n), mode)
    return scores.cpu().numpy(), rows.cpu().numpy()
