"""Backbone through the reference PyTorch trunk rebuilt from the bundle (eval mode, inference_mode).

On CUDA: channels-last, cuDNN autotuning, fp32 (TF32 off: the fidelity mode) or opt-in fp16 /
bf16 autocast, and one CUDA graph per input shape once a shape repeats (sgengine.cuda_graphs): a
1024x768 query feeds three fixed shapes, so after warm-up each backbone call is one graph
replay instead of ~200 kernel launches from Python. On the CPU: fp32, or bf16 autocast.
"""
from __future__ import annotations

import contextlib

import torch

from ..cuda_graphs import CudaGraphCache
from ..errors import BackendUnavailableError, InputError

_AMP = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _conv_precision():
    """torch >= 2.9's per-op setting for cuDNN convolutions (None where torch predates it)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    try:
        return conv, conv.fp32_precision
    except (AttributeError, RuntimeError):
        return None, None


def conv_tf32_enabled() -> bool:
    """Whether a float32 cuDNN convolution started now may use TF32 (what the conv kernels read)."""
    conv, prec = _conv_precision()
    if prec is not None:
        return prec == "tf32"  # the resolved value: "none" falls back to cuda/all, then generic/all
    return bool(torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def cudnn_ieee_conv(benchmark: bool = True):
    """cuDNN enabled, non-deterministic, autotuned (`benchmark`), float32 convolutions without
    TF32 for the block, whatever the process-wide flags say; the caller's flags come back after.

    Not `torch.backends.cudnn.flags(allow_tf32=False)`: on torch >= 2.9 it reads the legacy
    `allow_tf32` getter on entry and exit, which raises ("mix of the legacy and new APIs") as soon
    as the process used the new per-op API (`torch.backends.cudnn.conv.fp32_precision = "ieee"`,
    or `torch.backends.fp32_precision = "tf32"`), and it leaves TF32 on when the generic
    precision is "tf32" (its "none" defers to it). Here only the new API is touched where it
    exists, and only when convolutions would otherwise run in TF32. Not thread-safe: the flags
    are process-wide.
    """
    cudnn = torch.backends.cudnn
    conv, prec = _conv_precision()
    if prec is None:  # torch < 2.9: the legacy flag is the only one
        with cudnn.flags(enabled=True, benchmark=benchmark, deterministic=False, allow_tf32=False):
            yield
        return
    saved = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic)
    cudnn.enabled, cudnn.benchmark, cudnn.deterministic = True, bool(benchmark), False
    if prec == "tf32":
        conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        if prec == "tf32":
            conv.fp32_precision = prec
        cudnn.enabled, cudnn.benchmark, cudnn.deterministic = saved


class TorchBackbone:
    """`backbone(x [B,3,H,W] f32) -> [B,C,h,w] f32` with the bundle's PyTorch trunk, on cpu or cuda."""

    def __init__(self, bundle, device: str = "cpu", threads: int | None = None, *, precision: str = "fp32",
                 cuda_graphs: bool | None = None, max_graphs: int = 16) -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise BackendUnavailableError(f"torch backend: device {device!r} is not supported (use 'cpu' or 'cuda')")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"torch backend on {device!r}: torch sees no CUDA GPU "
                                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        if precision not in _AMP:
            raise InputError(f"precision must be one of {tuple(_AMP)}, got {precision!r}")
        if self.device.type == "cpu" and precision == "fp16":
            raise BackendUnavailableError("torch backend on the CPU: fp16 convolutions are not accelerated there; "
                                          "use precision='bf16' (or 'fp32')")
        if cuda_graphs and self.device.type != "cuda":
            raise InputError(f"cuda_graphs=True needs device='cuda', not {device!r}")
        reason = bundle.torch_unavailable_reason
        if reason:
            raise BackendUnavailableError(f"torch backend for {bundle.path}: {reason}")
        self.trunk = bundle.build_trunk().to(self.device).eval()
        # channels_last lets cuDNN pick its NHWC kernels; on the CPU the default layout is as fast.
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        if self.device.type == "cuda":
            self.trunk = self.trunk.to(memory_format=self.memory_format)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads() if self.device.type == "cpu" else None
        self.name = "torch"
        self.precision = precision
        self._amp = _AMP[precision]
        self.providers = [f"torch-{self.device.type}"]
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        # cuDNN autotuning costs seconds per new input shape (every convolution is timed): worth it
        # for a shape that repeats (it is captured into a graph with the tuned algorithms), not for
        # the one-off sizes of a photo collection, which use cuDNN's heuristics.
        self.graphs = (CudaGraphCache(lambda x, static=None: self._forward(x, tune=True), self.device,
                                      max_graphs=max_graphs, eager=lambda x, static=None: self._forward(x))
                       if use_graphs else None)

    def _context(self, tune: bool = False):
        stack = contextlib.ExitStack()
        if self.device.type == "cuda":
            # fp32 is the fidelity mode: cuDNN's TF32 convolutions (torch's default) would not match
            # SPEC's float32 model. tune: cuDNN benchmarks its algorithms for this shape.
            stack.enter_context(cudnn_ieee_conv(benchmark=tune))
        if self._amp is not None:
            # cache_enabled=False: a cast weight cached across calls would be freed under a CUDA graph.
            stack.enter_context(torch.autocast(self.device.type, dtype=self._amp, cache_enabled=False))
        return stack

    def _forward(self, x: torch.Tensor, tune: bool = False) -> torch.Tensor:
        with torch.inference_mode(), self._context(tune):
            return self.trunk(x).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"backbone input must be [B, 3, H, W], got {list(x.shape)}")
        with torch.inference_mode():
            x = x.to(self.device, torch.float32).contiguous(memory_format=self.memory_format)
            y = self.graphs(x) if self.graphs is not None else self._forward(x)
            # On CUDA the map stays channels-last: the Triton head reads either layout, and a
            # conversion would be one more pass over the map.
            return y if self.device.type == "cuda" else y.contiguous()

    def describe(self) -> dict:
        d = {"name": self.name, "device": str(self.device), "providers": self.providers,
             "precision": self.precision, "torch": torch.__version__}
        if self.precision != "fp32":
            d["autocast"] = str(self._amp).replace("torch.", "")
        if self.threads is not None:
            d["threads"] = self.threads
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
            with self._context():  # what the convolutions of a call actually see
                d["tf32"] = conv_tf32_enabled()
            d["cuda_graphs"] = None if self.graphs is None else self.graphs.describe()
        return d
