"""Retrieval quality of the built-in default model on a hard multi-view set of real photos.

    python bench/quality.py                          # export the default bundle, full-size set
    python bench/quality.py --bundle BUNDLE_DIR      # an existing bundle
    python bench/quality.py --out bench/results/2026-11-27-cpu-quality.txt

The set (sgengine.photoset.make_quality_set): every packaged photo that is not a distractor
source gives a query, one half of the photo; its positives are 12 augmented views of that half
(the demo's 8, plus a perspective warp, occlusion, blur + noise and a tight crop); the distractors
are 3 views of the other side of each query photo and 80 tiles and altered copies of photos that
are never queried. Queries and database images are embedded from JPEG files on disk through
the engine. Reported: mAP (SPEC 7 AP, sgengine.eval.metrics.compute_map, x100) and mP@1/5/10 of
global-only search and of SuperGlobal reranking (M = 400, beta = 0.15) at several K, K = 9 being
the published default. Everything is seeded; tests/test_quality.py runs the same code on a
smaller set and pins its numbers.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_KS = (1, 3, 5, 9, 15)
M, BETA, K_DEFAULT = 400, 0.15, 9
KAPPAS = (1, 5, 10)


@dataclass
class QualityResult:
    queries: int
    database: int
    views: int
    distractors: int
    global_map: float                     # mAP x 100
    reranked_map: dict[int, float]        # K -> mAP x 100
    global_mpk: list[float]               # mP@KAPPAS x 100
    reranked_mpk: dict[int, list[float]]
    seconds: dict[str, float] = field(default_factory=dict)
    describe: dict = field(default_factory=dict)

    def table(self, machine: str | None = None) -> str:
        d = self.describe
        out = [f"quality: {d.get('model')} (bundle {d.get('bundle_fingerprint')}, backend "
               f"{d.get('backend', {}).get('name')}), {self.queries} queries, {self.database} database images "
               f"({self.queries * self.views} views, {self.views} per photo; {self.distractors} distractors)",
               f"{'search':<30} {'mAP':>7} " + " ".join(f"{'mP@' + str(k):>7}" for k in KAPPAS),
               f"{'global only':<30} {self.global_map:7.2f} " + " ".join(f"{v:7.2f}" for v in self.global_mpk)]
        for K, m in self.reranked_map.items():
            label = f"reranked M={M} K={K} beta={BETA}" + (" *" if K == K_DEFAULT else "")
            out.append(f"{label:<30} {m:7.2f} " + " ".join(f"{v:7.2f}" for v in self.reranked_mpk[K]))
        out.append("* the published default K. mAP, mP@k x 100 (SPEC 7 AP; views of the query photo are its "
                   "positives, nothing is junk)")
        out.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        if machine:
            out.append(f"machine: {machine}")
        return "\n".join(out)


def run_quality(bundle, qset, *, Ks=DEFAULT_KS, backend: str = "auto") -> QualityResult:
    """Embed `qset` (a sgengine.photoset.QualitySet) with an engine on `bundle`, search it, score it.

    The database goes into a float32 index in a temporary directory and the engine searches it
    itself, so the numbers belong to the engine's own search and rerank paths.
    """
    from sgengine.engine import Engine
    from sgengine.eval.metrics import compute_map
    from sgengine.index import Index

    secs: dict[str, float] = {}
    ids = [id_ for id_, _ in qset.database]
    names = list(qset.queries)
    gnd = qset.gnd()
    with tempfile.TemporaryDirectory(prefix="sgengine-quality-") as tmp:
        index = Index.create(Path(tmp) / "index", dim=int(bundle.dim), bundle_fingerprint=bundle.fingerprint)
        engine = Engine.load(bundle, index=index, backend=backend)
        t0 = time.perf_counter()
        index.add(engine.embed([p for _, p in qset.database]), ids)
        q = engine.embed([qset.queries[n] for n in names])
        secs["embed"] = time.perf_counter() - t0
        n = len(index)
        t0 = time.perf_counter()
        res = engine.search(q, k=n, rerank=False)
        g_map, _, g_mpk, _ = compute_map(np.asarray(res.rows).T, gnd, KAPPAS)
        r_map, r_mpk = {}, {}
        for K in Ks:
            res = engine.search(q, k=n, rerank=True, M=M, K=K, beta=BETA)
            m, _, mpk, _ = compute_map(np.asarray(res.rows).T, gnd, KAPPAS)
            r_map[int(K)], r_mpk[int(K)] = m * 100, [float(v) * 100 for v in mpk]
        secs["search"] = time.perf_counter() - t0
        desc = engine.describe()
    return QualityResult(queries=len(names), database=len(ids), views=len(qset.views), distractors=qset.distractors,
                         global_map=g_map * 100, reranked_map=r_map, global_mpk=[float(v) * 100 for v in g_mpk],
                         reranked_mpk=r_mpk, seconds=secs, describe=desc)


def export_default(out_dir: Path, *, check: bool = True, progress=print):
    """The built-in default model (EfficientNet-Lite0, ImageNet weights) as a bundle in out_dir."""
    from sgengine.export import export_bundle
    from sgengine.model import default_model
    # Shrunk parity photos: the parity check is export's business, not this benchmark's.
    return export_bundle(default_model(), out_dir, check=check, parity_max_side=256, progress=progress)


def versions() -> str:
    import onnxruntime
    import PIL
    import torch
    return f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, Pillow {PIL.__version__}, numpy {np.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="an exported bundle (default: export the built-in default model)")
    p.add_argument("--workdir", type=Path, help="where the photo set is written (default: a temporary directory)")
    p.add_argument("--views", type=int, default=12, help="views per query photo (at most 12; default 12)")
    p.add_argument("--region-distractors", type=int, default=3,
                   help="distractors per query photo, from its never-queried other side (default 3)")
    p.add_argument("--distractors", type=int, default=80, help="distractor tiles of never-queried photos (default 80)")
    p.add_argument("--max-side", type=int, default=None, help="shrink the photos to this long side first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--K", type=int, nargs="+", default=list(DEFAULT_KS), help=f"rerank K values (default {DEFAULT_KS})")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import machine_name  # bench/conftest.py
    from sgengine.bundle import Bundle
    from sgengine.photoset import QUALITY_VIEWS, make_quality_set

    if not 1 <= args.views <= len(QUALITY_VIEWS):
        p.error(f"--views must be 1..{len(QUALITY_VIEWS)}")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sgengine-quality-") as tmp:
        t0 = time.perf_counter()
        bundle = Bundle.load(args.bundle) if args.bundle else export_default(Path(tmp) / "bundle",
                                                                              progress=lambda s: None)
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        root = args.workdir or Path(tmp) / "photos"
        qset = make_quality_set(root, views=QUALITY_VIEWS[:args.views], distractors=args.distractors,
                                region_distractors=args.region_distractors, max_side=args.max_side, seed=args.seed)
        t_set = time.perf_counter() - t0
        result = run_quality(bundle, qset, Ks=tuple(args.K))
    result.seconds = {"export": t_export, "photo set": t_set, **result.seconds,
                      "total": time.perf_counter() - t_all}
    text = result.table(machine_name()) + f"\nversions: {versions()}\nsettings: views {args.views}, distractors " \
        f"{args.region_distractors} per photo + {args.distractors}, max_side {args.max_side}, seed {args.seed}\ndate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
