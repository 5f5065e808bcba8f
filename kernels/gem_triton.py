"""Fused pooling head in Triton: Regional-GeM then GeM+ in one pass over the s4 feature map.

    gem_pool_triton(fmap [B, C, h, w]) -> [B, C] float32
    == gem_plus(regional_gem(fmap.float()))   (sgengine/model/head.py, SPEC 3.3-3.4)

One program owns one (image, block of channels) and holds that block's whole h*w plane in
registers, so the map is read from memory exactly once (the bandwidth floor). Inside the program:
F^2.5 is computed once per position, the 5x5 window sum is two separable 5-tap passes whose
reflected neighbours are fetched with `tl.gather` (on-chip, no second trip to memory), then the
mix, the clamp, ^4.6 and the mean over positions. Everything is accumulated in float32 whatever
the input dtype: x^4.6 overflows float16 above x ~ 11.

A second neighbour strategy, `via="scratch"`, stages F^2.5 and the row sums in a small per-program
global scratch buffer (L2-resident, reused by a persistent loop) behind CTA barriers; it exists
for Triton builds whose `tl.gather` lowering fails or is slow on a given GPU.

On CPU the kernel runs only under TRITON_INTERPRET=1 (set before triton is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gem_cpu import check_feature_map

RGEM_P = 2.5
GEMP_P = 4.6
GEMP_EPS = 1e-8

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
    return type(_gem_pool_gather_kernel).__name__ == "InterpretedFunction"


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
    # ReflectionPad2d(2) index map for t in [-2, n + 1]; valid because n >= 3 (checked on the host).
    t = tl.where(t < 0, -t, t)
    return tl.where(t >= n, 2 * n - 2 - t, t)


@triton.jit
def _pow_pos(x, p: tl.constexpr):
    # x^p for x > 0 through exp2/log2 (MUFU on NVIDIA); callers guarantee x > 0.
    return tl.exp2(tl.log2(x) * p)


@triton.jit
def _finish(x, box, m, inv_hw, c, out_row_ptr, C,
            RGEM_P: tl.constexpr, GEMP_P: tl.constexpr, GEMP_EPS: tl.constexpr):
    # P = (box / 25)^(1/p). A window of zeros gives box == 0, where log2 would give -inf: P = 0
    # exactly there, as in the reference. Elsewhere box >= x^2.5 > 0.
    pos = box > 0
    pm = tl.where(pos, _pow_pos(tl.where(pos, box * (1.0 / 25.0), 1.0), 1.0 / RGEM_P), 0.0)
    r = 0.5 * pm + 0.5 * x
    # GeM+ clamp; also keeps log2 finite. NaN must survive it (max() would drop it) so that a
    # broken feature map shows in the output instead of vanishing into the eps.
    r = tl.maximum(r, GEMP_EPS, propagate_nan=tl.PropagateNan.ALL)
    r = tl.where(m, _pow_pos(r, GEMP_P), 0.0)
    # mean >= eps^4.6 > 0 on real channels; padding channels (c >= C) get 1 and are not stored.
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
def _gem_pool_gather_kernel(
    x_ptr, out_ptr, C, H, W, n_cblocks, inv_hw,
    stride_b, stride_c, stride_h, stride_w,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, PLANE_CONTIG: tl.constexpr,
    RGEM_P: tl.constexpr, GEMP_P: tl.constexpr, GEMP_EPS: tl.constexpr,
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
    # F^2.5 = F^2 sqrt(F): exact 0 at F = 0, and one MUFU op instead of two.
    x25 = x * x * tl.sqrt(x)

    rows = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for d in tl.static_range(5):
        # Lanes past h*w gather themselves: any in-range index will do, they are masked later.
        idx = tl.where(kin, i * W + _reflect(j + (d - 2), W), k)
        rows += tl.gather(x25, tl.broadcast_to(idx[None, :], (BLOCK_C, BLOCK_HW)), axis=1)
    box = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for d in tl.static_range(5):
        idx = tl.where(kin, _reflect(i + (d - 2), H) * W + j, k)
        box += tl.gather(rows, tl.broadcast_to(idx[None, :], (BLOCK_C, BLOCK_HW)), axis=1)

    _finish(x, box, m, inv_hw, c, out_ptr + b.to(tl.int64) * C, C, RGEM_P, GEMP_P, GEMP_EPS)


@triton.jit
def _gem_pool_scratch_kernel(
    x_ptr, out_ptr, scratch_ptr, C, H, W, n_cblocks, n_items, inv_hw,
    stride_b, stride_c, stride_h, stride_w,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, PLANE_CONTIG: tl.constexpr,
    RGEM_P: tl.constexpr, GEMP_P: tl.constexpr, GEMP_EPS: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cc = tl.arange(0, BLOCK_C)
    k = tl.arange(0, BLOCK_HW)
    i = k // W
    j = k % W
    kin = k < H * W
    # Two planes of scratch per program (F^2.5, row sums), reused by every item it handles, so
    # the scratch stays in L2 instead of costing a full extra write of the map.
    s1 = scratch_ptr + pid.to(tl.int64) * (2 * BLOCK_C * BLOCK_HW) + cc[:, None] * BLOCK_HW
    s2 = s1 + BLOCK_C * BLOCK_HW
    # A while loop, not `tl.range(pid, n_items, nprog)`: both compile to the same loop, but Triton
    # 3.6's interpreter turns range bounds into Python ints with int() on 1-element arrays, which
    # NumPy >= 2.4 refuses (upstream triton-lang/triton#9171, fixed after 3.6); `while` only needs
    # the condition's truth value.
    item = pid
    while item < n_items:
        b = item // n_cblocks
        c = (item % n_cblocks) * BLOCK_C + cc
        m = (c[:, None] < C) & kin[None, :]
        ptrs = (x_ptr + b.to(tl.int64) * stride_b + c[:, None].to(tl.int64) * stride_c
                + _plane_offsets(k, i, j, stride_h, stride_w, PLANE_CONTIG)[None, :])
        x = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
        tl.store(s1 + k[None, :], x * x * tl.sqrt(x), mask=m)
        # Barriers make this CTA's global stores visible to its other threads; .cg loads read
        # them from L2, never from a stale L1 line.
        tl.debug_barrier()
        rows = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
        for d in tl.static_range(5):
            idx = i * W + _reflect(j + (d - 2), W)
            rows += tl.load(s1 + idx[None, :], mask=m, other=0.0, cache_modifier=".cg")
        tl.store(s2 + k[None, :], rows, mask=m)
        tl.debug_barrier()
        box = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
        for d in tl.static_range(5):
            idx = _reflect(i + (d - 2), H) * W + j
            box += tl.load(s2 + idx[None, :], mask=m, other=0.0, cache_modifier=".cg")
        # No write-after-read race on the reused planes: the next item's store to s1 comes after
        # this item's second barrier (every thread done reading s1), its store to s2 after its own
        # first barrier (every thread done reading this item's s2).
        _finish(x, box, m, inv_hw, c, out_ptr + b.to(tl.int64) * C, C, RGEM_P, GEMP_P, GEMP_EPS)
        item += nprog


def gem_pool_triton(fmap: torch.Tensor, *, via: str = "gather") -> torch.Tensor:
    """R-GeM + GeM+ of a [B, C, h, w] map (fp32/fp16/bf16, any strides) -> [B, C] float32.

    `via` picks how a program reaches its 5x5 neighbours: "gather" (default, on-chip tl.gather)
    or "scratch" (L2-resident scratch planes). Needs a CUDA tensor, or TRITON_INTERPRET=1 on CPU.
    """
    check_feature_map(fmap)
    interpret = interpreting()
    if fmap.device.type != "cuda" and not interpret:
        raise ValueError(f"gem_pool_triton: feature map is on {fmap.device}; Triton needs a CUDA tensor "
                         "(or TRITON_INTERPRET=1 set before sgengine.kernels.gem_triton is imported, "
                         "for CPU testing)")
    if interpret and fmap.device.type != "cpu":
        raise ValueError(f"gem_pool_triton: kernels were loaded in interpreter mode (TRITON_INTERPRET=1) "
                         f"and cannot run on {fmap.device}; move the map to the CPU")
    if fmap.dtype == torch.float64:
        raise ValueError("gem_pool_triton: float64 feature maps are not supported; use impl='cpu' or 'reference'")
    if via not in ("gather", "scratch"):
        raise ValueError(f"gem_pool_triton: via must be 'gather' or 'scratch', got {via!r}")
    B, C, h, w = fmap.shape
    s = gem_launch_settings(C, h, w, interpret=interpret)
    out = torch.empty((B, C), dtype=torch.float32, device=fmap.device)
    if B == 0 or C == 0:
        return out
    n_cblocks = triton.cdiv(C, s["BLOCK_C"])
    n_items = B * n_cblocks
    plane_contig = fmap.stride(3) == 1 and fmap.stride(2) == w
    consts = dict(BLOCK_C=s["BLOCK_C"], BLOCK_HW=s["BLOCK_HW"], PLANE_CONTIG=plane_contig,
                  RGEM_P=RGEM_P, GEMP_P=GEMP_P, GEMP_EPS=GEMP_EPS, num_warps=s["num_warps"])
    strides = fmap.stride()
    if via == "gather":
        _gem_pool_gather_kernel[(n_items,)](fmap, out, C, h, w, n_cblocks, 1.0 / (h * w), *strides, **consts)
    else:
        n_prog = min(n_items, _persistent_programs(fmap.device, interpret))
        scratch = torch.empty(n_prog * 2 * s["BLOCK_C"] * s["BLOCK_HW"], dtype=torch.float32, device=fmap.device)
        _gem_pool_scratch_kernel[(n_prog,)](fmap, out, scratch, C, h, w, n_cblocks, n_items, 1.0 / (h * w),
                                            *strides, **consts)
    return out


def _persistent_programs(device: torch.device, interpret: bool) -> int:
    if interpret:
        return 4
    # A few resident programs per SM: enough to hide latency, few enough that the scratch
    # (n_prog * 2 tiles) stays far below the L2 size.
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


__all__ = ["gem_pool_triton", "gem_launch_settings", "interpreting", "MAX_PLANE"]
