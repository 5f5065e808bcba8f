"""Pooling head on the CPU: a torch fast path and the fused C++ kernel.

    gem_pool_cpu_torch(fmap)   -> [B, C] float32   a handful of torch passes over the map
    gem_pool_cpu_native(fmap)  -> [B, C] float32   the fused C++ kernel (kernels/cpu/gem.cpp), one pass per plane
    native_info()              -> dict             whether the C++ kernel is built here, and how it runs

Both equal `sgengine.head.gem_pool_reference` (SPEC 3.3-3.4) and read the head's constants from
sgengine.head. They trust their input: `sgengine.head.gem_pool` checks it once (a floating
[B, C, h, w] map, h, w >= 3; the native kernel also needs it on the CPU).
"""
from __future__ import annotations

import math

import torch

from sgengine.errors import BackendUnavailableError
from sgengine.head import GEMP_EPS, GEMP_P, RGEM_MIX, RGEM_P, RGEM_SIZE

# The compiled kernel is optional: a source checkout without a build, or a wheel built with no
# C++ compiler, keeps the torch fast path. The reason is kept for error messages and describe().
try:
    from . import _cpu as _native
    _native_error: str | None = None
except ImportError as e:  # not built, or built for another Python
    _native = None
    _native_error = f"{type(e).__name__}: {e}"

# How gem_pool_cpu_torch sums NCHW columns: "auto" (a [w, w] matmul for NCHW maps, shifted slices
# for channels-last ones), "slices" or "matmul" (tests and benchmarks pin it).
COLUMNS = "auto"
# The C++ variant gem_pool_cpu_native runs: "auto" (the best this CPU runs), "avx512", "avx2" or
# "baseline" (tests pin each one).
ISA = "auto"


# ---------------------------------------------------------------------------------------------
# The torch path.
#
# Measured on the 2-core CPU: pow() with a fractional exponent costs ~10x a multiply, and log()
# of exact zeros (half of a ReLU map) is another ~10x slower than of positive numbers (the vector
# library takes a scalar path for specials). So: F^2.5 = F^2 sqrt(F); the two unavoidable
# fractional powers go through log + exp2 on inputs clamped away from zero; constant factors are
# folded into the few scalars at the end; and every step works in place on one or two buffers.
# This path implements SPEC 3.3's p = 2.5 (F^2.5 = F^2 sqrt(F)) and 5x5 window; the mix, q and eps
# come from sgengine.head as they are.
_TINY = 1e-30  # clamp before sqrt/log: keeps them off the slow zero path, changes no result (below)
_LN2 = math.log(2.0)
# R / (1 - m) = F + m / (1 - m) * (sum / 25)^(1/p), with (sum / 25)^(1/p) = sum^(1/p) * 25^(-1/p).
_P_SCALE = RGEM_MIX / (1.0 - RGEM_MIX) * RGEM_SIZE ** (-2.0 / RGEM_P)


def _reflect_rows(p: torch.Tensor, n: int) -> None:
    # p: [A, n + 4, D] whose rows 2..n+1 hold the data; fill ReflectionPad(2) rows (needs n >= 3).
    p[:, 0] = p[:, 4]
    p[:, 1] = p[:, 3]
    p[:, n + 2] = p[:, n]
    p[:, n + 3] = p[:, n - 1]


def _box5(p: torch.Tensor, n: int, out: torch.Tensor) -> torch.Tensor:
    # Sum of 5 consecutive rows of the padded [A, n + 4, D] buffer -> out [A, n, D].
    torch.add(p[:, 0:n], p[:, 1:n + 1], out=out)
    for d in range(2, RGEM_SIZE):
        out += p[:, d:d + n]
    return out


def _reflect_window_matrix(n: int) -> torch.Tensor:
    # M[k, t] = how many of t's 5 reflected neighbours are k, so (row @ M) is the window sum.
    m = torch.zeros(n, n)
    for t in range(n):
        for d in range(-2, 3):
            k = abs(t + d)
            if k >= n:
                k = 2 * (n - 1) - k
            m[k, t] += 1.0
    return m


_WINDOW_MATRICES: dict[tuple[int, torch.device], torch.Tensor] = {}


def gem_pool_cpu_torch(fmap: torch.Tensor) -> torch.Tensor:
    """R-GeM + GeM+ of a [B, C, h, w] map -> [B, C] float32, equal to the reference within ~1e-6.

    Passes: F^2.5 written straight into a row-padded buffer, a 5-row box sum written straight into
    a column-padded buffer, a 5-column box sum, then P, the mix, the clamp, ^4.6 and the mean, in
    place. NCHW and channels-last inputs both run without a layout copy. Torch ops only: it runs
    on any device, and is tuned for the CPU.
    """
    B, C, h, w = fmap.shape
    x = fmap.float()  # fp16/bf16 are widened once; x^4.6 overflows them above ~11
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # [B, h, w, C]: a row step is w*C elements and a column step C, both long contiguous runs.
        x3 = x.permute(0, 2, 3, 1).reshape(B, h, w * C)
        A, unit = B, C
    else:
        x3 = x.contiguous().view(B * C, h, w)
        A, unit = B * C, 1
    columns = COLUMNS
    if columns == "auto":
        columns = "matmul" if unit == 1 else "slices"

    # 1) F^2.5 into the row-padded buffer. Clamping to _TINY first makes sqrt(0) = 1e-15, but
    #    the product with F^2 = 0 is still exactly 0.
    dev = x.device
    p = torch.empty(A, h + 4, w * unit, device=dev)
    inner = p[:, 2:h + 2]
    torch.clamp_min(x3, _TINY, out=inner).sqrt_().mul_(x3).mul_(x3)
    _reflect_rows(p, h)
    # 2) 5-tap sums along h, then 3) along w.
    if columns == "matmul" and unit == 1:
        rows = _box5(p, h, torch.empty(A, h, w, device=dev))
        m = _WINDOW_MATRICES.get((w, dev))
        if m is None:
            m = _WINDOW_MATRICES.setdefault((w, dev), _reflect_window_matrix(w).to(dev))
        # [B*C*h, w] x [w, w] with small integer weights: the sums are as exact as plain adds.
        box = torch.mm(rows.view(-1, w), m)
    elif columns in ("slices", "matmul"):  # a channels-last map has no [w, w] form: slices
        q = torch.empty(A * h, w + 4, unit, device=dev)
        _box5(p, h, out=q.view(A, h, (w + 4) * unit)[:, :, 2 * unit:(w + 2) * unit])
        _reflect_rows(q, w)
        box = _box5(q, w, torch.empty(A * h, w, unit, device=dev))
    else:
        raise ValueError(f"sgengine.kernels.gem_cpu.COLUMNS must be 'auto', 'slices' or 'matmul', got {columns!r}")
    # NCHW: [B*C, h*w]; channels-last: [B, h*w, C]. Positions are dim 1 either way.
    box = box.view(A, h * w, unit)
    xs = x3.view(A, h * w, unit)
    # 4) P * 25^(1/p) = box^(1/p). A window of zeros has box = 0; the clamp turns its P into
    #    ~1e-12 instead of 0, which only matters where every F in the window is ~0, i.e. where the
    #    GeM+ clamp at 1e-8 overrides R anyway.
    box.clamp_min_(_TINY).log_().mul_(1.0 / (RGEM_P * _LN2)).exp2_()
    # 5) R' = R / (1 - m) = F + m / (1 - m) * P: the (1 - m) of the mix is taken out of the loop
    #    and applied to the final scalar, and the clamp moves with it (R >= eps <=> R' >= eps / (1 - m)).
    r = torch.add(xs, box, alpha=_P_SCALE, out=box)
    r.clamp_min_(GEMP_EPS / (1.0 - RGEM_MIX)).log_().mul_(GEMP_P / _LN2).exp2_()
    # 6) g = (mean R^q)^(1/q) = (1 - m) * (mean R'^q)^(1/q)
    g = r.sum(dim=1).div_(h * w).pow_(1.0 / GEMP_P).mul_(1.0 - RGEM_MIX)
    return g.view(B, C)


# ---------------------------------------------------------------------------------------------
# The fused C++ kernel (sgengine.kernels._cpu, built by CMake from kernels/cpu/gem.cpp).
def native_info() -> dict:
    """{"available": bool, "isa": best instruction set, "isas": all usable, "threading": ..., "error": str|None}."""
    if _native is None:
        return {"available": False, "isa": None, "isas": (), "threading": None, "error": _native_error}
    isas = tuple(_native.isas())
    return {"available": True, "isa": isas[0], "isas": isas, "threading": _native.threading, "error": None}


def gem_pool_cpu_native(fmap: torch.Tensor) -> torch.Tensor:
    """R-GeM + GeM+ of a CPU [B, C, h, w] map -> [B, C] float32 with the fused C++ kernel, on
    torch.get_num_threads() threads.

    float32 NCHW and channels-last maps are read in place (no layout copy); float16/bfloat16/
    float64 are widened to float32 first (one pass, the same widening the torch path does); other
    strides are made contiguous first. A plane holding NaN, inf or negative values is pooled by an
    exact scalar path, so NaN in the map gives NaN in that output, as in the reference.
    """
    if _native is None:
        raise BackendUnavailableError(
            f"gem_pool_cpu_native: the C++ kernel sgengine.kernels._cpu is not built here ({_native_error}); "
            f"rebuild with `pip install -e . --no-build-isolation --no-deps` (needs CMake and a C++17 compiler) "
            f"or use impl='cpu_torch'")
    x = fmap.detach()
    if x.dtype != torch.float32:
        x = x.float()  # keeps channels-last; x^4.6 would overflow float16 above ~11
    channels_last = not x.is_contiguous() and (x.stride(1) == 1 or x.is_contiguous(memory_format=torch.channels_last))
    if channels_last:
        arr = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).numpy()  # [B, h, w, C] view
    else:
        arr = x.contiguous().numpy()
    out = _native.gem_pool(arr, channels_last, RGEM_P, RGEM_SIZE, RGEM_MIX, GEMP_P, GEMP_EPS,
                           torch.get_num_threads(), ISA)
    return torch.from_numpy(out)


__all__ = ["gem_pool_cpu_torch", "gem_pool_cpu_native", "native_info", "COLUMNS", "ISA"]
