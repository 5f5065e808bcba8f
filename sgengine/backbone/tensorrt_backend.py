"""Backbone through a TensorRT plan (import-guarded; needs a CUDA GPU and the tensorrt package).

Where the plan comes from, first match wins:
1. a plan recorded in the bundle manifest at export (`sgengine export --tensorrt`) for this GPU,
   TensorRT version and precision;
2. the plan cache beside the bundle (sgengine.backbone.plan_cache), checked against the bundle
   fingerprint, backbone.onnx's hash, GPU, TensorRT version, precision and input profile;
3. a new plan built now from backbone.onnx (minutes, with progress) and stored in the cache,
   unless build_plan=False, in which case a missing or stale plan is an error saying why.
The plan runs on torch CUDA tensors as I/O buffers, on a stream of its own ordered against the
caller's torch stream: no host copies, no host synchronization.
"""
from __future__ import annotations

import sys

import torch

from ..errors import BackendUnavailableError, InputError
from . import plan_cache as pc


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class TensorRTBackbone:
    """`backbone(x [B,3,H,W] f32 cuda) -> [B,C,h,w] f32 cuda` through one execution context."""

    def __init__(self, bundle, device: str = "cuda", *, precision: str = "fp32", plan_cache=None,
                 build_plan: bool = True, max_side: int | None = None, progress=_stderr) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendUnavailableError(f"tensorrt backend runs on a CUDA GPU, not on {device!r}")
        if precision not in ("fp32", "fp16", "bf16"):
            raise InputError(f"precision must be 'fp32', 'fp16' or 'bf16', got {precision!r}")
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
        self.gpu = torch.cuda.get_device_name(self.device)
        self.precision = precision
        self.input_name, self.output_name = "image", "fmap"
        self.plan_source = ""
        self.cache_note = ""
        with torch.cuda.device(self.device):  # the builder targets the current device
            data, profile = self._plan_bytes(bundle, trt, plan_cache, build_plan, max_side, progress)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            # Kept for the engine's lifetime, like the logger: TensorRT's object-lifetime rules have the
            # runtime outlive the engines it deserialized.
            self._runtime = runtime = trt.Runtime(self._logger)
            self.engine = runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise BackendUnavailableError(f"tensorrt backend: the plan from {self.plan_source} did not deserialize "
                                              f"with TensorRT {trt.__version__}; delete it and load again to rebuild")
            self.context = self.engine.create_execution_context()
            # A stream of our own: enqueueV3 on the default stream (handle 0) makes TensorRT add
            # synchronizations of its own. Ordered against the caller's stream on every call.
            self._stream = torch.cuda.Stream(self.device)
        self.min_shape, self.max_shape = profile.get("min"), profile.get("max")
        self.name = "tensorrt"
        self.providers = [f"TensorRT {trt.__version__}"]

    def _plan_bytes(self, bundle, trt, plan_cache, build_plan: bool, max_side, progress) -> tuple[bytes, dict]:
        from sgengine.export.tensorrt import build_serialized
        d = pc.decide(bundle, gpu=self.gpu, tensorrt=trt.__version__, precision=self.precision,
                      plan_cache=plan_cache, max_side=max_side, build_plan=build_plan)
        if d.action == "run":
            self.plan_source = str(d.path)
            return d.path.read_bytes(), d.profile
        if d.note:
            self.cache_note = d.note
            progress(f"sgengine: {d.note}")
        try:
            data, _ = build_serialized(bundle.onnx_path, shapes=d.profile, precision=self.precision,
                                       input_name=self.input_name, progress=progress)
        except Exception as e:  # parse or build failure, a missing FP16/BF16 flag: backend="auto" moves on
            raise BackendUnavailableError(f"tensorrt backend: no plan for {bundle.path} ({type(e).__name__}: {e})") from e
        try:
            stored = pc.store(d.directory, d.key, data)
            self.plan_source = str(stored.plan)
        except OSError as e:  # a read-only bundle: run the plan, say it was not cached
            self.plan_source = "built in memory"
            self.cache_note = (self.cache_note + "; " if self.cache_note else "") + (
                f"could not cache the plan in {d.directory} ({e}): pass plan_cache=DIR")
            progress(f"sgengine: {self.cache_note}")
        return data, d.profile

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
        caller = torch.cuda.current_stream(self.device)
        # TensorRT reads x after what the caller queued, and the caller's later work (reading y,
        # reusing x's memory) waits for TensorRT: no host synchronization either way.
        self._stream.wait_stream(caller)
        try:
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution failed for input {list(x.shape)}")
        finally:
            caller.wait_stream(self._stream)
        return y

    def describe(self) -> dict:
        d = {"name": self.name, "device": str(self.device), "providers": self.providers,
             "precision": self.precision, "gpu": self.gpu, "plan": self.plan_source,
             "profile": {"min": self.min_shape, "max": self.max_shape}}
        if self.cache_note:
            d["plan_cache"] = self.cache_note
        return d
