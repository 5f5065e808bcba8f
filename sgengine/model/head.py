"""The SuperGlobal head as a module of the reference model (one scale of SPEC 3 after the backbone).

The constants, the step-by-step reference functions and the kernel dispatch live in the head
stage, `sgengine.head`; this module wraps them as an nn.Module named as CVNet checkpoints are.
"""
from __future__ import annotations

import torch
from torch import nn

from ..head import (GEMP_EPS, GEMP_P, L2_EPS, RGEM_MIX, RGEM_P, RGEM_SIZE, SCALES, HeadConfig,  # noqa: F401
                    gem_plus, gem_pool_reference, l2n, regional_gem, scale_gem_max)


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
