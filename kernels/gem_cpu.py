"""Pooling head on the CPU: the official module chain (for tests and benchmarks) and a fast path.

    gem_pool_chain(fmap)    -> [B, C] float32   R-GeM + GeM+ as the official code runs it, module by module
    gem_pool_cpu(fmap)      -> [B, C] float32   the same numbers with a handful of torch passes over the map
    gem_pool_native(fmap)   -> [B, C] float32   the fused C++ kernel (kernels/cpu/gem.cpp), one pass per plane
    native_info()           -> dict             whether the C++ kernel is built here, and how it runs

All equal `gem_pool_reference` in sgengine/model/head.py (SPEC 3.3-3.4).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sgengine.errors import BackendUnavailableError, InputError

# The compiled kernel is optional: a source checkout without a build, or a wheel built with no
# C++ compiler, keeps the torch fast path. The reason is kept for error messages and describe().
try:
    from . import _cpu as _native
    _native_error: str | None = None
except ImportError as e:  # not built, or built for another Python
    _native = None
    _native_error = f"{type(e).__name__}: {e}"

RGEM_P = 2.5
RGEM_SIZE = 5
GEMP_P = 4.6
GEMP_EPS = 1e-8
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_feature_map(fmap: torch.Tensor, name: str = "feature map") -> None:
    """Raise InputError (a ValueError) unless `fmap` is a floating [B, C, h, w] map with h, w >= 3."""
    if not isinstance(fmap, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor [B, C, h, w], got {type(fmap).__name__}")
    if fmap.dim() != 4:
        raise InputError(f"{name}: expected 4 dimensions [B, C, h, w], got shape {tuple(fmap.shape)}")
    if fmap.dtype not in FLOAT_DTYPES:
        raise InputError(f"{name}: dtype {fmap.dtype} is not supported; use float32, float16 or bfloat16")
    h, w = fmap.shape[-2:]
    if h < 3 or w < 3:
        raise InputError(
            f"{name}: shape {tuple(fmap.shape)} has h x w = {h}x{w}, but R-GeM's reflection padding "
            f"(pad 2) needs h, w >= 3; upscale the image so its smallest scale gives an s4 map of at "
            f"least 3x3 (SPEC 9, sgengine.preprocess.ensure_min_size)")


# ---------------------------------------------------------------------------------------------
# The reference chain, module by module, as the official SuperGlobal code runs it.
_reflect_pad = nn.ReflectionPad2d(RGEM_SIZE // 2)
_lp_pool = nn.LPPool2d(RGEM_P, RGEM_SIZE, stride=1)


def gem_pool_chain(fmap: torch.Tensor) -> torch.Tensor:
    """R-GeM then GeM+ written as the official modules: pad, scale, LPPool2d, mix, GeM+ pooling.

    LPPool2d computes (avg_pool(x^p) * k*k)^(1/p), i.e. the window *sum* of x^p to the 1/p; the
    official code divides the map by 25^(1/p) first, so the sum becomes the window mean: the same
    number as SPEC 3.3's power mean, reached by more arithmetic.
    """
    check_feature_map(fmap)
    x = fmap.float()
    pooled = _lp_pool(_reflect_pad(x) / RGEM_SIZE ** (2.0 / RGEM_P))
    r = 0.5 * pooled + 0.5 * x
    r = r.clamp(min=GEMP_EPS).pow(GEMP_P)
    g = F.avg_pool2d(r, (r.size(-2), r.size(-1))).pow(1.0 / GEMP_P)
    return g.flatten(1)


# ---------------------------------------------------------------------------------------------
# The fast path.
#
# Measured on the 2-core CPU: pow() with a fractional exponent costs ~10x a multiply, and log()
# of exact zeros (half of a ReLU map) is another ~10x slower than of positive numbers (the vector
# library takes a scalar path for specials). So: F^2.5 = F^2 sqrt(F); the two unavoidable
# fractional powers go through log + exp2 on inputs clamped away from zero; constant factors are
# folded into the few scalars at the end; and every step works in place on one or two buffers.
_TINY = 1e-30  # clamp before sqrt/log: keeps them off the slow zero path, changes no result (below)
_LN2 = math.log(2.0)
_MEAN_SCALE = RGEM_SIZE ** (-2.0 / RGEM_P)  # (sum / 25)^(1/p) = sum^(1/p) * 25^(-1/p)


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


def gem_pool_cpu(fmap: torch.Tensor, *, columns: str = "auto") -> torch.Tensor:
    """R-GeM + GeM+ of a [B, C, h, w] map -> [B, C] float32, equal to the reference within ~1e-6.

    Passes: F^2.5 written straight into a row-padded buffer, a 5-row box sum written straight into
    a column-padded buffer, a 5-column box sum, then P, the mix, the clamp, ^4.6 and the mean, in
    place. NCHW and channels-last inputs both run without a layout copy. `columns` ("auto",
    "slices", "matmul") picks how NCHW column sums are done (tests and benchmarks pin it).
    """
    check_feature_map(fmap)
    B, C, h, w = fmap.shape
    x = fmap.float()  # fp16/bf16 are widened once; x^4.6 overflows them above ~11
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # [B, h, w, C]: a row step is w*C elements and a column step C, both long contiguous runs.
        x3 = x.permute(0, 2, 3, 1).reshape(B, h, w * C)
        A, unit = B, C
    else:
        x3 = x.contiguous().view(B * C, h, w)
        A, unit = B * C, 1
    if columns == "auto":
        columns = "matmul" if unit == 1 else "slices"

    # 1) F^2.5 into the row-padded buffer. Clamping to _TINY first makes sqrt(0) = 1e-15, but
    #    the product with F^2 = 0 is still exactly 0.
    dev = x.device  # torch ops only: correct on any device, written and tuned for the CPU
    p = torch.empty(A, h + 4, w * unit, device=dev)
    inner = p[:, 2:h + 2]
    torch.clamp_min(x3, _TINY, out=inner).sqrt_().mul_(x3).mul_(x3)
    _reflect_rows(p, h)
    # 2) 5-tap sums along h, then 3) along w.
    if columns == "matmul":
        if unit != 1:
            raise ValueError("gem_pool_cpu: columns='matmul' needs an NCHW-contiguous map")
        rows = _box5(p, h, torch.empty(A, h, w, device=dev))
        m = _WINDOW_MATRICES.get((w, dev))
        if m is None:
            m = _WINDOW_MATRICES.setdefault((w, dev), _reflect_window_matrix(w).to(dev))
        # [B*C*h, w] x [w, w] with small integer weights: the sums are as exact as plain adds.
        box = torch.mm(rows.view(-1, w), m)
    elif columns == "slices":
        q = torch.empty(A * h, w + 4, unit, device=dev)
        _box5(p, h, out=q.view(A, h, (w + 4) * unit)[:, :, 2 * unit:(w + 2) * unit])
        _reflect_rows(q, w)
        box = _box5(q, w, torch.empty(A * h, w, unit, device=dev))
    else:
        raise ValueError(f"gem_pool_cpu: columns must be 'auto', 'slices' or 'matmul', got {columns!r}")
    # NCHW: [B*C, h*w]; channels-last: [B, h*w, C]. Positions are dim 1 either way.
    box = box.view(A, h * w, unit)
    xs = x3.view(A, h * w, unit)
    # 4) P * 25^(1/p) = box^(1/p). A window of zeros has box = 0; the clamp turns its P into
    #    ~1e-12 instead of 0, which only matters where every F in the window is ~0, i.e. where the
    #    GeM+ clamp at 1e-8 overrides R anyway.
    box.clamp_min_(_TINY).log_().mul_(1.0 / (RGEM_P * _LN2)).exp2_()
    # 5) R' = 2R = F + 25^(-1/p) box^(1/p): the 0.5 of the mix is taken out of the loop and
    #    applied to the final scalar, and the clamp moves with it (R >= 1e-8 <=> R' >= 2e-8).
    r = torch.add(xs, box, alpha=_MEAN_SCALE, out=box)
    r.clamp_min_(2.0 * GEMP_EPS).log_().mul_(GEMP_P / _LN2).exp2_()
    # 6) g = (mean R^p)^(1/p) = 0.5 * (mean R'^p)^(1/p)
    g = r.sum(dim=1).div_(h * w).pow_(1.0 / GEMP_P).mul_(0.5)
    return g.view(B, C)


# ---------------------------------------------------------------------------------------------
# The fused C++ kernel (sgengine.kernels._cpu, built by CMake from kernels/cpu/gem.cpp).
def native_info() -> dict:
    """{"available": bool, "isa": best instruction set, "isas": all usable, "threading": ..., "error": str|None}."""
    if _native is None:
        return {"available": False, "isa": None, "isas": (), "threading": None, "error": _native_error}
    isas = tuple(_native.isas())
    return {"available": True, "isa": isas[0], "isas": isas, "threading": _native.threading, "error": None}


def gem_pool_native(fmap: torch.Tensor, *, threads: int | None = None, isa: str = "auto") -> torch.Tensor:
    """R-GeM + GeM+ of a CPU [B, C, h, w] map -> [B, C] float32 with the fused C++ kernel.

    float32 NCHW and channels-last maps are read in place (no layout copy); float16/bfloat16/
    float64 are converted to float32 first (one pass, the same widening the torch path does);
    other strides are made contiguous first. `threads` defaults to torch.get_num_threads();
    `isa` ("auto", "avx512", "avx2", "baseline") pins the compiled variant (tests, benchmarks).
    A plane holding NaN, inf or negative values is pooled by an exact scalar path, so NaN in the
    map gives NaN in that output, as in the reference.
    """
    check_feature_map(fmap)
    if _native is None:
        raise BackendUnavailableError(
            f"gem_pool_native: the C++ kernel sgengine.kernels._cpu is not built here ({_native_error}); "
            f"rebuild with `pip install -e . --no-build-isolation --no-deps` (needs CMake and a C++17 compiler) "
            f"or use the torch path (impl='cpu_torch')")
    if fmap.device.type != "cpu":
        raise BackendUnavailableError(f"gem_pool_native: the map is on {fmap.device}; the C++ kernel reads CPU memory "
                                      f"(impl='cpu_torch' runs on any device)")
    x = fmap.detach()
    if x.dtype != torch.float32:
        x = x.float()  # keeps channels-last; x^4.6 would overflow float16 above ~11
    st = x.stride()
    if st[3] != 1 and st[1] != 1:
        x = x.contiguous()
    B, C = x.shape[:2]
    out = torch.empty(B, C, dtype=torch.float32)
    if out.numel():
        n = torch.get_num_threads() if threads is None else int(threads)
        if n < 1:
            raise InputError(f"gem_pool_native: threads must be >= 1, got {threads}")
        _native.gem_pool(x.data_ptr(), list(x.shape), list(x.stride()), out.data_ptr(), n, isa)
    return out


__all__ = ["gem_pool_chain", "gem_pool_cpu", "gem_pool_native", "native_info", "check_feature_map"]
