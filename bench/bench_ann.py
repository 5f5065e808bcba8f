"""The first stage at scale: exact scan against FAISS ANN settings, end to end through Engine.search.

    python bench/bench_ann.py --rows 100000 --out bench/results/DIR/ann_100k.txt
    python bench/bench_ann.py --rows 1000000 --sweep 16,64,256 --out bench/results/DIR/ann_1m.txt

Data: `bench/datagen.py` rows (calibrated on the default model's descriptors of real photos),
D = 2048, stored float16 in an sgengine Index; queries are held-out rows of the same scenes
(never in the index) and, with --fresh N, new views of N indexed scenes (datagen.fresh_views: a
new photo of something the collection holds). Each ANN setting runs with its probe (the
whitened second index, sgengine.search.ann "The probe") and without it ({"probe": 0}). The bundle is a random-weight CVNet ResNet-50 (only its fingerprint and D
matter here: every query is a descriptor). For each first stage, one query at a time, k = 100,
SuperGlobal rerank at M = 400, K = 9: milliseconds per query (median, whole `Engine.search`, and
its first stage: "search", or "ann" + "rescore"), recall@400 of the ANN's candidates, and the
overlap of the final reranked top 100 with the exact pipeline's. Also the ANN's bytes per row and
build time. Everything in one run, on one machine (printed at the end).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datagen  # noqa: E402

K_TOP, M, K, BETA = 100, 400, 9, 0.15


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _bundle(work: Path) -> Path:
    path = work / "bundle-r50"
    if (path / "manifest.json").exists():
        return path
    from sgengine.export import export_bundle
    from sgengine.model import load_checkpoint
    from sgengine.testing import save_cvnet_checkpoint
    model, _ = load_checkpoint(save_cvnet_checkpoint(work / "r50.pth", 50, seed=0))
    return export_bundle(model, path, check=False, progress=lambda s: None).path


def _index(work: Path, bundle, n: int, nq: int, dim: int, seed: int):
    """An index of n generated rows and nq held-out query rows (cached in work/)."""
    from sgengine import Index
    path = work / f"index-{n}"
    qpath = work / f"queries-{n}.npy"
    if (path / "manifest.json").exists() and qpath.exists():
        return Index.open(path), np.load(qpath)
    total = n + nq
    rows = np.lib.format.open_memmap(work / f"rows-{total}.npy", mode="w+", dtype=np.float16, shape=(total, dim))
    t0 = time.perf_counter()
    _, scene = datagen.generate(total, dim, seed=seed, out=rows)
    # Held-out queries: one row of each of nq random scenes with at least two rows.
    rng = np.random.default_rng(seed)
    starts = np.flatnonzero(np.r_[True, scene[1:] != scene[:-1]])
    sizes = np.diff(np.r_[starts, total])
    picks = rng.choice(starts[sizes >= 2], size=nq, replace=False)
    q_rows = np.sort(picks)
    keep = np.ones(total, bool)
    keep[q_rows] = False
    queries = np.asarray(rows[q_rows], np.float32)
    print(f"generated {total:,} x {dim} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    idx = Index.create(path, dim=dim, bundle_fingerprint=bundle.fingerprint, dtype="float16")
    ids = np.flatnonzero(keep)
    for a in range(0, len(ids), 1 << 17):
        part = ids[a:a + (1 << 17)]
        idx.add(np.asarray(rows[part], np.float32), [f"r{i}" for i in part])
    np.save(qpath, queries)
    del rows
    os.remove(work / f"rows-{total}.npy")
    return Index.open(path), queries


def _fresh(work: Path, n: int, nq: int, dim: int, seed: int, count: int) -> np.ndarray:
    """`count` new views of random indexed scenes of _index's rows (cached in work/)."""
    path = work / f"queries-fresh{count}-{n}.npy"
    if path.exists():
        return np.load(path)
    total = n + nq
    _, _, _, scene = datagen._model(total, dim, datagen.DEFAULT, seed)
    rng = np.random.default_rng(seed + 1)
    scenes = np.sort(rng.choice(np.unique(scene), size=count, replace=False))
    q = datagen.fresh_views(total, dim, scenes, seed=seed, view_seed=1)
    np.save(path, q)
    return q


def _run(engine, queries) -> tuple[list[list[str]], dict[str, float], str]:
    ids, totals, first = [], [], []
    engine.search(queries[0], k=K_TOP, M=M, K=K, beta=BETA)  # warm-up
    stage = "exact"
    for q in queries:
        t0 = time.perf_counter()
        r = engine.search(q, k=K_TOP, M=M, K=K, beta=BETA)
        totals.append((time.perf_counter() - t0) * 1e3)
        t = r.timings
        first.append(t.get("search", 0.0) + t.get("ann", 0.0) + t.get("rescore", 0.0))
        ids.append(r.ids[0])
        stage = r.first_stage
    return ids, {"total": statistics.median(totals), "first": statistics.median(first)}, stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--budget", default="4GiB", help="memory budget for --factory auto")
    p.add_argument("--factory", default="auto")
    p.add_argument("--sweep", default="", help="comma-separated values of the ANN's search parameter (nprobe or "
                   "efSearch) to measure besides the tuned one")
    p.add_argument("--work", default=os.path.expanduser("~/.cache/sgengine/bench_ann"))
    p.add_argument("--out")
    p.add_argument("--json", help="also write the table as JSON (bench/scale_table.py reads it)")
    p.add_argument("--probe", default="auto", help="the ANN's probe: auto, off or a FAISS factory (an existing ANN "
                   "without one gets it by ann.set_probe, no main rebuild)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing passes over the held-out queries "
                   "(0 skips)")
    p.add_argument("--fresh", type=int, default=0, help="also measure N fresh-view queries (new views of indexed "
                   "scenes)")
    a = p.parse_args(argv)
    import torch
    from sgengine import Engine
    from sgengine.bundle import Bundle
    from sgengine.search import ann as ann_stage

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.load(_bundle(work))
    rss0 = _rss_mb()
    index, queries = _index(work, bundle, a.rows, a.queries, a.dim, seed=1)
    rss_open = _rss_mb()
    lines = [f"== first stage at {len(index):,} rows x {index.dim} ({index.dtype}), {len(queries)} held-out queries, "
             f"k={K_TOP}, rerank M={M} K={K} beta={BETA}, one query per call"]
    t0 = time.perf_counter()
    if index.ann is None or index.ann_state() != "fresh" or index.ann_meta().get("requested") != a.factory:
        rep = ann_stage.build(index, a.factory, memory_budget=a.budget, M=M, progress=True, probe=a.probe)
        lines.append(rep.summary())
    build_s = time.perf_counter() - t0
    have = (index.ann_meta().get("probe") or {}).get("factory")
    if (a.probe == "off" and have) or (a.probe not in ("auto", "off") and have != a.probe) or \
            (a.probe == "auto" and not have):
        rep = ann_stage.set_probe(index, a.probe, progress=True)
        lines.append("probe set on the existing ANN (main index kept): " + rep.summary().split("\n")[-1].strip())
    meta = index.ann_meta()
    lines.append(f"ANN {meta['factory']}: {index.ann['bytes'] / len(index):,.0f} B/row; build (train + add + tune) "
                 f"{meta.get('build_seconds', build_s):.1f} s")
    pr = meta.get("probe")
    if pr:
        lines.append(f"probe {pr['factory']}: {pr['bytes'] / len(index):,.1f} B/row, build {pr['build_seconds']:.1f} s, "
                     f"its top {pr['candidates']} join the candidates")
    sets = [("held-out", queries)]
    if a.fresh:
        sets.append(("fresh views", _fresh(work, a.rows, a.queries, a.dim, 1, a.fresh)))

    exact = Engine.load(bundle, index=index, ann="off")
    exact_runs = {name: _run(exact, qs) for name, qs in sets}
    rss_exact = _rss_mb()
    table = [(f"exact ({exact.describe()['search_impl']}) [{name}]", 1.0, 1.0, exact_runs[name][1])
             for name, _ in sets]
    del exact  # one engine at a time: each holds its own buffers
    tuned = {k: v for k, v in (meta.get("params") or {}).items() if k != "probe"}
    key = next(iter(tuned), "nprobe")  # nprobe for IVF, efSearch for HNSW
    sweeps = [tuned] + [{key: int(v)} for v in a.sweep.split(",") if v and {key: int(v)} != tuned]
    # Every setting, with and without the probe: (label, engine ann_params, the Ann's params).
    settings = []
    for params in sweeps:
        for pp in ([{}, {"probe": 0}] if pr else [{}]):
            label = (", ".join(f"{k}={v}" for k, v in params.items()) or "default") + \
                ("" if not pr else ", no probe" if pp else f", probe {pr['candidates']}")
            settings.append((label, {**params, **pp}, {**params, "probe": pr["candidates"] if not pp else 0}
                             if pr else params))
    annobj = ann_stage.Ann.load(index)
    for label, full, ann_params in settings:
        annobj.set_params(ann_params)
        eng = Engine.load(bundle, index=index, ann="require", ann_params=full or None)
        if {k: v for k, v in full.items() if k != "probe"} == tuned:
            label += " (tuned)" if meta.get("recall") else " (as built)"
        for name, qs in sets:
            rec = ann_stage.measure_recall(index, annobj, qs, M=M)
            ids, ms, stage = _run(eng, qs)
            overlap = float(np.mean([len(set(x) & set(y)) / K_TOP for x, y in zip(ids, exact_runs[name][0])]))
            table.append((f"ANN {label} [{stage}, {name}]", rec.recall, overlap, ms))
        del eng
    # Timing side by side: every setting's engine on the same query in turn, `--rounds` passes
    # over the held-out queries (the table's sequential medians drift with the machine's state).
    inter = []
    if a.rounds:
        engines = {"exact": Engine.load(bundle, index=index, ann="off")}
        for label, full, _ in settings:
            engines[label] = Engine.load(bundle, index=index, ann="require", ann_params=full or None)
        times: dict[str, list[float]] = {k: [] for k in engines}
        parts: dict[str, dict[str, list[float]]] = {k: {} for k in engines}
        for e in engines.values():
            e.search(queries[0], k=K_TOP, M=M, K=K, beta=BETA)
        for _ in range(a.rounds):
            for q in queries:
                for name, e in engines.items():
                    t0 = time.perf_counter()
                    r = e.search(q, k=K_TOP, M=M, K=K, beta=BETA)
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    for key, v in r.timings.items():
                        parts[name].setdefault(key, []).append(v)
        for name in engines:
            med = {key: statistics.median(v) for key, v in parts[name].items()}
            inter.append({"name": name, "total_ms": statistics.median(times[name]),
                          **{f"{key}_ms": v for key, v in med.items() if key != "total"}})
        del engines
    w = max(len(t[0]) for t in table) + 1
    lines.append(f"{'first stage [queries]':<{w}} {'recall@400':>10} {'top-100 overlap':>16} {'first stage ms':>15} "
                 f"{'search ms':>10}")
    for name, rec, ov, ms in table:
        lines.append(f"{name:<{w}} {rec:>10.4f} {ov:>16.4f} {ms['first']:>15.2f} {ms['total']:>10.2f}")
    lines.append("queries: " + ", ".join(f"{name} {len(qs)}" for name, qs in sets))
    if inter:
        lines.append(f"interleaved timing, {a.rounds} rounds over the {len(queries)} held-out queries (medians, ms):")
        keys = [k for k in ("search", "ann", "rescore", "gather", "rerank") if any(f"{k}_ms" in r for r in inter)]
        lines.append(f"  {'engine':<{w}} {'total':>8} " + " ".join(f"{k:>8}" for k in keys))
        for r in inter:
            lines.append(f"  {r['name']:<{w}} {r['total_ms']:>8.2f} "
                         + " ".join(f"{r.get(k + '_ms', float('nan')):>8.2f}" for k in keys))
    lines.append(f"RSS: {rss0:.0f} MB before, {rss_open:.0f} MB after opening the index, {rss_exact:.0f} MB after "
                 f"exact searches (rows memory-mapped)")
    lines.append(f"machine: {platform.processor() or platform.machine()} ({os.cpu_count()} cores, torch "
                 f"{torch.__version__}, {torch.get_num_threads()} threads); load average before/after: "
                 f"{os.getloadavg()}")
    rss_end = _rss_mb()
    lines.append(f"RSS at the end: {rss_end:.0f} MB (the engines and the measurement share one loaded ANN)")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    if a.json:
        import json
        Path(a.json).write_text(json.dumps({
            "rows": len(index), "dim": index.dim, "dtype": index.dtype, "queries": len(queries),
            "k": K_TOP, "M": M, "K": K, "beta": BETA, "factory": meta["factory"], "probe": pr,
            "query_sets": {name: len(qs) for name, qs in sets},
            "bytes_per_row": index.ann["bytes"] / len(index), "build_seconds": meta.get("build_seconds", build_s),
            "results": [{"name": n, "recall": r, "overlap": o, "first_ms": ms["first"], "total_ms": ms["total"]}
                        for n, r, o, ms in table],
            "interleaved": inter, "rounds": a.rounds,
            "rss_mb": {"before": rss0, "open": rss_open, "exact": rss_exact, "end": rss_end},
            "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, torch {torch.__version__})",
            "loadavg_end": os.getloadavg()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
