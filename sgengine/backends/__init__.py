"""Backbone runners: `load_backbone(bundle, device, backend) -> Backbone`.

A Backbone is called as `backbone(x [B,3,H,W] float32) -> [B,C,h,w] float32` (x already
normalized and scaled; the output on the backbone's device) and has `.name`, `.device`,
`.providers`, `.precision` and `.describe()`.

Backends: "onnxruntime" (CPU default; CUDA only if onnxruntime-gpu's provider really loads),
"torch" (the reference trunk rebuilt from the bundle), "tensorrt" (a plan built for this GPU at
export). "auto" picks once, at load: cpu -> onnxruntime; cuda -> tensorrt if a plan for this GPU
exists, else onnxruntime CUDA, else torch CUDA. What it skipped and why is in describe().
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..errors import BackendUnavailableError, InputError

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")


class Backbone(Protocol):
    name: str
    device: torch.device
    providers: list
    precision: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict: ...


def _make(bundle, device: str, backend: str, threads: int | None):
    if backend == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackbone
        return OnnxRuntimeBackbone(bundle.onnx_path, device=device, threads=threads)
    if backend == "torch":
        from .torch_backend import TorchBackbone
        return TorchBackbone(bundle, device=device, threads=threads)
    if backend == "tensorrt":
        from .tensorrt_backend import TensorRTBackbone
        return TensorRTBackbone(bundle, device=device)
    raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")


class _Chosen:
    """Wraps the backbone "auto" picked, adding what it skipped to describe()."""

    def __init__(self, inner, skipped: dict[str, str]) -> None:
        self._inner = inner
        self.skipped = skipped
        self.name = inner.name
        self.device = inner.device
        self.providers = inner.providers
        self.precision = inner.precision

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._inner(x)

    def describe(self) -> dict:
        d = dict(self._inner.describe())
        d["chosen_by"] = "auto"
        if self.skipped:
            d["skipped"] = dict(self.skipped)
        return d

    def __getattr__(self, item):
        return getattr(self._inner, item)


def load_backbone(bundle, device: str = "cpu", backend: str = "auto", threads: int | None = None) -> Backbone:
    """Create the backbone runner once. Asking for something that cannot run here raises
    BackendUnavailableError saying why; nothing falls back silently except under "auto",
    whose choice and skipped options are visible in describe()."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    if backend != "auto":
        return _make(bundle, device, backend, threads)
    if dev.type == "cpu":
        return _Chosen(_make(bundle, device, "onnxruntime", threads), {})
    skipped: dict[str, str] = {}
    for name in ("tensorrt", "onnxruntime", "torch"):
        try:
            return _Chosen(_make(bundle, device, name, threads), skipped)
        except BackendUnavailableError as e:
            skipped[name] = str(e)
    raise BackendUnavailableError(f"no backend can run {bundle.path} on {device!r}: "
                                  + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
