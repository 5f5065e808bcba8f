"""Retrieval quality regression: bench/quality.py's benchmark on a CI-sized set, pinned to measured mAP.

The default model (EfficientNet-Lite0, ImageNet weights) is exported to ONNX and run through the
engine (ONNX Runtime backbone, pooling head, index search, SuperGlobal rerank) on real photos
written as JPEG files: nothing here is mocked, so a change anywhere on the query path that moves
retrieval quality (preprocessing, export, head, search, rerank, the photo set) moves these numbers.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality.py"

# The CI-sized set: photos shrunk to 224 px on the long side, all 12 views, 3 other-side
# distractors per query photo and 30 tiles: 14 queries, 168 positives, 72 distractors.
SET = dict(max_side=224, region_distractors=3, distractors=30, seed=0)
EXPECTED_SIZE = (14, 240)
# Measured by running this test's code (run_quality on SET, K = 9, M = 400, beta = 0.15) on
# 2026-11-27, AMD EPYC 2-core VM, torch 2.13.0+cpu, onnxruntime 1.32.0, Pillow 13.0.0,
# numpy 2.4.6; mAP x 100. The tolerance allows JPEG/resampling differences between Pillow
# versions and float summation order between ONNX Runtime builds: one of the 14 queries
# losing ~20 AP points moves mAP by ~1.4. What it catches (measured by breaking the code on
# purpose): a rerank without its neighbour weights (beta = 0) drops reranked mAP to 86.84, and
# the rerank gain to -1.26. What it does not: swapping the colour channels moves global/reranked
# mAP by only -1.0/-0.4, and averaging the scales instead of SPEC 4's max by +0.3/+0.9; the
# fidelity tests against the SPEC transcriptions (test_model.py, test_export.py) own those.
PINNED_GLOBAL = 88.10
PINNED_RERANKED = 89.88
TOLERANCE = 1.5


def _load_bench():
    spec = importlib.util.spec_from_file_location("sgengine_bench_quality", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quality(tmp_path_factory, default_bundle):
    """The benchmark's result on SET, with the session's default-model bundle (tests/conftest.py)."""
    from sgengine.bundle import Bundle
    from sgengine.photoset import make_quality_set
    bench = _load_bench()
    qset = make_quality_set(tmp_path_factory.mktemp("quality") / "photos", **SET)
    return bench.run_quality(Bundle.load(default_bundle), qset, Ks=(bench.K_DEFAULT,)), bench


def test_quality_set_shape(quality):
    result, _ = quality
    assert (result.queries, result.database) == EXPECTED_SIZE, (
        "the quality photo set changed size: re-measure the pinned mAP values")


def test_global_map_pinned(quality):
    result, _ = quality
    print(result.table())
    assert result.global_map == pytest.approx(PINNED_GLOBAL, abs=TOLERANCE), result.table()


def test_reranked_map_pinned(quality):
    result, bench = quality
    assert result.reranked_map[bench.K_DEFAULT] == pytest.approx(PINNED_RERANKED, abs=TOLERANCE), result.table()


def test_rerank_gain_pinned(quality):
    """SuperGlobal reranking must keep its measured gain over global search on this set (+1.78)."""
    result, bench = quality
    gain = result.reranked_map[bench.K_DEFAULT] - result.global_map
    assert gain == pytest.approx(PINNED_RERANKED - PINNED_GLOBAL, abs=TOLERANCE), result.table()


# ----------------------------------------------------------------------------- rerank modes
# The photo-group sets of sgengine.eval.photo_groups at CI size (224 px), original queries, with
# unrelated distractors only (tiles of never-queried photos and LFW faces): bench/quality.py --modes
# runs the same code (photo_set_rows). Measured on 2026-12-03, same machine and versions as above;
# mAP x 100 of (global only, faithful rerank, adaptive rerank).
PINNED_MODES = {"small": (94.66, 83.30, 95.36), "large": (93.63, 96.71, 96.09)}


@pytest.fixture(scope="module")
def modes(tmp_path_factory, default_bundle):
    from sgengine.bundle import Bundle
    bench = _load_bench()
    root = tmp_path_factory.mktemp("groups") / "photos"
    rows = bench.photo_set_rows(Bundle.load(default_bundle), root, max_side=224, variants=("original",),
                                hard_negatives=(False,))
    return {r.name.split(",")[0]: r for r in rows}, root


@pytest.mark.parametrize("grouping", ["small", "large"])
def test_modes_pinned(modes, grouping):
    row = modes[0][grouping]
    got = tuple(row.scores[m][0] for m in ("global only", "faithful", "adaptive"))
    assert got == pytest.approx(PINNED_MODES[grouping], abs=TOLERANCE), (grouping, got)


def test_adaptive_does_not_hurt_small_groups(modes):
    """The issue's case: with 2-3 views per scene the faithful rerank loses to global-only (here
    by ~11 mAP); the adaptive mode must not (target: at most 0.5 below)."""
    s = {m: v[0] for m, v in modes[0]["small"].scores.items()}
    assert s["faithful"] < s["global only"] - 5, s
    assert s["adaptive"] >= s["global only"] - 0.5, s


def test_adaptive_keeps_a_gain_on_large_groups(modes):
    s = {m: v[0] for m, v in modes[0]["large"].scores.items()}
    assert s["faithful"] > s["global only"] + 1 and s["adaptive"] > s["global only"] + 1, s


def test_engine_and_cli_adaptive(default_bundle, modes, tmp_path):
    """Engine.search(rerank="adaptive") is superglobal_rerank(mode="adaptive") on the index rows, with
    the engine's rerank impl; describe() names what each mode runs on; the CLI takes --adaptive."""
    import json
    import os
    import subprocess

    import numpy as np
    import torch

    from sgengine.engine import Engine
    from sgengine.errors import InputError
    from sgengine.index import Index
    from sgengine.rerank import superglobal_rerank

    photos = sorted(modes[1].glob("database/*/*.jpg"))[:40]
    engine = Engine.load(default_bundle)
    X = np.asarray(engine.embed([str(p) for p in photos]))
    ix = Index.create(tmp_path / "ix", dim=X.shape[1], bundle_fingerprint=engine.bundle.fingerprint)
    ix.add(X, [p.name + str(i) for i, p in enumerate(photos)])
    engine = Engine.load(default_bundle, index=tmp_path / "ix")
    modes_desc = engine.describe()["rerank_modes"]
    assert set(modes_desc) == {"faithful", "adaptive"} and modes_desc["adaptive"] == engine.rerank_impl
    q = X[:3]
    res = engine.search(q, k=40, rerank="adaptive", M=30)
    ids, sc = superglobal_rerank(torch.from_numpy(q), torch.from_numpy(X), M=30, K=9, beta=0.15, k=40,
                                 impl=engine.rerank_impl, mode="adaptive")
    assert np.array_equal(res.rows, ids.numpy()) and np.allclose(res.scores, sc.numpy(), atol=1e-6)
    faithful = engine.search(q, k=40, M=30)
    assert not np.allclose(faithful.scores, res.scores), "the modes must differ on these photos"
    assert np.array_equal(engine.search(q, k=40, M=30, rerank="faithful").rows, faithful.rows)
    with pytest.raises(InputError, match=r"rerank must be True or False, or a mode in \('faithful', 'adaptive'\), got 'fast'"):
        engine.search(q, rerank="fast")

    cli = [sys.executable, "-m", "sgengine", "search", str(default_bundle), str(tmp_path / "ix"), str(photos[0])]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run(cli + ["-k", "3", "--json", "--adaptive"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["queries"][0]["results"]) == 3
    r = subprocess.run(cli + ["--adaptive", "--no-rerank"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr and "Traceback" not in r.stderr
