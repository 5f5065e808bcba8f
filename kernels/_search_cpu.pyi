"""Type stub for sgengine.kernels._search_cpu, the exact first-stage scan (kernels/cpu/search_f16.cpp).

Called by sgengine.kernels.search_cpu.topk_inner_product, which passes an index's segments as they
are stored (numpy arrays or memmaps), the queries as a contiguous float32 array, the torch thread
count and the module constants ISA and TILE_ROWS.
"""
import numpy as np
import numpy.typing as npt

threading: str
"""'openmp' or 'std::thread': how the rows are spread over threads."""

def topk_inner_product(segments: list[npt.NDArray[np.float16] | npt.NDArray[np.float32]],
                       queries: npt.NDArray[np.float32], k: int, threads: int = 1, isa: str = "auto",
                       tile_rows: int = 0) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-k of queries [nq, D] . rows, the rows being the segments [n_i, D] numbered one after the
    other: (scores float32 [nq, k] descending, rows int64 [nq, k]); among equal scores lower rows
    first. Segments: C-contiguous, one dtype, float16 or float32, read in place (no conversion, no
    copy). queries: float32, C-contiguous. ValueError, naming the argument, for another dtype, a
    non-contiguous array, a mismatched D, an empty list, k outside 1..N, threads < 1, tile_rows < 0
    or an isa this CPU lacks; TypeError for a segment that is not a numpy array. tile_rows: rows per
    tile (0: about 192 KiB of rows). Releases the GIL while it runs."""

def isas() -> list[str]:
    """The compiled variants this CPU can run, best first ("auto" picks the first)."""
