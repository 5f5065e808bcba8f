"""Synthetic CVNet checkpoints for tests and benchmarks (no trained weights needed).

`make_cvnet_state_dict` writes the pycls key names out here, independently of
`sgengine.model.resnet`, so that loading it also checks the model's names against the format.

The weights are random but shaped like a trained network's, so a 50- or 101-layer forward stays
well scaled and input-dependent:
- convs are He-normal (std sqrt(2 / fan_in)), which keeps the second moment of ReLU inputs
  roughly constant through a layer;
- BatchNorm running statistics are *calibrated*: one forward pass over a small batch of smooth
  random images sets each BN's running mean/var to the batch statistics of its input (times a
  little noise). Without this, the per-channel offsets that random convs create pass straight
  through BN and dominate the pooled descriptor: every image then gets nearly the same one
  (measured: cosine 0.98-0.995 between unrelated photos, R50/R101);
- the BN affine part is mild (gamma ~ U(0.8, 1.2), beta ~ N(0, 0.2)), except the last BN of each
  residual branch (`f.c_bn`, gamma ~ U(0.15, 0.35)): each block adds a small correction to the
  shortcut, so 23 blocks in s3 neither explode nor vanish;
- the whitening FC is a random near-orthogonal matrix W (Gaussian / sqrt(D)) with bias -W mu,
  mu the mean calibration descriptor (plus a little noise), i.e. centre-then-rotate as a trained
  whitening does.
The ReLU+ floor (0.014) then sits inside the activations' range, so switching it changes results.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

PYCLS_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
PYCLS_WIDTHS = (256, 512, 1024, 2048)
PYCLS_BOTTLENECK = (64, 128, 256, 512)
DESCRIPTOR_DIM = 2048


def cvnet_tensor_shapes(depth: int = 50, whitening: bool = True) -> dict[str, tuple[int, ...]]:
    """Every backbone/head tensor of a pycls ResNet-`depth` CVNet model, unprefixed, with its shape.

    BatchNorm `num_batches_tracked` buffers are included (pycls checkpoints carry them).
    """
    if depth not in PYCLS_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(PYCLS_DEPTHS)}, got {depth}")
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name: str, c: int) -> None:
        for t in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{t}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    shapes["stem.conv.weight"] = (64, 3, 7, 7)
    bn("stem.bn", 64)
    w_in = 64
    for s, (n, w_out, w_b) in enumerate(zip(PYCLS_DEPTHS[depth], PYCLS_WIDTHS, PYCLS_BOTTLENECK), start=1):
        for b in range(1, n + 1):
            p = f"s{s}.b{b}"
            if b == 1:
                shapes[f"{p}.proj.weight"] = (w_out, w_in, 1, 1)
                bn(f"{p}.bn", w_out)
            c_in = w_in if b == 1 else w_out
            shapes[f"{p}.f.a.weight"] = (w_b, c_in, 1, 1)
            bn(f"{p}.f.a_bn", w_b)
            shapes[f"{p}.f.b.weight"] = (w_b, w_b, 3, 3)
            bn(f"{p}.f.b_bn", w_b)
            shapes[f"{p}.f.c.weight"] = (w_out, w_b, 1, 1)
            bn(f"{p}.f.c_bn", w_out)
        w_in = w_out
    if whitening:
        shapes["head.fc.weight"] = (DESCRIPTOR_DIM, DESCRIPTOR_DIM)
        shapes["head.fc.bias"] = (DESCRIPTOR_DIM,)
    return shapes


def _value(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    if name.endswith("num_batches_tracked"):
        return torch.tensor(0, dtype=torch.long)
    if name == "head.fc.weight":
        return torch.randn(shape, generator=g) / math.sqrt(shape[1])
    if name == "head.fc.bias":
        return torch.randn(shape, generator=g) * 0.01
    if len(shape) == 4:  # conv: He-normal
        fan_in = shape[1] * shape[2] * shape[3]
        return torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
    leaf = name.rsplit(".", 1)[1]
    if leaf == "weight":
        # small gamma on the branch's last BN keeps the residual stream bounded over 23 blocks
        return uniform(0.15, 0.35) if ".f.c_bn." in name else uniform(0.8, 1.2)
    if leaf == "bias":
        return torch.randn(shape, generator=g) * 0.2
    if leaf in ("running_mean", "running_var"):
        return torch.zeros(shape) if leaf == "running_mean" else torch.ones(shape)  # calibrated later
    raise AssertionError(f"no rule for {name}")


def _calibrate_batchnorm(sd: dict[str, torch.Tensor], depth: int, g: torch.Generator,
                         n: int = 4, size: int = 64) -> None:
    """Set every BN's running stats from one forward pass over smooth random images (in place).

    Plain ReLU everywhere: the floors do not matter for statistics. 4 images of 64 px (a 2x2 s4
    map, 16 samples a channel) are enough: the stats are then jittered by +-25% anyway, and this
    pass is most of the generation time.
    """
    low = torch.randn(n, 3, 5, 5, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.randn(n, 3, size, size, generator=g)

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        mean, var = t.mean(dim=(0, 2, 3)), t.var(dim=(0, 2, 3))
        c = mean.numel()
        sd[f"{name}.running_mean"] = mean + 0.05 * var.sqrt() * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = var * (torch.rand(c, generator=g) * 0.45 + 0.8)
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                            sd[f"{name}.weight"], sd[f"{name}.bias"], False, 0.0, 1e-5)

    with torch.no_grad():
        x = bn(F.conv2d(x, sd["stem.conv.weight"], stride=2, padding=3), "stem.bn").clamp(min=0)
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for s, blocks in enumerate(PYCLS_DEPTHS[depth], start=1):
            for b in range(1, blocks + 1):
                p = f"s{s}.b{b}"
                stride = 2 if (b == 1 and s > 1) else 1
                short = bn(F.conv2d(x, sd[f"{p}.proj.weight"], stride=stride), f"{p}.bn") if b == 1 else x
                y = bn(F.conv2d(x, sd[f"{p}.f.a.weight"]), f"{p}.f.a_bn").clamp(min=0)
                y = bn(F.conv2d(y, sd[f"{p}.f.b.weight"], stride=stride, padding=1), f"{p}.f.b_bn").clamp(min=0)
                y = bn(F.conv2d(y, sd[f"{p}.f.c.weight"]), f"{p}.f.c_bn")
                x = (short + y).clamp(min=0)
        if "head.fc.weight" in sd:
            # Trained whitening centres before rotating (bias = -W mu). Without it all descriptors
            # share the large mean of non-negative GeM vectors and sit within a few degrees.
            g_mean = F.normalize(x.clamp(min=1e-8).pow(4.6).mean(dim=(2, 3)).pow(1 / 4.6), dim=1).mean(dim=0)
            sd["head.fc.bias"] = sd["head.fc.bias"] - sd["head.fc.weight"] @ g_mean


def make_cvnet_state_dict(depth: int = 50, *, seed: int = 0, prefix: str = "encoder_q.",
                          whitening: bool = True, extras: bool = True) -> dict[str, torch.Tensor]:
    """A random CVNet-style state dict for a pycls ResNet-`depth` (float32, deterministic in `seed`).

    Keys are `prefix` + the pycls name (`encoder_q.s1.b1.f.a.weight`, ...); with `whitening` the
    head's `head.fc.weight` [2048, 2048] and `head.fc.bias`. With `extras`, what real CVNet
    checkpoints also carry and sgengine ignores: `head.pool.p` (under `prefix`) and a few small
    `conv2ds.*` / `cv_learner.*` tensors (at the top level, behind `module.` when `prefix` has it).
    """
    g = torch.Generator().manual_seed(seed)
    plain = {name: _value(name, shape, g) for name, shape in cvnet_tensor_shapes(depth, whitening).items()}
    _calibrate_batchnorm(plain, depth, g)
    sd = {prefix + name: t for name, t in plain.items()}
    if extras:
        outer = "module." if prefix.startswith("module.") else ""
        sd[prefix + "head.pool.p"] = torch.tensor([3.0])
        sd[outer + "conv2ds.0.weight"] = torch.randn(64, 256, 1, 1, generator=g) * 0.05
        sd[outer + "conv2ds.1.weight"] = torch.randn(64, 512, 1, 1, generator=g) * 0.05
        sd[outer + "cv_learner.conv1.weight"] = torch.randn(16, 1, 3, 3, 3, generator=g) * 0.1
        sd[outer + "cv_learner.conv1.bias"] = torch.zeros(16)
    return sd


def save_cvnet_checkpoint(path: str | os.PathLike, depth: int = 50, *, seed: int = 0, **kw) -> Path:
    """Write `{"model_state": make_cvnet_state_dict(depth, seed=seed, **kw)}` with torch.save; returns the path."""
    path = Path(path)
    torch.save({"model_state": make_cvnet_state_dict(depth, seed=seed, **kw)}, path)
    return path
