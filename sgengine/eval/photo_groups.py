"""Retrieval sets of real photos with a stated grouping: small groups, larger groups, distractors,
and rotated or rescaled queries. What `bench/quality.py` measures the rerank modes on.

Built on the quality benchmark's set (`sgengine.photoset.make_quality_set`: every packaged photo
that is not a distractor source gives a scene whose query is one half of the photo, with 12
augmented views of that half; 3 views of the photo's other half and 80 tiles of the distractor
photos are distractors), plus, where the packages ship them:

- a scene with a genuinely different photo: scikit-image's stereo motorcycle pair. The query is
  the left photo's first half; its positives are the right photo's first half unaltered and views
  of it (none of them holds a pixel of the query photo); 3 views of the left photo's other half
  are distractors;
- 100 more distractors that are other real photos: the face photographs of scikit-image's LFW
  subset (25 x 25 px greyscale; they form one dense cluster of similar-looking distractors).

Groupings (`GROUPINGS`): "small", each scene has 2 or 3 positives (drawn per scene, seeded) out of
its views; "large", each scene has all its 12. The database of both holds the same distractors.
Query variants (`QUERY_VARIANTS`): "original", "rotated" (30 degrees counter-clockwise, canvas
expanded, black corners) and "half" (half the size in each direction, Lanczos).

Every file is drawn from seeded generators and reused when already on disk, so a set is the same
from run to run (up to Pillow's JPEG encoder); every grouping and variant of one root shares its
database files.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..photoset import (DISTRACTOR_DIR, QUALITY_VIEWS, QualitySet, _augment, _save, _shrunk, _split_regions,
                        make_quality_set, rest_distractors)

__all__ = ["GROUPINGS", "QUERY_VARIANTS", "SMALL_GROUP_SIZES", "ROTATION_DEGREES", "make_group_set"]

GROUPINGS = ("small", "large")
QUERY_VARIANTS = ("original", "rotated", "half")
SMALL_GROUP_SIZES = (2, 3)
ROTATION_DEGREES = 30.0
FACE_DISTRACTORS = 100
SECOND_PHOTO_SCENE = "motorcycle"


def _second_photo_scene(root: Path, views: tuple[str, ...], region_distractors: int, max_side: int | None,
                        seed: int) -> tuple[Path, list[tuple[str, Path]], list[tuple[str, Path]]] | None:
    """(query path, positives, distractors) of the stereo pair scene, or None without the photos."""
    try:
        import skimage.data
        left, right, _ = skimage.data.stereo_motorcycle()
    except Exception:  # older scikit-image, or its data not installed
        return None
    rng = np.random.default_rng([seed, 2000])
    query, rest = _split_regions(_shrunk(np.asarray(left), max_side))
    second, _ = _split_regions(_shrunk(np.asarray(right), max_side))
    name = SECOND_PHOTO_SCENE
    qpath = root / "queries" / f"{name}.jpg"
    _save(query, qpath, 92)
    pos = [(f"{name}/second_photo", root / "database" / name / "second_photo.jpg")]
    _save(second, pos[0][1], 90)
    for view in views[:-1]:  # the second photo counts as one of the scene's views
        path = root / "database" / name / f"{view}.jpg"
        _save(_augment(second, view, rng), path, 90)
        pos.append((f"{name}/{view}", path))
    return qpath, pos, rest_distractors(root, name, rest, region_distractors, rng)


def _face_distractors(root: Path, n: int) -> list[tuple[str, Path]]:
    try:
        import skimage.data
        faces = skimage.data.lfw_subset()[:n]  # the first 100 of the subset are faces
    except Exception:
        return []
    out = []
    for j, a in enumerate(faces):
        id_ = f"{DISTRACTOR_DIR}/lfw-face-{j:03d}"
        path = root / "database" / f"{id_}.png"  # lossless: 25 x 25 px leaves nothing to compress
        _save(Image.fromarray(np.clip(np.asarray(a) * 255 + 0.5, 0, 255).astype(np.uint8)), path, 100)
        out.append((id_, path))
    return out


def _query_variant(path: Path, variant: str, root: Path) -> Path:
    if variant == "original":
        return path
    out = root / f"queries-{variant}" / path.name
    if not out.exists():
        with Image.open(path) as im:
            im = im.convert("RGB")
            if variant == "rotated":
                im = im.rotate(ROTATION_DEGREES, resample=Image.Resampling.BICUBIC, expand=True)
            else:
                im = im.resize((max(im.width // 2, 1), max(im.height // 2, 1)), Image.Resampling.LANCZOS)
            _save(im, out, 92)
    return out


def make_group_set(root: Path, grouping: str = "small", queries: str = "original", *, max_side: int | None = None,
                   region_distractors: int = 3, distractors: int = 80, faces: int = FACE_DISTRACTORS,
                   seed: int = 0) -> QualitySet:
    """Write (or reuse) the photos under `root` and return the set `grouping` with query variant
    `queries` (see the module docstring). max_side shrinks every photo first (CI-sized sets);
    the same arguments give the same set, and different max_side values need different roots."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    if queries not in QUERY_VARIANTS:
        raise ValueError(f"queries must be one of {QUERY_VARIANTS}, got {queries!r}")
    root = Path(root)
    base = make_quality_set(root, views=QUALITY_VIEWS, region_distractors=region_distractors,
                            distractors=distractors, max_side=max_side, seed=seed)
    qpaths = dict(base.queries)
    views = [(id_, p) for id_, p in base.database if not id_.startswith(DISTRACTOR_DIR + "/")]
    others = [(id_, p) for id_, p in base.database if id_.startswith(DISTRACTOR_DIR + "/")]
    extra = _second_photo_scene(root, QUALITY_VIEWS, region_distractors, max_side, seed)
    notes = list(base.notes)
    if extra is None:
        notes.append("scikit-image's stereo motorcycle photos are not installed: no second-photo scene")
    else:
        qpaths[SECOND_PHOTO_SCENE] = extra[0]
        views += extra[1]
        others += extra[2]
    face_rows = _face_distractors(root, faces)
    if faces and not face_rows:
        notes.append("scikit-image's LFW subset is not installed: no face distractors")
    others += face_rows
    if grouping == "small":
        kept = []
        for i, name in enumerate(qpaths):
            rng = np.random.default_rng([seed, 3000 + i])
            size = int(rng.choice(SMALL_GROUP_SIZES))
            mine = [v for v in views if v[0].split("/", 1)[0] == name]
            kept += [mine[j] for j in sorted(rng.permutation(len(mine))[:size])]
        views = kept
    qpaths = {name: _query_variant(p, queries, root) for name, p in qpaths.items()}
    return replace(base, queries=qpaths, database=views + others, distractors=len(others), notes=notes)
