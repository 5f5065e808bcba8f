"""Pooling head (R-GeM + GeM+): every impl against the official module chain, in one run.

    python bench/report.py bench/bench_head.py              # CPU (and CUDA when present)
    python bench/report.py bench/bench_head.py -k cuda      # GPU rows only

Maps: float32 [B, 2048, h, w], (h, w) in {32x24 (a 1024x768 image), 45x32 (its 1.41 scale)},
B in {1, 8}; ReLU'd normal values. Timed: one pooling call, map in, [B, C] float32 out.

Providers: "chain", `sgengine.head.gem_pool_chain`, the official modules one by one
(ReflectionPad2d, LPPool2d, ...), and every implementation of `sgengine.head.IMPLS` under its own
name, called through that table:
- reference: `gem_pool_reference` (float32, plain PyTorch);
- cpu_torch: `gem_pool_cpu_torch`, the vectorized torch fast path (on CUDA the same code on the GPU);
- cpu_native: `gem_pool_cpu_native`, the fused C++ kernel (CPU);
- triton: `gem_pool_triton`, the fused Triton kernel (CUDA);
and a floor that is no implementation: copy, `torch.empty_like(x).copy_(x)`, the bandwidth floor
of any one-pass kernel (CUDA).
`bytes` is what must cross memory: the map read once (copy: read + write), so report.py's GB/s
column shows how close each impl comes to the floor.

CUDA rows run REPEAT calls per timed round, then synchronize; extra_info["scale"] = REPEAT makes
report.py show the time per call. CPU rows run one call per round, a few rounds (the chain at
8x2048x45x32 takes about a second on a 2-core CPU), so the default CPU run stays short.
"""
from __future__ import annotations

import time

import pytest
import torch

SHAPES = [(1, 2048, 32, 24), (8, 2048, 32, 24), (1, 2048, 45, 32), (8, 2048, 45, 32)]
CPU_IMPLS = ["chain", "reference", "cpu_torch", "cpu_native"]
CUDA_IMPLS = ["chain", "reference", "cpu_torch", "triton", "copy"]
REPEAT = 20
CPU_TARGET_S, CPU_MIN_ROUNDS, CPU_MAX_ROUNDS = 0.6, 3, 50
CUDA_TARGET_S, CUDA_MIN_ROUNDS, CUDA_MAX_ROUNDS = 0.3, 5, 200


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


def _impl(name: str):
    """The provider `name`: the chain, the copy floor, or sgengine.head.IMPLS[name] (the kernel
    itself: the input check of gem_pool is not timed)."""
    from sgengine.head import IMPLS, gem_pool_chain

    if name == "chain":
        return gem_pool_chain
    if name == "copy":
        return lambda x: torch.empty_like(x).copy_(x)
    return IMPLS[name]


def _map(shape, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(*shape, generator=g) * 7.0).to(device)


def _rounds(run, target_s: float, lo: int, hi: int, warmups: int) -> int:
    # Warm-up calls (Triton compile, allocator, thread pool) are not timed; the last one sizes
    # the run. One warm-up on the CPU keeps the default run short (the chain at 8x2048x45x32
    # takes about a second there).
    for _ in range(warmups):
        t0 = time.perf_counter()
        run()
        once = time.perf_counter() - t0
    return int(min(hi, max(lo, target_s / max(once, 1e-6))))


def _extra(benchmark, shape, impl, device_name, scale=1):
    B, C, h, w = shape
    nbytes = B * C * h * w * 4
    benchmark.group = f"head {_shape_id(shape)} {'cuda' if scale > 1 else 'cpu'}"
    benchmark.extra_info.update({"op": "head", "shape": _shape_id(shape), "impl": impl,
                                 "bytes": 2 * nbytes if impl == "copy" else nbytes,
                                 "device": device_name, "scale": scale})


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_head_cpu(benchmark, machine, shape, impl):
    if impl == "cpu_native":
        from sgengine.head import available_impls
        if impl not in available_impls("cpu"):
            pytest.skip("the C++ kernel sgengine.kernels._cpu is not built here")
    x = _map(shape, "cpu")
    fn = _impl(impl)

    def run():
        with torch.no_grad():
            return fn(x)

    rounds = _rounds(run, CPU_TARGET_S, CPU_MIN_ROUNDS, CPU_MAX_ROUNDS, warmups=1)
    _extra(benchmark, shape, impl, machine)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", CUDA_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_head_cuda(benchmark, shape, impl):
    if impl == "triton":
        from sgengine.head import available_impls
        if impl not in available_impls("cuda"):
            pytest.skip("Triton does not run here")
    x = _map(shape, "cuda")
    fn = _impl(impl)

    def run():
        with torch.no_grad():
            for _ in range(REPEAT):
                out = fn(x)
        torch.cuda.synchronize()  # the timed round ends when the GPU is done, not at launch
        return out

    rounds = _rounds(run, CUDA_TARGET_S, CUDA_MIN_ROUNDS, CUDA_MAX_ROUNDS, warmups=2)
    _extra(benchmark, shape, impl, torch.cuda.get_device_name(), scale=REPEAT)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)


def _main() -> None:
    """Without pytest-benchmark: CUDA-event (or wall-clock) medians, one table, device named last."""
    import statistics

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    impls = CUDA_IMPLS if cuda else CPU_IMPLS
    print(f"{'shape':<16} {'impl':<15} {'median':>11} {'vs chain':>9} {'GB/s':>8}")
    for shape in SHAPES:
        x = _map(shape, device)
        chain = None
        for impl in impls:
            fn = _impl(impl)
            fn(x)
            times = []
            for _ in range(7 if cuda else 3):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(REPEAT):
                        fn(x)
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end) / 1e3 / REPEAT)
                else:
                    t0 = time.perf_counter()
                    fn(x)
                    times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            chain = med if impl == "chain" else chain
            nbytes = x.numel() * 4 * (2 if impl == "copy" else 1)
            print(f"{_shape_id(shape):<16} {impl:<15} {med * 1e3:9.3f}ms {chain / med:8.1f}x {nbytes / med / 1e9:8.1f}")
    from conftest import machine_name  # bench/conftest.py
    print("device:", machine_name())


if __name__ == "__main__":
    _main()
