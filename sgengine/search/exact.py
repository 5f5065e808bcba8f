"""Exact first stage (SPEC 5): top-k of S = X q over the database rows, with its reference beside it.

`topk_similarity` streams the database in chunks of rows and keeps a running top-k per query,
so memory is bounded by one chunk of scores (and one upcast chunk) however many rows there
are. A numpy array or memmap is wrapped in place with `torch.from_numpy`: nothing is copied
up front, and a memmap is paged in chunk by chunk. Only the top M reach the reranker, so a
top-k selection is equivalent to the reference's full argsort (SPEC 5).

Three ways to take the product, named in IMPLS and picked by `resolve_impl`:
- "upcast" (the reference): each chunk of float16 rows is copied to float32, then a float32 GEMM
  (float32 rows are multiplied in place). Scores carry the error of a plain float32 product.
- "cpu_native" (CPU, float16 or float32 rows): one C++ pass over the rows for the whole batch
  (sgengine.kernels.search_cpu): float16 is converted in registers, queries are multiplied in
  register blocks, and a running top-k per query replaces the [nq, N] scores, so each row is read
  once per batch and nothing the size of the index is allocated. float32 accumulation: equal to
  "upcast" up to float32 reassociation. One query is bound by reading the rows: on the 2-core
  EPYC, 1M x 2048 float16 rows memory-mapped, k = 400, one query took 92 ms (45 GB/s) and a
  batch of 20 took 325 ms, against 399 ms and 5.1 s for FAISS IndexFlatIP over the float32 rows
  (bench/bench_search.py).
- "split" (CUDA, float16 rows): the float32 query is split exactly into two float16 parts,
  q = e * (hi + lo * 2^-12), and both are multiplied with the float16 rows in one float16 GEMM
  that accumulates and returns float32 (`torch.mm(..., out_dtype=torch.float32)`). The rows
  are read once at 2 bytes per element and never converted, which is why it is several
  times faster than "upcast" on a GPU (the figures belong in bench/results/). Error: the split
  keeps ~22 bits of q, so |score error| <= ~2.4e-7 * sum|q_i x_i|, the size of a float32
  GEMM's own error at D = 2048; tests hold it to the float32 tolerance.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .._checks import check_finite, check_int
from ..cublas import ieee_if_cuda
from ..errors import BackendUnavailableError, InputError

__all__ = ["topk_similarity", "check_queries_and_database", "default_chunk_rows", "resolve_impl", "IMPLS",
           "exact_topk", "segments_topk"]

IMPLS = ("auto", "upcast", "split", "cpu_native")
# Row dtypes the C++ scan reads as they are stored.
_NATIVE_DTYPES = ("float16", "float32")
# hi carries the top 11 bits of q/e; the residual is below 2^-12, so scaling it by 2^12 keeps
# lo's float16 normal (not subnormal) and exact to another 11 bits.
_LO_SHIFT = 2.0 ** 12
_MM_OUT_DTYPE_OK: dict[str, bool] = {}


def _mm_out_dtype_ok(device: torch.device) -> bool:
    """Whether torch.mm(float16, float16, out_dtype=float32) runs on this device (CUDA, recent torch)."""
    key = str(device)
    if key not in _MM_OUT_DTYPE_OK:
        try:
            a = torch.ones(2, 8, dtype=torch.float16, device=device)
            ok = torch.mm(a, a.T, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _MM_OUT_DTYPE_OK[key] = ok
    return _MM_OUT_DTYPE_OK[key]


def _dtype_name(dtype: torch.dtype | np.dtype | str) -> str:
    """"float16", "float32", ... for a torch dtype, numpy dtype or name."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


def _native_why_not(device: torch.device, dtype_name: str) -> str | None:
    """Why "cpu_native" cannot search rows of `dtype_name` on `device`, or None when it can."""
    if device.type != "cpu":
        return f"it runs on the CPU, the search runs on {device}: use 'split' or 'upcast'"
    if dtype_name not in _NATIVE_DTYPES:
        return f"it reads float16 or float32 rows, these are {dtype_name}: use 'upcast'"
    from ..kernels.search_cpu import native_info
    info = native_info()
    if not info["available"]:
        return (f"sgengine.kernels._search_cpu is not built ({info['error']}); rebuild with "
                f"`pip install -e . --no-build-isolation --no-deps`, or use 'upcast'")
    return None


def resolve_impl(impl: str, device: torch.device | str, db_dtype: torch.dtype | np.dtype | str) -> str:
    """The product the first stage will use: "upcast", "split" or "cpu_native".

    "auto" picks "split" for float16 rows searched on CUDA when torch supports float16 GEMMs
    with float32 output there; "cpu_native" on the CPU for float16 and float32 rows when the C++
    kernel is built (on the 2-core EPYC it was faster than "upcast" from 5,000 rows up, and over
    float16 rows faster than over a float32 copy of them); else "upcast". Asking for "split"
    where it cannot run on CUDA, or for "cpu_native" where it cannot run, is an error saying
    why; on CPU "split" runs (emulated with float32 products, for tests) but is slower than
    "upcast".
    """
    if impl not in IMPLS:
        raise InputError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    dtype_name = _dtype_name(db_dtype)
    is_half = dtype_name == "float16"
    if impl == "upcast":
        return "upcast"
    if impl == "split":
        if not is_half:
            raise InputError(f"impl='split' needs float16 rows, got {db_dtype}")
        if device.type == "cuda" and not _mm_out_dtype_ok(device):
            raise BackendUnavailableError(
                f"impl='split' needs torch.mm(..., out_dtype=torch.float32) on {device}, which torch "
                f"{torch.__version__} lacks: use impl='upcast'")
        return "split"
    if impl == "cpu_native":
        why = _native_why_not(device, dtype_name)
        if why is not None:
            cls = InputError if device.type == "cpu" and dtype_name not in _NATIVE_DTYPES else BackendUnavailableError
            raise cls(f"impl='cpu_native' cannot run here: {why}")
        return "cpu_native"
    if device.type == "cuda":
        return "split" if is_half and _mm_out_dtype_ok(device) else "upcast"
    return "cpu_native" if _native_why_not(device, dtype_name) is None else "upcast"


def _split_query(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [nq, D] float32 -> (Q [2nq, D] float16 = [hi; lo], e [nq, 1]) with q ~= e * (hi + lo / 2^12).

    e is a power of two (exact scaling) bringing each row's max |q| into (0.5, 1], so hi never
    overflows float16 whatever the query's norm.
    """
    m = q.abs().amax(dim=1, keepdim=True)
    e = torch.where(m > 0, torch.exp2(torch.ceil(torch.log2(m))), torch.ones_like(m))
    qs = q / e
    hi = qs.to(torch.float16)
    lo = ((qs - hi.to(torch.float32)) * _LO_SHIFT).to(torch.float16)
    return torch.cat([hi, lo], dim=0), e


# Per-chunk working set: the [nq, chunk] score block and, when the rows need converting or
# moving, the upcast float32 copy of the chunk. On the CPU 64 MiB keeps the GEMM at full speed.
# On a GPU each chunk costs a handful of kernel launches, so chunks must be large: on an H200
# (1M x 2048 float16 rows, k=400, nq=1) 8k-row chunks took about twice as long as 131k-row
# (1 GiB) chunks, which come within ~15% of upcasting the whole database at once.
_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def default_chunk_rows(nq: int, dim: int, *, needs_copy: bool, device: torch.device | str = "cpu") -> int:
    """Rows per chunk so that one chunk's scores (and its float32 copy, if one is made) fit the
    device's working-set budget (64 MiB on the CPU, 1 GiB on CUDA)."""
    budget = _CHUNK_BYTES.get(torch.device(device).type, _CHUNK_BYTES["cpu"])
    per_row = 4 * max(nq, 1) + (4 * dim if needs_copy else 0)
    return max(1024, budget // per_row)


def as_rows_tensor(database: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A numpy array or memmap as a tensor sharing its memory (no copy); a tensor as it is."""
    if isinstance(database, torch.Tensor):
        return database
    with warnings.catch_warnings():
        # A read-only memmap is only ever read here; torch warns because it cannot
        # prove that, not because anything is wrong.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(database)


def check_queries_and_database(queries, database) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [nq, D] and database [N, D] as floating tensors of one dimension (numpy used in
    place), or an InputError naming which argument is wrong. Shared by every ranking entry point."""
    if isinstance(queries, np.ndarray):
        queries = torch.from_numpy(np.ascontiguousarray(queries))
    if not isinstance(queries, torch.Tensor):
        raise InputError(f"queries must be a numpy array or torch.Tensor [nq, D], got {type(queries).__name__}")
    if queries.ndim != 2:
        raise InputError(f"queries must be 2-D [nq, D], got shape {list(queries.shape)}")
    if not queries.is_floating_point():
        raise InputError(f"queries must be floating point, got {queries.dtype}")
    if not isinstance(database, (np.ndarray, torch.Tensor)):
        raise InputError(f"database must be a numpy array or torch.Tensor [N, D], got {type(database).__name__}")
    db = as_rows_tensor(database)
    if db.ndim != 2:
        raise InputError(f"database must be 2-D [N, D], got shape {list(db.shape)}")
    if not db.is_floating_point():
        raise InputError(f"database must be floating point (float32 or float16), got {db.dtype}")
    if queries.shape[1] != db.shape[1]:
        raise InputError(f"queries have dimension {queries.shape[1]} but the database rows have {db.shape[1]}")
    return queries, db


@torch.no_grad()
def topk_similarity(queries: torch.Tensor, database: torch.Tensor | np.ndarray, k: int,
                    chunk_rows: int | None = None, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product: scores [nq, k] float32 (descending) and rows [nq, k] int64.

    queries: [nq, D] floating tensor (numpy accepted); converted to float32. The computation
    runs on the queries' device: a database held elsewhere (a CPU memmap with CUDA queries)
    is moved there one chunk at a time. database: [N, D] float32 or float16 (any floating
    dtype), a tensor or a numpy array / memmap used in place; its rows must be finite. Each
    product accumulates in float32: impl="upcast" converts each chunk to float32 first;
    impl="split" (float16 rows on CUDA) splits the query instead; impl="cpu_native" (CPU) scans
    the rows once in C++ (module docstring); impl="auto" chooses with `resolve_impl`. chunk_rows
    sets the chunks of "upcast" and "split" ("cpu_native" picks its own tiles). 1 <= k <= N.
    Among exactly equal scores the order is unspecified (SPEC 6, ties).
    """
    queries, db = check_queries_and_database(queries, database)
    n = db.shape[0]
    k = check_int(k, "k")
    if n == 0:
        raise InputError("database is empty: nothing to search")
    if not 1 <= k <= n:
        raise InputError(f"k={k} must be between 1 and the number of database rows ({n})")
    if chunk_rows is not None:
        chunk_rows = check_int(chunk_rows, "chunk_rows", 1)
    q = queries.to(torch.float32)
    check_finite(q, "queries")
    mode = resolve_impl(impl, q.device, db.dtype)
    if mode == "cpu_native" and db.device.type != "cpu":
        if impl != "auto":
            raise BackendUnavailableError(f"impl='cpu_native' reads rows in host memory; the database is on "
                                          f"{db.device}: use 'upcast'")
        mode = "upcast"
    return exact_topk(q, db, k, chunk_rows, mode)


@torch.no_grad()
def exact_topk(q: torch.Tensor, db: torch.Tensor, k: int, chunk_rows: int | None,
               mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_similarity's scan. Trusts its inputs: q [nq, D] float32 and finite, on the device the
    product runs on; db [N, D] floating, any device (the CPU for "cpu_native"); 1 <= k <= N;
    chunk_rows None or >= 1; mode "upcast", "split" or "cpu_native" (resolved for db's dtype and
    q's device)."""
    device = q.device
    nq = q.shape[0]
    n, dim = db.shape
    if nq == 0:
        return (torch.empty(0, k, dtype=torch.float32, device=device),
                torch.empty(0, k, dtype=torch.int64, device=device))
    if mode == "cpu_native":
        from ..kernels.search_cpu import topk_inner_product
        rows = db.numpy() if db.is_contiguous() else np.ascontiguousarray(db.numpy())
        return topk_inner_product([rows], q, k)
    if mode == "split":
        Q, e = _split_query(q)
        native = device.type == "cuda"
        # CUDA reads the float16 rows as they are; the CPU emulation (tests) upcasts them.
        needs_copy = not native or db.device != device
    else:
        needs_copy = db.dtype != torch.float32 or db.device != device
    step = chunk_rows if chunk_rows is not None else default_chunk_rows(nq, dim, needs_copy=needs_copy, device=device)
    step = min(step, n)
    # One float32 buffer reused for every chunk that needs upcasting or moving: allocating a
    # fresh one per chunk costs more than the conversion itself (first-touch page faults; on
    # 2 shared EPYC cores, converting 100k x 512 float16 rows took 154 ms via .float() and
    # 24 ms via copy_ into a warm buffer).
    buf = None
    if needs_copy:
        buf_dtype = torch.float16 if mode == "split" and device.type == "cuda" else torch.float32
        buf = torch.empty(step, dim, dtype=buf_dtype, device=device)
    best_s: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, n, step):
        stop = min(start + step, n)
        if buf is not None:
            chunk = buf[: stop - start]
            part = db[start:stop]
            if part.device != device and part.dtype != chunk.dtype:
                # Move the rows in their stored dtype and upcast on arrival: half the bytes over
                # the bus, and the conversion runs on the device rather than on the host.
                part = part.to(device)
            chunk.copy_(part)  # only this chunk is converted / transferred
        else:
            chunk = db[start:stop]  # a view of the database, no copy
        if mode == "split":
            if device.type == "cuda":
                s2 = torch.mm(Q, chunk.T, out_dtype=torch.float32)  # [2nq, c]
            else:
                s2 = Q.to(torch.float32) @ chunk.T  # float16 x float16 products are exact in float32
            s = (s2[:nq] + s2[nq:] * (1.0 / _LO_SHIFT)) * e
        else:
            with ieee_if_cuda(chunk):  # SPEC 5's float32 product: no TF32, whatever the process flags
                s = q @ chunk.T  # [nq, c], float32 accumulation
        kc = min(k, stop - start)
        cs, ci = torch.topk(s, kc, dim=1, largest=True, sorted=False)
        ci = ci + start
        if best_s is None:
            best_s, best_i = cs, ci
        else:
            merged_s = torch.cat([best_s, cs], dim=1)
            merged_i = torch.cat([best_i, ci], dim=1)
            kk = min(k, merged_s.shape[1])
            best_s, pos = torch.topk(merged_s, kk, dim=1, largest=True, sorted=False)
            best_i = torch.gather(merged_i, 1, pos)
    assert best_s is not None and best_i is not None
    order = torch.argsort(best_s, dim=1, descending=True)
    return torch.gather(best_s, 1, order), torch.gather(best_i, 1, order).to(torch.int64)


@torch.no_grad()
def segments_topk(q: torch.Tensor, segments: list[np.ndarray | torch.Tensor], k: int,
                  mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over rows stored as segments [n_i, D] numbered one after the other (an index's
    .npy segments), without concatenating them: "cpu_native" scans them all in one call; the
    other modes run `exact_topk` per segment and merge. Trusts its inputs as exact_topk does;
    1 <= k <= sum n_i, every segment non-empty, numpy segments only for "cpu_native"."""
    if mode == "cpu_native" and q.shape[0]:
        from ..kernels.search_cpu import topk_inner_product
        return topk_inner_product(segments, q, k)
    if len(segments) == 1:
        return exact_topk(q, as_rows_tensor(segments[0]), k, None, mode)
    parts_s, parts_i = [], []
    start = 0
    for seg in segments:
        db = as_rows_tensor(seg)
        s, i = exact_topk(q, db, min(k, db.shape[0]), None, mode)
        parts_s.append(s)
        parts_i.append(i + start)
        start += db.shape[0]
    all_s, all_i = torch.cat(parts_s, dim=1), torch.cat(parts_i, dim=1)
    best_s, pos = torch.topk(all_s, k, dim=1, largest=True, sorted=True)
    return best_s, torch.gather(all_i, 1, pos)
