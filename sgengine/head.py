"""The pooling head (SPEC 3.3-4): its constants, its plain PyTorch reference, its input check and
the dispatch to the fused kernels.

    gem_pool(fmap [B, C, h, w], *, impl="auto") -> [B, C] float32   R-GeM + GeM+ (before L2, whitening)
    scale_gem_max([S x [B, D]]) -> [B, D]                           Scale-GeM (SPEC 4)

Implementations (`IMPLS`; the same names in `Engine.describe()`, the benchmark providers and the
functions):

| name         | function                                  | runs on                              |
|--------------|-------------------------------------------|--------------------------------------|
| `reference`  | `gem_pool_reference` (below)              | any device, float32, step by step    |
| `cpu_torch`  | `sgengine.kernels.gem_cpu.gem_pool_cpu_torch`  | any device (tuned for the CPU)  |
| `cpu_native` | `sgengine.kernels.gem_cpu.gem_pool_cpu_native` | CPU maps, C++ extension built   |
| `triton`     | `sgengine.kernels.gem_triton.gem_pool_triton`  | CUDA (CPU under TRITON_INTERPRET=1) |

"auto" takes triton on CUDA, cpu_native on the CPU where it is built, else cpu_torch.
`gem_pool` checks its input once; the kernels trust it and read the constants below.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice
from .errors import BackendUnavailableError, InputError

# SPEC 3.3-3.4 and 4. These are the only copies: the kernels receive them (Triton constexpr
# arguments, C++ arguments), and the reference model's head reads them from here.
RGEM_P = 2.5
RGEM_SIZE = 5
RGEM_MIX = 0.5
GEMP_P = 4.6
GEMP_EPS = 1e-8
SCALES = (0.7071, 1.0, 1.4142)
L2_EPS = 1e-12
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------- reference
def regional_gem(fmap: torch.Tensor, p: float = RGEM_P, size: int = RGEM_SIZE, mix: float = RGEM_MIX) -> torch.Tensor:
    """SPEC 3.3: R = mix * P + (1 - mix) * F, P the size x size power mean over a reflection-padded map.

    The reference writes P as LPPool2d(p, size, 1) over ReflectionPad2d(size // 2)(F / size^(2/p));
    the mean of F^p over the window, to the 1/p, is the same number. F must be >= 0 (the s4 map
    ends in a ReLU) and h, w > size // 2 (reflection padding; see SPEC 9).
    """
    pad = size // 2
    padded = F.pad(fmap, (pad, pad, pad, pad), mode="reflect")
    pooled = F.avg_pool2d(padded.pow(p), size, stride=1).pow(1.0 / p)
    return mix * pooled + (1.0 - mix) * fmap


def gem_plus(fmap: torch.Tensor, p: float = GEMP_P, eps: float = GEMP_EPS) -> torch.Tensor:
    """SPEC 3.4: per channel (mean over positions of max(x, eps)^p)^(1/p). [B, C, h, w] -> [B, C]."""
    return fmap.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def gem_pool_reference(fmap: torch.Tensor) -> torch.Tensor:
    """Regional-GeM then GeM+ in float32: the part of the head the fused kernels replace."""
    return gem_plus(regional_gem(fmap.float()))


def l2n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=-1, eps=L2_EPS)


def scale_gem_max(per_scale: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """SPEC 4: normalize(elementwise max over scales of normalize(d_s)). Input [S, B, D] or a list."""
    stacked = torch.stack(list(per_scale)) if not isinstance(per_scale, torch.Tensor) else per_scale
    return l2n(l2n(stacked).amax(dim=0))


_reflect_pad = nn.ReflectionPad2d(RGEM_SIZE // 2)
_lp_pool = nn.LPPool2d(RGEM_P, RGEM_SIZE, stride=1)


def gem_pool_chain(fmap: torch.Tensor) -> torch.Tensor:
    """R-GeM then GeM+ written as the official modules run them (pad, scale, LPPool2d, mix, GeM+):
    the baseline the benchmarks time ("chain"). Trusts its input.

    LPPool2d computes (avg_pool(x^p) * k*k)^(1/p), i.e. the window *sum* of x^p to the 1/p; the
    official code divides the map by 25^(1/p) first, so the sum becomes the window mean: the same
    number as SPEC 3.3's power mean, reached by more arithmetic.
    """
    x = fmap.float()
    pooled = _lp_pool(_reflect_pad(x) / RGEM_SIZE ** (2.0 / RGEM_P))
    r = RGEM_MIX * pooled + (1.0 - RGEM_MIX) * x
    r = r.clamp(min=GEMP_EPS).pow(GEMP_P)
    g = F.avg_pool2d(r, (r.size(-2), r.size(-1))).pow(1.0 / GEMP_P)
    return g.flatten(1)


@dataclass(frozen=True)
class HeadConfig:
    rgem_p: float = RGEM_P
    rgem_size: int = RGEM_SIZE
    rgem_mix: float = RGEM_MIX
    gemp_p: float = GEMP_P
    gemp_eps: float = GEMP_EPS
    scales: tuple[float, ...] = SCALES

    def to_dict(self) -> dict:
        return {
            "rgem": {"p": self.rgem_p, "size": self.rgem_size, "mix": self.rgem_mix},
            "gem_plus": {"p": self.gemp_p, "eps": self.gemp_eps},
            "scales": list(self.scales),
            "scale_gem": "max",
        }

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        return cls(
            rgem_p=float(d["rgem"]["p"]), rgem_size=int(d["rgem"]["size"]), rgem_mix=float(d["rgem"]["mix"]),
            gemp_p=float(d["gem_plus"]["p"]), gemp_eps=float(d["gem_plus"]["eps"]),
            scales=tuple(float(s) for s in d["scales"]),
        )

    def pooling_is_spec(self) -> bool:
        """Whether R-GeM and GeM+ use SPEC 3's constants (the ones the fused kernels receive); the
        scales are free."""
        spec = HeadConfig()
        return all(getattr(self, f) == getattr(spec, f) for f in ("rgem_p", "rgem_size", "rgem_mix", "gemp_p", "gemp_eps"))


# ----------------------------------------------------------------------------- checks
def check_feature_map(fmap, name: str = "feature map") -> None:
    """InputError (a ValueError) unless `fmap` is a floating [B, C, h, w] map with h, w >= 3."""
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


def check_pooled(out: torch.Tensor, shape: tuple) -> None:
    """NaN/inf in the map reach the pooled vector (every impl propagates them), so checking the
    small [B, C] output is an exact test of the map at no cost."""
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        rows = sorted({int(i) for i in bad.nonzero()[:, 0].tolist()})
        raise InputError(f"feature map {tuple(shape)}: NaN or inf in the features of batch item(s) "
                         f"{rows[:8]} (non-finite values, or values above ~1e8 that overflow x^4.6; check the input image "
                         f"and the backend's precision)")


# ----------------------------------------------------------------------------- dispatch
def _cpu_torch(fmap):
    from .kernels.gem_cpu import gem_pool_cpu_torch
    return gem_pool_cpu_torch(fmap)


def _cpu_native(fmap):
    from .kernels.gem_cpu import gem_pool_cpu_native
    return gem_pool_cpu_native(fmap)


def _triton(fmap):
    from .kernels.gem_triton import gem_pool_triton
    return gem_pool_triton(fmap)


IMPLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "reference": gem_pool_reference,
    "cpu_torch": _cpu_torch,
    "cpu_native": _cpu_native,
    "triton": _triton,
}

_triton_import_error: str | None = None


def _triton_module():
    """The Triton kernel module, imported once; None (and the reason kept) where it fails."""
    global _triton_import_error
    try:
        from .kernels import gem_triton
        return gem_triton
    except Exception as e:  # ImportError, or a Triton build that fails on import
        _triton_import_error = f"{type(e).__name__}: {e}"
        return None


def _why_not(impl: str, device: torch.device) -> str | None:
    """Why `impl` cannot run on a map on `device`, or None when it can."""
    if impl == "triton":
        mod = _triton_module()
        if mod is None:
            return f"Triton does not import ({_triton_import_error})"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "torch sees no CUDA GPU"
            if mod.interpreting():
                return (f"the kernels were loaded under TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}, "
                        "CPU only")
            return None
        if device.type == "cpu" and not mod.interpreting():
            return ("the map is on the CPU and Triton's interpreter is off: set TRITON_INTERPRET=1 before "
                    "sgengine.kernels.gem_triton is first imported (testing only; 'cpu_native' is the fast CPU path)")
        return None if device.type == "cpu" else f"Triton does not run on {device.type} devices"
    if impl == "cpu_native":
        from .kernels.gem_cpu import native_info
        if device.type != "cpu":
            return f"the map is on {device}, the C++ kernel reads CPU memory; 'cpu_torch' runs anywhere"
        info = native_info()
        if not info["available"]:
            return (f"sgengine.kernels._cpu is not built ({info['error']}); rebuild with "
                    f"`pip install -e . --no-build-isolation --no-deps`, or use 'cpu_torch'")
    return None


def available_impls(device: str | torch.device = "cpu") -> tuple[str, ...]:
    """The impls that run for a map on `device`, fastest first ("auto" takes the first)."""
    device = torch.device(device)
    return tuple(i for i in ("triton", "cpu_native", "cpu_torch", "reference") if _why_not(i, device) is None)


def resolve_impl(impl: str, device: str | torch.device) -> str:
    """The implementation name `impl` stands for on `device` ("auto": triton on CUDA, else
    cpu_native where built, else cpu_torch); BackendUnavailableError if it cannot run there."""
    check_choice(impl, "head impl", ("auto", *IMPLS))
    device = torch.device(device)
    if impl == "auto":
        if device.type == "cuda" and _why_not("triton", device) is None:
            return "triton"
        return "cpu_native" if _why_not("cpu_native", device) is None else "cpu_torch"
    why = _why_not(impl, device)
    if why is not None:
        raise BackendUnavailableError(f"gem_pool: impl={impl!r} cannot run on {device}: {why}")
    return impl


def gem_pool(fmap: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """R-GeM then GeM+ of an s4 feature map [B, C, h, w] (h, w >= 3) -> [B, C] float32.

    Every impl returns the reference's numbers to ~1e-6 relative on float32 input. A map holding
    NaN or inf gives an InputError instead of a descriptor.
    """
    check_feature_map(fmap)
    out = IMPLS[resolve_impl(impl, fmap.device)](fmap)
    check_pooled(out, fmap.shape)
    return out


__all__ = ["RGEM_P", "RGEM_SIZE", "RGEM_MIX", "GEMP_P", "GEMP_EPS", "SCALES", "L2_EPS", "HeadConfig",
           "regional_gem", "gem_plus", "gem_pool_reference", "gem_pool_chain", "l2n", "scale_gem_max",
           "check_feature_map", "check_pooled", "IMPLS", "available_impls", "resolve_impl", "gem_pool"]
