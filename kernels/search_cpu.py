"""Exact first stage on the CPU: one C++ pass over float16 (or float32) rows for a batch of queries.

    topk_inner_product(segments, q, k) -> (scores [nq, k] float32, rows [nq, k] int64), torch tensors
    native_info()                      -> dict: whether the kernel is built here, and how it runs

The kernel (kernels/cpu/search_f16.cpp, sgengine.kernels._search_cpu) reads each stored row once
per batch, converts float16 to float32 in registers and multiplies it with register blocks of up
to 6 queries, keeping a running top-k per query; neither the scores [nq, N] nor a float32 copy of
the rows is ever made, so a memory-mapped index is searched from its segments as they are. Results
equal `sgengine.search.exact` with mode "upcast" up to float32 reassociation; among exactly equal
scores the lower rows come first.

It trusts its input (`sgengine.search.topk_similarity` and `DeviceRows` check it once): segments
are C-contiguous [n_i, D] numpy arrays (memmaps welcome) of one dtype, float16 or float32; q is a
finite float32 CPU tensor [nq, D]; 1 <= k <= sum n_i.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sgengine.errors import BackendUnavailableError

# Optional, like the other C++ kernels: without a build the search stage keeps "upcast".
try:
    from . import _search_cpu as _native
    _native_error: str | None = None
except ImportError as e:  # not built, or built for another Python
    _native = None
    _native_error = f"{type(e).__name__}: {e}"

# The compiled variant: "auto" (the best this CPU runs), "avx512", "avx2" or "baseline" (tests pin each).
ISA = "auto"
# Rows per tile; 0 lets the kernel choose (about 192 KiB of rows). Tests make it small to cross
# tile boundaries on small inputs.
TILE_ROWS = 0
# Queries per pass over the rows. Per slice of 512 columns a pass keeps every query's slice near
# the core (128 x 2 KiB = L2); a larger batch would stream its queries from L3 once per tile of
# rows, costing more than reading the rows again.
QUERY_BLOCK = 128


def native_info() -> dict:
    """{"available": bool, "isa": best instruction set, "isas": all usable, "threading": ..., "error": str|None}."""
    if _native is None:
        return {"available": False, "isa": None, "isas": (), "threading": None, "error": _native_error}
    isas = tuple(_native.isas())
    return {"available": True, "isa": isas[0], "isas": isas, "threading": _native.threading, "error": None}


def topk_inner_product(segments: Sequence[np.ndarray], q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of q [nq, D] against the rows of `segments` (numbered one after the other), on
    torch.get_num_threads() threads: scores [nq, k] float32 descending and rows [nq, k] int64."""
    if _native is None:
        raise BackendUnavailableError(
            f"the C++ search kernel sgengine.kernels._search_cpu is not built here ({_native_error}); rebuild "
            f"with `pip install -e . --no-build-isolation --no-deps` (needs CMake and a C++17 compiler) or use "
            f"impl='upcast'")
    segs = list(segments)
    qn = q.detach().contiguous().numpy()
    threads = torch.get_num_threads()
    parts = [_native.topk_inner_product(segs, qn[i:i + QUERY_BLOCK], int(k), threads, ISA, TILE_ROWS)
             for i in range(0, max(len(qn), 1), QUERY_BLOCK)]
    if len(parts) == 1:
        s, r = parts[0]
    else:
        s, r = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return torch.from_numpy(s), torch.from_numpy(r)


__all__ = ["topk_inner_product", "native_info", "ISA", "TILE_ROWS", "QUERY_BLOCK"]
