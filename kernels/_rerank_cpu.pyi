"""Type stub for sgengine.kernels._rerank_cpu, the certified bfloat16 rerank
(kernels/cpu/rerank_select.cpp).

Called by sgengine.kernels.rerank_cpu (rerank_cpu_bf16, certified_rerank, and the test helpers
gram_topk and approx_gram_with_bound), whose docstring holds the derivation of the error bound and
whose module constants give safety (SAFETY), out_rel (OUT_REL * SAFETY) and cap (CAP_FRACTION).
Arrays are numpy, C-contiguous, of exactly the dtype named (no conversion): anything else is a
ValueError naming the argument. The entries need gram_bf16_available() (else RuntimeError),
keep their scratch per thread between calls and release the GIL while they run.
"""
import numpy as np
import numpy.typing as npt

threading: str
"""'openmp' or 'std::thread': how rows (or queries) are spread over threads."""

def certified_rerank(Y: npt.NDArray[np.float32], q: npt.NDArray[np.float32], Kp: int, beta: float, safety: float,
                     out_rel: float, cap: int, threads: int = 1, isa: str = "auto", likely_slot: int = -1
                     ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.uint8],
                                tuple[int, int, int]]:
    """SPEC 6 steps 2-8 for Y [nq, M, D] and q [nq, D] with K' = Kp (1 <= Kp <= M): (order [nq, M],
    scores [nq, M], status [nq], (rows, exact_dots, dense_rows)). status 1: a row of that query is
    not finite or has a norm above 1e15; its order and scores are not valid (the caller reruns it).
    Rows with more than `cap` candidates are dotted whole. One query or threads == 1: the kernels
    run threaded over rows; else a query per thread. likely_slot >= 0 runs the adaptive mode
    (docs/adaptive_rerank.md) with that slot; -1 (default) SPEC 6 as written."""

def certified_neighbours(Y: npt.NDArray[np.float32], q: npt.NDArray[np.float32] | None, Kp: int, safety: float,
                         out_rel: float, cap: int, threads: int = 1, isa: str = "auto"
                         ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], tuple[int, int, int]]:
    """SPEC 6.3 alone: (v [nq, M, Kp] descending, n [nq, M, Kp], (rows, exact_dots, dense_rows)).
    q sets the shift as the rerank does; None: c = 0. ValueError for a row outside the bound's model."""

def approx_gram_bound(Y: npt.NDArray[np.float32], c: npt.NDArray[np.float32], safety: float, out_rel: float,
                      threads: int = 1, isa: str = "auto") -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The bfloat16 Gram shifted by c [nq] (rounded to bfloat16), and its bound: (x, e), [nq, M, M]
    each, x = the approximate Gram, e = the bound the selection uses (|x - Y Y^T| <= e if it is
    right). ValueError for a row outside the bound's model."""

def gram_bf16_available() -> bool:
    """Whether the entries run here: AVX512_BF16 and AVX-512F/BW/VL/DQ, and a compiler that had them."""

def isas() -> list[str]:
    """The compiled variants this CPU runs, best first ("auto" picks the first)."""

def bf16_hardware() -> bool:
    """Whether the CPU has bfloat16 dot-product instructions (AVX512_BF16 or AMX-BF16)."""
