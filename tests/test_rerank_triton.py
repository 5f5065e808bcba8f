"""Triton SuperGlobal rerank (kernels/rerank_triton.py) against SPEC 6, tie-aware.

Three yardsticks, none of them the code under test:
- `sgengine.rerank.rerank_reference`: the plain float32 PyTorch transcription;
- `spec_scores_from_gram` below: SPEC 6 steps 3-8 in float64 from a given Gram, written here
  independently (float64 Gram for the exact answer; a Gram from rounded inputs for what a
  reduced-precision path should achieve);
- the error rule: the Triton path's error against float64 is at most twice the plain float32
  reference's error, plus a small atol.

Where this runs:
- CPU: the kernels run under the Triton interpreter, at small shapes. TRITON_INTERPRET must be
  set before any @triton.jit function is decorated, and pytest imports every test module in one
  process, so `test_interpreter_suite` re-runs this file's `test_interp_*` tests in a child
  process with TRITON_INTERPRET=1 (they run in-process when the variable is already set).
- CUDA: real shapes against the reference on the same GPU (skipped cleanly without one).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgengine.compare import assert_rankings_agree
from sgengine.errors import BackendUnavailableError, InputError
from sgengine.rerank import rerank_candidates, rerank_loop_chain, rerank_reference
from test_rerank import copy_labels, ill_posed_expansion

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()

interp_only = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child of test_interpreter_suite")
cuda_only = pytest.mark.skipif(INTERPRET or not CUDA, reason="needs a CUDA GPU (and no TRITON_INTERPRET)")

ATOL = 1e-6


# ----------------------------------------------------------------------------- yardsticks
@torch.no_grad()
def spec_scores_from_gram(q: torch.Tensor, Y: torch.Tensor, G: torch.Tensor, K: int, beta: float
                          ) -> torch.Tensor:
    """SPEC 6 steps 3-8 in float64 from a given Gram: final f per candidate [nq, M] (candidate order)."""
    q, Y, G = q.double(), Y.double(), G.double()
    nq, M, D = Y.shape
    Kp = min(K + 1, M)
    v, n = torch.sort(G, dim=2, descending=True, stable=True)
    v, n = v[..., :Kp], n[..., :Kp]
    w = beta * v
    w[..., 0] = 1.0  # slot 0 weighs 1 whatever it holds
    batch = torch.arange(nq, device=Y.device)[:, None]
    Yr = torch.zeros_like(Y)
    for j in range(Kp):
        Yr += w[..., j, None] * Y[batch, n[..., j]]
    Yr /= w.sum(dim=2, keepdim=True)  # not re-normalized
    s1 = torch.einsum("bmd,bd->bm", Yr, q)
    best = torch.sort(s1, dim=1, descending=True, stable=True).indices[:, :Kp]
    qe = Yr[batch, best].amax(dim=1)  # q not included, not normalized
    s2 = torch.einsum("bmd,bd->bm", Yr, qe)
    return (s1 + s2) / 2


def per_candidate(order: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Scores back in candidate order, from (order, scores-in-that-order)."""
    out = torch.empty_like(scores, dtype=torch.float64)
    out.scatter_(1, order, scores.double())
    return out


def as_ranking(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s, o = torch.sort(f, dim=1, descending=True, stable=True)
    return o, s


def assert_valid_permutation(order: torch.Tensor, M: int) -> None:
    assert order.dtype == torch.int64
    assert torch.equal(torch.sort(order, dim=1).values.cpu(),
                       torch.arange(M).expand(order.shape[0], M)), "order is not a permutation of the candidates"


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def random_case(nq: int, M: int, D: int, seed: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = unit(torch.randn(nq, D, generator=g))
    # Candidates leaning towards the query, more so early in the list (as a first-stage top-M).
    lean = torch.linspace(1.5, 0.0, M)[None, :, None]
    Y = unit(lean * q[:, None, :] + torch.randn(nq, M, D, generator=g) / D ** 0.5)
    return q.to(device), Y.to(device)


def check_against_spec(q, Y, K, beta, order, scores, context: str) -> None:
    """Tie-aware agreement with the float32 reference, and the 2x-error rule against float64."""
    nq, M, D = Y.shape
    assert order.shape == (nq, M) and scores.shape == (nq, M), context
    assert scores.dtype == torch.float32, context
    assert torch.isfinite(scores).all(), context
    assert_valid_permutation(order, M)
    assert torch.all(scores[:, 1:] <= scores[:, :-1]), f"{context}: scores not descending"
    r_order, r_scores = rerank_reference(q, Y, K, beta)
    assert_rankings_agree(order, scores, r_order, r_scores, truncated=False, context=context)
    Y64 = Y.double()
    exact = spec_scores_from_gram(q, Y, Y64 @ Y64.transpose(1, 2), K, beta)
    err = (per_candidate(order, scores) - exact).abs().max().item()
    err_ref = (per_candidate(r_order, r_scores) - exact).abs().max().item()
    assert err <= 2 * err_ref + ATOL, f"{context}: error {err:.3g} vs float64, plain float32 reference {err_ref:.3g}"


def check_adaptive(q, Y, K, beta, order, scores, context: str) -> None:
    """The adaptive mode: tie-aware agreement with the float32 reference's adaptive mode and the
    2x-error rule against the float64 chain's transcription of docs/adaptive_rerank.md, on the
    queries whose decisions are not within rounding (see test_rerank.ill_posed_expansion)."""
    nq, M, _ = Y.shape
    assert order.shape == (nq, M) and scores.dtype == torch.float32, context
    assert_valid_permutation(order, M)
    q, Y, order, scores = q.cpu(), Y.cpu(), order.cpu(), scores.cpu()
    r_order, r_scores = rerank_reference(q, Y, K, beta, adaptive=True)
    c_order, c_scores = rerank_loop_chain(q, Y, K, beta, adaptive=True)
    ok = ~ill_posed_expansion(q, Y, K, beta, adaptive=True)
    assert ok.mean() >= 0.5, f"{context}: too many ill-posed queries, the data are off"
    exact = per_candidate(c_order, c_scores)
    copy = copy_labels(Y)  # identical rows are interchangeable (test_rerank.check_against_chain)
    for i in ok.nonzero()[0]:
        assert_rankings_agree(copy[i][order[i]], scores[i], copy[i][r_order[i]], r_scores[i], truncated=False,
                              context=f"{context} q{i}")
        err = (per_candidate(order[i:i + 1], scores[i:i + 1]) - exact[i]).abs().max().item()
        err_ref = (per_candidate(r_order[i:i + 1], r_scores[i:i + 1]) - exact[i]).abs().max().item()
        assert err <= 2 * err_ref + ATOL, f"{context} q{i}: error {err:.3g}, plain float32 reference {err_ref:.3g}"


# ----------------------------------------------------------------------------- interpreter child
def test_interpreter_suite():
    """Runs the `test_interp_*` tests below under TRITON_INTERPRET=1 in a fresh process."""
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 is already set: the interpreter tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_interp_", __file__]
    res = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, timeout=600)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"interpreter tests failed (exit {res.returncode}):\n{tail}"
    assert " passed" in res.stdout and " failed" not in res.stdout, tail


# Small odd shapes: M below, at and above the block sizes; K + 1 > M; M = 1; D not a power of two.
INTERP_CASES = [
    # nq, M, D, K
    (3, 7, 16, 1),
    (3, 20, 40, 3),
    (3, 33, 40, 9),
    (2, 5, 16, 9),    # K + 1 > M: K' = M
    (2, 1, 16, 3),    # one candidate
    (1, 20, 16, 0),   # K = 0: each row refined by itself only
]


@interp_only
@pytest.mark.parametrize("nq,M,D,K", INTERP_CASES)
@pytest.mark.parametrize("gram", ["bmm", "triton"])
def test_interp_fp32_matches_reference(nq, M, D, K, gram, monkeypatch):
    from sgengine.kernels import rerank_triton
    monkeypatch.setattr(rerank_triton, "GRAM", gram)
    q, Y = random_case(nq, M, D, seed=M * 100 + K)
    order, scores = rerank_triton.rerank_triton(q, Y, K, 0.15, "fp32")
    check_against_spec(q, Y, K, 0.15, order, scores, f"nq={nq} M={M} D={D} K={K} gram={gram}")


@interp_only
@pytest.mark.parametrize("gram", ["bmm", "triton"])
def test_interp_duplicates_and_ties(gram, monkeypatch):
    """Exact duplicate candidates: a duplicate can take slot 0 (weight 1, SPEC quirk), and
    duplicates tie in every score, so only a tie-aware comparison can pass."""
    from sgengine.kernels import rerank_triton
    monkeypatch.setattr(rerank_triton, "GRAM", gram)
    q, Y = random_case(3, 24, 40, seed=7)
    Y[:, 5] = Y[:, 2]                      # a duplicate behind its original
    Y[:, 11] = Y[:, 12] = Y[:, 10]         # a triple
    Y[1, 3] = Y[1, 20]                     # a duplicate ahead of its original
    Y[2, :] = Y[2, 0]                      # every candidate identical: all scores tie
    order, scores = rerank_triton.rerank_triton(q, Y, 4, 0.15, "fp32")
    check_against_spec(q, Y, 4, 0.15, order, scores, f"duplicates gram={gram}")
    f = per_candidate(order, scores)
    assert abs(f[0, 5] - f[0, 2]) <= ATOL and abs(f[1, 3] - f[1, 20]) <= ATOL
    assert torch.all((f[2] - f[2, 0]).abs() <= ATOL), "identical candidates must score alike"
    # Deterministic: a second run gives the same bits.
    order2, scores2 = rerank_triton.rerank_triton(q, Y, 4, 0.15, "fp32")
    assert torch.equal(order, order2) and torch.equal(scores, scores2)


@interp_only
@pytest.mark.parametrize("beta", [0.0, 0.15, 1.0])
def test_interp_beta(beta):
    from sgengine.kernels import rerank_triton
    q, Y = random_case(2, 20, 16, seed=11)
    order, scores = rerank_triton.rerank_triton(q, Y, 5, beta, "fp32")
    check_against_spec(q, Y, 5, beta, order, scores, f"beta={beta}")


@interp_only
@pytest.mark.parametrize("precision", ["tf32", "fp16"])
def test_interp_reduced_precision(precision):
    """A reduced-precision Gram is no worse than the same rounding done in float64 by torch.

    (bf16 is left to the CUDA tests: the Triton 3.9 interpreter's bf16 tl.dot returns garbage.)
    """
    from sgengine.kernels import rerank_triton
    q, Y = random_case(3, 33, 40, seed=5)
    order, scores = rerank_triton.rerank_triton(q, Y, 9, 0.15, precision)
    assert_valid_permutation(order, 33)
    Y64 = Y.double()
    exact = spec_scores_from_gram(q, Y, Y64 @ Y64.transpose(1, 2), 9, 0.15)
    # tf32 under the interpreter is plain fp32; fp16 rounds the Gram's inputs.
    Yp = Y.half().double() if precision == "fp16" else Y64
    torch_p = spec_scores_from_gram(q, Y, Yp @ Yp.transpose(1, 2), 9, 0.15)
    err = (per_candidate(order, scores) - exact).abs().max().item()
    err_p = (torch_p - exact).abs().max().item()
    assert err <= 2 * err_p + 1e-5, f"{precision}: error {err:.3g}, same rounding in float64 {err_p:.3g}"


@interp_only
def test_interp_through_dispatch():
    """`sgengine.rerank.rerank_candidates(impl="triton")` reaches this kernel and agrees."""
    q, Y = random_case(2, 20, 40, seed=3)
    order, scores = rerank_candidates(q, Y, 9, 0.15, impl="triton")
    check_against_spec(q, Y, 9, 0.15, order, scores, "dispatch impl=triton")


@interp_only
@pytest.mark.parametrize("nq,M,D,K", INTERP_CASES)
def test_interp_adaptive_matches_chain(nq, M, D, K):
    from sgengine.kernels import rerank_triton
    q, Y = random_case(nq, M, D, seed=M * 100 + K + 1)
    order, scores = rerank_triton.rerank_triton(q, Y, K, 0.15, "fp32", adaptive=True)
    check_adaptive(q, Y, K, 0.15, order, scores, f"adaptive nq={nq} M={M} D={D} K={K}")


@interp_only
def test_interp_adaptive_duplicates_and_no_expansion():
    """Exact duplicates, and a query far from a tight cluster of candidates: no row is likely,
    so the expansion is empty and f = s1 (the has-flag path of the final kernel)."""
    q, Y = random_case(3, 24, 40, seed=9)
    Y[0, 5] = Y[0, 2]
    Y[0, 11] = Y[0, 12] = Y[0, 10]
    g = torch.Generator().manual_seed(4)
    c = unit(torch.randn(40, generator=g))
    Y[1] = unit(c + 0.3 * torch.randn(24, 40, generator=g) / 40 ** 0.5)
    q[1] = unit(torch.randn(40, generator=g) - 5.0 * c)
    order, scores = rerank_candidates(q, Y, 9, 0.15, impl="triton", mode="adaptive")
    check_adaptive(q, Y, 9, 0.15, order, scores, "adaptive duplicates / empty expansion")
    _, faithful = rerank_candidates(q, Y, 9, 0.15, impl="triton")
    assert (faithful[1] - scores[1]).abs().max() > 1e-2, "the empty expansion must change query 1's scores"


@interp_only
def test_interp_nq_zero():
    from sgengine.kernels import rerank_triton
    order, scores = rerank_triton.rerank_triton(torch.zeros(0, 16), torch.zeros(0, 5, 16), 9, 0.15)
    assert order.shape == (0, 5) and scores.shape == (0, 5)


@interp_only
def test_interp_errors_name_the_input(monkeypatch):
    """The stage entry checks what the kernel trusts; the kernel checks only its own knob."""
    from sgengine.kernels import rerank_triton
    q, Y = random_case(2, 8, 16, seed=1)
    cases = [
        ((q, Y[0], 9, 0.15), "Y"),
        ((q, Y, -1, 0.15), "K must be"),
        ((q, Y, 2.5, 0.15), "K must be"),
        ((q, Y, 9, float("nan")), "beta"),
    ]
    for args, word in cases:
        with pytest.raises(InputError, match=word):
            rerank_candidates(*args, impl="triton")
    with pytest.raises(InputError, match="precision"):
        rerank_triton.rerank_triton(q, Y, 9, 0.15, "fp8")
    monkeypatch.setattr(rerank_triton, "GRAM", "bmm")
    with pytest.raises(InputError, match="GRAM='bmm'"):
        rerank_triton.rerank_triton(q, Y, 9, 0.15, "fp16")
    monkeypatch.setattr(rerank_triton, "MAX_CANDIDATES", 4)
    with pytest.raises(InputError, match="at most 4"):
        rerank_candidates(q, Y, 9, 0.15, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="runs on CUDA tensors"):
        rerank_candidates(q, Y, 9, 0.15, impl="triton")


# ----------------------------------------------------------------------------- CUDA
def first_stage_candidates(nq: int, M: int, D: int, seed: int, N: int = 5000
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and their top-M candidates from a clustered database on the GPU (SPEC 5-6.1)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    N = max(N, 2 * M)
    centers = unit(torch.randn(64, D, device="cuda", generator=g))
    X = unit(centers[torch.randint(0, 64, (N,), device="cuda", generator=g)]
             + 1.2 * unit(torch.randn(N, D, device="cuda", generator=g)))
    q = unit(centers[torch.randint(0, 64, (nq,), device="cuda", generator=g)]
             + 1.2 * unit(torch.randn(nq, D, device="cuda", generator=g)))
    with torch.no_grad():
        top = torch.topk(q @ X.T, M, dim=1).indices
    return q, X[top]


CUDA_SHAPES = [(70, 400, 2048, 9), (16, 1600, 2048, 9), (1, 400, 2048, 9), (70, 100, 2048, 9)]


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("nq,M,D,K", CUDA_SHAPES)
def test_cuda_fp32_matches_reference(nq, M, D, K):
    from sgengine.kernels import rerank_triton
    q, Y = first_stage_candidates(nq, M, D, seed=M + nq)
    order, scores = rerank_triton.rerank_triton(q, Y, K, 0.15, "fp32")
    check_against_spec(q, Y, K, 0.15, order, scores, f"cuda nq={nq} M={M} D={D} K={K}")


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("nq,M,D,K", CUDA_SHAPES[:2])
def test_cuda_adaptive_matches_reference(nq, M, D, K):
    from sgengine.kernels import rerank_triton
    q, Y = first_stage_candidates(nq, M, D, seed=M + nq + 1)
    order, scores = rerank_triton.rerank_triton(q, Y, K, 0.15, "fp32", adaptive=True)
    r_order, r_scores = rerank_reference(q, Y, K, 0.15, adaptive=True)
    ok = ~ill_posed_expansion(q.cpu(), Y.cpu(), K, 0.15, adaptive=True)
    for i in ok.nonzero()[0]:
        assert_rankings_agree(order[i].cpu(), scores[i].cpu(), r_order[i].cpu(), r_scores[i].cpu(), rtol=0,
                              atol=1e-5, truncated=False, context=f"cuda adaptive nq={nq} M={M} q{i}")


@cuda_only
@pytest.mark.gpu
def test_cuda_fp32_ignores_process_tf32_flag():
    """fp32 mode stays IEEE when the process has TF32 switched on, and the flag comes back."""
    from sgengine.kernels import rerank_triton
    q, Y = first_stage_candidates(8, 400, 2048, seed=1)
    want = rerank_triton.rerank_triton(q, Y, 9, 0.15, "fp32")
    mm = torch.backends.cuda.matmul
    saved = mm.fp32_precision
    mm.fp32_precision = "tf32"
    try:
        got = rerank_triton.rerank_triton(q, Y, 9, 0.15, "fp32")
        assert mm.fp32_precision == "tf32"
    finally:
        mm.fp32_precision = saved
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def top_agreement(order_a: torch.Tensor, order_b: torch.Tensor, k: int = 100) -> float:
    """Mean over queries of |top-k of a & top-k of b| / k."""
    a, b = order_a[:, :k], order_b[:, :k]
    hits = (a[:, :, None] == b[:, None, :]).any(dim=2).sum(dim=1)
    return hits.double().mean().item() / a.shape[1]


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("precision,gram", [("tf32", "bmm"), ("tf32", "triton"), ("fp16", "triton"),
                                            ("bf16", "triton"), ("fp32", "triton")])
def test_cuda_reduced_precision_agreement(precision, gram, record_property, monkeypatch):
    """Opt-in precisions report their top-100 agreement with fp32; each must be within 0.02 of
    what the same input rounding gives when the rest is exact (float64 from that Gram)."""
    from sgengine.kernels import rerank_triton
    nq, M, D, K = 70, 400, 2048, 9
    q, Y = first_stage_candidates(nq, M, D, seed=99)
    o32, _ = rerank_triton.rerank_triton(q, Y, K, 0.15, "fp32")
    monkeypatch.setattr(rerank_triton, "GRAM", gram)
    op, sp = rerank_triton.rerank_triton(q, Y, K, 0.15, precision)
    assert_valid_permutation(op, M)
    Y64 = Y.double()
    exact_order, _ = as_ranking(spec_scores_from_gram(q, Y, Y64 @ Y64.transpose(1, 2), K, 0.15))
    if precision == "fp32":
        Yp = Y64
    elif precision == "tf32":
        # TF32 keeps 10 mantissa bits: round-to-nearest on the low 13 bits of each float32.
        bits = Y.view(torch.int32)
        Yp = ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double()
    else:
        Yp = Y.to(torch.float16 if precision == "fp16" else torch.bfloat16).double()
    ideal_order, _ = as_ranking(spec_scores_from_gram(q, Y, Yp @ Yp.transpose(1, 2), K, 0.15))
    agree_fp32 = top_agreement(op, o32)
    agree_exact = top_agreement(op, exact_order)
    agree_ideal = top_agreement(ideal_order, exact_order)
    record_property("top100_agreement_with_fp32", agree_fp32)
    print(f"\n{precision}/{gram}: top-100 agreement with fp32 {agree_fp32:.4f}, with float64 {agree_exact:.4f} "
          f"(same rounding done exactly: {agree_ideal:.4f})")
    assert agree_exact >= agree_ideal - 0.02, (
        f"{precision}/{gram}: top-100 agreement with float64 {agree_exact:.4f}, "
        f"but the same input rounding with an exact rest reaches {agree_ideal:.4f}")
