"""Backbone runners: `load_backbone(bundle, device, backend) -> Backbone`.

A Backbone is called as `backbone(x [B,3,H,W] float32) -> [B,C,h,w] float32` (x already
normalized and scaled; the output on the backbone's device) and has `.name`, `.device`,
`.providers`, `.precision` and `.describe()`.

Backends: "onnxruntime" (CPU default; CUDA only if onnxruntime-gpu's provider really loads),
"torch" (the reference trunk rebuilt from the bundle; CUDA graphs and autocast on CUDA),
"tensorrt" (a plan for this GPU, from the bundle or the plan cache beside it, built on demand).
"auto" picks once, at load: cpu -> onnxruntime (torch for bf16); cuda -> tensorrt when
installed, else onnxruntime CUDA, else torch CUDA. What it skipped and why is in describe().

precision: "fp32" (fidelity mode, the default), or opt-in "fp16" / "bf16" for the backbone:
tensorrt (fp16; bf16 where the TensorRT version has it) and torch (autocast; bf16 only on the
CPU). onnxruntime runs the bundle's float32 graph only and says so.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..errors import BackendUnavailableError, InputError

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")


class Backbone(Protocol):
    name: str
    device: torch.device
    providers: list
    precision: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict: ...


def _make(bundle, device: str, backend: str, threads: int | None, opts: dict):
    if backend == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackbone
        return OnnxRuntimeBackbone(bundle.onnx_path, device=device, threads=threads, precision=opts["precision"])
    if backend == "torch":
        from .torch_backend import TorchBackbone
        return TorchBackbone(bundle, device=device, threads=threads, precision=opts["precision"],
                             cuda_graphs=opts["cuda_graphs"])
    if backend == "tensorrt":
        from .tensorrt_backend import TensorRTBackbone
        return TensorRTBackbone(bundle, device=device, precision=opts["precision"], plan_cache=opts["plan_cache"],
                                build_plan=opts["build_plan"], max_side=opts["max_side"])
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


def load_backbone(bundle, device: str = "cpu", backend: str = "auto", threads: int | None = None, *,
                  precision: str = "fp32", cuda_graphs: bool | None = None, plan_cache=None,
                  build_plan: bool = True, max_side: int | None = None) -> Backbone:
    """Create the backbone runner once. Asking for something that cannot run here raises
    BackendUnavailableError saying why; nothing falls back silently except under "auto",
    whose choice and skipped options are visible in describe()."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    if cuda_graphs and backend not in ("torch", "auto"):
        raise InputError(f"cuda_graphs applies to the torch backend, not to {backend!r}")
    opts = {"precision": precision, "cuda_graphs": cuda_graphs, "plan_cache": plan_cache,
            "build_plan": build_plan, "max_side": max_side}
    if backend != "auto":
        return _make(bundle, device, backend, threads, opts)
    if dev.type == "cpu":
        order = ("onnxruntime", "torch")
    elif cuda_graphs:
        order = ("torch",)  # only torch has CUDA graphs: asking for them picks it
    else:
        order = ("tensorrt", "onnxruntime", "torch")
    skipped: dict[str, str] = {}
    for name in order:
        try:
            return _Chosen(_make(bundle, device, name, threads, opts), skipped)
        except BackendUnavailableError as e:
            skipped[name] = str(e)
    raise BackendUnavailableError(f"no backend can run {bundle.path} on {device!r} at {precision}: "
                                  + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
