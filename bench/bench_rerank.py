"""SuperGlobal rerank speed (SPEC 6): fast paths against the reference chain and the Gram floor.

    python bench/report.py bench/bench_rerank.py                 # CPU and (if present) CUDA
    python bench/report.py bench/bench_rerank.py -k "cpu_device" # CPU only
    SGENGINE_BENCH_THREADS=1 python bench/report.py bench/bench_rerank.py   # torch intra-op threads

Shapes: N = 5000 database rows, D = 2048, K = 9, nq in {1, 70}, M in {100, 400, 1600}; the
candidates are each query's exact first-stage top M of clustered unit vectors.
Providers:
- "chain": `rerank_loop_chain`, one query at a time with full sorts, float64 (the transcription
  the tests compare against). It is slow, so it runs on a subset of the queries and reports
  extra_info["scale"] = subset / nq; bench/report.py divides by it (per-query work is
  independent, so the scaled time is the full batch's).
- every implementation of `sgengine.rerank.IMPLS` under its own name, called through that table:
  "reference" (the batched plain PyTorch reference), "cpu_fp32" (float32 Gram and torch.topk),
  "cpu_bf16" (the certified bfloat16 selection, at every M; CPU with AVX512_BF16 only; "auto"
  takes it from M' >= CERT_MIN_M) and "triton" (the GPU kernel, CUDA only).
- "gram_matmul": the floor, one M x M x D float32 product per query (batched bmm); no implementation.
The adaptive mode (docs/adaptive_rerank.md) has its own groups, `test_rerank_adaptive_cpu_device`
(M = 400): the chain, the reference and the fast paths all in the adaptive mode, ratios against the
adaptive chain, and the fast paths in the faithful mode beside them ("cpu_bf16 faithful"), so the
mode's cost is one run's side-by-side ratio.
Any call estimated over CALL_BUDGET_S (the chain mostly; everything at nq=70, M=1600) runs the
same way on a subset of queries and is scaled.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from sgengine.rerank import IMPLS, rerank_loop_chain
from sgengine.search import topk_similarity

N, D, K, BETA = 5000, 2048, 9, 0.15
NQS = (1, 70)
MS = (100, 400, 1600)
# Seconds one call may take by default; longer calls run a subset of the queries (scaled).
# Keeps the whole CPU suite to a couple of minutes on a quiet 2-core machine.
CALL_BUDGET_S = 2.0

if os.environ.get("SGENGINE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SGENGINE_BENCH_THREADS"]))


@functools.lru_cache(maxsize=1)
def _database() -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered unit vectors (so neighbourhoods matter) and 70 queries near the same centres."""
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(50, D, generator=g), dim=1)
    def around(n):
        lab = torch.randint(0, len(centres), (n,), generator=g)
        x = centres[lab] + torch.randn(n, D, generator=g) / D ** 0.5
        return torch.nn.functional.normalize(x, dim=1)
    return around(max(NQS)), around(N)


@functools.lru_cache(maxsize=2)
def _candidates(nq: int, M: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    queries, X = _database()
    q = queries[:nq].contiguous()
    _, rows = topk_similarity(q, X, M)
    Y = X[rows]  # [nq, M, D]
    return q.to(device), Y.to(device)


def _est_seconds(impl: str, nq: int, M: int, device: str) -> float:
    """Rough cost per call, used only to pick rounds and subsets (never reported)."""
    gflop = 2 * nq * M * M * D / 1e9
    rate = 60.0 if device == "cpu" else 20000.0  # GFLOP/s of a float32 Gram
    # Relative cost (measured on the 2-core EPYC VM): float64 with full sorts, gathers, the fast paths.
    # Underestimating a fast path's speed left it 3 rounds where 20 fit, and on a machine whose
    # speed drifts, 3 rounds make a noisy median.
    per = {"chain": 6.0, "reference": 2.5, "cpu_bf16": 0.2, "cpu_fp32": 0.4, "gram_matmul": 0.35}.get(impl, 1.2)
    return per * gflop / rate + (2e-3 * nq if impl == "chain" else 0.0)


def _impl_fn(impl: str, adaptive: bool = False):
    """The provider `impl`: the chain, the Gram floor, or sgengine.rerank.IMPLS[impl] (the kernel
    itself: the input checks of rerank_candidates are not timed), in the adaptive mode or not."""
    if impl == "chain":
        return lambda q, Y: rerank_loop_chain(q, Y, K, BETA, dtype=torch.float64, adaptive=adaptive)
    if impl == "gram_matmul":
        return lambda q, Y: torch.bmm(Y, Y.transpose(1, 2))
    fn = IMPLS[impl]
    return lambda q, Y: fn(q, Y, K, BETA, adaptive)


def _run(benchmark, impl: str, nq: int, M: int, device: str, mode: str | None = None) -> None:
    """mode None: the faithful groups; "faithful" / "adaptive": the adaptive groups' providers."""
    q, Y = _candidates(nq, M, device)
    fn = _impl_fn(impl, adaptive=mode == "adaptive")
    est = _est_seconds(impl, nq, M, device)
    n_run = nq
    if est > CALL_BUDGET_S:  # per-query work is independent: a subset, scaled, is the batch's time
        n_run = max(1, min(nq, int(nq * CALL_BUDGET_S / est)))
    qs, Ys = q[:n_run], Y[:n_run]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        out = fn(qs, Ys)
        sync()
        return out

    est_run = est * n_run / nq
    rounds = max(3, min(20, int(3.0 / max(est_run, 1e-4))))  # >= 3: one round is one sample, not a median
    label = "rerank" if mode is None else "rerank adaptive"
    name = impl if mode in (None, "adaptive") else f"{impl} {mode}"
    benchmark.group = f"{label} {device} nq={nq} M={M} K={K} D={D} N={N}"
    benchmark.extra_info.update({
        "op": "rerank", "shape": ("" if mode is None else "adaptive ") + f"{device} nq={nq} M={M} K={K} D={D}", "impl": name,
        "flops": 2 * nq * M * M * D, "scale": n_run / nq, "queries_run": n_run,
        "threads": torch.get_num_threads(),
    })
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1 if est_run < 2 else 0, iterations=1)


@pytest.mark.parametrize("impl", ["chain", "reference", "cpu_fp32", "cpu_bf16", "gram_matmul"])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("nq", NQS)
def test_rerank_cpu_device(benchmark, nq, M, impl):
    if impl == "cpu_bf16":
        from sgengine.kernels.rerank_cpu import certified_available, certified_info
        if not certified_available():  # cpu_bf16 would run cpu_fp32: not a cpu_bf16 number
            pytest.skip(f"the certified path does not run here: {certified_info()['error']}")
    _run(benchmark, impl, nq, M, "cpu")


@pytest.mark.parametrize("provider", ["chain", "reference", "cpu_fp32", "cpu_bf16", "cpu_fp32 faithful",
                                      "cpu_bf16 faithful"])
@pytest.mark.parametrize("nq", NQS)
def test_rerank_adaptive_cpu_device(benchmark, nq, provider):
    impl, _, mode = provider.partition(" ")
    if impl == "cpu_bf16":
        from sgengine.kernels.rerank_cpu import certified_available, certified_info
        if not certified_available():
            pytest.skip(f"the certified path does not run here: {certified_info()['error']}")
    _run(benchmark, impl, nq, 400, "cpu", mode=mode or "adaptive")


def _triton_ok() -> bool:
    try:
        import sgengine.kernels.rerank_triton  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["chain", "reference", "cpu_fp32", "triton", "gram_matmul"])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("nq", NQS)
def test_rerank_cuda(benchmark, nq, M, impl):
    if impl == "triton" and not _triton_ok():
        pytest.skip("sgengine.kernels.rerank_triton does not import here")
    _run(benchmark, impl, nq, M, "cuda")
