"""Trunk + SuperGlobal head + Scale-GeM: the full reference computation of SPEC.md 3-4."""
from __future__ import annotations

import torch
from torch import nn

from ..preprocess import Normalization, resize_for_scale
from .head import HeadConfig, SuperGlobalHead, scale_gem_max


class SuperGlobalModel(nn.Module):
    """Normalized image batch [B, 3, H, W] -> unit descriptors [B, D].

    `trunk` maps images to a non-negative [B, C, h, w] map (the pycls ResNet, EfficientNet-Lite0,
    or any module the user brings); `head` pools it per scale. `normalization` says how a decoded
    BGR image becomes this model's input (it travels into the bundle); `name` is for people
    (bundle manifests, `describe()`).
    """

    def __init__(self, trunk: nn.Module, head: SuperGlobalHead, *, stride: int, channels: int,
                 family: str, depth: int | None = None, relu_plus: bool = True,
                 normalization: Normalization = Normalization(), name: str | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.stride = stride
        self.channels = channels
        self.family = family
        self.depth = depth
        self.relu_plus = relu_plus
        self.normalization = normalization
        self.name = name or (f"{family}{depth}" if depth is not None else family)

    @property
    def dim(self) -> int:
        """Descriptor dimension: the whitening FC's output, else the trunk's channels."""
        return self.head.fc.out_features if self.head.fc is not None else self.channels

    @property
    def whitening(self) -> bool:
        return self.head.fc is not None

    @property
    def config(self) -> HeadConfig:
        return self.head.config

    @property
    def scales(self) -> tuple[float, ...]:
        return self.head.config.scales

    def describe_scale(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """d_s of SPEC 3 for one scale (whitened, not yet re-normalized)."""
        return self.head(self.trunk(resize_for_scale(x, scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_gem_max([self.describe_scale(x, s) for s in self.scales])
