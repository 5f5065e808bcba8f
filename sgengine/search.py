"""First-stage search (SPEC 5): exact top-k of S = X q over the database rows.

`topk_similarity` streams the database in chunks of rows and keeps a running top-k per query,
so memory is bounded by one chunk of scores (and one upcast chunk) however many rows there
are. A numpy array or memmap is wrapped in place with `torch.from_numpy`: nothing is copied
up front, and a memmap is paged in chunk by chunk. Only the top M reach the reranker, so a
top-k selection is equivalent to the reference's full argsort (SPEC 5).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .errors import InputError

__all__ = ["topk_similarity", "default_chunk_rows"]

# Per-chunk working set: the [nq, chunk] score block and, when the rows need converting or
# moving, the upcast float32 copy of the chunk. 64 MiB keeps the GEMM large enough to run at
# full speed while staying far below any device's memory.
_CHUNK_BYTES = 64 << 20


def default_chunk_rows(nq: int, dim: int, *, needs_copy: bool) -> int:
    """Rows per chunk so that one chunk's scores (and its float32 copy, if one is made) fit in 64 MiB."""
    per_row = 4 * max(nq, 1) + (4 * dim if needs_copy else 0)
    return max(1024, _CHUNK_BYTES // per_row)


def _as_tensor(database) -> torch.Tensor:
    if isinstance(database, torch.Tensor):
        return database
    if isinstance(database, np.ndarray):
        with warnings.catch_warnings():
            # A read-only memmap is only ever read here; torch warns because it cannot
            # prove that, not because anything is wrong.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(database)
    raise InputError(f"database must be a torch.Tensor or numpy array, got {type(database).__name__}")


@torch.no_grad()
def topk_similarity(queries: torch.Tensor, database: torch.Tensor | np.ndarray, k: int,
                    chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product: scores [nq, k] float32 (descending) and rows [nq, k] int64.

    queries: [nq, D] floating tensor (numpy accepted); converted to float32. The computation
    runs on the queries' device: a database held elsewhere (a CPU memmap with CUDA queries)
    is moved there one chunk at a time. database: [N, D] float32 or float16 (any floating
    dtype), a tensor or a numpy array / memmap used in place; its rows must be finite. Each
    chunk is upcast to float32 before the product, so float16 storage never accumulates in
    float16. 1 <= k <= N. Among exactly equal scores the order is unspecified (SPEC 6, ties).
    """
    if isinstance(queries, np.ndarray):
        queries = torch.from_numpy(np.ascontiguousarray(queries))
    if not isinstance(queries, torch.Tensor):
        raise InputError(f"queries must be a torch.Tensor [nq, D], got {type(queries).__name__}")
    if queries.ndim != 2:
        raise InputError(f"queries must be 2-D [nq, D], got shape {list(queries.shape)}")
    if not queries.is_floating_point():
        raise InputError(f"queries must be floating point, got {queries.dtype}")
    db = _as_tensor(database)
    if db.ndim != 2:
        raise InputError(f"database must be 2-D [N, D], got shape {list(db.shape)}")
    if not db.is_floating_point():
        raise InputError(f"database must be floating point (float32 or float16), got {db.dtype}")
    n, dim = db.shape
    if queries.shape[1] != dim:
        raise InputError(f"queries have dimension {queries.shape[1]} but the database rows have {dim}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"k must be an integer, got {k!r}")
    k = int(k)
    if n == 0:
        raise InputError("database is empty: nothing to search")
    if not 1 <= k <= n:
        raise InputError(f"k={k} must be between 1 and the number of database rows ({n})")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or int(chunk_rows) < 1):
        raise InputError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")

    device = queries.device
    q = queries.to(torch.float32)
    if not bool(torch.isfinite(q).all()):
        raise InputError("queries contain NaN or Inf")
    nq = q.shape[0]
    if nq == 0:
        return (torch.empty(0, k, dtype=torch.float32, device=device),
                torch.empty(0, k, dtype=torch.int64, device=device))
    needs_copy = db.dtype != torch.float32 or db.device != device
    step = int(chunk_rows) if chunk_rows is not None else default_chunk_rows(nq, dim, needs_copy=needs_copy)

    best_s: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, n, step):
        stop = min(start + step, n)
        # A view; .to() copies only this chunk (upcast and/or host->device), never the database.
        chunk = db[start:stop].to(device=device, dtype=torch.float32, non_blocking=False)
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
