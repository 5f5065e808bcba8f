"""pycls ResNet-50/101 as CVNet trains it, with SuperGlobal's "ReLU+" (SPEC.md 2).

Module names follow pycls exactly (`stem.conv`, `s1.b1.f.a_bn`, `s2.b1.proj`, ...) so that CVNet
checkpoints load by name. Activations are written as `clamp(min=floor)`: floor 0 is ReLU, floor
0.014 is ReLU+.
"""
from __future__ import annotations

import torch
from torch import nn

RELU_PLUS_FLOOR = 0.014
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_WIDTHS = (256, 512, 1024, 2048)
BOTTLENECK_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BN_EPS = 1e-5


def activation_floors(stage: int, relu_plus: bool) -> tuple[float, float]:
    """(floor inside the bottleneck, floor after the residual add) for stage 1..4.

    SPEC.md 2: ReLU+ after the add in s1-s3 and inside the bottleneck in s1 only; plain ReLU
    elsewhere. The reference still clamps at 0.014 inside s1 with ReLU+ "off"; sgengine's
    relu_plus=False is plain ReLU everywhere (original CVNet) on purpose.
    """
    if not relu_plus:
        return 0.0, 0.0
    inner = RELU_PLUS_FLOOR if stage == 1 else 0.0
    out = RELU_PLUS_FLOOR if stage in (1, 2, 3) else 0.0
    return inner, out


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(64, eps=BN_EPS)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.bn(self.conv(x)).clamp(min=0.0))


class BottleneckTransform(nn.Module):
    """1x1 -> 3x3 (carries the stride) -> 1x1, BatchNorm after each."""

    def __init__(self, w_in: int, w_out: int, stride: int, w_b: int, floor: float) -> None:
        super().__init__()
        self.floor = floor
        self.a = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(w_b, eps=BN_EPS)
        self.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(w_b, eps=BN_EPS)
        self.c = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(w_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_bn(self.a(x)).clamp(min=self.floor)
        x = self.b_bn(self.b(x)).clamp(min=self.floor)
        return self.c_bn(self.c(x))


class ResBottleneckBlock(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, w_b: int, inner: float, out: float) -> None:
        super().__init__()
        self.out_floor = out
        self.has_proj = w_in != w_out or stride != 1
        if self.has_proj:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out, eps=BN_EPS)
        self.f = BottleneckTransform(w_in, w_out, stride, w_b, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.bn(self.proj(x)) if self.has_proj else x
        return (shortcut + self.f(x)).clamp(min=self.out_floor)


class ResStage(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, depth: int, w_b: int, inner: float, out: float) -> None:
        super().__init__()
        for i in range(depth):
            block = ResBottleneckBlock(w_in if i == 0 else w_out, w_out, stride if i == 0 else 1, w_b, inner, out)
            self.add_module(f"b{i + 1}", block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


class ResNet(nn.Module):
    """Image batch [B, 3, H, W] -> s4 feature map [B, 2048, ceil(H/32), ceil(W/32)]."""

    stride = 32
    out_channels = STAGE_WIDTHS[-1]

    def __init__(self, depth: int = 50, relu_plus: bool = True) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        self.depth = depth
        self.relu_plus = relu_plus
        self.stem = Stem()
        w_in = 64
        for i, (d, w_out, w_b, stride) in enumerate(zip(DEPTHS[depth], STAGE_WIDTHS, BOTTLENECK_WIDTHS, STAGE_STRIDES)):
            inner, out = activation_floors(i + 1, relu_plus)
            self.add_module(f"s{i + 1}", ResStage(w_in, w_out, stride, d, w_b, inner, out))
            w_in = w_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.s4(self.s3(self.s2(self.s1(x))))
