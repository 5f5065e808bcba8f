"""Image to tensor (SPEC.md 1), scale resizing (SPEC 3.1) and small-image handling (SPEC 9).

Decoding uses Pillow. Whatever comes in (file path, encoded bytes, PIL image, numpy array) leaves
as an 8-bit, 3-channel, HWC **BGR** array, the layout the reference gets from OpenCV's imread:
- EXIF orientation is applied (imread does the same by default);
- every Pillow mode is converted: grey, palette and two-channel images are expanded to three
  channels; alpha is dropped (imread's IMREAD_COLOR drops it too; premultiplied alpha is undone
  first); CMYK, YCbCr, LAB and HSV go through Pillow's conversion to RGB;
- 16-bit images keep their high byte (imread's 16 -> 8 bit conversion); float ("F") images are
  clipped to 0..255;
- animated and multi-page files give their first frame;
- numpy arrays are read as **RGB** unless `color_order="BGR"` is given; they must be uint8 or
  uint16, HW or HWC with 1, 3 or 4 channels.

Limits, checked before anything large is allocated or decoded:
- MAX_PIXELS pixels per image, for every kind of input (the header's size for files and bytes);
- MAX_FILE_BYTES per file or buffer; a file is opened, not read whole: Pillow identifies the
  format from its first bytes, so a non-image costs a few kilobytes whatever its size;
- MAX_JPEG_SCANS scans per JPEG, and MAX_JPEG_SCAN_PIXELS scans x pixels: a progressive JPEG
  is decoded scan by scan, each scan a pass over the whole image, so a small file of thousands
  of tiny scans would take minutes.
An image whose long side exceeds `max_side` (default 2048, so the revisited Oxford/Paris images
of about 1024 px are untouched) is shrunk with Pillow's antialiased resampling, keeping the
aspect ratio.
"""
from __future__ import annotations

import io
import math
import os
import stat
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ._checks import check_int
from .errors import ImageDecodeError, InputError, MemoryLimitError

DEFAULT_MAX_SIDE = 2048
# Pillow's own hard limit (2 x its default MAX_IMAGE_PIXELS), so a file, a PIL image and an array
# share one limit: 13,377 px square, 537 MB decoded as RGB.
MAX_PIXELS = 178_956_970
# An uncompressed 8-bit RGB file at MAX_PIXELS is 537 MB; 16-bit RGBA, 1.4 GB.
MAX_FILE_BYTES = 1 << 30
# Encoders write 1 scan (baseline) or up to ~10-20 (progressive: libjpeg's default script has 10);
# a thumbnail or a second frame (MPO) adds its own. Each scan is a pass over the whole image
# (~0.17 s at 179 MP on a 2-core EPYC), so the scans times the pixels are bounded too: 100 scans
# up to 20 MP, 11 at MAX_PIXELS, a few seconds of decoding at most.
MAX_JPEG_SCANS = 100
MAX_JPEG_SCAN_PIXELS = 2_000_000_000
# CVNet / SuperGlobal preprocessing: BGR order, ImageNet statistics reversed accordingly.
CVNET_MEAN_BGR = (0.406, 0.456, 0.485)
CVNET_STD_BGR = (0.225, 0.224, 0.229)
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

ImageSource = Any  # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray

# warnings.catch_warnings swaps a process-wide filter list: two threads interleaving it can leave
# each other's filter behind. Ours are serialized; they cover only the header read.
_OPEN_LOCK = threading.Lock()


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
    elif isinstance(source, torch.Tensor):
        tag = f"Tensor{list(source.shape)}:{str(source.dtype).replace('torch.', '')}"
    return f"input #{index} ({tag})" if index is not None else f"<{tag}>"


def check_pixels(width: int, height: int, name: str, error: type[InputError] = InputError) -> None:
    """`error` naming the image when it has no pixels or more than MAX_PIXELS."""
    if width * height == 0:
        raise error(f"{name}: image has zero pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise error(f"{name}: image is {width}x{height} = {width * height / 1e6:.1f} MP, over the limit of "
                    f"{MAX_PIXELS:,} pixels ({MAX_PIXELS / 1e6:.1f} MP); shrink it before passing it")


# Pillow modes with no direct conversion to RGB (or one that warns): the mode to go through.
_VIA = {"La": "LA", "P": "RGBA", "PA": "RGBA"}


def _pil_to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Any Pillow mode -> an RGB image, with the conversions the module docstring lists."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img)
        if mode == "F":
            if not np.isfinite(a).all():
                raise ImageDecodeError(f"{name}: floating-point image holds NaN or inf values")
            grey = np.clip(a, 0, 255).astype(np.uint8)
        else:
            # 32-bit "I" is how Pillow opens 16-bit greyscale PNGs: keep the high byte of 16 bits.
            grey = (np.clip(a, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    try:
        if mode in _VIA:
            img = img.convert(_VIA[mode])
        return img if img.mode == "RGB" else img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"{name}: Pillow image mode {mode!r} cannot be converted to RGB ({e})") from e


def _cap(img: Image.Image, max_side: int | None, notes: list[str]) -> Image.Image:
    if max_side is None:
        return img
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    f = max_side / max(w, h)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    notes.append(f"long side capped: {w}x{h} -> {size[0]}x{size[1]} (max_side={max_side})")
    return img.resize(size, Image.Resampling.LANCZOS)


def _open_pil(source: ImageSource, name: str) -> Image.Image:
    """A path or encoded bytes -> a decoded (loaded) PIL image, every limit checked on the way."""
    if isinstance(source, (str, os.PathLike)):
        try:
            st = os.stat(source)
        except FileNotFoundError:
            raise ImageDecodeError(f"{name}: no such file") from None
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
            raise ImageDecodeError(f"{name}: cannot read file ({getattr(e, 'strerror', None) or e})") from e
        if stat.S_ISDIR(st.st_mode):
            raise ImageDecodeError(f"{name}: is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(f"{name}: is not a regular file (a pipe, socket or device)")
        _check_bytes(st.st_size, name, "file")
        try:
            f: BinaryIO = open(source, "rb")
        except OSError as e:
            raise ImageDecodeError(f"{name}: cannot read file ({e.strerror})") from e
    elif isinstance(source, (bytes, bytearray, memoryview)):
        _check_bytes(memoryview(source).nbytes, name, "buffer")
        f = io.BytesIO(source)
    else:
        raise InputError(f"{name}: not an image source (expected a path, bytes, PIL image or uint8 numpy array)")
    with f:
        return _decode(f, name)


def _check_bytes(n: int, name: str, what: str) -> None:
    if n == 0:
        raise ImageDecodeError(f"{name}: {what} is empty (0 bytes)")
    if n > MAX_FILE_BYTES:
        raise ImageDecodeError(f"{name}: {what} is {n:,} bytes, over the limit of {MAX_FILE_BYTES:,} bytes for an image")


def _decode(f: BinaryIO, name: str) -> Image.Image:
    """Header first (format, size, JPEG scans), then the pixels."""
    with _OPEN_LOCK, warnings.catch_warnings():
        # Pillow warns from 89 MP on; MAX_PIXELS, checked below, decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(f)
        except UnidentifiedImageError as e:
            raise ImageDecodeError(f"{name}: not a recognised image format") from e
        except Image.DecompressionBombError as e:  # Pillow's limit is ours unless someone changed it
            raise ImageDecodeError(f"{name}: image is over the limit of {MAX_PIXELS:,} pixels ({e})") from e
        except Exception as e:  # OSError, and assorted other types on hostile headers
            raise ImageDecodeError(f"{name}: image header is truncated or corrupt ({e})") from e
    w, h = img.size
    check_pixels(w, h, name, ImageDecodeError)
    if img.format == "EPS":
        raise ImageDecodeError(f"{name}: EPS is PostScript, a program that only Ghostscript can draw; sgengine does "
                               "not run it (convert the file to PNG or JPEG first)")
    if img.format in ("JPEG", "MPO"):
        allowed = min(MAX_JPEG_SCANS, MAX_JPEG_SCAN_PIXELS // (w * h))
        if _jpeg_scans(f, allowed) > allowed:
            raise ImageDecodeError(
                f"{name}: JPEG has more than {allowed} scans, the most a {w}x{h} image may have (encoders write up "
                f"to about 20; each scan is a pass over all the pixels: at most {MAX_JPEG_SCANS} scans and "
                f"{MAX_JPEG_SCAN_PIXELS // 10**6:,} megapixel-scans)")
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as e:  # OSError for truncated data; hostile files raise many other types
        raise ImageDecodeError(f"{name}: image data is truncated or corrupt ({e})") from e
    return img


def _jpeg_scans(f: BinaryIO, limit: int) -> int:
    """Start-of-scan markers (FF DA) in a JPEG stream, counting up to just past `limit`. Inside
    entropy-coded data an FF byte is followed by 00 or a restart marker, so only scans (and the
    rare FF DA inside a metadata block, or a thumbnail's scans) are counted."""
    pos = f.tell()
    f.seek(0)
    n, tail = 0, b""
    while n <= limit and (block := f.read(1 << 20)):
        n += (tail + block).count(b"\xff\xda")
        tail = block[-1:]
    f.seek(pos)
    return n


def _array_to_rgb8(a: np.ndarray, name: str, color_order: str) -> np.ndarray:
    """Checked before any copy: dtype, layout, pixel count."""
    a = np.asarray(a)  # a subclass (np.matrix, a masked array) as its plain data
    if a.dtype.kind != "u" or a.dtype.itemsize > 2:  # uint8, uint16 in either byte order
        raise InputError(f"{name}: image arrays must be uint8 or uint16 (got {a.dtype}); "
                         "floating arrays are taken as descriptors by Engine.search")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise InputError(f"{name}: image arrays must be HW or HWC with 1, 3 or 4 channels (got shape {list(a.shape)})")
    check_pixels(a.shape[1], a.shape[0], name)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype.itemsize == 2:
        a = (a >> 8).astype(np.uint8)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    a = a[..., :3]
    return np.ascontiguousarray(a if color_order == "RGB" else a[..., ::-1])


def load_image(source: ImageSource, *, name: str | None = None, color_order: str = "RGB",
               max_side: int | None = DEFAULT_MAX_SIDE) -> DecodedImage:
    """Decode any supported source to BGR uint8 HWC (see the module docstring for the rules and
    limits). Errors name the source: InputError, ImageDecodeError, or MemoryLimitError when an
    allocation fails."""
    name = name or describe_source(source)
    try:
        return _load_image(source, name, color_order, max_side)
    except MemoryError as e:
        if isinstance(e, MemoryLimitError):
            raise
        raise MemoryLimitError(f"{name}: out of memory decoding it (max_side={max_side}); give the process more "
                               "memory, or pass a smaller image") from e


def _load_image(source: ImageSource, name: str, color_order: str, max_side: int | None) -> DecodedImage:
    if not isinstance(color_order, str) or color_order.upper() not in ("RGB", "BGR"):
        raise InputError(f"color_order must be 'RGB' or 'BGR', got {color_order!r}")
    if max_side is not None:
        max_side = check_int(max_side, "max_side", 1)
    notes: list[str] = []
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb8(source, name, color_order.upper())
        original = rgb.shape[:2]
        if max_side is not None and max(original) > max_side:
            rgb = np.asarray(_cap(Image.fromarray(rgb), max_side, notes))
        return DecodedImage(np.ascontiguousarray(rgb[..., ::-1]), name, (int(original[0]), int(original[1])), notes)
    if isinstance(source, Image.Image):
        img = source
        check_pixels(img.width, img.height, name)
        try:
            img.load()  # an image the caller opened lazily is decoded here
        except MemoryError:
            raise
        except Exception as e:
            raise ImageDecodeError(f"{name}: image data cannot be read ({e})") from e
    else:
        img = _open_pil(source, name)
    try:
        orientation = img.getexif().get(0x0112, 1)
        if orientation not in (1, None):
            img = ImageOps.exif_transpose(img)
            notes.append(f"EXIF orientation {orientation} applied")
    except Exception:  # a broken EXIF block should not lose the picture
        notes.append("EXIF block unreadable; used as stored")
    original = (img.height, img.width)
    rgb = np.asarray(_cap(_pil_to_rgb(img, name), max_side, notes))
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

