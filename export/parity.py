"""Parity of an exported backbone against PyTorch, on real photos, through the full descriptor pipeline.

Both sides compute SPEC 3-4 end to end (3 scales, pooling head, whitening, Scale-GeM); only the
backbone differs (PyTorch trunk vs the exported graph in ONNX Runtime). Per photo: the max
|difference| of the final descriptors, their cosine, and that max difference as a fraction of
the smallest distance between descriptors of two different photos, which is what decides
whether a difference could change a ranking.

Default tolerance (documented in the manifest): cosine >= 0.99999 and max-diff <= 1e-3 x the
smallest inter-photo distance, for every photo.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from sgengine.errors import ParityError
from sgengine.model.head import scale_gem_max
from sgengine.preprocess import Normalization, ensure_min_size, resize_for_scale, to_tensor

DEFAULT_MIN_COSINE = 0.99999
DEFAULT_MAX_RATIO = 1e-3
ODD_SIZE = (237, 353)  # (H, W): non-square, both odd, not a multiple of any stride


@dataclass(frozen=True)
class Tolerance:
    min_cosine: float = DEFAULT_MIN_COSINE
    max_ratio: float = DEFAULT_MAX_RATIO  # max |diff| / smallest distance between different photos

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PhotoParity:
    name: str
    size: tuple[int, int]  # (H, W) fed to the model at scale 1
    max_abs_diff: float
    cosine: float
    ratio: float


@dataclass
class ParityReport:
    photos: list[PhotoParity]
    min_distance: float
    tolerance: Tolerance
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def table(self) -> str:
        lines = [f"  {'photo':<22} {'HxW':>9}  {'max|diff|':>10}  {'cosine':>12}  {'diff/min-dist':>13}"]
        for p in self.photos:
            lines.append(f"  {p.name:<22} {p.size[0]:>4}x{p.size[1]:<4}  {p.max_abs_diff:10.3e}  "
                         f"{p.cosine:12.9f}  {p.ratio:13.3e}")
        lines.append(f"  smallest distance between descriptors of different photos: {self.min_distance:.4f}")
        lines.append(f"  tolerance: cosine >= {self.tolerance.min_cosine}, max|diff| <= "
                     f"{self.tolerance.max_ratio:g} x smallest distance -> {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "tolerance": self.tolerance.to_dict(),
            "min_inter_photo_distance": self.min_distance,
            "max_abs_diff": max(p.max_abs_diff for p in self.photos),
            "min_cosine": min(p.cosine for p in self.photos),
            "max_ratio": max(p.ratio for p in self.photos),
            "photos": [{"name": p.name, "size": list(p.size), "max_abs_diff": p.max_abs_diff,
                        "cosine": p.cosine, "ratio": p.ratio} for p in self.photos],
        }


def parity_inputs(normalization: Normalization, *, count: int = 3, max_side: int | None = None,
                  min_side: int = 1) -> list[tuple[str, torch.Tensor]]:
    """`count` colour photos at their own sizes plus one odd, non-square crop, as normalized tensors.

    max_side (optional) shrinks photos whose long side is larger (tests use it to stay fast).
    """
    from PIL import Image
    from sgengine.photos import sample_photos

    photos = sample_photos(color_only=True)
    if len(photos) < count + 1:
        raise ParityError(f"parity needs {count + 1} colour photos, found {len(photos)}: install scikit-image and scikit-learn")
    items = list(photos.items())
    chosen = [(n, a) for n, a in items[:count]]
    name, src = items[count]
    oh, ow = ODD_SIZE
    if max_side is not None and max(oh, ow) > max_side:
        f = max_side / max(oh, ow)
        oh, ow = [n - 1 + n % 2 for n in (int(oh * f), int(ow * f))]  # round down to odd: stays <= max_side
    crop = src[:oh, :ow] if src.shape[0] >= oh and src.shape[1] >= ow else np.asarray(
        Image.fromarray(src).resize((ow, oh), Image.Resampling.BILINEAR))
    chosen.append((f"{name}-crop", np.ascontiguousarray(crop)))
    out = []
    for n, rgb in chosen:
        h, w = rgb.shape[:2]
        if max_side is not None and max(h, w) > max_side:
            f = max_side / max(h, w)
            rgb = np.asarray(Image.fromarray(rgb).resize((max(1, round(w * f)), max(1, round(h * f))),
                                                         Image.Resampling.LANCZOS))
        x = to_tensor(np.ascontiguousarray(rgb[..., ::-1]), normalization)  # RGB -> BGR, as decoded files are
        x, _ = ensure_min_size(x, min_side)
        out.append((n, x))
    return out


@torch.inference_mode()
def descriptors_with(backbone: Callable[[torch.Tensor], torch.Tensor], head, scales, x: torch.Tensor) -> torch.Tensor:
    """SPEC 3-4 with the given backbone: per scale resize -> backbone -> head, then Scale-GeM."""
    return scale_gem_max([head(backbone(resize_for_scale(x, s)).float()) for s in scales])


def check_parity(model, backbone: Callable[[torch.Tensor], torch.Tensor],
                 inputs: list[tuple[str, torch.Tensor]], tolerance: Tolerance = Tolerance()) -> ParityReport:
    """Compare model(x) (all PyTorch) with the same pipeline through `backbone`. Never raises on a
    mismatch: the report says what failed (see `require`)."""
    model = model.eval()
    ref, got = [], []
    with torch.inference_mode():
        for _, x in inputs:
            ref.append(model(x)[0].double())
            got.append(descriptors_with(backbone, model.head, model.scales, x)[0].double())
    R = torch.stack(ref)
    dist = torch.cdist(R, R)
    n = len(inputs)
    min_dist = float(dist[~torch.eye(n, dtype=torch.bool)].min()) if n > 1 else float("nan")
    photos, failures = [], []
    for (name, x), r, g in zip(inputs, ref, got):
        diff = float((r - g).abs().max())
        cos = float(torch.dot(r, g) / (r.norm() * g.norm()).clamp_min(1e-300))
        ratio = diff / min_dist if min_dist > 0 else math.inf
        p = PhotoParity(name, (int(x.shape[-2]), int(x.shape[-1])), diff, cos, ratio)
        photos.append(p)
        if not (math.isfinite(diff) and math.isfinite(cos)):
            failures.append(f"{name}: descriptor is not finite")
        elif cos < tolerance.min_cosine:
            failures.append(f"{name}: cosine {cos:.9f} < {tolerance.min_cosine}")
        elif not ratio <= tolerance.max_ratio:
            failures.append(f"{name}: max|diff| {diff:.3e} is {ratio:.3e} of the smallest inter-photo distance "
                            f"{min_dist:.4f} (allowed {tolerance.max_ratio:g})")
    if n > 1 and min_dist <= 0:
        failures.append("two different photos gave identical descriptors: the model does not tell them apart")
    return ParityReport(photos, min_dist, tolerance, failures)


def require(report: ParityReport, what: str) -> None:
    if not report.passed:
        raise ParityError(f"{what}: exported graph differs from PyTorch beyond tolerance:\n  "
                          + "\n  ".join(report.failures) + "\n" + report.table())
