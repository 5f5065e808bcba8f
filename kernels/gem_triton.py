"""Fused pooling head in Triton: Regional-GeM then GeM+ in one pass over the s4 feature map.

    gem_pool_triton(fmap [B, C, h, w]) -> [B, C] float32
    == gem_pool_reference(fmap)   (sgengine/head.py, SPEC 3.3-3.4)

One program owns one (image, block of channels) and holds that block's whole h*w plane in
registers, so the map is read from memory exactly once (the bandwidth floor). Inside the program:
F^2.5 is computed once per position, the 5x5 window sum is two separable 5-tap passes whose
reflected neighbours are fetched with `tl.gather` (on-chip, no second trip to memory), then the
mix, the clamp, ^4.6 and the mean over positions. Everything is accumulated in float32 whatever
the input dtype: x^4.6 overflows float16 above x ~ 11.

On CPU the kernel runs only under TRITON_INTERPRET=1 (set before triton is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgengine.head import GEMP_EPS, GEMP_P, RGEM_MIX, RGEM_P, RGEM_SIZE

# Registers hold the whole plane of a channel block, so the tile is capped; the interpreter cannot
# build blocks larger than 2^20 elements at all.
MAX_PLANE = 1 << 20
_GPU_TILE = 4096
_INTERPRET_TILE = 1 << 15


def interpreting() -> bool:
    """Whether this module's kernels run in Triton's CPU interpreter.

    Triton decides when a kernel is decorated, i.e. when this module is first imported, so the
    environment variable must be set before that; changing it later changes nothing.
    """
    return type(_gem_pool_kernel).__name__ == "InterpretedFunction"


def gem_launch_settings(C: int, h: int, w: int, *, interpret: bool | None = None) -> dict:
    """Block sizes and warps for one launch: the single place these numbers come from.

    BLOCK_HW covers the whole plane (next power of two of h*w); BLOCK_C fills a tile of about
    4096 elements on a GPU (16 fp32 values per thread with 8 warps, so the ~6 live tiles fit in
    registers) and up to 2^15 under the interpreter, where fewer, larger programs run faster.
    """
    hw = h * w
    if hw > MAX_PLANE:
        raise ValueError(f"feature map plane {h}x{w} has {hw} positions; the Triton head holds a whole "
                         f"plane per program and supports at most {MAX_PLANE} (use impl='cpu')")
    interpret = interpreting() if interpret is None else interpret
    block_hw = triton.next_power_of_2(hw)
    tile = _INTERPRET_TILE if interpret else _GPU_TILE
    block_c = max(1, min(tile // block_hw, triton.next_power_of_2(C)))
    num_warps = int(min(16, max(4, block_c * block_hw // 512)))
    return {"BLOCK_C": block_c, "BLOCK_HW": block_hw, "num_warps": num_warps}


@triton.jit
def _reflect(t, n):
    # ReflectionPad2d index map for t in [-pad, n + pad - 1]; valid because n > pad (checked by the head stage).
    t = tl.where(t < 0, -t, t)
    return tl.where(t >= n, 2 * n - 2 - t, t)


@triton.jit
def _pow_pos(x, p: tl.constexpr):
    # x^p for x > 0 through exp2/log2 (MUFU on NVIDIA); callers guarantee x > 0.
    return tl.exp2(tl.log2(x) * p)


@triton.jit
def _finish(x, box, m, inv_hw, c, out_row_ptr, C, RGEM_P: tl.constexpr, RGEM_SIZE: tl.constexpr,
            RGEM_MIX: tl.constexpr, GEMP_P: tl.constexpr, GEMP_EPS: tl.constexpr):
    # P = (box / size^2)^(1/p). A window of zeros gives box == 0, where log2 would give -inf: P = 0
    # exactly there, as in the reference. Elsewhere box >= x^p > 0.
    pos = box > 0
    pm = tl.where(pos, _pow_pos(tl.where(pos, box * (1.0 / (RGEM_SIZE * RGEM_SIZE)), 1.0), 1.0 / RGEM_P), 0.0)
    r = RGEM_MIX * pm + (1.0 - RGEM_MIX) * x
    # GeM+ clamp; also keeps log2 finite. NaN must survive it (max() would drop it) so that a
    # broken feature map shows in the output instead of vanishing into the eps.
    r = tl.maximum(r, GEMP_EPS, propagate_nan=tl.PropagateNan.ALL)
    r = tl.where(m, _pow_pos(r, GEMP_P), 0.0)
    # mean >= eps^p > 0 on real channels; padding channels (c >= C) get 1 and are not stored.
    mean = tl.where(c < C, tl.sum(r, axis=1) * inv_hw, 1.0)
    g = _pow_pos(mean, 1.0 / GEMP_P)
    tl.store(out_row_ptr + c, g, mask=c < C)


@triton.jit
def _plane_offsets(k, i, j, stride_h, stride_w, PLANE_CONTIG: tl.constexpr):
    # NCHW planes are one contiguous run: offsetting by k itself lets Triton vectorize the load,
    # which i * stride_h + j * stride_w (a div/mod of k) hides from its contiguity analysis.
    if PLANE_CONTIG:
        return k
    else:
        return i * stride_h + j * stride_w


@triton.jit
def _gem_pool_kernel(
    x_ptr, out_ptr, C, H, W, n_cblocks, inv_hw,
    stride_b, stride_c, stride_h, stride_w,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, PLANE_CONTIG: tl.constexpr,
    RGEM_P: tl.constexpr, RGEM_SIZE: tl.constexpr, RGEM_MIX: tl.constexpr,
    GEMP_P: tl.constexpr, GEMP_EPS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.arange(0, BLOCK_HW)
    i = k // W
    j = k % W
    kin = k < H * W
    m = (c[:, None] < C) & kin[None, :]
    # int64 offsets: a large batch of large maps passes 2^31 elements.
    ptrs = (x_ptr + b.to(tl.int64) * stride_b + c[:, None].to(tl.int64) * stride_c
            + _plane_offsets(k, i, j, stride_h, stride_w, PLANE_CONTIG)[None, :])
    x = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    if RGEM_P == 2.5:
        # F^2.5 = F^2 sqrt(F): exact 0 at F = 0, and one MUFU op instead of two.
        xp = x * x * tl.sqrt(x)
    else:
        xp = tl.where(x > 0, _pow_pos(tl.where(x > 0, x, 1.0), RGEM_P), 0.0)

    # Separable window sums; reflected neighbours come from registers with tl.gather.
    rows = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for d in tl.static_range(RGEM_SIZE):
        # Lanes past h*w gather themselves: any in-range index will do, they are masked later.
        idx = tl.where(kin, i * W + _reflect(j + (d - RGEM_SIZE // 2), W), k)
        rows += tl.gather(xp, tl.broadcast_to(idx[None, :], (BLOCK_C, BLOCK_HW)), axis=1)
    box = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for d in tl.static_range(RGEM_SIZE):
        idx = tl.where(kin, _reflect(i + (d - RGEM_SIZE // 2), H) * W + j, k)
        box += tl.gather(rows, tl.broadcast_to(idx[None, :], (BLOCK_C, BLOCK_HW)), axis=1)

    _finish(x, box, m, inv_hw, c, out_ptr + b.to(tl.int64) * C, C, RGEM_P, RGEM_SIZE, RGEM_MIX, GEMP_P, GEMP_EPS)


def gem_pool_triton(fmap: torch.Tensor) -> torch.Tensor:
    """R-GeM + GeM+ of a [B, C, h, w] map (fp32/fp16/bf16, any strides) -> [B, C] float32.

    Trusts the map (`sgengine.head.gem_pool` checks it); needs a CUDA tensor, or a CPU one with
    TRITON_INTERPRET=1. The SPEC constants come from sgengine.head as constexpr arguments.
    """
    if fmap.dtype == torch.float64:  # the stage's check admits float64 for the torch paths
        fmap = fmap.float()
    B, C, h, w = fmap.shape
    s = gem_launch_settings(C, h, w)
    out = torch.empty((B, C), dtype=torch.float32, device=fmap.device)
    if B == 0 or C == 0:
        return out
    n_cblocks = triton.cdiv(C, s["BLOCK_C"])
    plane_contig = fmap.stride(3) == 1 and fmap.stride(2) == w
    _gem_pool_kernel[(B * n_cblocks,)](
        fmap, out, C, h, w, n_cblocks, 1.0 / (h * w), *fmap.stride(),
        BLOCK_C=s["BLOCK_C"], BLOCK_HW=s["BLOCK_HW"], PLANE_CONTIG=plane_contig,
        RGEM_P=RGEM_P, RGEM_SIZE=RGEM_SIZE, RGEM_MIX=RGEM_MIX, GEMP_P=GEMP_P, GEMP_EPS=GEMP_EPS,
        num_warps=s["num_warps"])
    return out


__all__ = ["gem_pool_triton", "gem_launch_settings", "interpreting", "MAX_PLANE"]
