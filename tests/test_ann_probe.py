"""The ANN's probe (sgengine.search.ann, "The probe"): a second FAISS index over the same rows in a
PCA-whitened space whose top candidates join the main index's.

What it must do: only add candidates (the main index's are kept as they are, no row twice), find
the views of a scene that the main index's routing misses, persist inside the ANN file without
changing the main index's bytes, follow `update`, be added to or removed from an existing ANN
(`set_probe`) without a rebuild of the main index, and be switched per search ("probe": 0).
Everything runs real FAISS on real files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest

from sgengine import Engine
from sgengine.bundle import Bundle
from sgengine.cli import main as cli_main
from sgengine.errors import IndexError_, InputError
from sgengine.index import Index
from sgengine.search import ann, search_index

FP = "ab" * 32


def scenes(n: int, d: int, seed: int = 0, views: int = 6, view_noise: float = 0.6):
    """Unit rows shaped like image descriptors (bench/datagen.py's model, small): a shared mean
    direction, and scenes of `views` rows whose latent and view noise both fall off as a power law
    over the principal directions. Returns (rows [n, d], scene per row)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s = (np.arange(d) + 1.0) ** -0.68
    s *= np.sqrt(d) / np.linalg.norm(s)
    mu = rng.standard_normal(d)
    mu /= np.linalg.norm(mu)
    scene = np.arange(n) // views
    g = rng.standard_normal((scene[-1] + 1, d))
    z = (g[scene] + view_noise * rng.standard_normal((n, d))) * s
    x = mu + z @ basis.T / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), scene


@pytest.fixture(scope="module")
def data():
    x, scene = scenes(20_000 + 60, 256)
    # Queries: one view of each of 60 scenes, held out of the index.
    held = np.arange(60) * 6 * 50
    keep = np.ones(len(x), bool)
    keep[held] = False
    return x[keep], x[held], scene[keep], scene[held]


def make(path, x):
    ix = Index.create(path, dim=x.shape[1], bundle_fingerprint=FP)
    ix.add(x[: len(x) // 2], [f"a{i}" for i in range(len(x) // 2)])
    ix.add(x[len(x) // 2:], [f"b{i}" for i in range(len(x) - len(x) // 2)])
    return ix


def recall10(ix, q, cand) -> float:
    _, gt = search_index(ix, q, 10)
    gt = np.asarray(gt)
    return float(np.mean([len(set(gt[i]) & set(cand[i][cand[i] >= 0])) / 10 for i in range(len(q))]))


# A deliberately weak main index (2 of 256 lists) so that it misses near neighbours.
WEAK = ("IVF256,SQ8", {"nprobe": 2})


def test_the_probe_only_adds_candidates_and_finds_what_the_main_index_missed(tmp_path, data):
    x, q = data[:2]
    ix = make(tmp_path / "ix", x)
    rep = ann.build(ix, WEAK[0], params=WEAK[1], recall_queries=0)
    assert rep.meta["probe"]["factory"] == ann.PROBE_FACTORY and rep.meta["probe"]["candidates"] == 32
    a = ann.Ann.load(ix)
    assert a.params == {"nprobe": 2, "probe": 32}
    with_probe = a.search(q, 100)
    a.set_params({"probe": 0})
    main = a.search(q, 100)
    assert main.shape == (60, 100) and with_probe.shape == (60, 132)
    assert np.array_equal(with_probe[:, :100], main)  # the main index's candidates, as they were
    for i in range(len(q)):
        extra = with_probe[i, 100:]
        extra = extra[extra >= 0]
        assert len(extra) and len(set(extra)) == len(extra) and not set(extra) & set(main[i])
        assert extra.max() < len(ix)
    r_main, r_probe = recall10(ix, q, main), recall10(ix, q, with_probe)
    assert r_main < 0.8 and r_probe > r_main + 0.15, (r_main, r_probe)
    # The probe finds the query's scene: its 10 candidates (with the main index's one) hold the
    # other views of the query's scene.
    sx, sq = data[2], data[3]
    a.set_params({"probe": 10})
    got = a.search(q, 1)
    found = [np.isin(np.flatnonzero(sx == sq[i]), got[i]).mean() for i in range(len(q))]
    assert np.mean(found) > 0.9, np.mean(found)


def test_probe_parameter_is_checked(tmp_path, data):
    x, q = data[:2]
    ix = make(tmp_path / "ix", x[:3000])
    ann.build(ix, WEAK[0].replace("256", "16"), params={"nprobe": 1}, recall_queries=0)
    a = ann.Ann.load(ix, params={"probe": 5})
    assert a.search(q[:3], 20).shape == (3, 25) and a.describe()["probe"]["candidates"] == 5
    with pytest.raises(InputError, match="probe"):
        a.set_params({"probe": -1})
    with pytest.raises(InputError, match="probe"):
        ann.Ann.load(ix, params={"probe": "many"})
    ann.set_probe(ix, "off")
    with pytest.raises(InputError, match="has no probe"):
        ann.Ann.load(ix, params={"probe": 4})
    assert "probe" not in ann.Ann.load(ix).params


CHILD = textwrap.dedent("""
    import sys, json, numpy as np
    from sgengine.index import Index
    from sgengine.search import ann
    a = ann.Ann.load(Index.open(sys.argv[1]))
    print(json.dumps({"rows": a.search(np.load(sys.argv[2]), 50).tolist(), "params": a.params}))
""")


def test_the_probe_persists_after_the_main_index_bytes(tmp_path, data):
    x, q = data[:2]
    ix = make(tmp_path / "ix", x[:5000])
    ann.build(ix, "IVF32,SQ8", params={"nprobe": 2}, recall_queries=0, probe="off")
    plain = (tmp_path / "ix" / ix.ann["file"]).read_bytes()
    main_rows = ann.Ann.load(ix).search(q, 50)
    rep = ann.set_probe(ix, "auto")
    pr = rep.meta["probe"]
    blob = (tmp_path / "ix" / ix.ann["file"]).read_bytes()
    assert len(blob) == pr["offset"] + pr["bytes"] == ix.ann["bytes"]
    assert blob[:pr["offset"]] == plain  # the main index is kept byte for byte
    # A reader that knows no probe reads the main index and stops there.
    old = faiss.read_index(faiss.PyCallbackIOReader(__import__("io").BytesIO(blob).read))
    old.nprobe = 2
    assert np.array_equal(old.search(q, 50)[1], main_rows)
    # A new process loads both parts.
    np.save(tmp_path / "q.npy", q)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ix"), str(tmp_path / "q.npy")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["params"] == {"nprobe": 2, "probe": 32}
    assert np.array_equal(np.array(got["rows"]), ann.Ann.load(Index.open(tmp_path / "ix")).search(q, 50))
    assert np.array_equal(np.array(got["rows"])[:, :50], main_rows)
    # Removing it gives back the plain file's bytes.
    ann.set_probe(ix, "off")
    assert (tmp_path / "ix" / ix.ann["file"]).read_bytes() == plain and "probe" not in ix.ann_meta()
    # The bytes of the probe part are hashed with the rest: a damaged probe is refused.
    ann.set_probe(ix, "auto")
    f = tmp_path / "ix" / ix.ann["file"]
    b = bytearray(f.read_bytes())
    b[-100] ^= 0xFF
    os.chmod(f, 0o644)
    f.write_bytes(bytes(b))
    with pytest.raises(IndexError_, match="sha256"):
        ann.Ann.load(Index.open(tmp_path / "ix"))


def test_update_adds_the_new_rows_to_the_probe_too(tmp_path, data):
    x, q = data[:2]
    ix = make(tmp_path / "ix", x[:4000])
    ann.build(ix, "IVF32,SQ8", params={"nprobe": 1}, recall_queries=0)
    ix.add(x[4000:4500], [f"new{i}" for i in range(500)])
    assert ix.ann_state() != "fresh"
    rep = ann.update(ix)
    assert rep.added == 500 and rep.meta["probe"]["factory"] == ann.PROBE_FACTORY
    a = ann.Ann.load(Index.open(tmp_path / "ix"), params={"probe": 5})
    assert a._probe.ntotal == a._fx.ntotal == 4500
    # The new rows are found by the probe: each new row as its own query.
    got = a.search(x[4000:4050], 1)
    assert all(r in got[i] for i, r in enumerate(range(4000, 4050)))


def test_auto_rule_and_refusals(tmp_path, data):
    x = data[0]
    assert ann._probe_choice("auto", "Flat", 50_000, 256)[0] is None
    assert ann._probe_choice("auto", "HNSW32,SQ8", 50_000, 64)[0] is None
    assert ann._probe_choice("auto", "HNSW32,SQ8", 500, 256)[0] is None
    assert ann._probe_choice("auto", "HNSW32,SQ8", 50_000, 256)[0] == ann.PROBE_FACTORY
    assert ann._probe_choice("off", "HNSW32,SQ8", 50_000, 256)[0] is None
    assert ann._probe_choice("PCAW32,PQ16x4fs", "Flat", 50_000, 256)[0] == "PCAW32,PQ16x4fs"
    with pytest.raises(InputError, match="probe"):
        ann._probe_choice("", "Flat", 10, 256)
    ix = make(tmp_path / "ix", x[:2000])
    assert "probe" not in ann.build(ix, "Flat", recall_queries=0).meta  # exact: no probe
    with pytest.raises(InputError, match="probe factory 'PCAWx'"):
        ann.build(ix, "IVF8,Flat", probe="PCAWx", recall_queries=0)
    assert ix.ann["factory"] == "Flat"  # nothing committed
    with pytest.raises(InputError, match="exact"):
        ann.set_probe(ix, "auto")
    assert ann.set_probe(ix, "PCAW64,L2norm,PQ32x4fs").meta["probe"]["requested"] == "PCAW64,L2norm,PQ32x4fs"
    small = make(tmp_path / "small", x[:2000, :64] / np.linalg.norm(x[:2000, :64], axis=1, keepdims=True))
    assert "probe" not in ann.build(small, "IVF8,Flat", recall_queries=0).meta  # D = 64 < 128


CHILD_SET_PROBE = textwrap.dedent("""
    import sys
    from sgengine.index import Index
    from sgengine.search import ann
    ann.set_probe(Index.open(sys.argv[1]), "auto")
""")


@pytest.mark.parametrize("crash_at", ["ann-mid-file", "ann-before-manifest"])
def test_a_crash_while_setting_a_probe_keeps_the_previous_ann(tmp_path, data, crash_at):
    x, q = data[:2]
    ix = make(tmp_path / "ix", x[:3000])
    ann.build(ix, "IVF16,SQ8", params={"nprobe": 2}, recall_queries=0, probe="off")
    before = ann.Ann.load(ix).search(q, 30)
    rec = dict(ix.ann)
    out = subprocess.run([sys.executable, "-c", CHILD_SET_PROBE, str(tmp_path / "ix")],
                         env={**os.environ, "SGENGINE_INDEX_CRASH_AT": crash_at}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 77, out.stderr[-2000:]
    again = Index.open(tmp_path / "ix")
    assert again.ann == rec and "probe" not in again.ann_meta()
    assert np.array_equal(ann.Ann.load(again).search(q, 30), before)
    again.verify()


def test_engine_and_cli_with_a_probe(tmp_path, capsys, default_bundle, data):
    bundle = Bundle.load(default_bundle)
    x, _ = scenes(3000, bundle.dim, seed=4)
    ix = Index.create(tmp_path / "ix", dim=bundle.dim, bundle_fingerprint=bundle.fingerprint)
    ix.add(x, [f"r{i}" for i in range(len(x))])
    path = str(tmp_path / "ix")
    assert cli_main(["index", "ann", path, "--factory", "IVF16,Flat", "--nprobe", "16", "--recall-queries", "0",
                     "--probe", "off", "--quiet"]) == 0
    assert "probe" not in capsys.readouterr().out
    assert cli_main(["index", "ann", path, "--set-probe", "auto", "--probe-candidates", "8", "--quiet"]) == 0
    assert f"probe {ann.PROBE_FACTORY}" in capsys.readouterr().out
    assert cli_main(["index", "info", path]) == 0
    assert json.loads(capsys.readouterr().out)["ann"]["probe"]["candidates"] == 8
    q = x[:3] + 0.01
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = Engine.load(bundle, index=path, ann="off")
    fast = Engine.load(bundle, index=path)
    assert fast.describe()["ann"]["probe"]["candidates"] == 8
    want, got = exact.search(q, k=20), fast.search(q, k=20)
    assert got.first_stage == "ann" and got.ids == want.ids  # nprobe = all lists: full recall, probe or not
    off = Engine.load(bundle, index=path, ann_params={"probe": 0})
    assert off.describe()["ann"]["probe"]["candidates"] == 0 and off.search(q, k=20).ids == want.ids
    assert cli_main(["index", "ann", path, "--set-probe", "off", "--update"]) == 2
    assert "exclude each other" in capsys.readouterr().err
