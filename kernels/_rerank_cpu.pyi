"""Type stub for sgengine.kernels._rerank_cpu, the certified rerank neighbour selection
(kernels/cpu/rerank_select.cpp).

Call it through sgengine.kernels.rerank_cpu (rerank_candidates_cpu(select="certified"),
gram_topk), which allocates every buffer, keeps it alive for the call and holds the derivation of
the error bound. Pointers are data_ptr() values of contiguous CPU tensors; both functions release
the GIL.
"""

threading: str
"""'openmp' or 'std::thread': how rows are spread over threads."""

def prepare_bf16(y_ptr: int, q_ptr: int, b: int, M: int, D: int, ld: int, Kp: int, left_ptr: int,
                 right_ptr: int, shift_ptr: int, d_ptr: int, base_ptr: int, norm_ptr: int, safety: float,
                 threads: int = 1, isa: str = "auto") -> int:
    """float32 Y [b*M, D] -> bfloat16 L = [bf16(y) | 1 | 0], R = [bf16(y) | -c | 0] ([b*M, ld] each);
    with q_ptr != 0 also d = Y q (float32 [b*M]) and c = bf16(K'-th largest of d) into shift [b], else
    c is read from shift; the bound's row terms (float64 [b*M], times `safety`) and row norms (float64
    [b*M]). Returns how many rows are not finite or have a norm above 1e15 (then nothing else is valid)."""

def certified_topk(a_ptr: int, y_ptr: int, b: int, M: int, D: int, Kp: int, shift_ptr: int, base_ptr: int,
                   norm_ptr: int, out_rel: float, cap: int, v_ptr: int, n_ptr: int, threads: int = 1,
                   isa: str = "auto") -> tuple[int, int]:
    """From A = L R^T (bfloat16 [b, M, M]) and the bound, the exact top K' of each Gram row of Y
    (float32 [b, M, D]) into v (float32 [b, M, K'], descending) and n (int64 [b, M, K']).
    out_rel: the output-rounding bound relative to |a_ij|. Rows with more than `cap` candidates are
    dotted whole. Returns (exact dots taken, rows dotted whole)."""

def isas() -> list[str]:
    """The compiled variants this CPU runs, best first ("auto" picks the first)."""

def bf16_hardware() -> bool:
    """Whether the CPU has bfloat16 dot-product instructions (AVX512_BF16 or AMX-BF16)."""
