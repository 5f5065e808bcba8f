"""Engine end to end on the default model: embedding, search, reranking, and every kind of bad input."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sgengine
from sgengine import Engine, Index
from sgengine.compare import assert_rankings_agree
from sgengine.errors import ImageDecodeError, IndexMismatchError, InputError
from sgengine.preprocess import load_image, to_tensor
from sgengine.rerank import rerank_loop_chain

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos) -> Path:
    """Real photos and a few augmented views of each, as JPEG/PNG files on disk."""
    d = tmp_path_factory.mktemp("photos")
    for name in NAMES:
        img = Image.fromarray(photos[name])
        (d / name).mkdir()
        img.save(d / name / "full.jpg", quality=92)
        w, h = img.size
        img.crop((w // 8, h // 8, w - w // 6, h - h // 6)).save(d / name / "crop.png")
        img.rotate(12, resample=Image.Resampling.BILINEAR).save(d / name / "rot.jpg", quality=90)
    return d


@pytest.fixture(scope="module")
def built(default_bundle, photo_dir, tmp_path_factory):
    from sgengine.indexing import build_index
    engine = Engine.load(default_bundle)
    index_dir = tmp_path_factory.mktemp("idx") / "index"
    rep = build_index(engine, photo_dir, index_dir, commit_every=7, progress=False)
    assert rep.added == 3 * len(NAMES) and not rep.failed
    return Engine.load(default_bundle, index=index_dir), index_dir


def test_describe_names_what_runs(built):
    engine, _ = built
    d = engine.describe()
    assert d["backend"]["name"] == "onnxruntime"
    assert "CPUExecutionProvider" in d["backend"]["providers"]
    assert d["head_impl"] in ("cpu_native", "cpu_torch")
    assert d["rerank_impl"] in ("cpu_bf16", "cpu_fp32"), d["rerank_impl"]
    assert d["index"]["count"] == 3 * len(NAMES) and d["dim"] == 1280


def test_embed_matches_the_pytorch_model(default_bundle, photos):
    """ONNX Runtime backbone + dispatched head equal the reference model's descriptor (SPEC 1-4)."""
    engine = Engine.load(default_bundle)
    model = engine.bundle.build_torch_model()
    rgb = photos["coffee"]
    got = engine.embed(rgb)
    with torch.no_grad():
        x = to_tensor(load_image(rgb).bgr, engine.normalization)
        want = model(x).numpy()
    assert got.shape == (1, 1280) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    cos = float((got * want).sum())
    assert cos > 0.99999, cos
    assert np.abs(got - want).max() < 1e-5


def test_inputs_of_every_kind_give_the_same_descriptor(built, photo_dir, photos):
    engine, _ = built
    path = photo_dir / "chelsea" / "crop.png"
    data = path.read_bytes()
    pil = Image.open(path)
    rgb = np.asarray(pil.convert("RGB"))
    d = engine.embed([path, str(path), data, pil, rgb, np.ascontiguousarray(rgb[..., ::-1])], color_order="RGB")
    # the BGR copy read as RGB is a different image; read correctly it matches
    d_bgr = engine.embed(np.ascontiguousarray(rgb[..., ::-1]), color_order="BGR")
    for i in range(1, 5):
        assert np.allclose(d[0], d[i], atol=1e-6)
    assert np.allclose(d[0], d_bgr[0], atol=1e-6)
    assert not np.allclose(d[0], d[5], atol=1e-3)


def test_search_finds_the_views_and_rerank_follows_spec(built, photo_dir):
    engine, _ = built
    res = engine.search(photo_dir / "coffee" / "full.jpg", k=5)
    assert res.rows.shape == (1, 5) and res.scores.shape == (1, 5) and len(res) == 1
    assert res[0].ids[0] == "coffee/full.jpg"
    assert {i.split("/")[0] for i in res[0].ids[:3]} == {"coffee"}
    for stage in ("decode", "backbone@0.7071", "backbone@1", "backbone@1.4142", "head", "search", "rerank", "total"):
        assert stage in res.timings and res.timings[stage] >= 0
    # the engine's order is SPEC 6's: the float64 loop-per-query transcription over the same
    # first-stage candidates (an independent path from the fast kernel the engine dispatches to)
    q = engine.embed(photo_dir / "coffee" / "full.jpg")
    X = engine.index.vectors().astype(np.float64)
    first = np.argsort(-(X @ q[0].astype(np.float64)), kind="stable")
    o64, s64 = rerank_loop_chain(torch.from_numpy(q).double(), torch.from_numpy(X[first])[None], 9, 0.15)
    full = engine.search(q, k=len(X))
    assert_rankings_agree(first[o64.numpy()], s64.numpy(), full.rows, full.scores, rtol=0, atol=1e-5,
                          truncated=False)


def test_batches_and_descriptors(built, photo_dir):
    engine, _ = built
    paths = [photo_dir / n / "rot.jpg" for n in NAMES]
    batch = engine.search(paths, k=4, rerank=False)
    assert batch.rows.shape == (len(NAMES), 4) and len(batch.ids) == len(NAMES)
    d = engine.embed(paths)
    by_desc = engine.search(d, k=4, rerank=False)
    assert np.array_equal(by_desc.rows, batch.rows)
    one = engine.search(d[2], k=4, rerank=False)
    # one descriptor is a batch of one: results are [nq, k] whatever the input
    assert one.rows.shape == (1, 4) and one.ids == [batch.ids[2]] and one[0].ids == batch.ids[2]


def test_k_handling(built):
    engine, _ = built
    d = engine.embed(np.zeros((200, 300, 3), np.uint8) + 128)
    n = len(engine.index)
    res = engine.search(d, k=10 * n)
    assert len(res.ids[0]) == n and any("clamped" in m for m in res.notes)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="k must be"):
            engine.search(d, k=bad)


def test_bad_descriptors(built):
    engine, _ = built
    with pytest.raises(InputError, match="D=1280"):
        engine.search(np.ones(7, np.float32), k=3)
    bad = np.ones((1, 1280), np.float32)
    bad[0, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        engine.search(bad, k=3)


def _bad_files(tmp: Path) -> dict[str, Path]:
    good = io.BytesIO()
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(good, "JPEG")
    files = {
        "empty.jpg": b"",
        "text.jpg": b"this is not an image at all\n" * 10,
        "truncated.jpg": good.getvalue()[: len(good.getvalue()) // 3],
    }
    out = {}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        out[name] = tmp / name
    return out


def test_bad_image_files_are_named(built, tmp_path):
    engine, _ = built
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(ImageDecodeError) as e:
            engine.embed(path)
        assert name in str(e.value)
    with pytest.raises(ImageDecodeError, match="no such file"):
        engine.embed(tmp_path / "missing.jpg")
    with pytest.raises(ImageDecodeError, match="directory"):
        engine.embed(tmp_path)
    with pytest.raises(InputError, match="input #1"):
        engine.embed([np.zeros((50, 50, 3), np.uint8), np.zeros((50, 50, 3), np.float32)])
    with pytest.raises(InputError, match="zero pixels"):
        engine.embed(np.zeros((0, 10, 3), np.uint8))


def test_odd_image_modes_are_converted(built, tmp_path, photos):
    """Grey, palette, RGBA, CMYK, 16-bit and EXIF-rotated files all embed (SPEC 1.1)."""
    engine, _ = built
    rgb = photos["rocket"][:200, :300]
    img = Image.fromarray(rgb)
    variants = {
        "grey.png": img.convert("L"),
        "palette.png": img.convert("P"),
        "rgba.png": img.convert("RGBA"),
        "cmyk.jpg": img.convert("CMYK"),
        "grey16.png": Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257)),
    }
    for name, im in variants.items():
        im.save(tmp_path / name)
    descs = {name: engine.embed(tmp_path / name)[0] for name in variants}
    base = engine.embed(rgb)[0]
    assert float(descs["rgba.png"] @ base) > 0.999  # alpha dropped, colour kept
    assert float(descs["palette.png"] @ base) > 0.8 and float(descs["cmyk.jpg"] @ base) > 0.9  # same picture
    assert np.allclose(descs["grey16.png"], descs["grey.png"], atol=1e-5)  # 16-bit keeps the high byte
    # EXIF orientation 6 (rotate 90 CW to display) must give the upright picture's descriptor
    upright = img.transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "exif.jpg", exif=exif, quality=95)
    upright.save(tmp_path / "upright.jpg", quality=95)
    d_exif, d_up = engine.embed([tmp_path / "exif.jpg", tmp_path / "upright.jpg"])
    assert float(d_exif @ d_up) > 0.995


def test_decoded_pixels_of_odd_modes():
    """Known pixels through each conversion, in BGR order (SPEC 1.1)."""
    pal = Image.new("P", (4, 3))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    pal.putpixel((1, 1), 1)
    bgr = load_image(pal).bgr
    assert bgr[0, 0].tolist() == [0, 0, 255] and bgr[1, 1].tolist() == [255, 0, 0]
    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))  # pure cyan
    assert load_image(cmyk).bgr[0, 0].tolist() == [255, 255, 0]
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))  # fully transparent: alpha dropped, colour kept
    assert load_image(rgba).bgr[0, 0].tolist() == [30, 20, 10]
    grey16 = Image.fromarray(np.full((2, 2), 0xABCD, np.uint16))
    assert load_image(grey16).bgr[0, 0].tolist() == [0xAB] * 3
    assert load_image(np.full((2, 2), 77, np.uint8)).bgr.shape == (2, 2, 3)


def test_tiny_and_huge_images(built, tmp_path):
    engine, _ = built
    for shape in [(1, 1, 3), (2, 7, 3), (5, 300, 3), (91, 91, 3), (1, 2048, 3)]:
        img = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
        res = engine.search(img, k=1, rerank=False)
        assert any("upscaled" in n for n in res.notes), (shape, res.notes)
        d = engine.embed(img)
        assert np.isfinite(d).all() and abs(np.linalg.norm(d) - 1) < 1e-5
    dec = engine.decode(np.zeros((3000, 5000, 3), np.uint8))
    assert max(dec.bgr.shape[:2]) == engine.max_side == 2048 and any("capped" in n for n in dec.notes)
    # 1024 px images are never touched (SPEC 1.4)
    assert engine.decode(np.zeros((768, 1024, 3), np.uint8)).bgr.shape == (768, 1024, 3)


def test_index_of_another_bundle_is_refused(built, tmp_path):
    engine, index_dir = built
    Index.create(tmp_path / "other", dim=1280, bundle_fingerprint="f" * 64)
    with pytest.raises(IndexMismatchError, match="bundle"):
        Engine.load(engine.bundle, index=tmp_path / "other")
    assert len(Index.open(index_dir)) == 3 * len(NAMES)  # nothing lost


def test_empty_index_and_no_index(default_bundle, tmp_path):
    engine = Engine.load(default_bundle)
    with pytest.raises(InputError, match="no index"):
        engine.search(np.zeros((20, 20, 3), np.uint8), k=1)
    fp = engine.bundle.fingerprint
    Index.create(tmp_path / "empty", dim=1280, bundle_fingerprint=fp)
    engine = Engine.load(default_bundle, index=tmp_path / "empty")
    with pytest.raises(InputError, match="empty"):
        engine.search(np.zeros((20, 20, 3), np.uint8), k=1)


def test_bad_engine_arguments(built, default_bundle):
    engine, _ = built
    with pytest.raises(InputError, match="threads"):
        Engine.load(default_bundle, threads=0)
    with pytest.raises(InputError, match="device"):
        Engine.load(default_bundle, device="gpu")
    with pytest.raises(InputError, match="impl"):
        Engine.load(default_bundle, head_impl="fastest")
    d = engine.embed(np.zeros((64, 64, 3), np.uint8))
    for kw, word in [({"M": "x"}, "M"), ({"M": 0}, "M"), ({"K": -1}, "K"), ({"beta": float("nan")}, "beta")]:
        with pytest.raises(InputError, match=word):
            engine.search(d, k=3, **kw)


def test_search_impl_is_checked_against_the_index_at_load(default_bundle, tmp_path):
    # "split" multiplies float16 rows; with float32 rows it is refused at load, not by every search.
    from sgengine.bundle import Bundle
    b = Bundle.load(default_bundle)
    ix = Index.create(tmp_path / "f32", dim=b.dim, bundle_fingerprint=b.fingerprint, dtype="float32")
    x = np.random.default_rng(0).standard_normal((5, b.dim))
    ix.add((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), [f"r{i}" for i in range(5)])
    with pytest.raises(InputError, match="split.*float16"):
        Engine.load(b, index=ix, search_impl="split")
    assert Engine.load(b, index=ix, search_impl="upcast").describe()["search_impl"] == "upcast"


def test_cuda_request_without_gpu_is_an_error(default_bundle):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(sgengine.BackendUnavailableError):
        Engine.load(default_bundle, device="cuda")


def test_index_build_resumes_and_lists_unreadable_files(default_bundle, photo_dir, tmp_path):
    """CLI end to end: build (with bad files mixed in), rebuild (resumes), search as table and JSON."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for n in NAMES[:3]:
        (folder / f"{n}.jpg").write_bytes((photo_dir / n / "full.jpg").read_bytes())
    _bad_files(folder)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cli = [sys.executable, "-m", "sgengine"]
    r = subprocess.run(cli + ["index", "build", str(default_bundle), str(folder), "-o", str(tmp_path / "ix"), "--quiet"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "indexed 3 new image(s)" in r.stdout and "3 unreadable" in r.stdout
    for name in ("empty.jpg", "text.jpg", "truncated.jpg"):
        assert name in r.stdout
    (folder / "rot.jpg").write_bytes((photo_dir / "coffee" / "rot.jpg").read_bytes())
    r = subprocess.run(cli + ["index", "build", str(default_bundle), str(folder), "-o", str(tmp_path / "ix"), "--quiet"],
                       capture_output=True, text=True, env=env)
    assert "indexed 1 new image(s), skipped 3" in r.stdout, r.stdout
    r = subprocess.run(cli + ["search", str(default_bundle), str(tmp_path / "ix"), str(photo_dir / "coffee" / "crop.png"),
                              "-k", "2", "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["queries"][0]["results"][0]["id"] in ("coffee.jpg", "rot.jpg")
    assert "rerank" in out["timings_ms"]
    r = subprocess.run(cli + ["search", str(default_bundle), str(tmp_path / "ix"), str(folder / "text.jpg")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "text.jpg" in r.stderr and "Traceback" not in r.stderr
