"""Backbone through a TensorRT plan stored in the bundle (import-guarded; needs a CUDA GPU).

Plans are built by `python -m sgengine.export ... --tensorrt` on the GPU they will run on; only
a plan built for this GPU model and this TensorRT version is used.
"""
from __future__ import annotations

import torch

from ..errors import BackendUnavailableError, InputError


def find_plan(bundle, gpu_name: str, trt_version: str) -> dict | None:
    for p in bundle.tensorrt_plans:
        if p.get("gpu") == gpu_name and p.get("tensorrt") == trt_version:
            return p
    return None


class TensorRTBackbone:
    """`backbone(x [B,3,H,W] f32 cuda) -> [B,C,h,w] f32 cuda` through one execution context."""

    def __init__(self, bundle, device: str = "cuda") -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendUnavailableError(f"tensorrt backend runs on a CUDA GPU, not on {device!r}")
        reasons = []
        try:
            import tensorrt as trt
        except ImportError as e:
            trt = None
            reasons.append(f"the tensorrt Python package is not installed ({e}; pip install tensorrt)")
        if not torch.cuda.is_available():
            reasons.append(f"torch sees no CUDA GPU (torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        if reasons:
            raise BackendUnavailableError("tensorrt backend unavailable: " + "; ".join(reasons))
        gpu = torch.cuda.get_device_name(self.device)
        plan = find_plan(bundle, gpu, trt.__version__)
        if plan is None:
            have = [(p.get("gpu"), p.get("tensorrt")) for p in bundle.tensorrt_plans] or "none"
            raise BackendUnavailableError(
                f"tensorrt backend: {bundle.path} has no plan for {gpu} with TensorRT {trt.__version__} "
                f"(plans: {have}); export with --tensorrt on this machine")
        self.plan = plan
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(self._logger)
            self.engine = runtime.deserialize_cuda_engine((bundle.path / plan["file"]).read_bytes())
            if self.engine is None:
                raise BackendUnavailableError(f"tensorrt backend: {bundle.path / plan['file']} did not deserialize")
            self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = "image", "fmap"
        prof = plan.get("profile", {}).get(self.input_name, {})
        self.min_shape, self.max_shape = prof.get("min"), prof.get("max")
        self.name = "tensorrt"
        self.precision = plan.get("precision", "fp32")
        self.providers = [f"TensorRT {trt.__version__}"]
        self.gpu = gpu

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"backbone input must be [B, 3, H, W], got {list(x.shape)}")
        if self.min_shape and self.max_shape:
            if any(d < lo or d > hi for d, lo, hi in zip(x.shape, self.min_shape, self.max_shape)):
                raise InputError(f"input {list(x.shape)} is outside the TensorRT plan's profile "
                                 f"{self.min_shape}..{self.max_shape}: use batches of at most {self.max_shape[0]} "
                                 "and images within the bundle's max_side")
        x = x.detach().to(self.device, torch.float32).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        y = torch.empty(shape, dtype=torch.float32, device=self.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for input {list(x.shape)}")
        return y

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device), "providers": self.providers,
                "precision": self.precision, "gpu": self.gpu, "plan": self.plan["file"],
                "profile": {"min": self.min_shape, "max": self.max_shape}}
