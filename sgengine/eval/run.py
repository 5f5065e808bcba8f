"""`sgengine eval`: reproduce the revisited Oxford/Paris tables with a bundle (or saved descriptors).

    sgengine eval roxford5k --data DATA --bundle BUNDLE            global-only and reranked rows
    sgengine eval rparis6k --data DATA --bundle BUNDLE --plus1m FEATURES
    sgengine eval roxford5k --data DATA --features feats.npz       no model: saved descriptors

Descriptors are cached per image under --cache, keyed by the bundle fingerprint, the dataset and
the image (queries also by their box), in small parts written atomically: an interrupted run
resumes where it stopped, and a second run with the same bundle extracts nothing.
The ranking evaluated is the full first-stage order over the database (mAP needs every
positive's position, not only the top M); the reranked run replaces its top M' by the
SuperGlobal order and keeps the first-stage order below (SPEC 6.8).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .._io import write_bytes_atomic
from ..errors import InputError, SgengineError
from .datasets import DatasetError, RevisitedDataset, load_distractors, load_revisited
from .metrics import PROTOCOLS, compute_map_protocols

__all__ = ["main", "build_parser", "DescriptorCache", "RowBlocks", "extract_descriptors", "full_ranking", "rerank_ranking",
           "evaluate", "format_table"]

SPEC_RERANK_DEFAULTS = {"M": 400, "K": 9, "beta": 0.15}
KAPPAS = (1, 5, 10)
_CVNET_HINT = ("a bundle is exported from CVNet weights (published in the CVNet authors' repository, "
               "https://github.com/sungonce/CVNet) with `sgengine export CHECKPOINT -o BUNDLE`")


def default_cache_dir() -> Path:
    env = os.environ.get("SGENGINE_CACHE")
    if env:
        return Path(env).expanduser() / "eval"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sgengine" / "eval"


# ----------------------------------------------------------------------------- descriptor cache
class DescriptorCache:
    """Per-image descriptors under ROOT/<bundle fingerprint>/<dataset>/<variant>/part-*.npz.

    Each part holds `keys` and `desc` for a few images and is written to a temporary name, then
    renamed: a crash leaves either a whole part or none, so everything committed is reused.
    `variant` carries the engine settings that change descriptors beyond the bundle (precision,
    size cap).
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, dataset: str, variant: str = "fp32") -> None:
        self.dir = Path(root).expanduser() / fingerprint / dataset / variant
        self._seq = 0

    def load(self, dim: int | None = None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if not self.dir.is_dir():
            return out
        for part in sorted(self.dir.glob("part-*.npz")):
            try:
                with np.load(part, allow_pickle=False) as z:
                    keys, desc = [str(k) for k in z["keys"]], np.asarray(z["desc"], np.float32)
            except Exception as e:  # an unreadable part is re-extracted, not fatal
                print(f"cache: ignoring unreadable {part} ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            if desc.ndim != 2 or len(keys) != desc.shape[0] or (dim is not None and desc.shape[1] != dim):
                print(f"cache: ignoring {part}: shape {desc.shape} does not match", file=sys.stderr)
                continue
            out.update(zip(keys, desc))
        return out

    def write(self, keys: Sequence[str], desc: np.ndarray) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        final = self.dir / f"part-{time.time_ns():020d}-{os.getpid()}-{self._seq:05d}.npz"
        buf = io.BytesIO()  # a part is a few images' descriptors: small enough to build in memory
        np.savez(buf, keys=np.asarray(list(keys), dtype=str), desc=np.asarray(desc, np.float32))
        write_bytes_atomic(final, buf.getvalue())
        return final


def _query_key(ds: RevisitedDataset, i: int) -> str:
    # The box is part of the key: a corrected ground-truth box must not reuse an old crop's descriptor.
    return f"query/{ds.qimlist[i]}@" + ",".join(f"{v:g}" for v in ds.query_box(i))


def extract_descriptors(engine, ds: RevisitedDataset, *, cache: DescriptorCache | None, batch_size: int = 8,
                        part_size: int = 32, progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """(queries [nq, D], database [N, D], stats) with the engine; cached images are not recomputed."""
    dim = int(engine.dim)
    have = cache.load(dim) if cache is not None else {}
    stats = {"extracted": 0, "cached": 0, "seconds": 0.0}

    def run(split: str, keys: list[str], make_input: Callable[[int], object], color_order: str) -> np.ndarray:
        todo = [i for i, k in enumerate(keys) if k not in have]
        stats["cached"] += len(keys) - len(todo)
        bar = None
        if progress and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc=f"{ds.name} {split}", unit="img",
                       file=sys.stderr, dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            for s in range(0, len(todo), part_size):
                chunk = todo[s:s + part_size]
                d = engine.embed([make_input(i) for i in chunk], color_order=color_order, batch_size=batch_size)
                d = np.asarray(d, np.float32).reshape(len(chunk), dim)
                if cache is not None:
                    cache.write([keys[i] for i in chunk], d)
                have.update(zip((keys[i] for i in chunk), d))
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        stats["seconds"] += time.perf_counter() - t0
        stats["extracted"] += len(todo)
        return np.stack([have[k] for k in keys]) if keys else np.empty((0, dim), np.float32)

    qkeys = [_query_key(ds, i) for i in range(len(ds.qimlist))]
    # Crops are BGR arrays (SPEC 1.1-1.2 decode then crop); database images go in as paths.
    Q = run("queries", qkeys, ds.load_query, "BGR")
    dpaths = ds.db_paths()
    X = run("database", [f"db/{n}" for n in ds.imlist], lambda i: dpaths[i], "RGB")
    return Q, X, stats


# ----------------------------------------------------------------------------- search and rerank
class RowBlocks:
    """Rows of several [n_i, D] arrays seen as one [sum n_i, D] database, without concatenating.

    The +1M database is the dataset's few thousand rows plus a million memory-mapped ones
    (8 GB in float32): a copy would double that, so chunks and gathers read the blocks in place.
    """

    def __init__(self, *blocks: np.ndarray) -> None:
        dims = {b.shape[1] for b in blocks}
        if len(dims) != 1:
            raise InputError(f"database blocks have different dimensions {sorted(dims)}")
        self.blocks = blocks
        self.offsets = np.cumsum([0] + [b.shape[0] for b in blocks])
        self.shape = (int(self.offsets[-1]), dims.pop())

    def __len__(self) -> int:
        return self.shape[0]

    def chunks(self, rows: int):
        """(start, float32 array) pieces covering all rows in order, each at most `rows` long."""
        for off, b in zip(self.offsets, self.blocks):
            for s in range(0, b.shape[0], rows):
                yield int(off) + s, np.ascontiguousarray(b[s:s + rows], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        r = np.asarray(rows).reshape(-1)
        out = np.empty((r.size, self.shape[1]), np.float32)
        which = np.searchsorted(self.offsets, r, side="right") - 1
        for bi, b in enumerate(self.blocks):
            m = which == bi
            if m.any():
                # np.take on a memmap reads only the rows asked for.
                out[m] = np.take(b, r[m] - self.offsets[bi], axis=0)
        return out.reshape(np.shape(rows) + (self.shape[1],))


def _as_blocks(X) -> RowBlocks:
    return X if isinstance(X, RowBlocks) else RowBlocks(np.asarray(X) if not isinstance(X, np.ndarray) else X)


def full_ranking(Q: np.ndarray, X, *, device: str = "cpu", chunk_rows: int = 1 << 16) -> np.ndarray:
    """First stage (SPEC 5) as the full order: ranks [N, nq] of database rows by descending Q X^T.

    X: [N, D] array (a float16/float32 memmap is fine) or RowBlocks; it is read chunk by chunk
    and upcast, so only the [N, nq] score matrix is held. Ties keep the lower row first.
    """
    import torch
    Xb = _as_blocks(X)
    n = len(Xb)
    q = torch.from_numpy(np.ascontiguousarray(Q, np.float32)).to(device)
    S = torch.empty((n, q.shape[0]), dtype=torch.float32, device=device)
    with torch.no_grad(), warnings.catch_warnings():
        # A chunk of a read-only memmap is only read here; torch warns because it cannot tell.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        for s, xc in Xb.chunks(chunk_rows):
            S[s:s + xc.shape[0]] = torch.from_numpy(xc).to(device) @ q.T
        ranks = torch.argsort(S, dim=0, descending=True, stable=True)
    del S
    dtype = np.int32 if n < 2**31 else np.int64
    return ranks.cpu().numpy().astype(dtype, copy=False)


def _resolve_rerank_impl(impl: str, device: str, M: int) -> str:
    from ..rerank import resolve_impl
    return resolve_impl(impl, device, M)


def rerank_ranking(Q: np.ndarray, X: np.ndarray, ranks: np.ndarray, *, M: int, K: int, beta: float,
                   device: str = "cpu", impl: str = "auto", query_chunk: int = 8, mode: str = "faithful") -> np.ndarray:
    """SuperGlobal rerank (SPEC 6; mode="adaptive": docs/adaptive_rerank.md) of each column's top
    M' = min(M, N); rows below M' keep their order."""
    import torch
    from ..rerank import rerank_candidates
    Xb = _as_blocks(X)
    n, nq = ranks.shape
    if n != len(Xb):
        raise InputError(f"ranks cover {n} database rows but the database has {len(Xb)}")
    m = min(int(M), n)
    impl = _resolve_rerank_impl(impl, device, m)
    out = ranks.copy()
    top = np.ascontiguousarray(ranks[:m].T)  # [nq, M'] in first-stage order, as SPEC 6.1 wants
    for s in range(0, nq, query_chunk):
        t = top[s:s + query_chunk]
        Y = Xb.take(t)  # only the candidates: [c, M', D]
        q = torch.from_numpy(np.ascontiguousarray(Q[s:s + query_chunk], np.float32)).to(device)
        order, _ = rerank_candidates(q, torch.from_numpy(Y).to(device), K=int(K), beta=float(beta), impl=impl,
                                     mode=mode)
        order = np.asarray(torch.as_tensor(order).cpu().numpy(), dtype=np.int64)
        out[:m, s:s + query_chunk] = np.take_along_axis(t, order, axis=1).T
    return out


# ----------------------------------------------------------------------------- evaluation and table
# rerank mode -> (its row's label after "<label> + ", its timings key)
RERANK_ROWS = {"faithful": ("reranking", "rerank"), "adaptive": ("adaptive reranking", "rerank_adaptive")}


def evaluate(Q: np.ndarray, X: np.ndarray, gnd: Sequence[dict], *, rerank: bool = True, M: int = 400, K: int = 9,
             beta: float = 0.15, device: str = "cpu", impl: str = "auto", label: str = "SuperGlobal",
             modes: Sequence[str] = ("faithful",)) -> dict:
    """Rows {label: protocol results} and timings {stage: seconds}: global-only, then one reranked row
    per rerank mode ("faithful": SPEC 6, "adaptive": docs/adaptive_rerank.md)."""
    rows: dict[str, dict] = {}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ranks = full_ranking(Q, X, device=device)
    timings["search"] = time.perf_counter() - t0
    rows[f"{label}, no reranking"] = compute_map_protocols(ranks, gnd, KAPPAS)
    for mode in modes if rerank else ():
        from ..rerank import check_mode
        check_mode(mode)  # InputError naming the modes, before any work
        t0 = time.perf_counter()
        rranks = rerank_ranking(Q, X, ranks, M=M, K=K, beta=beta, device=device, impl=impl, mode=mode)
        timings[RERANK_ROWS[mode][1]] = time.perf_counter() - t0
        rows[f"{label} + {RERANK_ROWS[mode][0]}"] = compute_map_protocols(rranks, gnd, KAPPAS)
    return {"rows": rows, "timings": timings}


def _fmt(v: float) -> str:
    return f"{v * 100:6.2f}" if np.isfinite(v) else f"{'n/a':>6}"


def format_table(title: str, rows: dict[str, dict], kappas: Sequence[int] = KAPPAS) -> str:
    """Paper-style table: mAP E/M/H, then mP@k E/M/H for each k; values x100 with two decimals."""
    groups = ["mAP"] + [f"mP@{k}" for k in kappas]
    w = max([len("method")] + [len(r) for r in rows]) + 1
    gw = 3 * 7 + 1  # three right-aligned columns of width 7, one space before the next bar
    head1 = " " * w + "".join(f"|{g:^{gw}}" for g in groups)
    head2 = f"{'method':<{w}}" + "".join("|" + "".join(f"{p[0].upper():>7}" for p in PROTOCOLS) + " " for _ in groups)
    lines = [title, head1.rstrip(), head2.rstrip(), "-" * len(head2.rstrip())]
    for label, res in rows.items():
        cells = ["".join(f" {_fmt(res[p]['map'])}" for p in PROTOCOLS)]
        for t in range(len(kappas)):
            cells.append("".join(f" {_fmt(res[p]['mpk'][t])}" for p in PROTOCOLS))
        lines.append(f"{label:<{w}}" + " ".join("|" + c for c in cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sgengine eval",
        description="Revisited Oxford/Paris evaluation (mAP and mP@1,5,10, Easy/Medium/Hard; SPEC 7) of "
                    "SuperGlobal global retrieval and reranking.")
    p.add_argument("dataset", help="roxford5k or rparis6k (any name with DATA/<name>/gnd_<name>.pkl works)")
    p.add_argument("--data", required=True, help="folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/ "
                   "(or the dataset folder itself); from http://cmp.felk.cvut.cz/revisitop/. The pickle is read with a "
                   "restricted unpickler (lists, dicts, numpy arrays only)")
    p.add_argument("--bundle", help="bundle directory (sgengine export); not needed with --features")
    p.add_argument("--features", help="evaluate saved descriptors (.npz with 'queries' and 'database', as written by "
                   "--save-features) instead of running a model")
    p.add_argument("--save-features", help="write the descriptors used to this .npz")
    p.add_argument("--plus1m", metavar="FEATURES", help="revisitop 1M distractor descriptors from the same model "
                   "(.npy [N, D], .npz, torch tensor file, or an sgengine index directory)")
    p.add_argument("--plus1m-list", metavar="FILE", help="revisitop1m.txt (one name per line) to check the count")
    p.add_argument("--no-rerank", action="store_true", help="global retrieval only")
    p.add_argument("--adaptive", action="store_true", help="also a row for the adaptive rerank (docs/adaptive_rerank.md), "
                   "after the faithful one")
    p.add_argument("--M", type=int, default=None, help="candidates reranked (default: bundle's, else 400)")
    p.add_argument("--K", type=int, default=None, help="neighbours per refined descriptor (default 9)")
    p.add_argument("--beta", type=float, default=None, help="neighbour weight (default 0.15)")
    p.add_argument("--cache", default=None, help=f"descriptor cache folder (default {default_cache_dir()}; "
                   "env SGENGINE_CACHE)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the descriptor cache")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backend", default="auto", help="auto, onnxruntime, torch or tensorrt (default auto)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--batch-size", type=int, default=8, help="images per backbone batch (same-size images only)")
    p.add_argument("--rerank-impl", default="auto", help="auto, or one of sgengine.rerank.IMPLS: reference, cpu_fp32, cpu_bf16, triton (default auto)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _load_feature_file(path: str, ds: RevisitedDataset) -> tuple[np.ndarray, np.ndarray, dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"--features {p} not found: write one with `sgengine eval {ds.name} --data ... --bundle ... "
                           f"--save-features {p}`")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "queries" not in z or "database" not in z:
                raise DatasetError(f"--features {p} holds {list(z.keys())}; expected 'queries' and 'database'")
            Q, X = np.asarray(z["queries"], np.float32), np.asarray(z["database"], np.float32)
            meta = {k: str(z[k]) for k in ("dataset", "bundle_fingerprint", "bundle_name") if k in z}
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"--features {p}: not a readable .npz ({type(e).__name__}: {e})") from e
    if meta.get("dataset") and meta["dataset"] != ds.name:
        raise InputError(f"--features {p} was saved for {meta['dataset']}, not {ds.name}")
    if Q.ndim != 2 or X.ndim != 2 or Q.shape[1] != X.shape[1]:
        raise InputError(f"--features {p}: queries {list(Q.shape)} and database {list(X.shape)} must be [n, D] "
                         "with the same D")
    if Q.shape[0] != len(ds.qimlist) or X.shape[0] != len(ds.imlist):
        raise InputError(f"--features {p} has {Q.shape[0]} queries and {X.shape[0]} database rows; {ds.name} "
                         f"has {len(ds.qimlist)} and {len(ds.imlist)}")
    for what, a in (("queries", Q), ("database", X)):
        if not np.isfinite(a).all():
            raise InputError(f"--features {p}: '{what}' contains NaN or Inf")
    return Q, X, meta


def main(argv: list[str] | None = None) -> int:
    """Run `sgengine eval`; returns 0. Errors about inputs raise SgengineError (the CLI prints them)."""
    a = build_parser().parse_args(argv)
    if a.adaptive and a.no_rerank:
        raise InputError("--adaptive adds a reranked row and --no-rerank asks for none: give one of them")
    ds = load_revisited(a.dataset, a.data)
    bundle = None
    info = {}
    if a.features:
        Q, X, meta = _load_feature_file(a.features, ds)
        info["source"] = f"descriptors from {a.features}"
        stats = None
        if a.bundle:
            from ..bundle import Bundle
            bundle = Bundle.load(a.bundle)
            if meta.get("bundle_fingerprint") and meta["bundle_fingerprint"] != bundle.fingerprint:
                raise InputError(f"--features {a.features} was made by bundle {meta['bundle_fingerprint'][:12]}, "
                                 f"not {a.bundle} ({bundle.fingerprint[:12]})")
        fingerprint = meta.get("bundle_fingerprint", "")
        bundle_name = meta.get("bundle_name", "")
    else:
        if not a.bundle:
            raise InputError(f"--bundle BUNDLE is required unless --features FILE is given; {_CVNET_HINT}")
        ds.check_images()
        from ..engine import Engine
        engine = Engine.load(a.bundle, device=a.device, backend=a.backend, threads=a.threads,
                             precision=getattr(a, "precision", "fp32"))
        bundle = engine.bundle
        desc = engine.describe()
        variant = f"{desc.get('precision', 'fp32')}_max{desc.get('max_side')}"
        cache = None if a.no_cache else DescriptorCache(a.cache or default_cache_dir(), bundle.fingerprint,
                                                         ds.name, variant)
        Q, X, stats = extract_descriptors(engine, ds, cache=cache, batch_size=a.batch_size, progress=not a.quiet)
        backend = desc.get("backend") or {}
        info["source"] = (f"{desc.get('model')} via {backend.get('name', '?')} on {desc.get('device')}"
                          if isinstance(backend, dict) else f"{desc.get('model')} via {backend}")
        fingerprint, bundle_name = bundle.fingerprint, str(desc.get("model") or "")
    if a.save_features:
        sp = Path(a.save_features).expanduser()
        sp.parent.mkdir(parents=True, exist_ok=True)
        with open(sp, "wb") as f:
            np.savez(f, queries=Q, database=X, dataset=np.asarray(ds.name), bundle_fingerprint=np.asarray(fingerprint),
                     bundle_name=np.asarray(bundle_name), imlist=np.asarray(ds.imlist, dtype=str),
                     qimlist=np.asarray(ds.qimlist, dtype=str))

    defaults = dict(SPEC_RERANK_DEFAULTS)
    if bundle is not None:
        defaults.update(bundle.rerank_defaults)
    M = int(defaults["M"] if a.M is None else a.M)
    K = int(defaults["K"] if a.K is None else a.K)
    beta = float(defaults["beta"] if a.beta is None else a.beta)
    if M < 1 or K < 0 or not np.isfinite(beta):
        raise InputError(f"rerank needs M >= 1, K >= 0 and a finite beta (got M={M}, K={K}, beta={beta})")

    n_db = X.shape[0]
    label = "SuperGlobal"
    if a.plus1m:
        t0 = time.perf_counter()
        D1m, _ = load_distractors(a.plus1m, dim=Q.shape[1], image_list=a.plus1m_list,
                                  bundle_fingerprint=fingerprint or None)
        # SPEC 7 +1M: distractors are appended after the dataset's images, so the ground-truth
        # indices stay valid.
        X = RowBlocks(X, D1m)
        info["plus1m"] = f"+{D1m.shape[0]} distractors from {a.plus1m} (loaded in {time.perf_counter() - t0:.1f} s)"
        label = "SuperGlobal +1M"

    modes = ("faithful", "adaptive") if a.adaptive else ("faithful",)
    res = evaluate(Q, X, ds.gnd, rerank=not a.no_rerank, M=M, K=K, beta=beta, device=a.device, impl=a.rerank_impl,
                   label=label, modes=modes)
    nq = Q.shape[0]
    title = (f"{ds.name}: {nq} queries, {n_db} database images"
             + (f" + {X.shape[0] - n_db} distractors" if X.shape[0] > n_db else "")
             + f" | {info['source']}" + (f" | bundle {fingerprint[:12]}" if fingerprint else ""))
    print(format_table(title, res["rows"]))
    if not a.no_rerank:
        print(f"rerank: M={M} K={K} beta={beta:g} (M'={min(M, X.shape[0])})")
    t = res["timings"]
    parts = []
    if stats is not None:
        n_all = nq + n_db
        rate = f", {stats['extracted'] / stats['seconds']:.2f} img/s" if stats["extracted"] and stats["seconds"] else ""
        parts.append(f"extract {stats['seconds']:.1f} s ({stats['extracted']} extracted, {stats['cached']} of "
                     f"{n_all} from cache{rate})")
    parts.append(f"search {t['search'] * 1e3 / max(nq, 1):.2f} ms/query")
    impl_note = f"(impl {_resolve_rerank_impl(a.rerank_impl, a.device, min(M, len(X)))} on {a.device})"
    for key in (key for _, key in RERANK_ROWS.values() if key in t):
        parts.append(f"{key.replace('_', ' ')} {t[key] * 1e3 / max(nq, 1):.2f} ms/query {impl_note}")
    # One pass, no warm-up: first-call overheads are included (bench/ has the warmed medians).
    print("timings (one pass, wall clock): " + " | ".join(parts))
    if "plus1m" in info:
        print(info["plus1m"])
    if a.json:
        out = {"dataset": ds.name, "queries": nq, "database": n_db, "distractors": int(X.shape[0] - n_db),
               "bundle_fingerprint": fingerprint, "rerank": None if a.no_rerank else {"M": M, "K": K, "beta": beta,
                                                                    "modes": list(modes)},
               "rows": {lab: {p: {"mAP": r[p]["map"] * 100, **{f"mP@{k}": float(r[p]["mpk"][i]) * 100
                                                               for i, k in enumerate(KAPPAS)}}
                              for p in PROTOCOLS} for lab, r in res["rows"].items()},
               "timings_s": {**t, **({"extract": stats["seconds"]} if stats else {})}}
        jp = Path(a.json).expanduser()
        jp.parent.mkdir(parents=True, exist_ok=True)
        jp.write_text(json.dumps(_json_safe(out), indent=2, allow_nan=False))
    return 0


def _json_safe(v):
    """NaN (a protocol with no positives) -> null: strict JSON readers reject NaN."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    return v


def _cli() -> int:
    try:
        return main()
    except SgengineError as e:
        print(f"sgengine eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(_cli())
