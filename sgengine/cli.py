"""The `sgengine` command: export, index build/info/verify/ann, search, describe, demo, eval.

Every subcommand reports bad input, a damaged index and a path the OS refuses the same way: one
line on stderr naming it, exit status 2 (`main`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ._io import os_error_text
from .errors import SgengineError


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime, torch or tensorrt (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores of this process)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="backbone precision: fp32 (fidelity mode, default) or opt-in fp16/bf16 (tensorrt, torch)")


def _cmd_index_build(a) -> int:
    dtype = "float16" if a.float16 else "float32"
    if a.ray is not None:
        from .indexing_ray import build_index_ray
        rep = build_index_ray(a.bundle, a.folder, a.output, address=a.ray, workers=a.workers, device=a.device,
                              backend=a.backend, precision=a.precision, threads=a.threads, dtype=dtype,
                              commit_every=a.commit_every, progress=not a.quiet)
    elif a.workers is not None:
        from .errors import InputError
        raise InputError("--workers sets the size of the Ray actor pool: use it with --ray [ADDRESS]")
    else:
        from .engine import Engine
        from .indexing import build_index
        engine = Engine.load(a.bundle, device=a.device, backend=a.backend, threads=a.threads,
                             precision=a.precision)
        rep = build_index(engine, a.folder, a.output, dtype=dtype, commit_every=a.commit_every,
                          progress=not a.quiet)
    print(f"indexed {rep.added} new image(s), skipped {rep.skipped} already in {a.output}, "
          f"{len(rep.failed)} unreadable, of {rep.total} found")
    if rep.ignored:
        print(f"passed over {sum(rep.ignored.values())} file(s) of types this Pillow does not decode: "
              + ", ".join(f"{suffix or '(no suffix)'} {n}" for suffix, n in rep.ignored.items()))
    if rep.notes:
        print(f"{len(rep.notes)} image(s) adjusted (capped or upscaled, see docs): "
              + ", ".join(sorted({rel for rel, _ in rep.notes})[:10]) + (" ..." if len(rep.notes) > 10 else ""))
    if rep.failed:
        print("unreadable files (not indexed):")
        for rel, why in rep.failed:
            print(f"  {rel}: {why}")
    if rep.unreadable_dirs:
        print("unreadable folders (not searched for images):")
        for folder, why in rep.unreadable_dirs:
            print(f"  {folder}: {why}")
    return 0


def _cmd_index_info(a) -> int:
    from .errors import IndexError_
    from .index import Index
    from .search import ann
    idx = Index.open(a.index)
    problems = idx.problems()
    try:
        ann_info = ann.info(idx)
    except SgengineError:  # problems() names what is wrong with it
        ann_info = {"state": "damaged (see problems)"}
    info = {"path": str(idx.path), "count": len(idx), "dim": idx.dim, "dtype": idx.dtype,
            "bundle_fingerprint": idx.bundle_fingerprint, "ann": ann_info, "problems": problems}
    print(json.dumps(info, indent=2))
    if problems:
        raise IndexError_(f"index {idx.path}: " + "; ".join(problems)
                          + f" (sgengine index verify {idx.path} checks every byte)")
    return 0


def _cmd_index_verify(a) -> int:
    from .index import Index
    idx = Index.open(a.index)
    rep = idx.verify()
    print(f"index {idx.path}: OK: {rep['rows']:,} rows, {rep['files']} files, {rep['bytes'] / 1e9:.3f} GB "
          f"hashed in {rep['seconds']:.2f} s")
    return 0


def _ann_params(a) -> dict | None:
    params = {}
    if a.nprobe is not None:
        params["nprobe"] = a.nprobe
    if a.ef_search is not None:
        params["efSearch"] = a.ef_search
    if getattr(a, "ann_probe", None) is not None:
        params["probe"] = a.ann_probe
    return params or None


def _cmd_index_ann(a) -> int:
    from .errors import InputError
    from .index import Index
    from .search import ann
    if sum(map(bool, (a.drop, a.update, a.set_probe))) > 1:
        raise InputError("--drop, --update and --set-probe exclude each other")
    idx = Index.open(a.index)
    if a.drop:
        print(f"dropped the ANN of {idx.path}" if ann.drop(idx) else f"{idx.path} has no ANN: nothing to drop")
        return 0
    if a.update:
        rep = ann.update(idx, progress=not a.quiet)
        r = rep.record
        print(f"ANN {r['factory']} of {idx.path} is fresh: added {rep.added:,} row(s), now covers {r['count']:,}"
              + (f" ({r['file']}, generation {r['generation']})" if rep.added else ""))
        return 0
    log = (lambda msg: None) if a.quiet else (lambda msg: print(msg, file=sys.stderr))
    if a.set_probe:
        rep = ann.set_probe(idx, a.set_probe, candidates=a.probe_candidates, progress=not a.quiet, log=log)
        pr = rep.meta.get("probe")
        print(f"ANN {rep.record['factory']} of {idx.path}: "
              + (f"probe {pr['factory']} ({pr['bytes']:,} B), its top {pr['candidates']} join the candidates"
                 if pr else "no probe") + f" ({rep.record['file']}, generation {rep.record['generation']})")
        return 0
    rep = ann.build(idx, a.factory, memory_budget=a.memory_budget, sample=a.sample, params=_ann_params(a), M=a.M,
                    ef_construction=a.ef_construction, probe=a.probe, probe_candidates=a.probe_candidates,
                    candidates=a.candidates, target_recall=a.target_recall, recall_queries=a.recall_queries,
                    device=a.device, progress=not a.quiet, log=log)
    print(rep.summary())
    return 0


def _cmd_search(a) -> int:
    from .engine import Engine
    engine = Engine.load(a.bundle, index=a.index, device=a.device, backend=a.backend, threads=a.threads,
                         precision=a.precision, ann=a.ann, ann_params=_ann_params(a), ann_candidates=a.ann_candidates)
    queries = a.queries
    res = engine.search(queries if len(queries) > 1 else queries[0], k=a.k,
                        rerank=False if a.no_rerank else "adaptive" if a.adaptive else True,
                        M=a.M, K=a.K, beta=a.beta)
    if a.json:
        out = {"queries": [{"query": q, "results": [{"id": i, "score": float(s)} for i, s in zip(res.ids[n], res.scores[n])]}
                           for n, q in enumerate(queries)],
               "first_stage": res.first_stage,
               "timings_ms": {k_: round(v, 3) for k_, v in res.timings.items()}, "notes": res.notes}
        print(json.dumps(out, indent=2))
    else:
        text = res.table().splitlines()
        if len(queries) > 1:
            text = [f"query {queries[int(l.split()[1])]}" if l.startswith("query ") else l for l in text]
        else:
            print(f"query {queries[0]}")
        print("\n".join(text))
        print(f"first stage: {res.first_stage}; timings (ms): "
              + ", ".join(f"{k_} {v:.1f}" for k_, v in res.timings.items()))
        for n in res.notes:
            print(f"note: {n}")
    return 0


def _cmd_describe(a) -> int:
    from .engine import Engine
    engine = Engine.load(a.bundle, index=a.index, device=a.device, backend=a.backend, threads=a.threads,
                         precision=a.precision)
    print(json.dumps(engine.describe(), indent=2, default=str))
    return 0


def _cmd_demo(a) -> int:
    from .demo import run_demo
    return run_demo(workdir=Path(a.workdir), fresh=a.fresh, queries_to_show=a.show)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgengine", description="SuperGlobal image retrieval engine")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("export", help="export a checkpoint (or the built-in default) to a bundle; "
                   "same as python -m sgengine.export", add_help=False)

    ix = sub.add_parser("index", help="build or inspect an index").add_subparsers(dest="index_command", required=True)
    b = ix.add_parser("build", help="embed every image under a folder into an index (resumable)")
    b.add_argument("bundle")
    b.add_argument("folder")
    b.add_argument("-o", "--output", required=True, help="index directory (created, or appended to)")
    b.add_argument("--float16", action="store_true", help="store descriptors as float16 (half the disk and memory)")
    b.add_argument("--commit-every", type=int, default=64, help="images per committed segment (default 64)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="embed on a Ray cluster (pip install 'sgengine[ray]'): a new local one, or the one at "
                   "ADDRESS ('auto', HOST:PORT, ray://HOST:PORT); every node must see BUNDLE and FOLDER at the "
                   "same paths. --threads is then the CPUs (and backend threads) of each worker")
    b.add_argument("--workers", type=int, default=None,
                   help="Ray workers, one engine each (default: the cluster's CPUs // threads, or its GPUs "
                   "with --device cuda, one GPU per worker)")
    _add_engine_args(b)
    b.set_defaults(func=_cmd_index_build)
    info = ix.add_parser("info", help="print an index's manifest summary; exit status 2 when a cheap look finds "
                         "a problem")
    info.add_argument("index")
    info.set_defaults(func=_cmd_index_info)
    ver = ix.add_parser("verify", help="check every file of an index against its manifest (sha256 of every byte, "
                        "ids unique): exit status 2 naming each problem")
    ver.add_argument("index")
    ver.set_defaults(func=_cmd_index_verify)
    an = ix.add_parser("ann", help="build (or --update, --drop) the FAISS first stage of an index, "
                       "for millions of rows")
    an.add_argument("index")
    an.add_argument("--factory", default="auto",
                    help="'auto' (chosen from N, D and --memory-budget, as autofaiss does) or any FAISS factory "
                    "string: 'HNSW32', 'IVF4096,SQ8', 'OPQ64_256,IVF16384_HNSW32,PQ64x8', 'Flat' ... (default auto)")
    an.add_argument("--memory-budget", default="4GiB", help="memory the ANN may use, for --factory auto (default 4GiB)")
    an.add_argument("--nprobe", type=int, default=None,
                    help="IVF lists searched per query (default: the smallest reaching --target-recall)")
    an.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (default: tuned like --nprobe)")
    an.add_argument("--sample", type=int, default=None, help="training rows (default 64 per IVF list, >= 65,536)")
    an.add_argument("--ef-construction", type=int, default=None,
                    help="HNSW build-time search width (default FAISS's 40; larger links tight clusters better, "
                    "build time grows with it)")
    an.add_argument("--M", type=int, default=400, help="the rerank's M that recall@M is tuned for (default 400)")
    an.add_argument("--candidates", type=int, default=None, help="M', candidates per query (default 2 x M)")
    an.add_argument("--target-recall", type=float, default=0.95, help="recall@M the tuning aims for (default 0.95)")
    an.add_argument("--recall-queries", type=int, default=200,
                    help="stored rows used as queries to tune and report recall@M (default 200; 0 skips)")
    an.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="train and add on the CPU, or on the GPU with faiss-gpu (default cpu)")
    an.add_argument("--probe", default="auto",
                    help="the probe, a small second index in a PCA-whitened space whose top candidates join the "
                    "main index's (finds views of one scene that graph and IVF routing miss): auto (on for an "
                    "approximate main index, D >= 128, N >= 1,000), off, or a FAISS factory (default auto)")
    an.add_argument("--probe-candidates", type=int, default=None,
                    help="how many of the probe's candidates join by default (default 32)")
    an.add_argument("--set-probe", default=None, metavar="auto|off|FACTORY",
                    help="add, replace or remove the probe of the existing ANN, keeping its main index")
    an.add_argument("--update", action="store_true",
                    help="add the rows appended since the ANN was built (no retraining), making it fresh again")
    an.add_argument("--drop", action="store_true", help="remove the index's ANN")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    an.set_defaults(func=_cmd_index_ann)

    s = sub.add_parser("search", help="search an index with one or more query images")
    s.add_argument("bundle")
    s.add_argument("index")
    s.add_argument("queries", nargs="+", help="query image file(s)")
    s.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    rr = s.add_mutually_exclusive_group()
    rr.add_argument("--no-rerank", action="store_true", help="first-stage (global) ranking only")
    rr.add_argument("--adaptive", action="store_true",
                    help="adaptive rerank: only neighbours likely to match take part (docs/adaptive_rerank.md); "
                    "for small groups of matching images")
    s.add_argument("--M", type=int, default=None, help="candidates reranked (default: bundle's, 400)")
    s.add_argument("--K", type=int, default=None, help="neighbours per refined descriptor (default 9)")
    s.add_argument("--beta", type=float, default=None, help="neighbour weight (default 0.15)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--ann", default="auto", choices=("auto", "require", "off"),
                   help="the index's FAISS first stage: auto (when it covers every row; else the exact scan, with a "
                   "note), require (an error unless it does), off (default auto)")
    s.add_argument("--nprobe", type=int, default=None, help="ANN: IVF lists searched (default: tuned at build)")
    s.add_argument("--ef-search", type=int, default=None, help="ANN: HNSW efSearch (default: tuned at build)")
    s.add_argument("--ann-candidates", type=int, default=None,
                   help="ANN: M' candidates re-scored (default 2 x max(k, M))")
    s.add_argument("--ann-probe", type=int, default=None,
                   help="ANN: the probe's candidates that join (default: as built, 32; 0 turns it off)")
    _add_engine_args(s)
    s.set_defaults(func=_cmd_search)

    d = sub.add_parser("describe", help="show what an engine would run (model, backend, kernels)")
    d.add_argument("bundle")
    d.add_argument("--index", default=None)
    _add_engine_args(d)
    d.set_defaults(func=_cmd_describe)

    demo = sub.add_parser("demo", help="export the default model, index the bundled photos and search them")
    demo.add_argument("--workdir", default="sgengine-demo", help="where the demo keeps its bundle, photos, index "
                      "and report (default ./sgengine-demo; reused by later runs)")
    demo.add_argument("--fresh", action="store_true", help="rebuild everything instead of reusing")
    demo.add_argument("--show", type=int, default=4, help="queries whose top results are printed (default 4)")
    demo.set_defaults(func=_cmd_demo)

    from .service.cli import add_serve_parser
    add_serve_parser(sub)

    sub.add_parser("eval", help="revisited Oxford/Paris evaluation (sgengine eval -h)", add_help=False)
    return p


def _error_line(prog: str, e: BaseException) -> str:
    """The one line the CLI prints for an error it turns into exit status 2."""
    msg = os_error_text(e) if isinstance(e, OSError) else str(e)
    return f"{prog}: error: " + " ".join(part.strip() for part in msg.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(sys.stdout, "reconfigure"):  # ids and paths are printed: an odd byte must not crash a report
        sys.stdout.reconfigure(errors="backslashreplace")
    # export and eval own their argument parsing; hand the rest of the line over untouched.
    own_parser = bool(argv) and argv[0] in ("export", "eval")
    prog = f"sgengine {argv[0]}" if own_parser else "sgengine"
    try:
        if own_parser:
            if argv[0] == "export":
                from .export import main as export_main
                return export_main(argv[1:])
            from .eval.run import main as eval_main
            return eval_main(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (| head): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (SgengineError, OSError) as e:  # bad input, or a path the OS refused: one line, status 2
        print(_error_line(prog, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed work is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
