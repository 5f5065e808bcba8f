"""float32 cuBLAS products in IEEE (or TF32) for a block, whatever the process-wide flags say.

SPEC's products are float32. A host application that turns TF32 on for its own models
(`torch.set_float32_matmul_precision("high")`, `torch.backends.cuda.matmul.allow_tf32 = True`,
`torch.backends.fp32_precision = "tf32"`) would otherwise get 10-bit-mantissa products in
sgengine's fp32 path too (~1e-3 relative score errors, enough to reorder near-ties): the first
stage over float32 rows, the whitening, the reference rerank and the Triton rerank's Gram.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def cublas_fp32(tf32: bool = False):
    """Set cuBLAS float32 matmuls to IEEE (or TF32) for the block, and restore the caller's setting.

    torch >= 2.9 has a per-backend `fp32_precision`; reading and writing that one keeps both the
    legacy (`allow_tf32`) and the new API readable afterwards (mixing them raises). Not
    thread-safe: the flag is process-wide.
    """
    mm = torch.backends.cuda.matmul
    want = "tf32" if tf32 else "ieee"
    try:
        saved = mm.fp32_precision
    except (AttributeError, RuntimeError):
        saved = None
    if saved is not None:
        mm.fp32_precision = want
        try:
            yield
        finally:
            mm.fp32_precision = saved
        return
    saved = mm.allow_tf32
    mm.allow_tf32 = tf32
    try:
        yield
    finally:
        mm.allow_tf32 = saved


def ieee_if_cuda(t: torch.Tensor):
    """cublas_fp32(False) when t is a CUDA tensor, else nothing (CPU products are IEEE already)."""
    return cublas_fp32(False) if t.is_cuda else contextlib.nullcontext()
