"""`sgengine eval` end to end on a miniature revisited-format dataset written to disk here.

Real JPEG files (photos shipped by scikit-image / scikit-learn, plus augmented views), a
gnd_<name>.pkl in the revisitop layout, a bundle exported from the built-in default model.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from sgengine.errors import InputError
from sgengine.eval.datasets import DatasetError, load_descriptors, load_revisited, read_gnd_pickle
from sgengine.eval.run import format_table, main

NAME = "roxford5k"  # the layout and the command do not care that it is not Oxford
QUERY_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "china")
CROP_PHOTO = "flower"  # queried with a sub-box; its only positives are "hard"
OTHER_PHOTOS = ("camera", "brick", "coins", "clock", "moon", "immunohistochemistry")
LONG_SIDE = 224  # small images keep the whole file well under a minute on 2 cores


def _small(rgb: np.ndarray) -> Image.Image:
    img = Image.fromarray(rgb)
    f = LONG_SIDE / max(img.size)
    return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.LANCZOS)


def _views(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    crop = img.crop((int(0.1 * w), int(0.15 * h), int(0.85 * w), int(0.9 * h))).resize((w, h), Image.Resampling.BICUBIC)
    turned = ImageEnhance.Brightness(img.rotate(10, resample=Image.Resampling.BILINEAR)).enhance(1.2)
    tiny = img.crop((0, 0, int(0.35 * w), int(0.35 * h)))
    return {"v1": crop, "v2": turned, "junk": tiny}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """DATA/roxford5k/{gnd_roxford5k.pkl, jpg/*.jpg}; returns (DATA, info)."""
    from sgengine.photos import sample_photos
    photos = sample_photos()
    data = tmp_path_factory.mktemp("revisited")
    jpg = data / NAME / "jpg"
    jpg.mkdir(parents=True)
    imlist: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}

    def save(name: str, img: Image.Image) -> None:
        img.convert("RGB").save(jpg / f"{name}.jpg", quality=90)
        imlist.append(name)
        sizes[name] = img.size

    for p in QUERY_PHOTOS + (CROP_PHOTO,):
        img = _small(photos[p])
        save(f"{p}_orig", img)
        for v, vim in _views(img).items():
            save(f"{p}_{v}", vim)
    for p in OTHER_PHOTOS:
        save(p, _small(photos[p]))
    idx = {n: i for i, n in enumerate(imlist)}
    qimlist, gnd = [], []
    for p in QUERY_PHOTOS:
        # The query is the very image stored as <p>_orig (as in Oxford, queries are database
        # images) with a box covering it all: its easy positive is itself.
        w, h = sizes[f"{p}_orig"]
        qimlist.append(f"{p}_orig")
        gnd.append({"bbx": [0.0, 0.0, float(w), float(h)], "easy": np.array([idx[f"{p}_orig"]]),
                    "hard": [idx[f"{p}_v1"], idx[f"{p}_v2"]], "junk": [idx[f"{p}_junk"]]})
    w, h = sizes[f"{CROP_PHOTO}_orig"]
    crop_box = np.array([0.2 * w, 0.25 * h, 0.8 * w + 0.7, 0.75 * h + 0.3])  # fractional, as revisitop boxes are
    qimlist.append(f"{CROP_PHOTO}_orig")
    gnd.append({"bbx": crop_box, "easy": [], "hard": np.array([idx[f"{CROP_PHOTO}_{s}"] for s in ("orig", "v1", "v2")]),
                "junk": [idx[f"{CROP_PHOTO}_junk"]]})
    with open(data / NAME / f"gnd_{NAME}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=2)
    return data, {"imlist": imlist, "qimlist": qimlist, "gnd": gnd, "crop_box": crop_box}


@pytest.fixture(scope="module")
def bundle_dir(default_bundle):
    """The session's default-model bundle (tests/conftest.py): one export shared by every suite."""
    return default_bundle


ROW = re.compile(r"^(?P<label>.+?)\s*(?P<cells>(\|(\s+(\d+\.\d\d|n/a)){3}\s*){4})$")


def parse_table(text: str) -> dict[str, dict[str, list[float]]]:
    """Table rows -> {label: {'mAP': [E, M, H], 'mP@1': [...], ...}}; checks the layout on the way."""
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("method"))
    groups = [g.strip() for g in lines[head - 1].split("|")[1:]]
    assert groups == ["mAP", "mP@1", "mP@5", "mP@10"], lines[head - 1]
    assert [c.split() for c in lines[head].split("|")[1:]] == [["E", "M", "H"]] * 4
    rows = {}
    for ln in lines[head + 2:]:
        m = ROW.match(ln)
        if not m:
            break
        cells = m["cells"].split("|")[1:]
        vals = [[float("nan") if v == "n/a" else float(v) for v in c.split()] for c in cells]
        for c in cells:  # two decimals exactly, as the paper prints
            assert all(re.fullmatch(r"\d+\.\d\d|n/a", v) for v in c.split()), ln
        rows[m["label"].strip()] = dict(zip(groups, vals))
    return rows


# ----------------------------------------------------------------------------- dataset reader
def test_reader_layout_both_ways_and_query_crop(mini):
    data, info = mini
    a = load_revisited(NAME, data)
    b = load_revisited(NAME, data / NAME)  # DIR pointing at the dataset folder itself
    assert a.imlist == b.imlist == info["imlist"] and a.qimlist == info["qimlist"]
    assert len(a.gnd) == len(info["qimlist"])
    assert a.gnd[0]["easy"].dtype == np.int64 and list(a.gnd[0]["hard"]) == info["gnd"][0]["hard"]
    a.check_images()
    # SPEC 1.2: im[int(y1):int(y2), int(x1):int(x2)], compared with a crop done by Pillow on the file.
    qi = len(info["qimlist"]) - 1
    x1, y1, x2, y2 = info["crop_box"]
    crop = a.load_query(qi)
    want = np.asarray(Image.open(a.query_paths()[qi]).convert("RGB"))[int(y1):int(y2), int(x1):int(x2), ::-1]
    assert crop.shape == (int(y2) - int(y1), int(x2) - int(x1), 3)
    np.testing.assert_array_equal(crop, want)


def test_missing_ground_truth_names_file_and_source(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_revisited("rparis6k", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "rparis6k" / "gnd_rparis6k.pkl") in msg
    assert "http://cmp.felk.cvut.cz/revisitop/" in msg and "Radenovic" in msg


def test_missing_images_are_listed(mini, tmp_path):
    data, info = mini
    root = tmp_path / NAME
    (root / "jpg").mkdir(parents=True)
    shutil.copy(data / NAME / f"gnd_{NAME}.pkl", root)
    for n in info["imlist"][1:]:
        shutil.copy(data / NAME / "jpg" / f"{n}.jpg", root / "jpg")
    ds = load_revisited(NAME, tmp_path)
    with pytest.raises(DatasetError, match=re.escape(f"{info['imlist'][0]}.jpg")):
        ds.check_images()


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))
    (tmp_path / "victim").mkdir()
    (tmp_path / NAME).mkdir()
    with open(tmp_path / NAME / f"gnd_{NAME}.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [Evil()]}, f)
    with pytest.raises(DatasetError, match="not allowed"):
        read_gnd_pickle(tmp_path / NAME / f"gnd_{NAME}.pkl")
    assert (tmp_path / "victim").is_dir()


def test_out_of_range_ground_truth_is_named(tmp_path):
    (tmp_path / NAME).mkdir()
    with open(tmp_path / NAME / f"gnd_{NAME}.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"bbx": [0, 0, 1, 1], "easy": [3], "hard": [],
                                                                  "junk": []}]}, f)
    with pytest.raises(DatasetError, match=r"gnd\[0\]\['easy'\].*index 3"):
        load_revisited(NAME, tmp_path)


def test_descriptor_files_npy_transposed_and_torch(tmp_path):
    import torch
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 16)).astype(np.float32)
    np.save(tmp_path / "cols.npy", a.T)  # revisitop stores vectors as columns [D, N]
    np.testing.assert_array_equal(load_descriptors(tmp_path / "cols.npy", dim=16), a)
    torch.save({"database": torch.from_numpy(a)}, tmp_path / "d.pt")
    np.testing.assert_array_equal(load_descriptors(tmp_path / "d.pt", dim=16), a)
    with pytest.raises(DatasetError, match="same model"):
        load_descriptors(tmp_path / "cols.npy", dim=8)
    bad = a.copy()
    bad[3, 2] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(DatasetError, match="NaN"):
        load_descriptors(tmp_path / "bad.npy", dim=16)


# ----------------------------------------------------------------------------- the command
def test_format_table_two_decimals():
    res = {p: {"map": v, "mpk": np.array([1.0, 0.5, np.nan])} for p, v in (("easy", 0.12345), ("medium", 1.0),
                                                                            ("hard", np.nan))}
    rows = parse_table(format_table("t", {"row": res}))
    assert rows["row"]["mAP"][:2] == [12.35, 100.0] and np.isnan(rows["row"]["mAP"][2])
    assert rows["row"]["mP@5"] == [50.0, 50.0, 50.0]


def test_features_route_by_hand(mini, tmp_path, capsys):
    """Designed descriptors (one basis vector per database image) give a ranking worked out by hand."""
    data, info = mini
    idx = {n: i for i, n in enumerate(info["imlist"])}
    n_db = len(info["imlist"])
    X = np.eye(n_db, 32, dtype=np.float32)
    Q = np.zeros((len(info["qimlist"]), 32), np.float32)
    for qi, q in enumerate(info["qimlist"]):
        p = q[:-len("_orig")]
        # scores: orig 4 > camera 3.5 > v1 3 > junk 2.5 > v2 2 > everything else 0
        for name, w in ((f"{p}_orig", 4), ("camera", 3.5), (f"{p}_v1", 3), (f"{p}_junk", 2.5), (f"{p}_v2", 2)):
            Q[qi, idx[name]] = w
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    np.savez(tmp_path / "f.npz", queries=Q, database=X)
    assert main([NAME, "--data", str(data), "--features", str(tmp_path / "f.npz"), "--no-rerank"]) == 0
    row = parse_table(capsys.readouterr().out)["SuperGlobal, no reranking"]
    # Full-box queries (5): easy [orig], hard [v1, v2], junk [junk]; ranking orig, camera, v1, junk, v2.
    #   Easy  : drop junk+hard -> orig at 0                                  -> AP 1
    #   Medium: drop junk -> orig 0, camera 1, v1 2, v2 3:
    #           (1+1) + (1/2 + 2/3) + (2/3 + 3/4) = 55/12, / (2*3)           -> AP 55/72
    #   Hard  : drop junk+orig -> camera 0, v1 1, v2 2:
    #           (0/1 + 1/2) + (1/2 + 2/3) = 5/3, / (2*2)                     -> AP 5/12
    # Crop query: easy [], hard [orig, v1, v2]: Easy NaN (skipped); Medium and Hard both 55/72.
    assert row["mAP"] == [100.0, pytest.approx(100 * 55 / 72, abs=0.006), pytest.approx(100 * (5 * 5 / 12 + 55 / 72) / 6, abs=0.006)]
    # Medium mP@k: 1-based positions 1, 3, 4 -> k=1: 1; k=5, 10: kq = 4 -> 3/4 (every query alike)
    assert row["mP@1"][1] == 100.0 and row["mP@5"][1] == 75.0 and row["mP@10"][1] == 75.0
    # Hard mP@1: camera is first for full-box queries (0), the crop query's orig is first (1) -> 1/6
    assert row["mP@1"][2] == pytest.approx(100 / 6, abs=0.006)


def test_bundle_required_without_features(mini):
    data, _ = mini
    with pytest.raises(InputError, match="CVNet"):
        main([NAME, "--data", str(data)])


@pytest.fixture(scope="module")
def bundle_run(mini, bundle_dir, tmp_path_factory):
    """One full run with the model: table text, cache dir, saved features, JSON."""
    import contextlib
    import io
    data, _ = mini
    work = tmp_path_factory.mktemp("evalrun")
    args = [NAME, "--data", str(data), "--bundle", str(bundle_dir), "--cache", str(work / "cache"),
            "--save-features", str(work / "feats.npz"), "--json", str(work / "res.json"), "--quiet"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    return {"out": buf.getvalue(), "work": work, "args": args}


def test_end_to_end_table_is_sensible(bundle_run, mini):
    out = bundle_run["out"]
    rows = parse_table(out)
    assert list(rows) == ["SuperGlobal, no reranking", "SuperGlobal + reranking"], out
    for label, r in rows.items():
        for group, vals in r.items():
            assert all(0.0 <= v <= 100.0 for v in vals), (label, group, vals)
    g, rr = rows["SuperGlobal, no reranking"], rows["SuperGlobal + reranking"]
    # Each full-box query is the very image stored in the database, hard views are junk under
    # Easy: the identical image must come first, so Easy mAP and mP@1 are exactly 100.
    assert g["mAP"][0] == 100.0 and g["mP@1"][0] == 100.0
    # Medium/Hard positives are crops and rotated, brightened views of the same photo among 36
    # images: an ImageNet network finds them far above chance (about 3/36 = 8% AP).
    assert g["mAP"][1] > 60.0 and g["mAP"][2] > 40.0, out
    assert rr["mAP"][0] > 90.0 and rr["mAP"][1] > 60.0, out
    assert "6 queries, 30 database images" in out
    assert re.search(r"timings \(one pass, wall clock\): extract [\d.]+ s \(36 extracted, 0 of 36 from cache", out), out
    assert re.search(r"search [\d.]+ ms/query \| rerank [\d.]+ ms/query", out)
    res = json.loads((bundle_run["work"] / "res.json").read_text())
    assert res["rows"]["SuperGlobal, no reranking"]["easy"]["mAP"] == pytest.approx(100.0)
    assert res["rerank"] == {"M": 400, "K": 9, "beta": 0.15, "modes": ["faithful"]}


def test_saved_query_descriptor_is_the_box_crop(bundle_run, bundle_dir, mini):
    from sgengine.engine import Engine
    data, info = mini
    with np.load(bundle_run["work"] / "feats.npz") as z:
        Q, X = z["queries"], z["database"]
    engine = Engine.load(bundle_dir)
    qi = len(info["qimlist"]) - 1
    x1, y1, x2, y2 = info["crop_box"]
    path = data / NAME / "jpg" / f"{info['qimlist'][qi]}.jpg"
    rgb = np.asarray(Image.open(path).convert("RGB"))[int(y1):int(y2), int(x1):int(x2)]
    want = engine.embed(np.ascontiguousarray(rgb))[0]
    np.testing.assert_allclose(Q[qi], want, atol=2e-5)
    # and it is not the uncropped image's descriptor (which is in the database)
    assert np.abs(Q[qi] - X[info["imlist"].index(info["qimlist"][qi])]).max() > 1e-2


def test_second_run_reads_the_cache_and_resumes(bundle_run, bundle_dir):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(bundle_run["args"])
    assert "(0 extracted, 36 of 36 from cache" in buf.getvalue()
    assert parse_table(buf.getvalue()) == parse_table(bundle_run["out"])
    # Remove the committed parts holding database images: only those are extracted again.
    parts = sorted((bundle_run["work"] / "cache").rglob("part-*.npz"))
    db_parts = [p for p in parts if any(str(k).startswith("db/") for k in np.load(p)["keys"])]
    n_db = sum(len(np.load(p)["keys"]) for p in db_parts)
    for p in db_parts:
        p.unlink()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(bundle_run["args"])
    assert f"({n_db} extracted, {36 - n_db} of 36 from cache" in buf.getvalue()
    assert parse_table(buf.getvalue()) == parse_table(bundle_run["out"])


def test_features_file_without_model_gives_the_same_table(bundle_run, mini, capsys):
    data, _ = mini
    assert main([NAME, "--data", str(data), "--features", str(bundle_run["work"] / "feats.npz")]) == 0
    out = capsys.readouterr().out
    assert parse_table(out) == parse_table(bundle_run["out"])
    assert "extract" not in out
    # The reranked row equals the metrics of sgengine.rerank.superglobal_rerank's own full ranking.
    from sgengine.eval.metrics import compute_map_protocols
    from sgengine.rerank import superglobal_rerank
    with np.load(bundle_run["work"] / "feats.npz") as z:
        ids, _ = superglobal_rerank(z["queries"], z["database"], M=400, K=9, beta=0.15)
    want = compute_map_protocols(ids.T, load_revisited(NAME, data).gnd)
    got = parse_table(out)["SuperGlobal + reranking"]
    assert got["mAP"] == [round(want[p]["map"] * 100, 2) for p in ("easy", "medium", "hard")]
    assert main([NAME, "--data", str(data), "--features", str(bundle_run["work"] / "feats.npz"),
                 "--no-rerank"]) == 0
    assert list(parse_table(capsys.readouterr().out)) == ["SuperGlobal, no reranking"]


def test_adaptive_row_is_the_adaptive_rerank(bundle_run, mini, tmp_path, capsys):
    """--adaptive adds a row after the faithful one: the metrics of superglobal_rerank(mode="adaptive")."""
    from sgengine.eval.metrics import compute_map_protocols
    from sgengine.rerank import superglobal_rerank
    data, _ = mini
    feats = bundle_run["work"] / "feats.npz"
    assert main([NAME, "--data", str(data), "--features", str(feats), "--adaptive", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    rows = parse_table(out)
    assert list(rows) == ["SuperGlobal, no reranking", "SuperGlobal + reranking", "SuperGlobal + adaptive reranking"], out
    assert {k: rows[k] for k in list(rows)[:2]} == parse_table(bundle_run["out"])  # the other rows are unchanged
    assert "rerank adaptive" in out
    gnd = load_revisited(NAME, data).gnd
    with np.load(feats) as z:
        ids_a, _ = superglobal_rerank(z["queries"], z["database"], M=400, K=9, beta=0.15, mode="adaptive")
        ids_f, _ = superglobal_rerank(z["queries"], z["database"], M=400, K=9, beta=0.15)
    assert not np.array_equal(ids_a, ids_f), "the modes rank this set alike: the row would not show the flag works"
    want = compute_map_protocols(ids_a.T, gnd)
    got = rows["SuperGlobal + adaptive reranking"]
    assert got["mAP"] == [round(want[p]["map"] * 100, 2) for p in ("easy", "medium", "hard")]
    js = json.loads((tmp_path / "r.json").read_text())
    assert js["rerank"]["modes"] == ["faithful", "adaptive"] and "SuperGlobal + adaptive reranking" in js["rows"]
    with pytest.raises(InputError, match="--no-rerank"):
        main([NAME, "--data", str(data), "--features", str(feats), "--adaptive", "--no-rerank"])


def test_plus1m_distractors_are_appended(bundle_run, mini, tmp_path, capsys):
    import torch
    data, info = mini
    feats = bundle_run["work"] / "feats.npz"
    with np.load(feats) as z:
        Q = z["queries"]
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((50, Q.shape[1])).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    # Unrelated random directions barely move anything...
    np.save(tmp_path / "noise.npy", noise)
    assert main([NAME, "--data", str(data), "--features", str(feats), "--plus1m", str(tmp_path / "noise.npy"),
                 "--no-rerank"]) == 0
    out = capsys.readouterr().out
    assert "+ 50 distractors" in out
    rows = parse_table(out)
    assert rows["SuperGlobal +1M, no reranking"]["mAP"][0] == 100.0
    # ...while a near-copy of each query (cosine 0.995: below the identical database image,
    # above any augmented view), stored as a torch file, lands right behind the easy positive:
    # Easy stays 100 and every hard positive moves down one place, so Hard mAP drops.
    u = rng.standard_normal(Q.shape).astype(np.float32)
    u -= (u * Q).sum(1, keepdims=True) * Q
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    near = 0.995 * Q + np.sqrt(1 - 0.995 ** 2) * u
    torch.save(torch.from_numpy(near.astype(np.float32)), tmp_path / "near.pt")
    assert main([NAME, "--data", str(data), "--features", str(feats), "--plus1m", str(tmp_path / "near.pt"),
                 "--no-rerank"]) == 0
    rows = parse_table(capsys.readouterr().out)["SuperGlobal +1M, no reranking"]
    base = parse_table(bundle_run["out"])["SuperGlobal, no reranking"]
    assert rows["mAP"][0] == 100.0
    assert rows["mAP"][2] < base["mAP"][2] - 1.0 and rows["mAP"][1] < base["mAP"][1]


def test_plus1m_missing_file_says_where(mini, bundle_run, tmp_path):
    data, _ = mini
    with pytest.raises(DatasetError, match="revisitop"):
        main([NAME, "--data", str(data), "--features", str(bundle_run["work"] / "feats.npz"),
              "--plus1m", str(tmp_path / "nope.npy")])
