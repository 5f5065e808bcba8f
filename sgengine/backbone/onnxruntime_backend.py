"""Backbone through ONNX Runtime: one InferenceSession, created at load, reused for every call."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendUnavailableError, InputError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def machine_threads() -> int:
    """CPUs this process may run on (cgroup/affinity aware, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cuda_provider_options(device_index: int, stream_handle: int) -> dict[str, str]:
    """CUDA execution provider options: ORT computes on `stream_handle` (a stream of the session's
    own; 0, the default stream, reads as "none given" to ORT), TF32 off (fp32 is the fidelity
    mode), cuDNN's heuristic algorithm choice (an exhaustive search costs seconds for every new
    input shape, and a photo collection has hundreds)."""
    if not stream_handle:
        raise ValueError("user_compute_stream must be a real stream, not the default stream (handle 0)")
    return {"device_id": str(int(device_index)), "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0",
            "do_copy_in_default_stream": "1", "user_compute_stream": str(int(stream_handle))}


class OnnxRuntimeBackbone:
    """`backbone(x [B,3,H,W] f32) -> [B,C,h,w] f32` through one ONNX Runtime session.

    device="cuda[:i]" needs onnxruntime-gpu whose CUDA provider really loads: onnxruntime falls
    back to the CPU silently when the CUDA libraries do not match, so the session's providers
    are checked after creation and a fallback is an error here, not a slow surprise later.
    """

    def __init__(self, onnx_path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 input_name: str = "image", output_name: str = "fmap", *, precision: str = "fp32") -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # backend="auto" moves on to the next backend
            raise BackendUnavailableError(f"onnxruntime backend: onnxruntime does not import ({e})") from e

        if precision != "fp32":
            # The bundle's graph is float32; converting it would be a second, unverified model.
            raise BackendUnavailableError(
                f"onnxruntime runs the bundle's float32 graph only, not precision={precision!r}: "
                "use backend='tensorrt' or backend='torch' for fp16/bf16")

        self.onnx_path = Path(onnx_path)
        self.device = torch.device(device)
        self.input_name, self.output_name = input_name, output_name
        self.threads = int(threads) if threads else machine_threads()
        self.precision = "fp32"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # the provider check below reports failures; ORT's own warnings are noise
        if self.device.type == "cuda":
            available = ort.get_available_providers()
            if CUDA not in available:
                raise BackendUnavailableError(
                    f"onnxruntime on {self.device}: the CUDA provider did not load: this onnxruntime build offers "
                    f"only {available} (install onnxruntime-gpu instead of onnxruntime)")
            if not torch.cuda.is_available():
                raise BackendUnavailableError(
                    f"onnxruntime on {self.device}: torch sees no CUDA GPU, and the engine hands ORT torch CUDA "
                    f"tensors (torch {torch.__version__}, CUDA build: {torch.version.cuda})")
            index = self.device.index or 0
            # ORT computes on a torch stream of this session's own, ordered against the caller's
            # stream on every call (see _run_cuda). Not torch's current stream: that is normally the
            # default stream, whose handle is 0, and ORT takes user_compute_stream=0 for "none
            # given" and computes on a non-blocking stream of its own, which does not wait for the
            # kernels that wrote the input. Options: see cuda_provider_options.
            self._stream = torch.cuda.Stream(self.device)
            options = cuda_provider_options(index, self._stream.cuda_stream)
            providers: list = [(CUDA, options), CPU]
        elif self.device.type == "cpu":
            providers = [CPU]
            # ORT's CPU arena keeps the largest query's activations for the life of the session
            # (2.9 GB after one 2048 px query with EfficientNet-Lite0) and rounds them up to powers
            # of two; without it the memory goes back after each run, for ~10-20% more CPU time.
            so.enable_cpu_mem_arena = False
        else:
            raise BackendUnavailableError(f"onnxruntime backend: device {device!r} is not supported (use 'cpu' or 'cuda')")
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            if self.device.type == "cuda":
                raise BackendUnavailableError(f"onnxruntime on {self.device}: the CUDA provider did not load "
                                              f"for {self.onnx_path}: {e}") from e
            raise
        self.providers = list(self.session.get_providers())
        if self.device.type == "cuda" and (not self.providers or self.providers[0] != CUDA):
            raise BackendUnavailableError(
                f"onnxruntime on {self.device}: the CUDA provider did not load (the session got {self.providers}); "
                "onnxruntime-gpu needs CUDA and cuDNN versions matching its build")
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if input_name not in names_in or output_name not in names_out:
            raise BackendUnavailableError(f"{self.onnx_path}: graph has inputs {names_in} and outputs {names_out}, "
                                          f"expected {input_name!r} -> {output_name!r}")
        self._out_shapes: dict[tuple, tuple] = {}
        self.name = "onnxruntime"

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"backbone input must be [B, 3, H, W], got {list(x.shape)}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if self.device.type == "cpu":
            a = x.detach().to("cpu", torch.float32).contiguous().numpy()
            out = self.session.run([self.output_name], {self.input_name: a})[0]
            return torch.from_numpy(out)
        return self._run_cuda(x)

    def _run_cuda(self, x: torch.Tensor) -> torch.Tensor:
        # IO binding keeps the tensors on the GPU. The output shape of a generic trunk is only known
        # after a run, so the first call per input shape lets ORT allocate and remembers the shape.
        x = x.detach().to(self.device, torch.float32).contiguous()
        idx = self.device.index or 0
        caller = torch.cuda.current_stream(self.device)
        # ORT's kernels go to self._stream: they wait for what the caller queued (x), and the
        # caller's later work waits for them (y; and x's memory is only reused after ORT read it).
        self._stream.wait_stream(caller)
        try:
            return self._run_bound(x, idx)
        finally:
            caller.wait_stream(self._stream)

    def _run_bound(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", idx, np.float32, list(x.shape), x.data_ptr())
        shape = self._out_shapes.get(tuple(x.shape))
        if shape is None:
            # First call for this shape (warm-up): let ORT allocate the output to learn its shape.
            binding.bind_output(self.output_name, "cuda", idx)
            self.session.run_with_iobinding(binding)
            out = binding.get_outputs()[0]
            self._out_shapes[tuple(x.shape)] = tuple(out.shape())
            return torch.from_numpy(out.numpy()).to(self.device)
        y = torch.empty(shape, dtype=torch.float32, device=self.device)
        binding.bind_output(self.output_name, "cuda", idx, np.float32, list(shape), y.data_ptr())
        self.session.run_with_iobinding(binding)
        return y

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device), "providers": self.providers,
                "precision": self.precision, "threads": self.threads, "graph": str(self.onnx_path),
                "graph_optimization": "ORT_ENABLE_ALL"}
