"""Synthetic descriptors calibrated on real ones, for the million-row benchmarks.

Isotropic Gaussian clusters are a poor stand-in for image descriptors: real ones share a common
direction (every pair of photos has a positive cosine), their variance falls off steeply across
principal directions, and a photo has a few near-duplicates (its views) while the rest of the
collection is far. An ANN's recall and an exact scan's ties depend on exactly these properties.

The model (D dimensions, rows unit length):

    x = normalize(a * mu + B (s * g_scene) + sigma * B (s * e_view))

mu: a fixed unit "mean" direction; B: a random orthonormal basis; s: a power-law spectrum
s_i = (i + 1)^(-alpha / 2) (eigenvalues falling as i^-alpha, alpha fitted to the real
descriptors' PCA eigenvalues); g_scene: one standard normal draw per scene; e_view: one per row.
Scenes have 1 + Poisson(views - 1) rows, and a scene's view noise is sigma times a log-normal
factor (some photos' views vary more than others'). `a` sets the cosine of unrelated rows, `sigma` the
cosine of views of one scene; both are fitted by bisection so that the synthetic set matches the
real set's median cosine between random pairs and its median top-1 neighbour cosine.

    python bench/datagen.py --bundle BUNDLE --out bench/results/DIR/datagen.txt   # calibrate + report
    from datagen import Calibration, generate        # in a benchmark: rows for N and D

`calibrate` embeds the packaged photos and their augmented views (sgengine.photoset, the demo's
set) with the given bundle; `report` prints the neighbour-similarity profile of the real
descriptors beside the synthetic set's at the same size, so the match is visible.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DEFAULT_VIEWS = 9.0  # the demo's set: a photo and 8 views of it


@dataclass(frozen=True)
class Calibration:
    alpha: float           # eigenvalue decay exponent of the scene/view spread
    mean_weight: float     # a: weight of the shared direction
    view_noise: float      # sigma: a view's spread around its scene
    views: float = DEFAULT_VIEWS  # mean rows per scene
    noise_spread: float = 0.4     # log-normal spread of sigma between scenes (some photos vary more)
    source: str = "default"       # what it was fitted on

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# Fitted on the default bundle (EfficientNet-Lite0, ImageNet weights) over the demo's photo set by
# `python bench/datagen.py`; bench/results/<date>-cpu-*/datagen.txt holds the run that produced it.
DEFAULT = Calibration(alpha=1.3598, mean_weight=1.0023, view_noise=0.5055,
                      source="default bundle (EfficientNet-Lite0): 171 photo-set descriptors, D = 1280")


def _spectrum(d: int, alpha: float) -> np.ndarray:
    s = (np.arange(d, dtype=np.float64) + 1.0) ** (-alpha / 2.0)
    return (s / np.linalg.norm(s)).astype(np.float32)


def _basis(d: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q.astype(np.float32)


def _scene_normal(seed: int, scenes: np.ndarray) -> np.ndarray:
    """One standard normal per scene id, independent of where a block starts (a hash of the id)."""
    u = (scenes.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)) >> np.uint64(11)
    u1 = (u % np.uint64(1 << 26)).astype(np.float64) / (1 << 26) + 0.5 / (1 << 26)
    u2 = ((u >> np.uint64(26)) % np.uint64(1 << 26)).astype(np.float64) / (1 << 26)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)).astype(np.float32)


def _model(n: int, d: int, cal: Calibration, seed: int):
    """The draws every row of generate(n, d, cal, seed) shares: basis, spectrum, mean direction and
    the scene of each row."""
    rng = np.random.default_rng(seed)
    basis = _basis(d, rng)
    s = _spectrum(d, cal.alpha) * np.sqrt(d)  # unit-variance scale overall
    mu = rng.standard_normal(d).astype(np.float32)
    mu /= np.linalg.norm(mu)
    sizes = 1 + rng.poisson(max(cal.views - 1.0, 0.0), size=n)
    scene = np.repeat(np.arange(len(sizes)), sizes)[:n]
    return basis, s, mu, scene


def _block_latents(scene: np.ndarray, a: int, b: int, n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(scene ids, their latents g) of the rows a..b-1 (one block of generate)."""
    first = np.unique(scene[a:b])
    g = np.random.default_rng([seed, 1, int(first[0])]).standard_normal((len(first), d), dtype=np.float32)
    # Scene latents must not depend on where a block starts: draw each scene's from its own seed
    # when a scene straddles a block boundary.
    if a > 0 and scene[a - 1] == first[0]:
        g[0] = np.random.default_rng([seed, 2, int(first[0])]).standard_normal(d, dtype=np.float32)
    if b < n and scene[b] == first[-1]:
        g[-1] = np.random.default_rng([seed, 2, int(first[-1])]).standard_normal(d, dtype=np.float32)
    return first, g


def _rows(g: np.ndarray, e: np.ndarray, sc: np.ndarray, cal: Calibration, basis, s, mu, seed: int) -> np.ndarray:
    noise = cal.view_noise * np.exp(cal.noise_spread * _scene_normal(seed, sc))[:, None]
    z = (g + noise * e) * s
    x = cal.mean_weight * mu + (z @ basis.T) / np.sqrt(len(s))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(n: int, d: int, cal: Calibration = DEFAULT, *, seed: int = 0, out: np.ndarray | None = None,
             block: int = 65536, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(rows [n, d] unit length in `dtype` (written into `out`, e.g. a memmap, when given), scene
    id per row [n] int64). Deterministic in (n, d, cal, seed); generated a block at a time so a
    memmap of 1M x 2048 float16 never needs the whole set in RAM."""
    basis, s, mu, scene = _model(n, d, cal, seed)
    rows = np.empty((n, d), dtype) if out is None else out
    for a in range(0, n, block):
        b = min(a + block, n)
        sc = scene[a:b]
        first, g = _block_latents(scene, a, b, n, d, seed)
        e = np.random.default_rng([seed, 3, a]).standard_normal((b - a, d), dtype=np.float32)
        rows[a:b] = _rows(g[np.searchsorted(first, sc)], e, sc, cal, basis, s, mu, seed).astype(dtype)
    return rows, scene


def fresh_views(n: int, d: int, scenes, cal: Calibration = DEFAULT, *, seed: int = 0, view_seed: int = 0,
                block: int = 65536, _e: np.ndarray | None = None) -> np.ndarray:
    """New views [len(scenes), d] float32 of the given scenes of generate(n, d, cal, seed=seed,
    block=block): the same scene latents and view-noise scale, fresh view noise (seeded by
    view_seed, apart from every row generate draws). The queries a collection really gets: a new
    photo of something it holds, every stored view of which is relevant."""
    basis, s, mu, scene = _model(n, d, cal, seed)
    scenes = np.asarray(scenes, np.int64)
    if scenes.size and (scenes.min() < 0 or scenes.max() > scene[-1]):
        raise ValueError(f"scenes must be in 0..{scene[-1]}")
    g = np.empty((len(scenes), d), np.float32)
    starts = np.searchsorted(scene, scenes)
    for a in np.unique(starts // block * block):  # one latent draw per block, as generate does it
        b = min(a + block, n)
        first, gb = _block_latents(scene, int(a), b, n, d, seed)
        sel = np.flatnonzero(starts // block * block == a)
        g[sel] = gb[np.searchsorted(first, scenes[sel])]
    e = (np.random.default_rng([seed, 4, view_seed]).standard_normal((len(scenes), d), dtype=np.float32)
         if _e is None else _e)
    return _rows(g, e, scenes, cal, basis, s, mu, seed).astype(np.float32)


def profile(x: np.ndarray, rng_seed: int = 0) -> dict:
    """Neighbour-similarity profile of unit rows: quantiles of the top-1 and top-10 neighbour
    cosine (self excluded) and of the cosine between random pairs."""
    x = np.asarray(x, np.float32)
    g = x @ x.T
    np.fill_diagonal(g, -np.inf)
    top = -np.sort(-g, axis=1)
    rng = np.random.default_rng(rng_seed)
    i, j = rng.integers(0, len(x), 4000), rng.integers(0, len(x), 4000)
    keep = i != j
    rand = g[i[keep], j[keep]]
    q = (0.1, 0.5, 0.9)
    return {"top1": np.quantile(top[:, 0], q).round(3).tolist(),
            "top10": np.quantile(top[:, min(9, len(x) - 2)], q).round(3).tolist(),
            "random": np.quantile(rand, q).round(3).tolist()}


def _eigen_alpha(x: np.ndarray) -> float:
    """Slope of log eigenvalue against log rank over the leading half of the real set's spectrum."""
    xc = x - x.mean(axis=0)
    ev = np.linalg.svd(xc, compute_uv=False) ** 2
    k = max(4, len(ev) // 2)
    r = np.arange(1, k + 1)
    slope = np.polyfit(np.log(r[1:]), np.log(ev[1:k] + 1e-12), 1)[0]
    return float(-slope)


def fit(real: np.ndarray, *, seed: int = 0, views: float = DEFAULT_VIEWS, source: str = "") -> Calibration:
    """The calibration whose synthetic set (same N, same D) matches `real`'s median random-pair
    cosine and median top-1 neighbour cosine."""
    n, d = real.shape
    want = profile(real)
    alpha = _eigen_alpha(real)

    def med(cal: Calibration, key: str) -> float:
        return profile(generate(n, d, cal, seed=seed)[0])[key][1]

    def bisect(lo: float, hi: float, f, target: float, increasing: bool) -> float:
        for _ in range(24):
            mid = (lo + hi) / 2
            if (f(mid) < target) == increasing:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    a, sigma = 0.5, 0.5
    for _ in range(3):  # the two targets move together a little: alternate
        a = bisect(0.0, 4.0, lambda v: med(Calibration(alpha, v, sigma, views), "random"), want["random"][1], True)
        sigma = bisect(0.01, 4.0, lambda v: med(Calibration(alpha, a, v, views), "top1"), want["top1"][1], False)
    return Calibration(alpha=round(alpha, 4), mean_weight=round(a, 4), view_noise=round(sigma, 4), views=views,
                       source=source)


def real_descriptors(bundle: str | Path, workdir: Path) -> np.ndarray:
    """The default model's descriptors of the demo's photo set (each packaged photo and 8 views)."""
    from sgengine import Engine
    from sgengine.photoset import make_photo_set
    queries, ddir = make_photo_set(workdir)
    files = sorted(queries.values()) + sorted(ddir.rglob("*.jpg"))
    return Engine.load(bundle).embed([str(f) for f in files])


def report(real: np.ndarray, cal: Calibration, *, seed: int = 0) -> str:
    syn = generate(len(real), real.shape[1], cal, seed=seed)[0]
    pr, ps = profile(real), profile(syn)
    lines = [f"calibration: {cal.to_json()}",
             f"real set: {real.shape[0]} descriptors, D = {real.shape[1]}; synthetic: the same N and D, seed {seed}",
             "quantiles (10% / 50% / 90%) of the cosine to:",
             f"{'':>22} {'real':>24} {'synthetic':>24}"]
    for key, label in (("top1", "the nearest neighbour"), ("top10", "the 10th neighbour"), ("random", "a random row")):
        lines.append(f"{label:>22} {str(pr[key]):>24} {str(ps[key]):>24}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle whose descriptors calibrate the generator")
    p.add_argument("--workdir", help="where the photo set is written (default: a temporary folder)")
    p.add_argument("--out", help="also write the report here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        real = real_descriptors(a.bundle, Path(a.workdir or tmp))
    cal = fit(real, source=f"{Path(a.bundle).name}: {real.shape[0]} photo-set descriptors, D = {real.shape[1]}")
    text = report(real, cal) + f"\nmachine: {platform.processor() or platform.machine()}, python {sys.version.split()[0]}"
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
