"""End-to-end query latency: one 1024x768 JPEG through `Engine.search`, stage by stage.

    python bench/query_report.py                               # run, print the table, draw the chart
    python bench/report.py bench/bench_query.py -k "5k"        # the 5,000-row databases only
    SGENGINE_BENCH_QUERY_BUDGET_S=60 python bench/query_report.py

One query photo (scikit-image's astronaut, resized to 1024x768 and saved as JPEG) goes through the
whole engine: decode, preprocess, backbone at the 3 scales, pooling head + whitening + Scale-GeM,
first-stage search, gather and SuperGlobal rerank (M = 400, K = 9, beta = 0.15), top 100 out.
Configurations: model x database size x device.
- models: "cvnet-r50" (a random-weight CVNet ResNet-50 checkpoint from sgengine.testing, exported
  without the parity check: the weights do not change the cost) and "lite0" (the built-in
  default, EfficientNet-Lite0 with ImageNet weights), each exported once per session;
- databases: 5,000 and 1,000,000 synthetic unit descriptors (seeded Gaussian directions) stored
  as float16 in a memory-mapped index. The 1M index (4 GiB at D = 2048, 2.5 GiB at D = 1280) is
  built once, in chunks, under SGENGINE_BENCH_CACHE (default ~/.cache/sgengine/bench), keyed by
  the bundle's fingerprint (exports are deterministic, so reruns reuse it), and skipped with a
  reason when the disk has less than 10 GiB free;
- devices: cpu, and cuda when torch sees a GPU.
Each benchmark times `engine.search` end to end after one untimed warm-up call, for as many
rounds as fit SGENGINE_BENCH_QUERY_BUDGET_S seconds (3 at least), and stores the median of each
stage from `result.timings` in extra_info["stages_ms"] (ms; "other" is total minus the named
stages: result assembly, id lookup) with the load average before and after, since a shared
machine's load moves CPU numbers.
"""
from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

QUERY_SIZE = (1024, 768)
QUERY_PHOTO = "astronaut"
M, K, BETA, TOPK = 400, 9, 0.15, 100
SIZES = {"5k": 5_000, "1M": 1_000_000}
MODELS = ("cvnet-r50", "lite0")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STAGE_ORDER = ("decode", "preprocess", "backbone@0.7071", "backbone@1", "backbone@1.4142", "head", "search",
               "gather", "rerank", "other")
BUDGET_S = float(os.environ.get("SGENGINE_BENCH_QUERY_BUDGET_S", "30"))
MIN_ROUNDS, MAX_ROUNDS = 3, 30
MIN_FREE_DISK = 10 << 30
BUILD_CHUNK = 65_536  # rows per append while building: 512 MiB of float32 at D = 2048


def cache_dir() -> Path:
    return Path(os.environ.get("SGENGINE_BENCH_CACHE", "~/.cache/sgengine/bench")).expanduser()


@pytest.fixture(scope="session")
def query_jpeg(tmp_path_factory) -> Path:
    from PIL import Image
    from sgengine.photos import sample_photos
    rgb = sample_photos()[QUERY_PHOTO]
    path = tmp_path_factory.mktemp("query") / f"{QUERY_PHOTO}-{QUERY_SIZE[0]}x{QUERY_SIZE[1]}.jpg"
    Image.fromarray(rgb).resize(QUERY_SIZE, Image.Resampling.LANCZOS).save(path, quality=92)
    return path


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """model name -> Bundle, exported on first use and kept for the session."""
    from sgengine.export import export_bundle
    from sgengine.model import default_model, load_checkpoint
    from sgengine.testing import save_cvnet_checkpoint
    root = tmp_path_factory.mktemp("bundles")
    made = {}

    def get(name: str):
        if name not in made:
            if name == "cvnet-r50":
                ckpt = save_cvnet_checkpoint(root / "cvnet_r50.pth", 50, seed=0)
                model, _ = load_checkpoint(ckpt)
            else:
                model = default_model()
            # No parity check: it is test_export's job, and it would only lengthen the session.
            made[name] = export_bundle(model, root / name, check=False, progress=lambda s: None)
        return made[name]

    return get


def _synthetic_rows(start: int, stop: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows start..stop of a fixed sequence of unit vectors; each block is seeded by its position."""
    out = np.empty((stop - start, dim), np.float32)
    for b0 in range(start - start % BUILD_CHUNK, stop, BUILD_CHUNK):
        block = np.random.default_rng([seed, b0 // BUILD_CHUNK]).standard_normal((BUILD_CHUNK, dim), np.float32)
        lo, hi = max(start, b0), min(stop, b0 + BUILD_CHUNK)
        out[lo - start:hi - start] = block[lo - b0:hi - b0]
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def build_synthetic_index(path: Path, bundle, n: int, *, progress=print):
    """A float16 index of n synthetic rows at `path` for `bundle`: resumes a partial build, ends compacted.

    Appends BUILD_CHUNK rows at a time (one segment each, never the whole database in memory),
    then merges them into one segment, which `Index.vectors()` maps instead of concatenating in
    memory.
    """
    from sgengine.index import Index
    idx = Index.create(path, dim=int(bundle.dim), bundle_fingerprint=bundle.fingerprint, dtype="float16",
                       exist_ok=True)
    t0 = time.perf_counter()
    for start in range(len(idx), n, BUILD_CHUNK):
        stop = min(n, start + BUILD_CHUNK)
        idx.add(_synthetic_rows(start, stop, idx.dim), [f"syn{i:07d}" for i in range(start, stop)])
        if progress and (stop // BUILD_CHUNK) % 4 == 0:
            progress(f"  {path.name}: {stop:,}/{n:,} rows ({time.perf_counter() - t0:.0f} s)")
    if len(idx) != n:
        raise RuntimeError(f"{path} holds {len(idx)} rows, expected {n}: delete it and rerun")
    idx.compact()
    return idx


@pytest.fixture(scope="session")
def indexes(tmp_path_factory, bundles):
    """(model, size key) -> index path; 5k in the session's tmp dir, 1M in the cache dir."""
    made = {}

    def get(model: str, size: str) -> Path:
        key = (model, size)
        if key in made:
            return made[key]
        bundle = bundles(model)
        n = SIZES[size]
        if n <= 100_000:
            path = tmp_path_factory.mktemp(f"index-{model}-{size}") / "index"
            build_synthetic_index(path, bundle, n, progress=None)
            made[key] = path
            return path
        root = cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        prefix = f"index-{bundle.dim}d-{n}-fp16-"
        path = root / (prefix + bundle.fingerprint[:16])
        done = (path / "manifest.json").exists() and _complete(path, n)
        if not done:
            need = max(MIN_FREE_DISK, 2 * n * int(bundle.dim) * 2 + (1 << 30))  # the compaction copy doubles it
            # A stale index of the same shape from an earlier export only takes disk space.
            for old in root.glob(prefix + "*"):
                if old != path and old.is_dir():
                    shutil.rmtree(old)
            free = shutil.disk_usage(root).free
            if free < need:
                pytest.skip(f"{size} index needs {need / 2**30:.1f} GiB free under {root}; {free / 2**30:.1f} GiB free")
            print(f"\nbuilding the {n:,}-row float16 index for {model} under {path} (once; reused later)")
            build_synthetic_index(path, bundle, n)
        made[key] = path
        return path

    return get


def _complete(path: Path, n: int) -> bool:
    from sgengine.index import Index
    try:
        idx = Index.open(path)
    except Exception:
        return False
    return len(idx) == n and idx.segments == 1


def stage_medians(timings: list[dict[str, float]]) -> dict[str, float]:
    """Median ms per stage over rounds, plus "other" = total - the named stages."""
    out: dict[str, float] = {}
    stages = sorted({s for t in timings for s in t if s != "total"},
                    key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
    for s in stages:
        out[s] = statistics.median(t.get(s, 0.0) for t in timings)
    out["other"] = statistics.median(t["total"] - sum(v for k, v in t.items() if k != "total") for t in timings)
    out["total"] = statistics.median(t["total"] for t in timings)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("model", MODELS)
def test_query(benchmark, machine, bundles, indexes, query_jpeg, model, size, device):
    from sgengine.engine import Engine
    index_path = indexes(model, size)
    engine = Engine.load(bundles(model), index=index_path, device=device)
    desc = engine.describe()
    t0 = time.perf_counter()
    engine.search(query_jpeg, k=TOPK, M=M, K=K, beta=BETA)  # warm-up: sessions, page cache, allocator
    est = time.perf_counter() - t0
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, BUDGET_S // max(est, 1e-3))))
    timings: list[dict[str, float]] = []

    def run():
        r = engine.search(query_jpeg, k=TOPK, M=M, K=K, beta=BETA)
        timings.append(r.timings)

    load_before = os.getloadavg()
    benchmark.group = f"query {size} {device}"
    benchmark.extra_info.update({
        "op": "query", "shape": f"{QUERY_SIZE[0]}x{QUERY_SIZE[1]} N={SIZES[size]} fp16 {device}",
        "impl": model, "model": desc["model"], "size": size, "n": SIZES[size], "device": device,
        "backend": desc["backend"].get("name"), "providers": desc["backend"].get("providers"),
        "head_impl": desc["head_impl"], "rerank_impl": desc["rerank_impl"], "dim": desc["dim"],
        "M": M, "K": K, "beta": BETA, "k": TOPK, "machine": machine,
    })
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"stages_ms": stage_medians(timings), "rounds": len(timings),
                                 "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())})
