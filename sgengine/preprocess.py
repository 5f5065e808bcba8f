"""Image to tensor (SPEC.md 1), scale resizing (SPEC 3.1) and small-image handling (SPEC 9).

Decoding uses Pillow. Whatever comes in (file path, encoded bytes, PIL image, numpy array) leaves
as an 8-bit, 3-channel, HWC **BGR** array, the layout the reference gets from OpenCV's imread:
- EXIF orientation is applied (imread does the same by default);
- grey, palette and two-channel images are expanded to three channels; alpha is dropped
  (imread's IMREAD_COLOR drops it too), CMYK goes through Pillow's conversion;
- 16-bit images keep their high byte (imread's 16 -> 8 bit conversion);
- numpy arrays are read as **RGB** unless `color_order="BGR"` is given; they must be uint8 or
  uint16, HW or HWC with 1, 3 or 4 channels.

Limits: an image whose long side exceeds `max_side` (default 2048, so the revisited Oxford/Paris
images of about 1024 px are untouched) is shrunk with Pillow's antialiased resampling, keeping the
aspect ratio; images over MAX_PIXELS pixels are refused before decoding.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError, InputError

DEFAULT_MAX_SIDE = 2048
MAX_PIXELS = 200_000_000
# CVNet / SuperGlobal preprocessing: BGR order, ImageNet statistics reversed accordingly.
CVNET_MEAN_BGR = (0.406, 0.456, 0.485)
CVNET_STD_BGR = (0.225, 0.224, 0.229)
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

ImageSource = Any  # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray


@dataclass
class DecodedImage:
    """A decoded image as BGR uint8 HWC plus what was done to it."""

    bgr: np.ndarray
    name: str
    original_size: tuple[int, int]  # (height, width) before any cap
    notes: list[str] = field(default_factory=list)


def describe_source(source: ImageSource, index: int | None = None) -> str:
    """A short name for an input, used in every error message about it."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    tag = type(source).__name__
    if isinstance(source, np.ndarray):
        tag = f"ndarray{list(source.shape)}:{source.dtype}"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        tag = f"bytes[{len(source)}]"
    elif isinstance(source, Image.Image):
        tag = f"PIL.Image({source.mode} {source.width}x{source.height})"
    return f"input #{index} ({tag})" if index is not None else f"<{tag}>"


def _pil_to_rgb8(img: Image.Image, name: str) -> np.ndarray:
    """Any Pillow mode -> RGB uint8 HWC, with the conversions the module docstring lists."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img)
        if a.dtype != np.uint16 and mode == "I":
            # 32-bit 'I' is how Pillow opens 16-bit greyscale PNGs: keep the high byte of 16 bits.
            a = np.clip(a, 0, 65535).astype(np.uint16)
        grey = (a.astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ImageDecodeError(f"{name}: floating-point image holds NaN or inf values")
        grey = np.clip(a, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "RGB":
        return np.asarray(img)
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
    if mode == "CMYK":
        return np.asarray(img.convert("RGB"))
    if img.mode in ("RGBA", "RGBa", "LA", "La", "RGBX"):
        img = img.convert("RGB")  # drops alpha, as imread's IMREAD_COLOR does
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def _cap(rgb_or_img: Image.Image, max_side: int | None, notes: list[str]) -> Image.Image:
    if max_side is None:
        return rgb_or_img
    w, h = rgb_or_img.size
    if max(w, h) <= max_side:
        return rgb_or_img
    f = max_side / max(w, h)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    notes.append(f"long side capped: {w}x{h} -> {size[0]}x{size[1]} (max_side={max_side})")
    return rgb_or_img.resize(size, Image.Resampling.LANCZOS)


def _open_pil(source: ImageSource, name: str) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageDecodeError(f"{name}: no such file")
        if path.is_dir():
            raise ImageDecodeError(f"{name}: is a directory, not an image file")
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ImageDecodeError(f"{name}: cannot read file ({e.strerror})") from e
        if size == 0:
            raise ImageDecodeError(f"{name}: file is empty (0 bytes)")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageDecodeError(f"{name}: cannot read file ({e.strerror})") from e
        return _open_bytes(data, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError(f"{name}: buffer is empty (0 bytes)")
        return _open_bytes(bytes(source), name)
    raise InputError(f"{name}: not an image source (expected a path, bytes, PIL image or uint8 numpy array)")


def _open_bytes(data: bytes, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"{name}: not a recognised image format") from e
    except Exception as e:  # Pillow raises assorted errors on hostile headers
        raise ImageDecodeError(f"{name}: cannot decode image header ({e})") from e
    w, h = img.size
    if w * h == 0:
        raise ImageDecodeError(f"{name}: image has zero pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageDecodeError(f"{name}: image is {w}x{h} = {w * h / 1e6:.0f} MP, over the {MAX_PIXELS / 1e6:.0f} MP limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{name}: image data is truncated or corrupt ({e})") from e
    return img


def _array_to_rgb8(a: np.ndarray, name: str, color_order: str) -> np.ndarray:
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise InputError(f"{name}: image arrays must be uint8 or uint16 (got {a.dtype}); "
                         "floating arrays are taken as descriptors by Engine.search")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim != 3 or a.shape[2] not in (3, 4):
        raise InputError(f"{name}: image arrays must be HW or HWC with 1, 3 or 4 channels (got shape {list(a.shape)})")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"{name}: image has zero pixels ({a.shape[1]}x{a.shape[0]})")
    a = a[..., :3]
    order = color_order.upper()
    if order not in ("RGB", "BGR"):
        raise InputError(f"color_order must be 'RGB' or 'BGR', got {color_order!r}")
    return np.ascontiguousarray(a if order == "RGB" else a[..., ::-1])


def load_image(source: ImageSource, *, name: str | None = None, color_order: str = "RGB",
               max_side: int | None = DEFAULT_MAX_SIDE) -> DecodedImage:
    """Decode any supported source to BGR uint8 HWC (see the module docstring for the rules)."""
    name = name or describe_source(source)
    notes: list[str] = []
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb8(source, name, color_order)
        original = rgb.shape[:2]
        if max_side is not None and max(original) > max_side:
            rgb = np.asarray(_cap(Image.fromarray(rgb), max_side, notes))
        return DecodedImage(np.ascontiguousarray(rgb[..., ::-1]), name, (int(original[0]), int(original[1])), notes)
    if isinstance(source, Image.Image):
        img = source
        if img.width * img.height == 0:
            raise InputError(f"{name}: image has zero pixels ({img.width}x{img.height})")
    else:
        img = _open_pil(source, name)
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block should not lose the picture
        orientation = 1
        notes.append("EXIF block unreadable; used as stored")
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append(f"EXIF orientation {orientation} applied")
    original = (img.height, img.width)
    rgb = _pil_to_rgb8(img, name)
    if max_side is not None and max(original) > max_side:
        rgb = np.asarray(_cap(Image.fromarray(rgb), max_side, notes))
    return DecodedImage(np.ascontiguousarray(rgb[..., ::-1]), name, (int(original[0]), int(original[1])), notes)


def crop_box(bgr: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """SPEC 1.2: the revisited protocol's query crop, im[int(y1):int(y2), int(x1):int(x2)]."""
    x1, y1, x2, y2 = box
    return bgr[int(y1):int(y2), int(x1):int(x2)]


@dataclass(frozen=True)
class Normalization:
    """How a BGR uint8 image becomes the network's input (the bundle's `preprocess` block)."""

    channel_order: str = "BGR"   # order of channels the network expects
    mean: tuple[float, float, float] = CVNET_MEAN_BGR  # in channel_order
    std: tuple[float, float, float] = CVNET_STD_BGR

    def to_dict(self) -> dict:
        return {"channel_order": self.channel_order, "mean": list(self.mean), "std": list(self.std), "scale": 1 / 255}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(d["channel_order"], tuple(d["mean"]), tuple(d["std"]))


def to_tensor(bgr: np.ndarray, norm: Normalization = Normalization(), device: str | torch.device | None = None
              ) -> torch.Tensor:
    """SPEC 1.3: float32, HWC -> CHW, /255, per-channel mean/std. Returns [1, 3, H, W] on `device`.

    The 8-bit pixels are moved to the device first and converted there: one upload of 1 byte
    per channel instead of 4, and the arithmetic (the same operations in the same order as on
    the CPU) runs on the GPU.
    """
    a = bgr if norm.channel_order.upper() == "BGR" else bgr[..., ::-1]
    u8 = torch.from_numpy(np.ascontiguousarray(a))
    if device is not None and torch.device(device).type != "cpu":
        u8 = u8.to(device, non_blocking=False)
    x = u8.permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1).to(x.device)
    std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1).to(x.device)
    return ((x - mean) / std).unsqueeze(0).contiguous()


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """SPEC 3.1: [int(H*s), int(W*s)]."""
    return int(h * scale), int(w * scale)


def resize_for_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """SPEC 3.1: bilinear, align_corners=False, no antialiasing; scale 1.0 is the identity."""
    if scale == 1.0:
        return x
    size = scaled_size(x.shape[-2], x.shape[-1], scale)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


def min_input_side(stride: int, scales: Sequence[float], min_cells: int = 3) -> int:
    """Smallest side L such that every scale's map has >= min_cells cells (SPEC 9: reflection pad 2)."""
    side = 1
    while True:
        if all(math.ceil(int(side * s) / stride) >= min_cells for s in scales):
            return side
        side += 1


def ensure_min_size(x: torch.Tensor, min_side: int, max_side: int | None = None) -> tuple[torch.Tensor, str | None]:
    """SPEC 9: upscale a too-small normalized image so every scale's map is >= 3x3.

    The aspect ratio is kept while the long side stays within max_side; an image too thin for that
    (say 1x2048) is upscaled to max_side on its long side and its short side is then stretched to
    min_side. Returns the tensor and a note saying what was done (None when nothing was).
    """
    h, w = x.shape[-2:]
    if h >= min_side and w >= min_side:
        return x, None
    f = max(min_side / h, min_side / w)
    if max_side is not None:
        f = min(f, max(1.0, max_side / max(h, w)))
    nh, nw = max(h, math.ceil(h * f)), max(w, math.ceil(w * f))
    note = f"upscaled {w}x{h} -> "
    if nh < min_side or nw < min_side:
        nh, nw = max(nh, min_side), max(nw, min_side)
        note = f"upscaled and stretched (aspect ratio changed) {w}x{h} -> "
    y = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)
    return y, note + f"{nw}x{nh} so the smallest scale gives a >= 3x3 feature map"

