"""Exact first stage (SPEC 5): the C++ scan over float16 rows against the reference and FAISS, in one run.

    python bench/report.py bench/bench_search.py -k N100k     # 100,000 rows (a couple of minutes)
    python bench/report.py bench/bench_search.py -k N1M       # 1,000,000 rows (needs ~14 GiB free RAM)
    SGENGINE_BENCH_DIR=/data python bench/report.py bench/bench_search.py   # where the rows are written
    SGENGINE_BENCH_THREADS=1 python bench/report.py bench/bench_search.py   # torch and FAISS threads

Rows: N in {100,000, 1,000,000} x D = 2048 unit vectors around Gaussian cluster centres
(`make_rows`, seeded), stored as a float16 .npy and searched memory-mapped, the way an index
segment is; queries are perturbed rows. nq in {1, 20}, k = 400 (the rerank's M). Timed: one
search call for the batch, queries in, top-k scores and rows out.

Providers (one group per nq and N; report.py's ratio column is against "faiss_flat_f32", named as
the group's baseline in extra_info):
- "cpu_native": sgengine.search's C++ scan, reading the float16 memmap in place;
- "upcast": the reference, each chunk of float16 rows copied to float32, then a float32 GEMM;
- "faiss_flat_f32": faiss.IndexFlatIP over the rows as float32 (twice the bytes, in RAM);
- "faiss_sq_fp16": faiss.IndexScalarQuantizer(QT_fp16) with the inner product, float16 codes in RAM.
`bytes` is the stored rows one call must read (N x bytes per row); report.py shows bytes / median
as GB/s. The FAISS indexes are built outside the timing, one at a time.
"""
from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sgengine.search.exact import as_rows_tensor, exact_topk, resolve_impl

D, K, SEED = 2048, 400, 0
NS = {"N100k": 100_000, "N1M": 1_000_000}
NQS = (1, 20)
PROVIDERS = ("cpu_native", "upcast", "faiss_flat_f32", "faiss_sq_fp16")
BASELINE = "faiss_flat_f32"
# Seconds of timed calls per benchmark (at least MIN_ROUNDS rounds, at most MAX_ROUNDS).
TARGET_S, MIN_ROUNDS, MAX_ROUNDS = 15.0, 3, 30
_CHUNK = 1 << 15

if os.environ.get("SGENGINE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SGENGINE_BENCH_THREADS"]))


def make_rows(n: int, d: int, seed: int, path: str | os.PathLike) -> np.ndarray:
    """n unit rows [n, d] as float16 in the .npy at `path`, returned memory-mapped read-only.

    Gaussian clusters: 256 unit centres, each row a centre plus N(0, 1/d) noise, normalized. Written
    once (streamed, never whole in memory) and reused by later runs; the realistic descriptor
    generator can replace this function with the same signature."""
    path = Path(path)
    if path.exists():
        rows = np.load(path, mmap_mode="r")
        if rows.shape == (n, d) and rows.dtype == np.float16:
            return rows
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
    for s in range(0, n, _CHUNK):
        m = min(n, s + _CHUNK) - s
        x = centres[rng.integers(0, len(centres), m)]
        x += rng.standard_normal((m, d), dtype=np.float32) * np.float32(d ** -0.5)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + m] = x
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def _bench_dir() -> Path:
    p = Path(os.environ.get("SGENGINE_BENCH_DIR") or Path(tempfile.gettempdir()) / "sgengine-bench")
    p.mkdir(parents=True, exist_ok=True)
    return p


@functools.lru_cache(maxsize=1)
def _rows(n: int) -> np.ndarray:
    return make_rows(n, D, SEED, _bench_dir() / f"rows-gauss-{n}x{D}-seed{SEED}-f16.npy")


@functools.lru_cache(maxsize=1)
def _queries(n: int) -> torch.Tensor:
    rows = _rows(n)
    rng = np.random.default_rng(SEED + 1)
    q = rows[np.sort(rng.choice(n, max(NQS), replace=False))].astype(np.float32)
    q += rng.standard_normal(q.shape, dtype=np.float32) * np.float32(0.5 * D ** -0.5)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return torch.from_numpy(q)


_FAISS: dict[tuple[str, int], object] = {}  # one FAISS index at a time: 1M float32 rows are 8 GiB


def _faiss_index(kind: str, n: int):
    """The FAISS index of `kind` over the rows, built once (the previous one is dropped first)."""
    import faiss

    if os.environ.get("SGENGINE_BENCH_THREADS"):
        faiss.omp_set_num_threads(int(os.environ["SGENGINE_BENCH_THREADS"]))
    if (kind, n) in _FAISS:
        return _FAISS[(kind, n)]
    _FAISS.clear()
    rows = _rows(n)
    if kind == "faiss_flat_f32":
        index = faiss.IndexFlatIP(D)
    else:
        index = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        index.train(np.zeros((1, D), np.float32))  # QT_fp16 needs no statistics
    for s in range(0, n, _CHUNK):
        index.add(np.ascontiguousarray(rows[s:s + _CHUNK], dtype=np.float32))
    _FAISS[(kind, n)] = index
    return index


def _provider(impl: str, n: int):
    """A callable q [nq, D] float32 -> top-K, timed as is (input checks are not timed)."""
    if impl.startswith("faiss_"):
        index = _faiss_index(impl, n)
        return lambda q: index.search(q.numpy(), K)
    _FAISS.clear()  # the sgengine paths need no FAISS index in memory
    db = as_rows_tensor(_rows(n))
    return lambda q: exact_topk(q, db, K, None, impl)


# The providers of one group run one after the other (fair on a machine whose speed drifts); the
# FAISS indexes are rebuilt for each nq instead of holding both at once.
@pytest.mark.parametrize("impl", PROVIDERS)
@pytest.mark.parametrize("nq", NQS)
@pytest.mark.parametrize("n", list(NS.values()), ids=list(NS))
def test_search_cpu(benchmark, n, impl, nq):
    if impl == "cpu_native" and resolve_impl("auto", "cpu", "float16") != "cpu_native":
        pytest.skip("the C++ search kernel is not built here")
    fn = _provider(impl, n)
    q = _queries(n)[:nq].contiguous()
    fn(q)  # warm-up: pages the rows in, starts the thread pools
    t0 = time.perf_counter()
    fn(q)
    est = time.perf_counter() - t0
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / max(est, 1e-3))))
    bytes_per_row = D * (4 if impl == "faiss_flat_f32" else 2)
    benchmark.group = f"search cpu nq={nq} k={K} D={D} N={n}"
    benchmark.extra_info.update({
        "op": "search", "shape": f"nq={nq} k={K} D={D} N={n}", "impl": impl, "baseline": BASELINE,
        "rows": n, "bytes_per_row": bytes_per_row, "bytes": n * bytes_per_row, "nq": nq,
        "threads": torch.get_num_threads(),
    })
    benchmark.pedantic(fn, args=(q,), rounds=rounds, warmup_rounds=0, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        med = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = round(n * bytes_per_row / med / 1e9, 2)
        benchmark.extra_info["ms_per_query"] = round(med * 1e3 / nq, 3)
