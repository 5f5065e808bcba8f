"""The SuperGlobal pooling head in plain PyTorch, straight from SPEC.md 3-4.

This is the reference every fused kernel is compared with: each function is one step of the
SPEC, in float32, with no fusion.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RGEM_P = 2.5
RGEM_SIZE = 5
RGEM_MIX = 0.5
GEMP_P = 4.6
GEMP_EPS = 1e-8
SCALES = (0.7071, 1.0, 1.4142)
L2_EPS = 1e-12


def regional_gem(fmap: torch.Tensor, p: float = RGEM_P, size: int = RGEM_SIZE, mix: float = RGEM_MIX) -> torch.Tensor:
    """SPEC 3.3: R = mix * P + (1 - mix) * F, P the size x size power mean over a reflection-padded map.

    The reference writes P as LPPool2d(p, size, 1) over ReflectionPad2d(size // 2)(F / size^(2/p));
    the mean of F^p over the window, to the 1/p, is the same number. F must be >= 0 (the s4 map
    ends in a ReLU) and h, w > size // 2 (reflection padding; see SPEC 9).
    """
    pad = size // 2
    padded = F.pad(fmap, (pad, pad, pad, pad), mode="reflect")
    pooled = F.avg_pool2d(padded.pow(p), size, stride=1).pow(1.0 / p)
    return mix * pooled + (1.0 - mix) * fmap


def gem_plus(fmap: torch.Tensor, p: float = GEMP_P, eps: float = GEMP_EPS) -> torch.Tensor:
    """SPEC 3.4: per channel (mean over positions of max(x, eps)^p)^(1/p). [B, C, h, w] -> [B, C]."""
    return fmap.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def gem_pool_reference(fmap: torch.Tensor) -> torch.Tensor:
    """Regional-GeM then GeM+ in float32: the part of the head the fused kernel replaces."""
    return gem_plus(regional_gem(fmap.float()))


def l2n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=-1, eps=L2_EPS)


def scale_gem_max(per_scale: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """SPEC 4: normalize(elementwise max over scales of normalize(d_s)). Input [S, B, D] or a list."""
    stacked = torch.stack(list(per_scale)) if not isinstance(per_scale, torch.Tensor) else per_scale
    return l2n(l2n(stacked).amax(dim=0))


@dataclass(frozen=True)
class HeadConfig:
    rgem_p: float = RGEM_P
    rgem_size: int = RGEM_SIZE
    rgem_mix: float = RGEM_MIX
    gemp_p: float = GEMP_P
    gemp_eps: float = GEMP_EPS
    scales: tuple[float, ...] = SCALES

    def to_dict(self) -> dict:
        return {
            "rgem": {"p": self.rgem_p, "size": self.rgem_size, "mix": self.rgem_mix},
            "gem_plus": {"p": self.gemp_p, "eps": self.gemp_eps},
            "scales": list(self.scales),
            "scale_gem": "max",
        }

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        return cls(
            rgem_p=float(d["rgem"]["p"]), rgem_size=int(d["rgem"]["size"]), rgem_mix=float(d["rgem"]["mix"]),
            gemp_p=float(d["gem_plus"]["p"]), gemp_eps=float(d["gem_plus"]["eps"]),
            scales=tuple(float(s) for s in d["scales"]),
        )


class SuperGlobalHead(nn.Module):
    """One scale of SPEC 3 after the backbone: R-GeM, GeM+, L2, optional whitening FC.

    `fc` is named as in CVNet checkpoints (`head.fc.weight`, `head.fc.bias`). CVNet's learned
    `head.pool.p` is not used: SuperGlobal fixes p = 4.6.
    """

    def __init__(self, dim: int, whitening: bool = True, config: HeadConfig = HeadConfig()) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(dim, dim, bias=True) if whitening else None

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        c = self.config
        return gem_plus(regional_gem(fmap, c.rgem_p, c.rgem_size, c.rgem_mix), c.gemp_p, c.gemp_eps)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """normalize then whiten (SuperGlobal normalizes before the FC; CVNet did not)."""
        g = l2n(pooled)
        return self.fc(g) if self.fc is not None else g

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(fmap))
