"""Multi-view photo sets built from the packaged photos: the demo's, and a harder one for the quality benchmark.

A "view" is an augmented copy of one photo (crop, rotation, colour change, rescale...); a query is
the original photo and its views are its positives. `make_photo_set` is the demo's set (8 views per
photo, every packaged photo a query). `make_quality_set` is harder: the query is one half of a
photo, with 12 views (the demo's 8 plus a perspective warp, an occlusion, blur with noise and a
tight crop), and the distractors are views of no query: views of the other side of the same
photos (same colours and style, none of the query's pixels), tiles of the large astronomy and
retina images and flipped, heavily altered greyscale textures, all from regions that are never
queried. On the demo's set the default model's mAP is near 99 (measured): too easy to show
anything; the hard negatives are what a ranking has to push down.

Everything is drawn from numpy generators seeded per photo, and files already on disk are
reused, so a set is the same from run to run (up to Pillow's JPEG encoder version).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

VIEWS = ("crop_center", "crop_corner", "rotate_ccw", "rotate_cw", "jitter", "shrink", "enlarge", "mixed")
HARD_VIEWS = ("perspective", "occlude", "blur_noise", "tight_crop")
QUALITY_VIEWS = VIEWS + HARD_VIEWS
# Never queried: their tiles and altered copies are the distractors. The large ones give many
# distinct tiles; the textures are what a texture-biased descriptor confuses with real photos.
DISTRACTOR_SOURCES = ("hubble_deep_field", "retina", "brick", "grass", "gravel")
DISTRACTOR_DIR = "_distractors"


def _augment(img: Image.Image, view: str, rng: np.random.Generator) -> Image.Image:
    """One view of `img`. The demo's eight views draw from `rng` in a fixed order: keep it (the demo's files depend on it)."""
    w, h = img.size
    if view == "crop_center":
        f = rng.uniform(0.45, 0.6)
        cw, ch = int(w * f), int(h * f)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return img.crop((x0, y0, x0 + cw, y0 + ch))
    if view == "crop_corner":
        f = rng.uniform(0.5, 0.65)
        cw, ch = int(w * f), int(h * f)
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        return img.crop((x0, y0, x0 + cw, y0 + ch))
    if view in ("rotate_ccw", "rotate_cw"):
        angle = rng.uniform(15, 35) * (1 if view == "rotate_ccw" else -1)
        return img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False)
    if view == "jitter":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.5, 1.5))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.5, 1.5))
        return ImageEnhance.Color(img).enhance(rng.uniform(0.0, 1.6))
    if view == "shrink":
        f = rng.uniform(0.25, 0.4)
        return img.resize((int(w * f), int(h * f)), Image.Resampling.LANCZOS)
    if view == "enlarge":
        f = rng.uniform(1.3, 1.6)
        return img.resize((int(w * f), int(h * f)), Image.Resampling.BICUBIC)
    if view == "mixed":
        img = _augment(img, "crop_corner", rng)
        img = _augment(img, "jitter", rng)
        return _augment(img, "rotate_cw", rng)
    # The quality set's harder views.
    if view == "perspective":
        # Move each corner inwards by up to 22% of the side: an oblique viewpoint, not a crop.
        src = []
        for cx, cy in ((0, 0), (w, 0), (w, h), (0, h)):
            dx, dy = rng.uniform(0, 0.22) * w, rng.uniform(0, 0.22) * h
            src.append((cx + dx if cx == 0 else cx - dx, cy + dy if cy == 0 else cy - dy))
        return img.transform((w, h), Image.Transform.QUAD, [c for p in src for c in p],
                             resample=Image.Resampling.BILINEAR)
    if view == "occlude":
        # Grey and noise blocks over 25-40% of the area, on a jittered copy.
        img = _augment(img, "jitter", rng).copy()
        covered = 0.0
        while covered < rng.uniform(0.25, 0.4):
            bw, bh = int(w * rng.uniform(0.15, 0.35)), int(h * rng.uniform(0.15, 0.35))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            block = rng.integers(0, 256, (bh, bw, 3), dtype=np.uint8) if rng.random() < 0.5 else \
                np.full((bh, bw, 3), int(rng.integers(0, 256)), np.uint8)
            img.paste(Image.fromarray(block), (x0, y0))
            covered += bw * bh / (w * h)
        return img
    if view == "blur_noise":
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 3.0)))
        a = np.asarray(img, dtype=np.float32)
        a = a + rng.normal(0, rng.uniform(8, 16), a.shape).astype(np.float32)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if view == "tight_crop":
        f = rng.uniform(0.3, 0.42)
        cw, ch = max(int(w * f), 16), max(int(h * f), 16)
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        img = img.crop((x0, y0, x0 + cw, y0 + ch))
        return img.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, expand=False)
    raise ValueError(f"unknown view {view!r}; known: {QUALITY_VIEWS}")


def _save(img: Image.Image, path: Path, quality: int) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        img.convert("RGB").save(path, quality=quality)


def make_photo_set(root: Path, views: tuple[str, ...] = VIEWS, seed: int = 0) -> tuple[dict[str, Path], Path]:
    """Write queries/<photo>.jpg and database/<photo>/<view>.jpg under root; reuse files already there."""
    from .photos import sample_photos
    qdir, ddir = root / "queries", root / "database"
    queries: dict[str, Path] = {}
    for i, (name, rgb) in enumerate(sample_photos().items()):
        rng = np.random.default_rng(seed + i)
        img = Image.fromarray(rgb)
        qpath = qdir / f"{name}.jpg"
        _save(img, qpath, 92)
        queries[name] = qpath
        for view in views:
            view_img = _augment(img, view, rng)  # always drawn, so the rng sequence is stable
            _save(view_img, ddir / name / f"{view}.jpg", 90)
    return queries, ddir


def _distractor(src: Image.Image, grey: bool, rng: np.random.Generator) -> Image.Image:
    """A tile of `src` (a third to two thirds of its short side), flipped/rotated and altered."""
    w, h = src.size
    side = int(min(w, h) * rng.uniform(0.33, 0.66))
    tw = min(w, int(side * rng.uniform(0.8, 1.3)))
    x0, y0 = int(rng.integers(0, w - tw + 1)), int(rng.integers(0, h - side + 1))
    img = src.crop((x0, y0, x0 + tw, y0 + side))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = img.rotate(90 * int(rng.integers(0, 4)), expand=True)
    if grey:
        # Textures: heavy changes, so no two distractors are near copies of each other.
        img = ImageOps.autocontrast(img, cutoff=float(rng.uniform(0, 5)))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.8))
        if rng.random() < 0.5:
            img = ImageOps.posterize(img.convert("RGB"), int(rng.integers(3, 6)))
        if rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    f = rng.uniform(0.6, 1.2)
    return img.resize((max(int(img.width * f), 32), max(int(img.height * f), 32)), Image.Resampling.BICUBIC)


@dataclass
class QualitySet:
    """Files of a multi-view set and its ground truth.

    database: (id, path) in a fixed order; the id of a view is "<photo>/<view>", of a distractor
    "_distractors/<source>-<i>". positives(name) gives the database positions of a query's views.
    """

    root: Path
    queries: dict[str, Path]
    database: list[tuple[str, Path]]
    views: tuple[str, ...]
    distractors: int
    notes: list[str] = field(default_factory=list)

    def positives(self, name: str) -> list[int]:
        return [i for i, (id_, _) in enumerate(self.database) if id_.split("/", 1)[0] == name]

    def gnd(self) -> list[dict]:
        """compute_map ground truth, one dict per query in `queries` order (no junk)."""
        return [{"ok": self.positives(name), "junk": []} for name in self.queries]


def _shrunk(rgb: np.ndarray, max_side: int | None) -> Image.Image:
    img = Image.fromarray(rgb)
    if max_side and max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize((max(int(img.width * f), 1), max(int(img.height * f), 1)), Image.Resampling.LANCZOS)
    return img


def _split_regions(img: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The first half of the photo along its long side, and its last 45% (a 5% gap, no shared pixel)."""
    w, h = img.size
    if w >= h:
        return img.crop((0, 0, w // 2, h)), img.crop((int(w * 0.55), 0, w, h))
    return img.crop((0, 0, w, h // 2)), img.crop((0, int(h * 0.55), w, h))


def rest_distractors(root: Path, name: str, rest: Image.Image, count: int,
                     rng: np.random.Generator) -> list[tuple[str, Path]]:
    """`count` augmented views of the unqueried part of photo `name` (a random view kind each),
    saved under root/database/DISTRACTOR_DIR: distractors that share the photo's look."""
    out = []
    for j in range(count):
        view = QUALITY_VIEWS[int(rng.integers(0, len(QUALITY_VIEWS)))]
        id_ = f"{DISTRACTOR_DIR}/{name}-rest-{j}-{view}"
        path = root / "database" / f"{id_}.jpg"
        _save(_augment(rest, view, rng), path, 90)
        out.append((id_, path))
    return out


def make_quality_set(root: Path, *, views: tuple[str, ...] = QUALITY_VIEWS, region_distractors: int = 3,
                     distractors: int = 80, sources: tuple[str, ...] = DISTRACTOR_SOURCES,
                     max_side: int | None = None, seed: int = 0) -> QualitySet:
    """Write the quality benchmark's set under `root` (reusing files there) and return it.

    Every packaged photo not in `sources` gives one query: the first half of the photo along its
    long side, with `views` of that half as positives. The rest of the photo (its last 45%) is
    never queried: `region_distractors` views of it per photo are distractors sharing the
    query's colours, light and style (the "other side of the same building" case). `distractors`
    more are tiles and altered copies of the `sources` photos, spread evenly over them.
    max_side shrinks every photo first (a smaller, faster set for CI). The same arguments give
    the same set: write different sizes to different roots.
    """
    from .photos import sample_photos
    unknown = [v for v in views if v not in QUALITY_VIEWS]
    if unknown:
        raise ValueError(f"unknown views {unknown}; known: {QUALITY_VIEWS}")
    root = Path(root)
    photos = sample_photos()
    missing = [s for s in sources if s not in photos]
    srcs = [s for s in sources if s in photos]
    if distractors and not srcs:
        raise ValueError(f"none of the distractor sources {sources} is among the packaged photos {sorted(photos)}")
    queries: dict[str, Path] = {}
    database: list[tuple[str, Path]] = []
    others: list[tuple[str, Path]] = []
    for i, (name, rgb) in enumerate(photos.items()):
        if name in sources:
            continue
        rng = np.random.default_rng([seed, i])
        region, rest = _split_regions(_shrunk(rgb, max_side))
        qpath = root / "queries" / f"{name}.jpg"
        _save(region, qpath, 92)
        queries[name] = qpath
        for view in views:
            view_img = _augment(region, view, rng)  # drawn even when the file exists: a stable sequence
            vpath = root / "database" / name / f"{view}.jpg"
            _save(view_img, vpath, 90)
            database.append((f"{name}/{view}", vpath))
        others += rest_distractors(root, name, rest, region_distractors, rng)
    for j in range(distractors):
        src = srcs[j % len(srcs)]
        rng = np.random.default_rng([seed, 1000 + j])
        grey = bool(np.all(photos[src][..., 0] == photos[src][..., 1]))
        img = _distractor(_shrunk(photos[src], max_side * 2 if max_side else None), grey, rng)
        id_ = f"{DISTRACTOR_DIR}/{src}-{j:04d}"
        path = root / "database" / f"{id_}.jpg"
        _save(img, path, 90)
        others.append((id_, path))
    notes = [f"distractor source {s!r} is not among the packaged photos" for s in missing]
    return QualitySet(root, queries, database + others, tuple(views), len(others), notes)


__all__ = ["VIEWS", "HARD_VIEWS", "QUALITY_VIEWS", "DISTRACTOR_SOURCES", "make_photo_set", "make_quality_set",
           "QualitySet"]
