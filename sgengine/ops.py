"""Kernel dispatch: one argument swaps each fast path for its reference.

    gem_pool(fmap [B, C, h, w], *, impl="auto") -> [B, C] float32   (R-GeM + GeM+, SPEC 3.3-3.4,
                                                                      before L2 and whitening)
    available_impls(device) -> tuple of the impl names that run on that device

impl: "triton" (fused one-pass kernel, CUDA; CPU only under TRITON_INTERPRET=1), "cpu" (the CPU
fast path: "cpu_native" for a CPU map when the C++ extension is built, else "cpu_torch"),
"cpu_native" (the fused C++ kernel, kernels/cpu/gem.cpp; CPU maps only), "cpu_torch" (the
vectorized torch fast path; tuned for the CPU, correct on any device), "reference"
(sgengine.model.head, float32, module by module) or "auto" (triton on CUDA tensors when Triton
imports, else cpu). `cpu_path(device)` says which of the two "cpu" runs.
"""
from __future__ import annotations

import os

import torch

from .errors import BackendUnavailableError, InputError

IMPLS = ("auto", "triton", "cpu", "cpu_native", "cpu_torch", "reference")

_triton_import_error: str | None = None
_triton_module = None


def _triton_gem():
    """Import the Triton kernel module once; remember why it failed so errors can say it."""
    global _triton_module, _triton_import_error
    if _triton_module is None and _triton_import_error is None:
        try:
            from .kernels import gem_triton
            _triton_module = gem_triton
        except Exception as e:  # ImportError, or a Triton build that fails on import
            _triton_import_error = f"{type(e).__name__}: {e}"
    return _triton_module


def _triton_runs_on(device: torch.device) -> bool:
    mod = _triton_gem()
    if mod is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and not mod.interpreting()
    return device.type == "cpu" and mod.interpreting()


def _native_runs_on(device: torch.device) -> bool:
    from .kernels.gem_cpu import native_info
    return device.type == "cpu" and native_info()["available"]


def cpu_path(device: str | torch.device = "cpu") -> str:
    """What impl="cpu" runs for a map on `device`: "cpu_native" (the C++ kernel) or "cpu_torch".

    The C++ kernel is picked wherever it runs: on the 2-core EPYC it beat the torch path at every
    shape measured, from 1.2x (2048 planes of 3x3) to 3-14x (2048 planes of 32x24 and 45x32, 1-2
    threads), and the module chain by 13-36x (issue 3).
    """
    return "cpu_native" if _native_runs_on(torch.device(device)) else "cpu_torch"


def available_impls(device: str | torch.device = "cpu") -> tuple[str, ...]:
    """The impls gem_pool can run for a map on `device` ("auto" not listed; it picks one of these)."""
    device = torch.device(device)
    impls = ["reference", "cpu", "cpu_torch"]
    if _native_runs_on(device):
        impls.insert(0, "cpu_native")
    if _triton_runs_on(device):
        impls.insert(0, "triton")
    return tuple(impls)


def resolve_impl(impl: str, device: str | torch.device) -> str:
    """What "auto" (or an explicit impl) means on `device`; raises if it cannot run there."""
    if impl not in IMPLS:
        raise InputError(f"gem_pool: impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_runs_on(device) else "cpu"
    if impl == "triton" and not _triton_runs_on(device):
        if _triton_gem() is None:
            why = f"Triton does not import ({_triton_import_error})"
        elif device.type == "cpu":
            why = ("the map is on the CPU and Triton's interpreter is off: set TRITON_INTERPRET=1 before "
                   "sgengine.kernels.gem_triton is first imported (testing only; impl='cpu' is the fast CPU path)")
        elif _triton_module.interpreting():
            why = f"the kernels were loaded under TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}, CPU only"
        else:
            why = f"Triton does not run on {device.type} devices"
        raise BackendUnavailableError(f"gem_pool: impl='triton' cannot run on {device}: {why}")
    if impl == "cpu_native" and not _native_runs_on(device):
        from .kernels.gem_cpu import native_info
        why = (f"the map is on {device}, the C++ kernel reads CPU memory" if device.type != "cpu" else
               f"sgengine.kernels._cpu is not built ({native_info()['error']}); rebuild with "
               f"`pip install -e . --no-build-isolation --no-deps`")
        raise BackendUnavailableError(f"gem_pool: impl='cpu_native' cannot run on {device}: {why}; impl='cpu_torch' runs anywhere")
    return impl


def gem_pool(fmap: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """R-GeM then GeM+ of an s4 feature map [B, C, h, w] (h, w >= 3) -> [B, C] float32.

    Every impl returns the reference's numbers to ~1e-6 relative on float32 input. A map holding
    NaN or inf gives an InputError instead of a descriptor.
    """
    from .kernels.gem_cpu import check_feature_map, gem_pool_cpu, gem_pool_native

    check_feature_map(fmap)
    impl = resolve_impl(impl, fmap.device)
    if impl == "cpu":
        impl = cpu_path(fmap.device)
    if impl == "triton":
        out = _triton_gem().gem_pool_triton(fmap)
    elif impl == "cpu_native":
        out = gem_pool_native(fmap)
    elif impl == "cpu_torch":
        out = gem_pool_cpu(fmap)
    else:
        from .model.head import gem_pool_reference
        out = gem_pool_reference(fmap)
    # NaN/inf in the map reach the pooled vector (every impl propagates them), so checking the
    # small [B, C] output costs nothing and catches them all.
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        rows = sorted({int(i) for i in bad.nonzero()[:, 0].tolist()})
        raise InputError(f"feature map {tuple(fmap.shape)}: NaN or inf in the features of batch item(s) "
                         f"{rows[:8]} (non-finite values, or values above ~1e8 that overflow x^4.6; check the input image "
                         f"and the backend's precision)")
    return out


__all__ = ["gem_pool", "available_impls", "resolve_impl", "cpu_path", "IMPLS"]
