"""Real photographs shipped by installed packages (scikit-image, scikit-learn).

The demo, the export parity check and the tests use these: no download, real JPEG/PNG content.
`chelsea` and `cat` are the same photo in scikit-image, so only one is listed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Colour photographs first (the parity check uses the first few), then greyscale ones.
SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "colorwheel", "retina", "camera", "brick", "grass", "gravel", "moon", "coins", "clock", "page", "text",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def sample_photo_files() -> dict[str, Path]:
    """Names -> paths of the photo files as installed (so they can be decoded from disk)."""
    out: dict[str, Path] = {}
    try:
        import skimage.data
        base = Path(skimage.data.__file__).parent
        for name in SKIMAGE_PHOTOS:
            for ext in (".png", ".jpg"):
                if (base / f"{name}{ext}").exists():
                    out[name] = base / f"{name}{ext}"
                    break
    except ImportError:
        pass
    try:
        import sklearn.datasets
        base = Path(sklearn.datasets.__file__).parent / "images"
        for fname in SKLEARN_PHOTOS:
            if (base / fname).exists():
                out[Path(fname).stem] = base / fname
    except ImportError:
        pass
    return out


def sample_photos(limit: int | None = None, color_only: bool = False) -> dict[str, np.ndarray]:
    """Names -> RGB uint8 HWC arrays (greyscale photos expanded to three channels).

    Raises ImportError naming the extra to install when neither package is present.
    """
    photos: dict[str, np.ndarray] = {}
    try:
        import skimage.data
        for name in SKIMAGE_PHOTOS:
            try:
                a = np.asarray(getattr(skimage.data, name)())
            except Exception:  # some images need optional downloads; skip them
                continue
            if a.dtype != np.uint8:
                continue
            if a.ndim == 2:
                if color_only:
                    continue
                a = np.repeat(a[..., None], 3, axis=2)
            photos[name] = np.ascontiguousarray(a[..., :3])
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images
        s = load_sample_images()
        for img, fname in zip(s.images, s.filenames):
            photos[Path(fname).stem] = np.ascontiguousarray(img)
    except ImportError:
        pass
    if not photos:
        raise ImportError("no sample photos: install the demo extra (pip install 'sgengine[demo]') for scikit-image and scikit-learn")
    items = list(photos.items())
    return dict(items[:limit] if limit is not None else items)
