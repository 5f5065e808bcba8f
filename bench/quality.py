"""Retrieval quality of the built-in default model on a hard multi-view set of real photos.

    python bench/quality.py                          # export the default bundle, full-size set
    python bench/quality.py --bundle BUNDLE_DIR      # an existing bundle
    python bench/quality.py --out bench/results/2026-11-27-cpu-quality.txt
    python bench/quality.py --modes --out bench/results/DIR/quality_adaptive.md   # global / faithful / adaptive

The set (sgengine.photoset.make_quality_set): every packaged photo that is not a distractor
source gives a query, one half of the photo; its positives are 12 augmented views of that half
(the demo's 8, plus a perspective warp, occlusion, blur + noise and a tight crop); the distractors
are 3 views of the other side of each query photo and 80 tiles and altered copies of photos that
are never queried. Queries and database images are embedded from JPEG files on disk through
the engine. Reported: mAP (SPEC 7 AP, sgengine.eval.metrics.compute_map, x100) and mP@1/5/10 of
global-only search and of SuperGlobal reranking (M = 400, beta = 0.15) at several K, K = 9 being
the published default. Everything is seeded; tests/test_quality.py runs the same code on a
smaller set and pins its numbers.

--modes: one table of global-only, faithful rerank and adaptive rerank (mAP and recall@1 = mP@1)
on every set of sgengine.eval.photo_groups (small and large groups, with unrelated distractors or
also with the other-side hard negatives, original / rotated / half-size queries), on synthetic
landmark-like sets (bench/datagen.py, many relevant per query), and the cost of each mode on the
CPU fast path (interleaved repeats, medians).
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


# ----------------------------------------------------------------------------- rerank modes
MODE_ROWS = (("global only", False), ("faithful", True), ("adaptive", "adaptive"))


@dataclass
class ModeRow:
    name: str
    grouping: str          # stated grouping of the set
    queries: int
    database: int
    scores: dict           # mode name -> (mAP x 100, recall@1 x 100, per-query AP x 100, per-query hit@1 x 100)
    groups: list = field(default_factory=list)  # per query: its scene (the bootstrap resamples scenes)


def _bench_on_path() -> None:
    """bench/ on sys.path, for datagen and conftest."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)


def _score(ranks: np.ndarray, gnd) -> tuple[float, float, np.ndarray, np.ndarray]:
    from sgengine.eval.metrics import compute_map
    ranks = np.asarray(ranks)
    m, aps, mpk, _ = compute_map(ranks.T, gnd, (1,))
    hit1 = np.array([100.0 if int(ranks[i, 0]) in set(np.asarray(g["ok"]).tolist()) else 0.0
                     for i, g in enumerate(gnd)])
    return m * 100, float(mpk[0]) * 100, np.asarray(aps, np.float64) * 100, hit1


def pool(runs: list[list["ModeRow"]]) -> list["ModeRow"]:
    """Rows of the same set from several seeds as one row over all their queries."""
    out = []
    for same in zip(*runs):
        scores = {}
        for mode in same[0].scores:
            aps = np.concatenate([r.scores[mode][2] for r in same])
            hit = np.concatenate([r.scores[mode][3] for r in same])
            scores[mode] = (float(aps.mean()), float(hit.mean()), aps, hit)
        out.append(ModeRow(same[0].name, same[0].grouping, sum(r.queries for r in same), same[0].database, scores,
                           [g for r in same for g in r.groups]))
    return out


BOOTSTRAP = 10_000


def paired_interval(a: np.ndarray, b: np.ndarray, groups=None, level: float = 0.9, seed: int = 0
                    ) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a - b) (the same queries for both modes), resampling
    groups of queries with replacement: scenes, whose queries from several seeds are not
    independent (`groups` None: every query its own group). How far a set of this many scenes
    pins a difference of mAP."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    keys = np.arange(len(d)) if not groups else np.unique(np.asarray(groups), return_inverse=True)[1]
    ng = int(keys.max()) + 1
    sums, counts = np.bincount(keys, d, ng), np.bincount(keys, None, ng)
    pick = np.random.default_rng(seed).integers(0, ng, size=(BOOTSTRAP, ng))
    means = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def photo_set_rows(bundle, root: Path, *, max_side: int | None = None, seed: int = 0, variants=None,
                   hard_negatives=(False, True)) -> list[ModeRow]:
    """Every grouping x query variant of sgengine.eval.photo_groups under `root`, searched through the
    engine's own index search and rerank (M = 400, K = 9, beta = 0.15) in each mode. Each file is
    embedded once."""
    from sgengine.engine import Engine
    from sgengine.eval.photo_groups import GROUPINGS, QUERY_VARIANTS, make_group_set
    from sgengine.index import Index

    variants = variants or QUERY_VARIANTS
    sets = {}
    for hard in hard_negatives:
        for g in GROUPINGS:
            for v in variants:
                sets[(hard, g, v)] = make_group_set(root, g, v, max_side=max_side, seed=seed,
                                                    region_distractors=3 if hard else 0)
    files = sorted({str(p) for qs in sets.values() for p in [*qs.queries.values(), *(p for _, p in qs.database)]})
    desc = dict(zip(files, np.asarray(Engine.load(bundle).embed(files))))
    rows = []
    with tempfile.TemporaryDirectory(prefix="sgengine-quality-") as tmp:
        for j, ((hard, g, v), qs) in enumerate(sets.items()):
            index = Index.create(Path(tmp) / f"index{j}", dim=int(bundle.dim), bundle_fingerprint=bundle.fingerprint)
            index.add(np.stack([desc[str(p)] for _, p in qs.database]), [i for i, _ in qs.database])
            engine = Engine.load(bundle, index=index)
            q = np.stack([desc[str(p)] for p in qs.queries.values()])
            gnd = qs.gnd()
            scores = {name: _score(engine.search(q, k=len(index), rerank=r, M=M, K=K_DEFAULT, beta=BETA).rows, gnd)
                      for name, r in MODE_ROWS}
            sizes = sorted({len(x["ok"]) for x in gnd})
            grouping = (f"{'2-3' if g == 'small' else sizes[-1]} views/scene, "
                        f"{qs.distractors} distractors{' incl. other-side' if hard else ''}")
            rows.append(ModeRow(f"{g}{' +hard' if hard else ''}, {v} queries", grouping, len(gnd), len(index), scores,
                                list(qs.queries)))
    return rows


def landmark_rows(views=(20.0, 40.0), n: int = 20000, dim: int = 1280, nq: int = 100, seed: int = 0) -> list[ModeRow]:
    """Synthetic landmark-like sets: bench/datagen.py rows (calibrated on the default model's
    descriptors) whose scenes have 1 + Poisson(views - 1) rows; a query is one held-out row of a
    scene with >= 10 rows, its positives the rest of the scene. Exact first stage and the CPU fast
    path of the rerank (superglobal_rerank, impl "auto")."""
    _bench_on_path()
    import torch
    from dataclasses import replace
    from datagen import DEFAULT, generate
    from sgengine.rerank import superglobal_rerank
    out = []
    for v in views:
        rows, scene = generate(n, dim, replace(DEFAULT, views=v), seed=seed)
        rng = np.random.default_rng(seed)
        sizes = np.bincount(scene)
        pick = rng.choice(np.flatnonzero(sizes[:scene.max()] >= 10), nq, replace=False)  # scenes wholly inside
        qrow = np.array([np.flatnonzero(scene == s)[0] for s in pick])
        keep = np.ones(n, bool)
        keep[qrow] = False
        X, sc, q = rows[keep], scene[keep], rows[qrow]
        gnd = [{"ok": np.flatnonzero(sc == s), "junk": []} for s in pick]
        glob = np.argsort(-(q @ X.T), axis=1, kind="stable")
        scores = {"global only": _score(glob, gnd)}
        for name, mode in (("faithful", "faithful"), ("adaptive", "adaptive")):
            ids, _ = superglobal_rerank(torch.from_numpy(q), torch.from_numpy(X), M=M, K=K_DEFAULT, beta=BETA,
                                        k=len(X), mode=mode)
            scores[name] = _score(ids.numpy(), gnd)
        npos = [len(g["ok"]) for g in gnd]
        out.append(ModeRow(f"synthetic landmark-like, views {v:g}", f"{min(npos)}-{max(npos)} relevant/query "
                           f"(median {int(np.median(npos))}), N={len(X)}, D={dim}", nq, len(X), scores,
                           [f"seed{seed}/q{i}" for i in range(nq)]))
    return out


def mode_costs(nq_list=(1, 70), Mc: int = 400, dim: int = 2048, n: int = 20000, repeats: int = 15, seed: int = 0) -> list[dict]:
    """Median seconds of the rerank on the CPU fast paths, faithful against adaptive, timed in
    alternation on the same candidates (each query's exact top M of calibrated rows)."""
    _bench_on_path()
    import statistics
    import torch
    from datagen import generate
    from sgengine.rerank import IMPLS, resolve_impl
    rows, _ = generate(n, dim, seed=seed)
    X = torch.from_numpy(rows)
    out = []
    for nq in nq_list:
        q = X[:nq].clone()
        Y = X[torch.topk(q @ X.T, Mc, dim=1).indices].contiguous()
        impls = sorted({resolve_impl("auto", "cpu", Mc), "cpu_fp32"}, key=lambda s: s != resolve_impl("auto", "cpu", Mc))
        for impl in impls:
            fn = IMPLS[impl]
            t = {False: [], True: []}
            for _ in range(2):  # warm-up
                fn(q, Y, K_DEFAULT, BETA, False), fn(q, Y, K_DEFAULT, BETA, True)
            for r in range(repeats):
                for adaptive in ((False, True) if r % 2 == 0 else (True, False)):
                    t0 = time.perf_counter()
                    fn(q, Y, K_DEFAULT, BETA, adaptive)
                    t[adaptive].append(time.perf_counter() - t0)
            f, a = statistics.median(t[False]), statistics.median(t[True])
            out.append({"impl": impl, "nq": nq, "M": Mc, "D": dim, "faithful_ms": f * 1e3, "adaptive_ms": a * 1e3,
                        "ratio": a / f, "repeats": repeats})
    return out


def modes_table(rows: list[ModeRow], synthetic: list[ModeRow], costs: list[dict]) -> str:
    head = ("| set | grouping | queries | db | global mAP | R@1 | faithful mAP | R@1 | adaptive mAP | R@1 "
            "| adaptive - global [90% interval] | adaptive - faithful [90% interval] |")
    out = [head, "|" + "---|" * 12]

    def diff(r, x: str, y: str) -> str:
        lo, hi = paired_interval(r.scores[x][2], r.scores[y][2], r.groups)
        return f"{r.scores[x][0] - r.scores[y][0]:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    for r in rows + synthetic:
        g, f, a = r.scores["global only"], r.scores["faithful"], r.scores["adaptive"]
        out.append(f"| {r.name} | {r.grouping} | {r.queries} | {r.database} | {g[0]:.2f} | {g[1]:.1f} | {f[0]:.2f} | "
                   f"{f[1]:.1f} | {a[0]:.2f} | {a[1]:.1f} | {diff(r, 'adaptive', 'global only')} | "
                   f"{diff(r, 'adaptive', 'faithful')} |")
    out += ["", "Intervals: paired percentile bootstrap (10,000 resamples) over the set's scenes (photo sets: a "
            "scene's queries from every seed go together; synthetic: every query its own): the range of mean "
            "differences that sets of this many scenes give.", "", "Targets (on the point estimates):"]
    worst = min(rows + synthetic, key=lambda r: r.scores["adaptive"][0] - r.scores["global only"][0])
    d = worst.scores["adaptive"][0] - worst.scores["global only"][0]
    out.append(f"- adaptive never below global-only by more than 0.5 mAP on any set: worst {d:+.2f} ({worst.name}) "
               f"-> {'met' if d >= -0.5 else 'NOT met'}")
    for r in rows:
        if r.name.startswith("large"):
            d = r.scores["adaptive"][0] - r.scores["faithful"][0]
            out.append(f"- adaptive >= faithful - 0.5 mAP on the larger-group set ({r.name}): {d:+.2f} -> "
                       f"{'met' if d >= -0.5 else 'NOT met'}")
    for r in synthetic:
        gain_f = r.scores["faithful"][0] - r.scores["global only"][0]
        gain_a = r.scores["adaptive"][0] - r.scores["global only"][0]
        out.append(f"- >= 90% of the faithful gain on the {r.name} set: faithful {gain_f:+.2f}, adaptive {gain_a:+.2f} "
                   f"({100 * gain_a / gain_f:.0f}%) -> {'met' if gain_a >= 0.9 * gain_f else 'NOT met'}")
    out += ["", "Cost (rerank alone, M' = 400, D = 2048, K = 9; medians of interleaved repeats):", "",
            "| impl | queries | faithful ms | adaptive ms | adaptive / faithful |", "|---|---|---|---|---|"]
    for c in costs:
        out.append(f"| {c['impl']} | {c['nq']} | {c['faithful_ms']:.2f} | {c['adaptive_ms']:.2f} | {c['ratio']:.3f} |")
    fast = [c for c in costs if c["impl"] == costs[0]["impl"]]
    worst = max(c["ratio"] for c in fast)
    out.append(f"\n- cost within 10% of the faithful rerank on the CPU fast path ({costs[0]['impl']}): worst ratio "
               f"{worst:.3f} -> {'met' if worst <= 1.10 else 'NOT met'}")
    return "\n".join(out)


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
    p.add_argument("--seeds", default=None, help="--modes: comma-separated seeds whose sets are pooled (e.g. 0,1,2)")
    p.add_argument("--K", type=int, nargs="+", default=list(DEFAULT_KS), help=f"rerank K values (default {DEFAULT_KS})")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    p.add_argument("--modes", action="store_true",
                   help="the global / faithful / adaptive table on the photo-group and synthetic sets, with costs")
    p.add_argument("--repeats", type=int, default=15, help="--modes: timed repeats per mode (default 15)")
    args = p.parse_args(argv)
    if args.modes:
        return main_modes(args)

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
    return _emit(text, args.out)


def _emit(text: str, out: Path | None) -> int:
    """Print the table, and write it to `out` when given."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"written: {out}")
    return 0


def main_modes(args) -> int:
    _bench_on_path()
    from conftest import machine_name  # bench/conftest.py
    from sgengine.bundle import Bundle

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sgengine-quality-") as tmp:
        bundle = Bundle.load(args.bundle) if args.bundle else export_default(Path(tmp) / "bundle",
                                                                              progress=lambda s: None)
        base = args.workdir or Path(tmp) / "photos"
        seeds = [int(x) for x in str(args.seeds).split(",")] if args.seeds else [args.seed]
        # Seed 0 keeps the workdir's own name (earlier runs' files are reused); seed n uses WORKDIR_sn.
        roots = ({sd: base if sd == 0 else base.with_name(f"{base.name}_s{sd}") for sd in seeds} if args.seeds
                 else {args.seed: base})
        rows = pool([photo_set_rows(bundle, roots[sd], max_side=args.max_side, seed=sd) for sd in seeds])
        model = f"{bundle.manifest['model'].get('name')} (bundle {bundle.fingerprint[:16]})"
    synthetic = pool([landmark_rows(seed=sd) for sd in seeds])
    costs = mode_costs(repeats=args.repeats, seed=args.seed)
    text = "\n".join([
        "# Rerank modes: global-only, faithful (SPEC 6) and adaptive (docs/adaptive_rerank.md)", "",
        f"`python bench/quality.py --modes` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); photo sets: "
        f"model {model}, M = {M}, K = {K_DEFAULT}, beta = {BETA}, the engine's own index search and rerank; "
        f"mAP and R@1 (= mP@1) x 100 (SPEC 7 AP, no junk); max_side {args.max_side}, seeds {seeds} (each seed: "
        "new augmented views and new positive draws of the same scenes; its queries pooled).", "",
        modes_table(rows, synthetic, costs), "",
        f"machine: {machine_name()}; {versions()}; total {time.perf_counter() - t_all:.0f} s"])
    return _emit(text, args.out)


if __name__ == "__main__":
    sys.exit(main())
