"""Backbone through the reference PyTorch trunk rebuilt from the bundle (eval mode, inference_mode)."""
from __future__ import annotations

import torch

from ..errors import BackendUnavailableError, InputError


class TorchBackbone:
    """`backbone(x [B,3,H,W] f32) -> [B,C,h,w] f32` with the bundle's PyTorch trunk, on cpu or cuda."""

    def __init__(self, bundle, device: str = "cpu", threads: int | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"torch backend on {device!r}: torch sees no CUDA GPU "
                                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        if self.device.type not in ("cpu", "cuda"):
            raise BackendUnavailableError(f"torch backend: device {device!r} is not supported (use 'cpu' or 'cuda')")
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
        self.precision = "fp32"
        self.providers = [f"torch-{self.device.type}"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"backbone input must be [B, 3, H, W], got {list(x.shape)}")
        with torch.inference_mode():
            x = x.to(self.device, torch.float32).contiguous(memory_format=self.memory_format)
            return self.trunk(x).float().contiguous()

    def describe(self) -> dict:
        d = {"name": self.name, "device": str(self.device), "providers": self.providers,
             "precision": self.precision, "torch": torch.__version__}
        if self.threads is not None:
            d["threads"] = self.threads
        if self.device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self.device)
        return d
