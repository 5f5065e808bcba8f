"""SuperGlobal rerank on the GPU: Triton path against the loop chain, the batched reference and
the Gram floor, all measured in this one run on the same GPU.

    python bench/report.py bench/bench_rerank_gpu.py

Setup (not timed): a clustered N = 5000, D = 2048 float32 database on the GPU, queries drawn
near its clusters, first-stage top-M candidates gathered. Timed: rerank of those candidates,
K = 9, beta = 0.15, with torch.cuda.synchronize() inside each timed call.

impls:
- chain: `sgengine.rerank.rerank_loop_chain` in float32, one query at a time, full sorts;
- reference: `sgengine.rerank.rerank_reference` (batched plain PyTorch);
- triton: `sgengine.kernels.rerank_triton.rerank_triton`, fp32 fidelity mode (cuBLAS IEEE Gram);
- triton_graph: the same replayed from a CUDA graph (sgengine.cuda_graphs, as the engine runs it
  on CUDA): one launch instead of ~8, which is what batch 1 is bound by;
- triton_tgram: same, with the symmetric Triton Gram kernel (IEEE fp32);
- triton_tf32 / triton_fp16 / triton_bf16: opt-in Gram precisions;
- triton_adaptive / chain_adaptive: the adaptive mode (docs/adaptive_rerank.md) of the fp32 Triton
  path and of the chain, beside the faithful ones: the mode's cost on the GPU;
- gram_bmm: the floor, one batched float32 (IEEE) bmm of the same Gram shapes.
Skipped without CUDA. About a minute on one H100-class GPU.
"""
from __future__ import annotations

import time

import pytest
import torch

SHAPES = [(1, 100), (1, 400), (1, 1600), (70, 100), (70, 400), (70, 1600)]
N, D, K, BETA = 5000, 2048, 9, 0.15
IMPLS = ["chain", "reference", "triton", "triton_graph", "triton_tgram", "triton_tf32", "triton_fp16", "triton_bf16",
         "triton_adaptive", "chain_adaptive", "gram_bmm"]
# Per benchmark: enough rounds for a stable median, about 0.4 s of timed work.
TARGET_S, MIN_ROUNDS, MAX_ROUNDS = 0.4, 5, 200

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator(device="cuda").manual_seed(0)

    def unit(x):
        return torch.nn.functional.normalize(x, dim=-1)

    centers = unit(torch.randn(64, D, device="cuda", generator=g))
    X = unit(centers[torch.randint(0, 64, (N,), device="cuda", generator=g)]
             + 1.2 * unit(torch.randn(N, D, device="cuda", generator=g)))
    q = unit(centers[torch.randint(0, 64, (70,), device="cuda", generator=g)]
             + 1.2 * unit(torch.randn(70, D, device="cuda", generator=g)))
    return q, X


def _ieee_bmm(Y: torch.Tensor) -> torch.Tensor:
    # The floor is float32 as the fidelity mode is: TF32 off explicitly, caller's flag restored.
    mm = torch.backends.cuda.matmul
    saved = mm.fp32_precision
    mm.fp32_precision = "ieee"
    try:
        return torch.bmm(Y, Y.transpose(1, 2))
    finally:
        mm.fp32_precision = saved


def _impl(name: str):
    from sgengine.kernels import rerank_triton as kernel
    from sgengine.kernels.rerank_triton import rerank_triton
    from sgengine.rerank import rerank_loop_chain, rerank_reference

    variants = {
        "triton": "fp32",
        "triton_tf32": "tf32",
        "triton_fp16": "fp16",
        "triton_bf16": "bf16",
    }
    if name == "chain":
        return lambda q, Y: rerank_loop_chain(q, Y, K, BETA, dtype=torch.float32)
    if name == "chain_adaptive":
        return lambda q, Y: rerank_loop_chain(q, Y, K, BETA, dtype=torch.float32, adaptive=True)
    if name == "triton_adaptive":
        return lambda q, Y: rerank_triton(q, Y, K, BETA, "fp32", adaptive=True)
    if name == "reference":
        return lambda q, Y: rerank_reference(q, Y, K, BETA)
    if name == "gram_bmm":
        return lambda q, Y: _ieee_bmm(Y)
    if name == "triton_tgram":  # the Triton Gram kernel in fp32 (GRAM pinned for this call only)
        def tgram(q, Y):
            saved, kernel.GRAM = kernel.GRAM, "triton"
            try:
                return rerank_triton(q, Y, K, BETA, "fp32")
            finally:
                kernel.GRAM = saved
        return tgram
    if name == "triton_graph":
        from sgengine.cuda_graphs import CudaGraphCache
        graphs = CudaGraphCache(lambda q, Y, static=None: rerank_triton(q, Y, K, BETA), "cuda",
                                capture_after=1)

        def replay(q, Y):
            out = graphs(q, Y)
            if graphs.failures:
                raise RuntimeError(f"CUDA graph capture failed: {graphs.failures}")
            return out
        return replay
    precision = variants[name]
    return lambda q, Y: rerank_triton(q, Y, K, BETA, precision)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nq,M", SHAPES, ids=[f"nq{nq}-M{M}" for nq, M in SHAPES])
def test_rerank_cuda(benchmark, data, nq, M, impl):
    q_all, X = data
    q = q_all[:nq].contiguous()
    with torch.no_grad():
        top = torch.topk(q @ X.T, M, dim=1).indices
        Y = X[top].contiguous()  # [nq, M, D], first-stage order
    fn = _impl(impl)

    def run():
        with torch.no_grad():
            out = fn(q, Y)
        torch.cuda.synchronize()
        return out

    run()  # compile / autotune / allocator warm-up, not timed
    t0 = time.perf_counter()
    run()
    once = time.perf_counter() - t0
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, TARGET_S / max(once, 1e-6))))
    shape = f"nq={nq} M={M} K={K} D={D}"
    benchmark.group = shape
    benchmark.extra_info.update({"op": "rerank", "shape": shape, "impl": impl, "flops": 2 * nq * M * M * D,
                                 "device": torch.cuda.get_device_name()})
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
