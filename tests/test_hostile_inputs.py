"""Hostile and careless inputs: images, arrays, tensors, descriptors, parameters and bundles.

Each case asserts the documented outcome: the exact sgengine error type with a message that names
the input, or a correct result. Also the resource limits (pixels, file bytes, JPEG scans, memory
per query, concurrent queries). The engine is a tiny random-weight trunk exported for real
(ONNX Runtime runs it), so the file stays quick; tests/test_engine.py covers the real model.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, features

from sgengine import Engine, Index
from sgengine.bundle import MANIFEST, Bundle
from sgengine.errors import BundleError, ImageDecodeError, IndexError_, InputError, MemoryLimitError
from sgengine.preprocess import MAX_FILE_BYTES, MAX_JPEG_SCAN_PIXELS, MAX_JPEG_SCANS, MAX_PIXELS, load_image

N_ROWS = 60
# Pillow's own note on a TIFF directory it cannot read; the error that follows is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")


# ----------------------------------------------------------------------------- fixtures
def _tiny_trunk() -> torch.nn.Module:
    """Two strided 1x1 convolutions: cheap to run, yet a 2048 px query holds ~270 MB of
    activations at its largest scale, enough for the memory tests to see."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 1, stride=2), torch.nn.ReLU(),
                               torch.nn.Conv2d(32, 32, 1, stride=2), torch.nn.ReLU())


def export_tiny(out: Path) -> Path:
    from sgengine.export import export_bundle
    from sgengine.model.factory import from_trunk
    export_bundle(from_trunk(_tiny_trunk(), name="tiny"), out, check=False, exporter="legacy",
                  progress=lambda *_: None)
    return out


def _unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    bundle = export_tiny(root / "bundle")
    b = Bundle.load(bundle)
    ix = Index.create(root / "index", dim=b.dim, bundle_fingerprint=b.fingerprint)
    ix.add(_unit_rows(N_ROWS, b.dim), [f"row-{i}" for i in range(N_ROWS)])
    return {"bundle": bundle, "index": root / "index", "engine": Engine.load(bundle, index=root / "index"),
            "dim": b.dim, "min_side": b.min_side}


@pytest.fixture(scope="module")
def engine(tiny) -> Engine:
    return tiny["engine"]


# ----------------------------------------------------------------------------- file makers
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB and whose data is a few bytes: the size is
    read, the pixels never exist."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """A JPEG after its SOI as (marker, bytes) parts; a scan part runs from its SOS marker to the
    next marker that is not a restart marker or a stuffed FF."""
    out, i = [], 2
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((marker, data[i:i + 2]))
            break
        j = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            j = data.index(b"\xff", j)
            while data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7:
                j = data.index(b"\xff", j + 2)
        out.append((marker, data[i:j]))
        i = j
    return out


def progressive_jpeg(scans: int, side: int = 512) -> bytes:
    """A flat-grey progressive JPEG with `scans` scans: libjpeg's 10, then its last (tiny:
    every block is an end-of-band run) repeated. Each scan is still a pass over the image."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(buf, "JPEG", progressive=True, quality=90)
    parts = jpeg_segments(buf.getvalue())
    at = [k for k, (m, _) in enumerate(parts) if m == 0xDA]
    extra = scans - len(at)
    assert extra >= 0
    last = at[-1]
    return (b"\xff\xd8" + b"".join(p for _, p in parts[:last + 1]) + parts[last][1] * extra
            + b"".join(p for _, p in parts[last + 1:]))


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w: int = 96, h: int = 64) -> Image.Image:
    """A small picture with structure (gradients), so orientation and colour can be checked."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 60)], axis=2).astype(np.uint8)
    return Image.fromarray(rgb)


def _write(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def _rchar() -> int:
    """Bytes this process has read through read() calls (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


# ----------------------------------------------------------------------------- image files: refused
def _animated_gif_truncated(tmp):
    data = _encoded(_photo(), "GIF", save_all=True, append_images=[_photo().rotate(90)])
    return _write(tmp, "anim.gif", data[: len(data) // 2])


BAD_FILES = {
    # case: (make(tmp) -> path or bytes, words the message must hold)
    "zero-byte file": (lambda t: _write(t, "empty.jpg", b""), "empty"),
    "text named .jpg": (lambda t: _write(t, "notes.jpg", b"shopping list: eggs, milk\n" * 20), "not a recognised"),
    "truncated jpeg": (lambda t: _write(t, "cut.jpg", _encoded(_photo(), "JPEG")[:300]), "truncated"),
    "truncated png": (lambda t: _write(t, "cut.png", _encoded(_photo(), "PNG")[:200]), "truncated"),
    "jpeg marker then junk": (lambda t: _write(t, "junk.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2), "junk.jpg"),
    "truncated animated gif": (_animated_gif_truncated, "anim.gif"),
    "directory as file": (lambda t: (t / "adir.jpg").mkdir() or t / "adir.jpg", "directory"),
    "non-existent path": (lambda t: t / "missing.jpg", "no such file"),
    "broken symlink": (lambda t: os.symlink(t / "gone.jpg", t / "dangling.jpg") or t / "dangling.jpg", "no such file"),
    "symlink loop": (lambda t: os.symlink(t / "loop.jpg", t / "loop.jpg") or t / "loop.jpg", "cannot read"),
    "name over NAME_MAX": (lambda t: t / ("x" * 300 + ".jpg"), "cannot read"),
    "NUL byte in path": (lambda t: str(t / "a\0b.jpg"), "cannot read"),
    "named pipe": (lambda t: os.mkfifo(t / "pipe.jpg") or t / "pipe.jpg", "not a regular file"),
    "header 100000x100000": (lambda t: _write(t, "huge.png", png_header(100_000, 100_000)), "over the limit"),
    "header one pixel over MAX_PIXELS": (lambda t: _write(t, "over.png", png_header(MAX_PIXELS + 1, 1)), "over the limit"),
    "header 0x0": (lambda t: _write(t, "zero.png", png_header(0, 0)), "zero.png"),
    "jpeg with too many scans": (lambda t: _write(t, "scans.jpg", progressive_jpeg(MAX_JPEG_SCANS + 1)), "scans"),
    "eps (postscript)": (lambda t: _write(t, "art.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"),
                         "PostScript"),
    "svg named .png": (lambda t: _write(t, "logo.png", b"<svg xmlns='http://www.w3.org/2000/svg'/>"), "not a recognised"),
    "bmp with bogus header": (lambda t: _write(t, "bogus.bmp", b"BM" + b"\xff" * 60), "bogus.bmp"),
    "tiff with broken directory": (lambda t: _write(t, "bad.tif", b"II*\x00\xff\xff\xff\x7f" + b"\0" * 40), "bad.tif"),
    "random bytes": (lambda t: _write(t, "noise.webp", np.random.default_rng(1).bytes(4096)), "not a recognised"),
    "empty bytes": (lambda t: b"", "empty"),
    "junk bytes": (lambda t: b"GIF89a\x10\x00", "not a recognised"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_image_files_raise_named_errors(engine, tmp_path, case):
    make, words = BAD_FILES[case]
    src = make(tmp_path)
    with pytest.raises(ImageDecodeError) as e:
        engine.decode(src)
    msg = str(e.value)
    name = os.fspath(src) if isinstance(src, (str, Path)) else f"bytes[{len(src)}]"
    assert name in msg, msg
    assert words in msg, msg


def test_unreadable_file_is_named(engine, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    p = _write(tmp_path, "secret.jpg", _encoded(_photo(), "JPEG"))
    p.chmod(0)
    with pytest.raises(ImageDecodeError, match="secret.jpg.*cannot read"):
        engine.decode(p)


def test_file_over_the_byte_limit_is_refused_unread(engine, tmp_path):
    p = tmp_path / "big.jpg"
    with open(p, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk, no memory
    r0 = _rchar()
    with pytest.raises(ImageDecodeError, match=f"big.jpg: file is {MAX_FILE_BYTES + 1:,} bytes, over the limit"):
        engine.decode(p)
    assert _rchar() - r0 < 4096


def test_a_large_non_image_costs_only_its_header(engine, tmp_path):
    """The format is identified from the first bytes: a 256 MiB non-image is refused after a few
    kilobytes, not read whole."""
    p = tmp_path / "zeros.jpg"
    with open(p, "wb") as f:
        f.truncate(256 << 20)
    r0 = _rchar()
    with pytest.raises(ImageDecodeError, match="zeros.jpg: not a recognised image format"):
        engine.decode(p)
    assert _rchar() - r0 < (1 << 20)


def test_jpeg_scan_limit(engine, tmp_path):
    """A progressive JPEG at the scan limit decodes; one scan more is refused before decoding
    (the test of the thousands-of-scans file, which took minutes)."""
    ok = load_image(progressive_jpeg(MAX_JPEG_SCANS))
    assert ok.bgr.shape == (512, 512, 3) and abs(int(ok.bgr[100, 100, 2]) - 120) <= 2
    bomb = _write(tmp_path, "bomb.jpg", progressive_jpeg(4000, side=1024))
    with pytest.raises(ImageDecodeError, match=r"bomb.jpg: JPEG has more than 100 scans"):
        engine.decode(bomb)
    # a large image gets fewer: scans x pixels is bounded too (5000 x 5000: 80 scans)
    allowed = MAX_JPEG_SCAN_PIXELS // (5000 * 5000)
    assert allowed < MAX_JPEG_SCANS
    big = _write(tmp_path, "big.jpg", progressive_jpeg(allowed + 1, side=5000))
    with pytest.raises(ImageDecodeError, match=f"big.jpg: JPEG has more than {allowed} scans, the most a 5000x5000"):
        engine.decode(big)


def test_pixel_limit_is_pillows_and_no_bomb_warning_escapes(recwarn):
    """Between Pillow's warning (89 MP) and its error (179 MP) a header is read quietly and our own
    limit decides: the 100 MP file below fails only because its data is missing."""
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        load_image(png_header(10_000, 10_000))
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.raises(ImageDecodeError, match=f"over the limit of {MAX_PIXELS:,} pixels"):
        load_image(png_header(13_400, 13_356))


def test_pixel_limit_for_arrays_and_pil_images(monkeypatch):
    over = (13_356, 13_400)  # 178,970,400 px, just over MAX_PIXELS
    view = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (*over, 3))  # 537 MB if ever copied
    with pytest.raises(InputError, match=r"ndarray\[13356, 13400, 3\]:uint8.*over the limit"):
        load_image(view)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # let Pillow open the header lazily
    lazy = Image.open(io.BytesIO(png_header(over[1], over[0])))
    with pytest.raises(InputError, match="PIL.Image.*over the limit"):
        load_image(lazy)


# ----------------------------------------------------------------------------- image files: decoded
def _exif_rotated(tmp):
    exif = Image.Exif()
    exif[0x0112] = 6
    return _write(tmp, "rotated.jpg", _encoded(_photo(), "JPEG", exif=exif, quality=95))


def _palette_transparent(tmp):
    img = _photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.info["transparency"] = 0
    return _write(tmp, "pal.png", _encoded(img, "PNG", transparency=0))


def _broken_exif(tmp):
    data = _encoded(_photo(), "JPEG", quality=95)
    app1 = b"Exif\0\0" + b"MM\0*\xff\xff\xff\xff" + b"\x13" * 20
    return _write(tmp, "badexif.jpg", data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:])


GOOD_FILES = {
    # case: (make(tmp) -> source, expected (height, width) of the decoded image)
    "png named .jpg": (lambda t: _write(t, "really-png.jpg", _encoded(_photo(), "PNG")), (64, 96)),
    "cmyk jpeg": (lambda t: _write(t, "cmyk.jpg", _encoded(_photo().convert("CMYK"), "JPEG")), (64, 96)),
    "16-bit grey png": (lambda t: _write(t, "g16.png", _encoded(Image.fromarray(np.full((64, 96), 0xABCD, np.uint16)), "PNG")),
                        (64, 96)),
    "animated gif": (lambda t: _write(t, "anim.gif", _encoded(_photo(), "GIF", save_all=True,
                                                              append_images=[_photo().rotate(90)])), (64, 96)),
    "multi-page tiff": (lambda t: _write(t, "pages.tif", _encoded(_photo(), "TIFF", save_all=True,
                                                                  append_images=[_photo().resize((10, 10))])), (64, 96)),
    "exif rotation 6": (_exif_rotated, (96, 64)),
    "palette with transparency": (_palette_transparent, (64, 96)),
    "grey + alpha png": (lambda t: _write(t, "la.png", _encoded(_photo().convert("LA"), "PNG")), (64, 96)),
    "1-bit png": (lambda t: _write(t, "bw.png", _encoded(_photo().convert("1"), "PNG")), (64, 96)),
    "progressive jpeg": (lambda t: _write(t, "prog.jpg", _encoded(_photo(), "JPEG", progressive=True)), (64, 96)),
    "broken exif block": (_broken_exif, (64, 96)),
    "bmp": (lambda t: _write(t, "pic.bmp", _encoded(_photo(), "BMP")), (64, 96)),
    "1x1 png": (lambda t: _write(t, "dot.png", _encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")), (1, 1)),
    "bytearray": (lambda t: bytearray(_encoded(_photo(), "PNG")), (64, 96)),
    "memoryview": (lambda t: memoryview(_encoded(_photo(), "PNG")), (64, 96)),
}
if features.check("webp"):
    GOOD_FILES["webp"] = (lambda t: _write(t, "pic.webp", _encoded(_photo(), "WEBP", lossless=True)), (64, 96))


@pytest.mark.parametrize("case", list(GOOD_FILES))
def test_odd_image_files_decode(engine, tmp_path, case):
    make, shape = GOOD_FILES[case]
    dec = engine.decode(make(tmp_path))
    assert dec.bgr.shape == (*shape, 3) and dec.bgr.dtype == np.uint8 and dec.bgr.flags.c_contiguous


def test_decoded_content_of_odd_files(engine, tmp_path):
    ref = np.asarray(_photo())[..., ::-1].astype(int)  # BGR
    g16 = engine.decode(GOOD_FILES["16-bit grey png"][0](tmp_path)).bgr
    assert (g16 == 0xAB).all()  # the high byte
    gif = engine.decode(GOOD_FILES["animated gif"][0](tmp_path)).bgr.astype(int)
    assert np.abs(gif - ref).mean() < 12  # the first frame, not the rotated second one
    rot = engine.decode(_exif_rotated(tmp_path))
    assert any("EXIF orientation 6" in n for n in rot.notes)
    assert np.abs(rot.bgr.astype(int) - np.rot90(ref, -1)).mean() < 6  # displayed upright
    pal = engine.decode(_palette_transparent(tmp_path)).bgr.astype(int)
    assert np.abs(pal - ref).mean() < 12  # colours kept, transparency dropped
    bw = engine.decode(GOOD_FILES["1-bit png"][0](tmp_path)).bgr
    assert set(np.unique(bw)) <= {0, 255}


def test_every_search_input_embeds(engine, tmp_path):
    """A 1x1 file, a PNG named .jpg and a CMYK JPEG run through the whole search."""
    srcs = [GOOD_FILES[c][0](tmp_path) for c in ("1x1 png", "png named .jpg", "cmyk jpeg")]
    res = engine.search(srcs, k=3)
    assert res.rows.shape == (3, 3) and np.isfinite(res.scores).all()
    assert any("upscaled" in n for n in res.notes)


# ----------------------------------------------------------------------------- PIL modes
def _in_mode(mode: str) -> Image.Image:
    """A 6x4 image in `mode` whose colour is (200, 100, 50), grey 124, alpha 128 where it has alpha."""
    rgba = Image.new("RGBA", (6, 4), (200, 100, 50, 128))
    grey = 124
    wide = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}
    if mode in wide:
        return Image.frombytes(mode, (6, 4), np.full((4, 6), grey * 257, wide[mode]).tobytes())
    if mode == "I":
        return Image.fromarray(np.full((4, 6), grey * 257, np.int32), "I")
    if mode == "F":
        return Image.fromarray(np.full((4, 6), grey + 0.25, np.float32), "F")
    if mode == "LAB":
        srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
        return ImageCms.applyTransform(rgba.convert("RGB"), ImageCms.buildTransform(srgb, lab, "RGB", "LAB"))
    if mode in ("L", "LA", "La", "1"):
        return Image.new("LA", (6, 4), (grey, 128)).convert(mode)
    return rgba.convert(mode) if mode in ("RGBA", "RGBa", "PA") else rgba.convert("RGB").convert(mode)


COLOUR_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
GREY_MODES = ("L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


@pytest.mark.parametrize("mode", COLOUR_MODES + GREY_MODES + ("1",))
def test_every_pil_mode_converts(mode):
    img = _in_mode(mode)
    assert img.mode == mode
    bgr = load_image(img).bgr.astype(int)
    assert bgr.shape == (4, 6, 3)
    if mode in COLOUR_MODES:
        tol = 40 if mode in ("P", "PA") else 3  # P: Pillow's web palette
        assert np.abs(bgr - [50, 100, 200]).max() <= tol, (mode, bgr[0, 0])
    elif mode in GREY_MODES:
        assert np.abs(bgr - 124).max() <= 1, (mode, bgr[0, 0])  # premultiplied grey (La) un-premultiplied
    else:
        assert set(np.unique(bgr)) <= {0, 255}


def test_pil_mode_list_is_complete():
    assert set(Image.MODES) == set(COLOUR_MODES + GREY_MODES + ("1",))


def test_lazy_pil_image_with_missing_data_is_named():
    lazy = Image.open(io.BytesIO(_encoded(_photo(), "PNG")[:150]))
    with pytest.raises(ImageDecodeError, match=r"PIL.Image\(RGB 96x64\).*cannot be read"):
        load_image(lazy)


# ----------------------------------------------------------------------------- arrays
BAD_ARRAYS = {
    "1-D": np.zeros(30, np.uint8),
    "4-D": np.zeros((2, 8, 8, 3), np.uint8),
    "2 channels": np.zeros((8, 8, 2), np.uint8),
    "5 channels": np.zeros((8, 8, 5), np.uint8),
    "bool": np.zeros((8, 8, 3), bool),
    "complex": np.zeros((8, 8, 3), np.complex64),
    "object": np.full((8, 8, 3), None, object),
    "int16": np.zeros((8, 8, 3), np.int16),
    "int64": np.zeros((8, 8, 3), np.int64),
    "float64 pixels 0-255": np.full((8, 8, 3), 128.0),
    "float32 with NaN": np.full((8, 8, 3), np.nan, np.float32),
    "structured": np.zeros((8, 8), dtype=[("r", "u1"), ("g", "u1"), ("b", "u1")]),
    "zero rows": np.zeros((0, 10, 3), np.uint8),
    "zero columns": np.zeros((10, 0), np.uint8),
    "just over MAX_PIXELS": np.broadcast_to(np.zeros((1, 1), np.uint8), (13_356, 13_400)),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_arrays_raise_named_errors(engine, case):
    a = BAD_ARRAYS[case]
    with pytest.raises(InputError) as e:
        engine.embed([np.zeros((16, 16, 3), np.uint8), a])
    assert "input #1 (ndarray[" in str(e.value), str(e.value)


GOOD_ARRAYS = {
    "1xN": np.full((1, 500, 3), 77, np.uint8),
    "Nx1": np.full((300, 1), 77, np.uint8),
    "uint16": np.full((20, 30, 3), 77 * 257, np.uint16),
    "big-endian uint16": np.full((20, 30, 3), 77 * 257, ">u2"),
    "negative strides": np.full((20, 30, 3), 77, np.uint8)[::-1, ::-1],
    "fortran order": np.asfortranarray(np.full((20, 30, 3), 77, np.uint8)),
    "read-only view": np.broadcast_to(np.full((1, 1, 3), 77, np.uint8), (20, 30, 3)),
    "one channel": np.full((20, 30, 1), 77, np.uint8),
    "rgba": np.full((20, 30, 4), 77, np.uint8),
    "matrix": np.full((20, 30), 77, np.uint8).view(np.matrix),
}


@pytest.mark.parametrize("case", list(GOOD_ARRAYS))
def test_odd_arrays_decode(case):
    dec = load_image(GOOD_ARRAYS[case])
    assert dec.bgr.ndim == 3 and dec.bgr.shape[2] == 3 and (dec.bgr == 77).all()


def test_odd_arrays_search(engine):
    res = engine.search([GOOD_ARRAYS["1xN"], GOOD_ARRAYS["matrix"]], k=2, rerank=False)
    assert res.rows.shape == (2, 2) and any("upscaled" in n for n in res.notes)


# ----------------------------------------------------------------------------- tensors
def test_tensor_inputs(engine, tiny):
    d = torch.from_numpy(_unit_rows(3, tiny["dim"], seed=5))
    want = engine.search(d.numpy(), k=4, rerank=False).rows
    grad = d.clone().requires_grad_(True)
    assert np.array_equal(engine.search(grad, k=4, rerank=False).rows, want)
    strided = d.t().contiguous().t()  # same values, column-major
    assert not strided.is_contiguous()
    assert np.array_equal(engine.search(strided, k=4, rerank=False).rows, want)
    assert engine.search(d.half(), k=4, rerank=False).rows.shape == (3, 4)
    assert engine.search(d.bfloat16(), k=4, rerank=False).rows.shape == (3, 4)


BAD_TENSORS = {
    "meta device": (lambda dim: torch.empty(2, dim, device="meta"), "'meta' device"),
    "sparse": (lambda dim: torch.eye(dim)[:2].to_sparse(), "sparse"),
    "uint8 image tensor": (lambda dim: torch.zeros(16, 16, 3, dtype=torch.uint8), "not an image source"),
    "complex": (lambda dim: torch.zeros(1, dim, dtype=torch.complex64), "not an image source"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensors_raise_named_errors(engine, tiny, case):
    make, words = BAD_TENSORS[case]
    with pytest.raises(InputError, match=words):
        engine.search(make(tiny["dim"]), k=3)


# ----------------------------------------------------------------------------- descriptors
def _rows_with(dim: int, row: int, value) -> np.ndarray:
    x = _unit_rows(4, dim, seed=2)
    x[row] = value(x[row])
    return x


BAD_DESCRIPTORS = {
    "all zeros": (lambda dim: np.zeros((1, dim), np.float32), "row 0 is all zeros"),
    "NaN in row 2": (lambda dim: _rows_with(dim, 2, lambda r: np.where(np.arange(dim) == 3, np.nan, r)), "row 2 contains NaN"),
    "inf in row 1": (lambda dim: _rows_with(dim, 1, lambda r: np.where(np.arange(dim) == 0, np.inf, r)), "row 1 contains NaN or inf"),
    "x100": (lambda dim: _unit_rows(2, dim) * 100, "row 0 has L2 norm 100"),
    "norm 1.01": (lambda dim: _rows_with(dim, 3, lambda r: r * 1.01), "row 3 has L2 norm 1.01"),
    "overflows float32": (lambda dim: np.full((1, dim), 1e300), "row 0"),
    "wrong dim": (lambda dim: _unit_rows(1, dim + 1), "D="),
    "3-D": (lambda dim: _unit_rows(4, dim).reshape(2, 2, dim), "[D] or [n, D]"),
    "int64 rows": (lambda dim: np.ones((1, dim), np.int64), "uint8 or uint16"),
}


@pytest.mark.parametrize("case", list(BAD_DESCRIPTORS))
def test_bad_descriptors_raise_named_errors(engine, tiny, case):
    make, words = BAD_DESCRIPTORS[case]
    with pytest.raises(InputError, match=words.replace("[", r"\[").replace("]", r"\]")):
        engine.search(make(tiny["dim"]), k=3)


def test_descriptor_tolerance_and_layouts(engine, tiny):
    dim = tiny["dim"]
    x = _unit_rows(3, dim, seed=9)
    want = engine.search(x, k=5, rerank=False).rows
    assert np.array_equal(engine.search(x * (1 + 5e-4), k=5, rerank=False).rows, want)  # within 1e-3
    assert np.array_equal(engine.search(x.astype(np.float64), k=5, rerank=False).rows, want)
    assert np.array_equal(engine.search(x.astype(">f4"), k=5, rerank=False).rows, want)
    rev = np.ascontiguousarray(x[::-1])[::-1]  # negative strides
    assert np.array_equal(engine.search(rev, k=5, rerank=False).rows, want)
    assert np.array_equal(engine.search(x.astype(np.longdouble), k=5, rerank=False).rows, want)
    for nothing in (np.empty((0, dim), np.float32), []):  # no queries: no rows, as FAISS answers
        empty = engine.search(nothing, k=5)
        assert empty.rows.shape == (0, 5) and empty.ids == []


# ----------------------------------------------------------------------------- parameters
BAD_SEARCH_PARAMS = [
    ({"k": 0}, "k must be"), ({"k": -3}, "k must be"), ({"k": 2.5}, "k must be"), ({"k": True}, "k must be"),
    ({"k": "5"}, "k must be"), ({"k": None}, "k must be"),
    ({"M": 0}, "M must be"), ({"M": -1}, "M must be"), ({"M": 1.5}, "M must be"),
    ({"K": -1}, "K must be"), ({"K": 2.5}, "K must be"),
    ({"beta": float("nan")}, "beta must be finite"), ({"beta": float("inf")}, "beta must be finite"),
    ({"beta": -float("inf")}, "beta must be finite"), ({"beta": -0.1}, "beta must be >= 0"),
    ({"beta": 1e38}, "beta must be <= 1e\\+06"), ({"beta": "0.1"}, "beta must be a real number"),
    ({"beta": True}, "beta must be a real number"),
    ({"rerank": "yes"}, "rerank must be True or False"), ({"rerank": 1}, "rerank must be True or False"),
    ({"rerank": None}, "rerank must be True or False"),
    ({"ann": "fast"}, "ann must be one of"),
]


@pytest.mark.parametrize("kw,words", BAD_SEARCH_PARAMS, ids=[f"{list(kw)[0]}={list(kw.values())[0]!r}"
                                                            for kw, _ in BAD_SEARCH_PARAMS])
def test_bad_search_parameters_are_named(engine, tiny, kw, words):
    with pytest.raises(InputError, match=words):
        engine.search(_unit_rows(1, tiny["dim"]), **{"k": 3, **kw})


def test_bad_color_order_is_named(engine):
    for bad in ("RGBA", 3, None):
        with pytest.raises(InputError, match="color_order must be 'RGB' or 'BGR'"):
            engine.search(np.zeros((16, 16, 3), np.uint8), k=3, color_order=bad)


def test_edge_parameters_give_documented_results(engine, tiny):
    q = _unit_rows(1, tiny["dim"], seed=3)
    huge = engine.search(q, k=10 ** 12)
    assert huge.rows.shape == (1, N_ROWS) and any("clamped" in n for n in huge.notes)
    assert engine.search(q, k=np.int64(3)).rows.shape == (1, 3)
    small_m = engine.search(q, k=5, M=3, K=9)  # M < K: K' = min(K + 1, M') (SPEC 6)
    assert small_m.rows.shape == (1, 5) and np.isfinite(small_m.scores).all()
    big = engine.search(q, k=5, M=10 ** 12, K=10 ** 30)
    assert np.isfinite(big.scores).all()
    for beta in (0.0, 1e6):
        assert np.isfinite(engine.search(q, k=5, beta=beta).scores).all()


BAD_LOAD_PARAMS = [
    ({"max_side": 0}, "max_side must be >= 1"), ({"max_side": -7}, "max_side must be >= 1"),
    ({"max_side": 2.5}, "max_side must be an integer"), ({"max_side": "2048"}, "max_side must be an integer"),
    ({"max_side": 5}, "max_side=5 is below"),
    ({"max_concurrent_queries": 0}, "max_concurrent_queries must be >= 1"),
    ({"threads": 0}, "threads must be >= 1"),
]


@pytest.mark.parametrize("kw,words", BAD_LOAD_PARAMS, ids=[f"{list(kw)[0]}={list(kw.values())[0]!r}"
                                                          for kw, _ in BAD_LOAD_PARAMS])
def test_bad_load_parameters_are_named(tiny, kw, words):
    with pytest.raises(InputError, match=words):
        Engine.load(tiny["bundle"], **kw)


def test_bad_embed_batch_size(engine):
    for bad in (0, 1.5, "8"):
        with pytest.raises(InputError, match="batch_size must be"):
            engine.embed(np.zeros((16, 16, 3), np.uint8), batch_size=bad)


def test_smallest_max_side_works(tiny):
    e = Engine.load(tiny["bundle"], index=tiny["index"], max_side=tiny["min_side"])
    res = e.search(np.zeros((500, 300, 3), np.uint8), k=2)
    assert any("capped" in n for n in res.notes) and res.rows.shape == (1, 2)


# ----------------------------------------------------------------------------- stored rows
@pytest.fixture()
def nan_row_engine(tiny, tmp_path):
    """The tiny index with row 7's descriptor overwritten by NaN in its segment file (same
    size), as a disk fault or a buggy writer would leave it; Index.add itself refuses NaN."""
    ix = tmp_path / "index"
    shutil.copytree(tiny["index"], ix)
    seg = sorted((ix / "segments").glob("*.npy"))
    assert len(seg) == 1
    rows = np.load(seg[0], mmap_mode="r+")
    rows[7] = np.nan
    rows.flush()
    del rows
    return Engine.load(tiny["bundle"], index=ix)


@pytest.mark.parametrize("rerank", [False, True])
def test_a_nan_stored_row_is_never_a_result(nan_row_engine, tiny, rerank):
    q = _unit_rows(1, tiny["dim"], seed=4)
    with pytest.raises(IndexError_, match=r"stored row 7 \(id 'row-7'\) holds NaN"):
        nan_row_engine.search(q, k=N_ROWS, rerank=rerank)


# ----------------------------------------------------------------------------- bundles
def _bundle_copy(tiny, tmp: Path, copy: tuple[str, ...] = ()) -> Path:
    dst = tmp / "b"
    dst.mkdir()
    for f in os.listdir(tiny["bundle"]):
        (shutil.copy2 if f in copy or f == MANIFEST else os.link)(tiny["bundle"] / f, dst / f)
    return dst


def _put(b: Path, manifest: bytes) -> Path:
    (b / MANIFEST).write_bytes(manifest)
    return b


def _edit_manifest(b: Path, edit) -> Path:
    m = json.loads((b / MANIFEST).read_text())
    edit(m)
    (b / MANIFEST).write_text(json.dumps(m))
    return b


def _set(path: str, value):
    def edit(m):
        *head, last = path.split(".")
        d = m
        for k in head:
            d = d[k]
        d[last] = value
    return edit


def _first_file(b: Path) -> str:
    return sorted(json.loads((b / MANIFEST).read_text())["files"])[0]


def _truncate(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.unlink()  # not through the hard link
    path.write_bytes(data[:n])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(data))


BAD_BUNDLES = {
    "missing directory": (lambda b: b.parent / "nope", "not a directory"),
    "a file, not a directory": (lambda b: _write(b.parent, "file-bundle", b"x"), "not a directory"),
    "no manifest": (lambda b: (b / MANIFEST).unlink() or b, "no manifest.json"),
    "manifest not JSON": (lambda b: _put(b, b"{ not json"), "unreadable manifest"),
    "manifest not UTF-8": (lambda b: _put(b, b"\xff\xfe{}"), "unreadable manifest"),
    "manifest a list": (lambda b: _put(b, b"[1, 2]"), "format is 'list'"),
    "manifest nested 100000 deep": (lambda b: _put(b, b"[" * 100_000 + b"]" * 100_000), "unreadable manifest"),
    "manifest of 17 MB": (lambda b: os.truncate(b / MANIFEST, 17 << 20) or b, "not a manifest"),
    "format_version 99": (lambda b: _edit_manifest(b, _set("format_version", 99)), "upgrade sgengine"),
    "files missing": (lambda b: _edit_manifest(b, lambda m: m.pop("files")), "lacks ['files']"),
    "files a list": (lambda b: _edit_manifest(b, _set("files", [])), "files is a list"),
    "file entry outside the bundle": (lambda b: _edit_manifest(b, lambda m: m["files"].update(
        {"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}})), "not a plain file name"),
    "file entry without hash": (lambda b: _edit_manifest(b, lambda m: m["files"].update({_first_file(b): {}})),
                                "sha256 string"),
    "dim a string": (lambda b: _edit_manifest(b, _set("model.dim", "abc")), "model.dim is 'abc'"),
    "min_side zero": (lambda b: _edit_manifest(b, _set("preprocess.min_side", 0)), "preprocess.min_side"),
    "scale 100": (lambda b: _edit_manifest(b, _set("head.scales", [100.0])), "head.scales"),
    "head block garbage": (lambda b: _edit_manifest(b, _set("head", {"rgem": 1})), "head cannot be read"),
    "rerank beta negative": (lambda b: _edit_manifest(b, _set("rerank.beta", -1)), "rerank.beta"),
    "listed file missing": (lambda b: (b / _first_file(b)).unlink() or b, "is missing"),
    "file tampered, same size": (lambda b: _flip_byte(b / "head.safetensors") or b, "sha256 mismatch"),
    "safetensors truncated": (lambda b: _truncate(b / "head.safetensors", 20) or b, "bytes, manifest says"),
}


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_bad_bundles_raise_named_errors(tiny, tmp_path, case):
    make, words = BAD_BUNDLES[case]
    b = make(_bundle_copy(tiny, tmp_path))
    with pytest.raises(BundleError) as e:
        Engine.load(b)
    assert str(b) in str(e.value) and words in str(e.value), str(e.value)


def test_truncated_weights_unverified_are_named(tiny, tmp_path):
    """verify=False skips the hashes; reading a damaged weights file still names it."""
    b = _bundle_copy(tiny, tmp_path)
    _truncate(b / "backbone.pt", 30)
    bundle = Bundle.load(b, verify=False)
    with pytest.raises(BundleError, match="backbone.pt: not a loadable TorchScript trunk"):
        bundle.build_torch_model()


# ----------------------------------------------------------------------------- concurrency and memory
class _CountingBackbone:
    """The engine's own backbone, counting the calls inside it at once (and slow enough to overlap)."""

    def __init__(self, inner) -> None:
        self.inner, self.now, self.most, self.lock = inner, 0, 0, threading.Lock()

    def __call__(self, x):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.05)
            return self.inner(x)
        finally:
            with self.lock:
                self.now -= 1

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_concurrent_queries_are_bounded(tiny):
    e = Engine.load(tiny["bundle"], index=tiny["index"], max_concurrent_queries=2)
    counting = e.backbone = _CountingBackbone(e.backbone)
    img = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    errors = []

    def run():
        try:
            e.search(img, k=3)
        except Exception as ex:  # reported below
            errors.append(ex)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and counting.most == 2
    # descriptors never wait for an image slot: a search while both are held returns at once
    q = _unit_rows(1, tiny["dim"])
    with e._slots, e._slots:
        assert e.search(q, k=3).rows.shape == (1, 3)


_MEMORY_CHILD = r"""
import json, os, sys, threading, numpy as np
from sgengine import Engine
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def peak():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1]) / 1024
e = Engine.load(sys.argv[1], index=sys.argv[2])
img = np.random.default_rng(0).integers(0, 255, (2048, 2048, 3), dtype=np.uint8)
e.search(img[:64, :64], k=3)
before = rss()
threads = int(sys.argv[3])
ts = [threading.Thread(target=e.search, args=(img,), kwargs={"k": 3}) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"before": before, "after": rss(), "peak": peak()}))
"""


def _memory_run(tiny, threads: int) -> dict:
    p = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tiny["bundle"]), str(tiny["index"]), str(threads)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_memory_returns_after_large_queries(tiny):
    """RSS after 2048x2048 queries stays within 100 MiB of RSS before them (the working memory,
    ~300 MB per query for this trunk, goes back), and 4 concurrent queries peak at about 2 queries'
    working memory (max_concurrent_queries=2), not 4."""
    one = _memory_run(tiny, 1)
    assert one["after"] - one["before"] < 100, one
    work = one["peak"] - one["before"]
    assert work > 150, one  # the query did hold real memory
    four = _memory_run(tiny, 4)
    assert four["after"] - four["before"] < 100, four
    assert four["peak"] - four["before"] < 2.6 * work, (one, four)


_OOM_CHILD = r"""
import resource, sys, numpy as np
from sgengine import Engine
from sgengine.errors import MemoryLimitError
e = Engine.load(sys.argv[1], index=sys.argv[2])
e.search(np.zeros((64, 64, 3), np.uint8), k=3)
with open("/proc/self/statm") as f:
    vsz = int(f.read().split()[0]) * 4096
resource.setrlimit(resource.RLIMIT_AS, (vsz + (200 << 20), resource.RLIM_INFINITY))
try:
    e.search([np.zeros((64, 64, 3), np.uint8), np.full((2048, 2048, 3), 7, np.uint8)], k=3)
except MemoryLimitError as ex:
    print("MemoryLimitError:", ex)
"""


def test_out_of_memory_is_a_named_error(tiny):
    """Under an address-space limit a 2048 px query's allocation fails inside ONNX Runtime or
    torch; the caller gets MemoryLimitError naming the query and what to lower."""
    p = subprocess.run([sys.executable, "-c", _OOM_CHILD, str(tiny["bundle"]), str(tiny["index"])],
                       capture_output=True, text=True, timeout=300)
    assert "MemoryLimitError: input #1 (ndarray[2048, 2048, 3]:uint8): out of memory" in p.stdout, p.stdout + p.stderr
    assert "max_side" in p.stdout
