"""The certified bfloat16 path of the CPU rerank (kernels/rerank_cpu.py, kernels/cpu/rerank_select.cpp).

Its claim is exactness of the neighbour selection: a bfloat16 Gram only rules columns out, under
a rigorous bound, and every column it cannot rule out gets an exact float32 dot. So the tests
check (1) the bound itself, entry by entry against a float64 Gram, on data of several kinds, and
that it is tight enough for such a check to catch a bound that is too small; (2) the triangle
Gram kernel against float64 and torch products of the same bfloat16 operands; (3) the selection
against float64 top-K' (tie-aware) on adversarial inputs: exact and near duplicates (where the
dense fallback must run), odd M' and D, M' <= K', K = 0, rows that are not unit norm; (4) whole
reranks and searches against the float64 chain and the float32 reference, tie-aware; (5) that a
too-small bound does produce wrong neighbours, i.e. that these tests can fail; (6) the C++
entries' own argument checks. Knobs are module constants (SAFETY, CAP_FRACTION, ISA), which tests
monkeypatch. Seeds are fresh each run and printed in failures.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sgengine.compare import assert_rankings_agree, rankings_agree
from sgengine.errors import BackendUnavailableError, InputError
from sgengine.kernels import rerank_cpu as rc
from sgengine.rerank import rerank_candidates, resolve_impl, superglobal_rerank
from test_rerank import assert_search_agrees, candidates, check_against_chain, make_data

# Tests that run without the certified path (the fallback it takes then).
_RUN_WITHOUT_CERTIFIED = {"test_bf16_without_avx512_bf16_runs_fp32"}


@pytest.fixture(autouse=True)
def _needs_certified(request):
    if request.node.originalname not in _RUN_WITHOUT_CERTIFIED and not rc.certified_available():
        pytest.skip(f"the certified path does not run here: {rc.certified_info()['error']}")


@pytest.fixture
def seed() -> int:
    import os
    return int.from_bytes(os.urandom(4), "little")


def gram64(Y: torch.Tensor) -> torch.Tensor:
    Yd = Y.double()
    return Yd @ Yd.transpose(1, 2)


def assert_neighbours_exact(Y: torch.Tensor, v: torch.Tensor, n: torch.Tensor, context: str, atol: float = 2e-6):
    """(v, n) against the float64 Gram's top K': values position by position, columns up to ties
    (a group of values within atol may come in any order, and the group at the cut is open)."""
    G = gram64(Y)
    Kp = v.shape[-1]
    v64, n64 = torch.topk(G, Kp, dim=2)
    assert n.dtype == torch.int64 and v.dtype == torch.float32
    # The values we return are the float32 dots of the columns we chose: their float64 values too.
    assert torch.allclose(torch.gather(G, 2, n), v.double(), rtol=0, atol=atol), context
    for b in range(Y.shape[0]):
        ok, msg = rankings_agree(n64[b], v64[b], n[b], v[b], rtol=0, atol=atol, truncated=True)
        assert ok, f"{context}, query {b}: {msg}"


# ----------------------------------------------------------------------------- the bound
def _data(kind: str, rng: np.random.Generator, nq: int, M: int, D: int) -> torch.Tensor:
    if kind == "gaussian":
        Y = rng.standard_normal((nq, M, D))
        Y /= np.linalg.norm(Y, axis=2, keepdims=True)
    elif kind == "clustered":
        c = rng.standard_normal((4, D))
        Y = c[rng.integers(0, 4, (nq, M))] + rng.standard_normal((nq, M, D)) / np.sqrt(D) * 0.8
        Y /= np.linalg.norm(Y, axis=2, keepdims=True)
    elif kind == "relu":  # GeM-like: non-negative, heavy-tailed, all pairs strongly positive
        Y = np.maximum(rng.standard_normal((nq, M, D)), 0) ** 2
        Y /= np.linalg.norm(Y, axis=2, keepdims=True)
    elif kind == "float16":  # stored half precision: norms off 1 by ~1e-4
        Y = rng.standard_normal((nq, M, D))
        Y = (Y / np.linalg.norm(Y, axis=2, keepdims=True)).astype(np.float16)
    elif kind == "scaled":  # norms from 1e-3 to 1e3 in one query
        Y = rng.standard_normal((nq, M, D)) * 10.0 ** rng.uniform(-3, 3, (nq, M, 1))
    else:
        raise ValueError(kind)
    return torch.from_numpy(np.ascontiguousarray(Y)).float()


@pytest.mark.parametrize("kind", ["gaussian", "clustered", "relu", "float16", "scaled"])
@pytest.mark.parametrize("M,D", [(300, 256), (57, 2048), (9, 37)])
@pytest.mark.parametrize("c", [0.0, 0.5, -0.25])
def test_bound_holds(seed, kind, M, D, c):
    Y = _data(kind, np.random.default_rng(seed), 2, M, D)
    x, e = rc.approx_gram_with_bound(Y, c)
    err = (x - gram64(Y)).abs()
    ratio = float((err / e).max())
    assert ratio <= 1.0, f"seed {seed}: |x - G| exceeds the bound by {ratio:.3f}x"
    # Not vacuous: the bound is within ~30x of the error it covers somewhere, so a bound made too
    # small by more than that would fail this test.
    assert ratio > 1 / 32, f"seed {seed}: bound {1 / ratio:.0f}x the largest error"


def test_bound_holds_on_the_symmetric_gram(seed):
    # The triangle kernel mirrors the upper triangle: the lower one is an exact copy, and still bounded.
    Y = _data("clustered", np.random.default_rng(seed), 1, 300, 128)
    x, e = rc.approx_gram_with_bound(Y, 0.5)
    assert bool(((x - gram64(Y)).abs() <= e).all()), f"seed {seed}"
    assert torch.equal(x, x.transpose(1, 2)), f"seed {seed}"


# ----------------------------------------------------------------------------- the triangle Gram
def _rows(rng: np.random.Generator, b: int, M: int, D: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((b, M, D))).float(), dim=2).contiguous()


def _operands(Y: torch.Tensor, c: float):
    """The GEMM operands the kernel builds: bfloat16 L = [h | 1 | 0..], R = [h | -c | 0..], h = bf16(Y)
    (nearest even), ld as the kernel pads it."""
    b, M, D = Y.shape
    ld = (D + 1 + 15) // 16 * 16
    L = torch.zeros(b, M, ld, dtype=torch.bfloat16)
    L[..., :D] = Y.bfloat16()
    R = L.clone()
    L[..., D] = 1.0
    R[..., D] = -c
    return L, R, ld


@pytest.mark.parametrize("b,M,D", [(1, 400, 2048), (3, 97, 130), (2, 33, 64), (1, 1, 16), (2, 13, 7), (1, 417, 96)])
def test_triangle_gram(seed, b, M, D):
    # The kernel's a = x - c: the lower triangle an exact mirror, each entry within the bound's
    # accumulation and output-rounding terms of the float64 product of the same bfloat16 operands
    # (an entry left unwritten would hold another call's value and fail), rounded to nearest, and
    # the same bits at one and two threads (one writer per entry).
    Y = _rows(np.random.default_rng(seed), b, M, D)
    c = 0.375
    cs = np.full(b, c, np.float32)
    x, _ = rc._native.approx_gram_bound(Y.numpy(), cs, rc.SAFETY, rc.OUT_REL * rc.SAFETY, threads=2)
    A = torch.from_numpy(x) - c  # exact: a and c are bfloat16 values of similar size
    assert torch.equal(A, A.transpose(1, 2)), f"seed {seed}"
    L, R, ld = _operands(Y, c)
    exact = torch.bmm(L.double(), R.double().transpose(1, 2))
    terms = torch.bmm(L.double().abs(), R.double().abs().transpose(1, 2))
    acc = ld * 2.0 ** -24 / (1 - ld * 2.0 ** -24) * terms + 1e-30
    err = (A - exact).abs()
    bound = acc + 2.0 ** -8 * A.abs()
    assert bool((err <= bound).all()), f"seed {seed}: error {float((err / bound).max()):.3f}x the bound"
    # Rounded to nearest: within half a bfloat16 ulp (<= 2^-8 |x|) of the float32 sum; truncation
    # would be off by up to a whole ulp on about half the entries.
    assert bool((err <= 2.0 ** -8 * exact.abs() * (1 + 2.0 ** -7) + 2 * acc).all()), f"seed {seed}"
    x1, _ = rc._native.approx_gram_bound(Y.numpy(), cs, rc.SAFETY, rc.OUT_REL * rc.SAFETY, threads=1)
    assert np.array_equal(x, x1), f"seed {seed}: one and two threads disagree"


def test_triangle_gram_matches_torch_product(seed):
    # Against oneDNN's bfloat16 product of the same operands: both round float32 sums of the
    # same exact products, so they differ by at most a bfloat16 ulp or two where the sums' orders
    # part ways at a rounding boundary.
    Y = _rows(np.random.default_rng(seed), 1, 300, 512)
    x, _ = rc.approx_gram_with_bound(Y, 0.0)
    L, R, _ = _operands(Y, 0.0)
    T = torch.mm(L[0], R[0].T)
    diff = (x[0] - T.double()).abs()
    ulp = 2.0 ** (torch.floor(torch.log2(T.double().abs().clamp_min(2.0 ** -20))) - 7)
    assert bool((diff <= 2 * ulp).all()), f"seed {seed}: {float((diff / ulp).max()):.1f} ulp apart"
    assert float((diff == 0).double().mean()) > 0.9, f"seed {seed}"


# ----------------------------------------------------------------------------- the selection
@pytest.mark.parametrize("nq,M,D,K", [(1, 400, 2048, 9), (2, 333, 96, 9), (2, 257, 37, 9), (3, 12, 64, 9),
                                      (3, 5, 16, 9), (2, 200, 64, 0), (2, 64, 48, 31)])
def test_neighbours_match_float64(seed, nq, M, D, K):
    queries, db = make_data(seed, nq, 3 * M, D)
    q, Y = candidates(queries, db, M)
    Kp = min(K + 1, M)
    v, n, st = rc.gram_topk(Y, Kp, q)
    assert v.shape == n.shape == (nq, M, Kp)
    assert_neighbours_exact(Y, v, n, f"seed {seed}")
    assert st["rows"] == nq * M and st["exact_dots"] >= nq * M * Kp / 2


@pytest.mark.parametrize("kind", ["relu", "float16", "scaled"])
def test_neighbours_odd_data(seed, kind):
    Y = _data(kind, np.random.default_rng(seed), 2, 150, 80)
    v, n, _ = rc.gram_topk(Y, 10)
    # Scaled rows: values up to 1e6, so float32 dots differ from float64 by up to ~1e-1 absolute.
    atol = 2e-6 * float(gram64(Y).abs().amax()) if kind == "scaled" else 2e-6
    assert_neighbours_exact(Y, v, n, f"seed {seed}, {kind}", atol=atol)


def test_exact_duplicates(seed):
    # Every row three times: each Gram row ties in threes everywhere, slot 0 included.
    queries, base = make_data(seed, 2, 100, 48)
    Y = torch.from_numpy(np.repeat(base, 3, axis=0))[None].repeat(2, 1, 1).contiguous()
    v, n, _ = rc.gram_topk(Y, 10, torch.from_numpy(queries))
    assert_neighbours_exact(Y, v, n, f"seed {seed}")


def test_near_duplicates_take_the_dense_fallback(seed):
    # 200 of 300 candidates are one vector perturbed by 1e-6: their Gram values differ far below
    # the bfloat16 bound, so none of those rows can rule out any of its 200 twins. With more
    # candidates than cap = M'/2 they take the whole exact row (the fallback). The other 100 rows
    # (20 groups of 5 twins) are certified, unless their cut happens to fall at their value
    # against the 200 twins.
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((21, 64))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    rows = np.concatenate([np.repeat(base[:1], 200, axis=0), np.repeat(base[1:], 5, axis=0)])
    rows = rows + 1e-6 * rng.standard_normal(rows.shape)
    Y = torch.from_numpy(rows[rng.permutation(300)]).float()[None].contiguous()
    v, n, st = rc.gram_topk(Y, 10)
    assert 200 <= st["dense_rows"] < 300, f"seed {seed}: {st}"
    assert_neighbours_exact(Y, v, n, f"seed {seed}")


def test_float32_near_ties_are_decided_in_float64(seed):
    # 300 rows within ~2e-6 of one vector: the Gram values of a row sit within ~1e-6 of each other,
    # at the scale float32 dots err by, so a float32 Gram picks its top K' partly by rounding (in
    # hundreds of rows here), while the float64 values are ~1e-8 apart and well defined. The
    # certified path recomputes the window around each cut in float64, so its set must be
    # float64's exactly. (With that window shrunk to 0, 30-90 of these 900 rows differed, seeds 0-4.)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 1, 256))
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    Y = torch.from_numpy(x + 2e-6 * rng.standard_normal((3, 300, 256))).float().contiguous()
    v64, n64 = torch.topk(gram64(Y), 11, dim=2)
    decided = ((v64[..., 9] - v64[..., 10]).abs() > 1e-12).numpy()
    v, n, _ = rc.gram_topk(Y, 10)
    for b, i in zip(*np.nonzero(decided)):
        assert set(n[b, i].tolist()) == set(n64[b, i, :10].tolist()), f"seed {seed}, query {b}, row {i}"
    _, ne = torch.topk(torch.bmm(Y, Y.transpose(1, 2)), 10, dim=2)  # the float32 Gram's selection
    flips = sum(set(ne[b, i].tolist()) != set(n64[b, i, :10].tolist()) for b, i in zip(*np.nonzero(decided)))
    assert flips > 0, f"seed {seed}: the float32 Gram resolved every row; the data do not exercise the window"


def test_cap_forces_whole_rows(seed, monkeypatch):
    queries, db = make_data(seed, 2, 600, 64)
    q, Y = candidates(queries, db, 200)
    monkeypatch.setattr(rc, "CAP_FRACTION", 0.0)  # cap = K': any row with more candidates is dotted whole
    v, n, st = rc.gram_topk(Y, 10, q)
    assert st["dense_rows"] >= 100, f"seed {seed}: {st}"  # rows with exactly K' candidates stay certified
    assert_neighbours_exact(Y, v, n, f"seed {seed}")


def test_too_small_a_bound_is_caught(monkeypatch):
    # Bench-like data: ~100 rows per cluster at cosine ~0.5, K'-th neighbours 0.004 apart, so
    # the bfloat16 error (~0.002) reorders the cut of many rows. With the bound scaled to 0 the
    # kernel trusts the approximate top K' and must pick wrong neighbours somewhere; with the
    # bound it must not. This is what makes the exactness tests above able to fail.
    g = torch.Generator().manual_seed(0)
    D = 512
    centres = torch.nn.functional.normalize(torch.randn(3, D, generator=g), dim=1)
    lab = torch.randint(0, 3, (1, 300), generator=g)
    Y = torch.nn.functional.normalize(centres[lab] + torch.randn(1, 300, D, generator=g) / D ** 0.5, dim=2)
    G = gram64(Y)
    v64, n64 = torch.topk(G, 10, dim=2)
    with monkeypatch.context() as m:
        m.setattr(rc, "SAFETY", 0.0)  # the bound's terms and output rounding times 0
        v, n, _ = rc.gram_topk(Y, 10)
    ok, _ = rankings_agree(n64[0], v64[0], n[0], v[0], rtol=0, atol=2e-6, truncated=True)
    assert not ok, "a zero bound still gave the exact neighbours: the data do not exercise the bound"
    v, n, _ = rc.gram_topk(Y, 10)
    assert_neighbours_exact(Y, v, n, f"SAFETY={rc.SAFETY}")


def test_scalar_variant_matches(seed, monkeypatch):
    queries, db = make_data(seed, 2, 500, 100)
    q, Y = candidates(queries, db, 250)
    v, n, _ = rc.gram_topk(Y, 10, q)
    monkeypatch.setattr(rc, "ISA", "baseline")
    vb, nb, _ = rc.gram_topk(Y, 10, q)
    assert_neighbours_exact(Y, vb, nb, f"seed {seed}, baseline")
    for b in range(2):
        assert_rankings_agree(n[b], v[b], nb[b], vb[b], rtol=0, atol=2e-6, context=f"seed {seed}")
    o, s = rc.rerank_cpu_bf16(q, Y, 9, 0.15)  # the whole rerank on the scalar variant
    ref_o, ref_s = rc.rerank_cpu_fp32(q, Y, 9, 0.15)
    for b in range(2):
        assert_rankings_agree(ref_o[b], ref_s[b], o[b], s[b], rtol=0, atol=4e-6, context=f"seed {seed}, baseline")


# ----------------------------------------------------------------------------- whole reranks
@pytest.mark.parametrize("nq,M,D,K", [(2, 400, 2048, 9), (3, 257, 96, 9), (3, 200, 40, 0), (4, 11, 32, 9)])
def test_rerank_matches_chain(seed, nq, M, D, K):
    queries, db = make_data(seed, nq, 3 * M, D)
    q, Y = candidates(queries, db, M)
    check_against_chain(q, Y, K, 0.15, seed, impls=("cpu_bf16", "cpu_fp32", "auto"))


def test_bf16_without_avx512_bf16_runs_fp32(seed, monkeypatch):
    # Where the certified path cannot run, cpu_bf16 is cpu_fp32 (no third route): the same bits.
    queries, db = make_data(seed, 3, 900, 128)
    q, Y = candidates(queries, db, 300)
    monkeypatch.setattr(rc, "certified_available", lambda: False)
    o, s = rc.rerank_cpu_bf16(q, Y, 9, 0.15)
    ref_o, ref_s = rc.rerank_cpu_fp32(q, Y, 9, 0.15)
    assert torch.equal(o, ref_o) and torch.equal(s, ref_s), f"seed {seed}"


def test_rerank_duplicates_and_ties(seed):
    # The certified path end to end (C++ selection and finish) where every Gram row has exact
    # ties, slot 0 may be a duplicate, s1 ties at the expansion's cut and final scores tie in threes.
    queries, base = make_data(seed, 3, 100, 64)
    db = np.repeat(base, 3, axis=0)
    q, Y = candidates(queries, db, 240)
    check_against_chain(q, Y, 9, 0.15, seed, impls=("cpu_bf16",))


def test_batch_split_over_threads_equals_one_by_one(seed):
    # Batches run their queries on separate threads, single-threaded kernels; one query (or one
    # thread) runs the kernels over rows on every thread. The arithmetic is the same either way:
    # identical bits.
    queries, db = make_data(seed, 5, 900, 96)
    q, Y = candidates(queries, db, 300)
    o, s, st = rc.certified_rerank(q, Y, 9, 0.15)
    assert st["rows"] == 5 * 300 and st["exact_queries"] == 0, st
    for i in range(5):
        oi, si, _ = rc.certified_rerank(q[i:i + 1], Y[i:i + 1], 9, 0.15)
        assert torch.equal(o[i], oi[0]) and torch.equal(s[i], si[0]), f"seed {seed}, query {i}"
    args = (Y.numpy(), q.numpy(), 10, 0.15, rc.SAFETY, rc.OUT_REL * rc.SAFETY, 150)
    for threads in (1, 2, 3):
        o1, s1, status, counts = rc._native.certified_rerank(*args, threads=threads)
        assert not status.any() and counts[0] == 5 * 300
        assert np.array_equal(o1, o.numpy()) and np.array_equal(s1, s.numpy()), f"seed {seed}, threads={threads}"


def test_rerank_float16_rows(seed):
    # An index stored in float16: the candidates are not exactly unit norm.
    queries, db = make_data(seed, 3, 900, 256)
    db = db.astype(np.float16).astype(np.float32)
    q, Y = candidates(queries, db, 300)
    check_against_chain(q, Y, 9, 0.15, seed, impls=("cpu_bf16",))


def test_search_top100(seed):
    # The acceptance test: identical top-100 (tie-aware) to the chain, at the default M, K.
    queries, db = make_data(seed, 3, 2000, 128)
    ids, sc = superglobal_rerank(queries, db, M=400, K=9, k=100, impl="cpu_bf16")
    assert_search_agrees(queries, db, 400, 9, 0.15, ids, sc, seed, k=100)
    ref_ids, ref_sc = superglobal_rerank(queries, db, M=400, K=9, k=100, impl="reference")
    assert_rankings_agree(ref_ids, ref_sc, ids, sc, rtol=0, atol=4e-6, context=f"seed {seed}")


# ----------------------------------------------------------------------------- adaptive mode
@pytest.mark.parametrize("nq,M,D,K", [(2, 400, 2048, 9), (3, 257, 96, 9), (3, 200, 40, 0), (4, 11, 32, 9),
                                      (3, 150, 64, 2)])
def test_adaptive_rerank_matches_chain(seed, nq, M, D, K):
    # The adaptive mode on the certified path: the C++ finish with its mask and expansion rule.
    queries, db = make_data(seed, nq, 3 * M, D)
    q, Y = candidates(queries, db, M)
    check_against_chain(q, Y, K, 0.15, seed, impls=("cpu_bf16", "cpu_fp32"), mode="adaptive")


def test_adaptive_duplicates_and_threads(seed):
    # Exact ties everywhere (every row three times); a batch over threads equals one query at a time.
    queries, base = make_data(seed, 4, 100, 64)
    q, Y = candidates(queries, np.repeat(base, 3, axis=0), 240)
    check_against_chain(q, Y, 9, 0.15, seed, impls=("cpu_bf16",), mode="adaptive")
    o, s, _ = rc.certified_rerank(q, Y, 9, 0.15, adaptive=True)
    for i in range(len(q)):
        oi, si, _ = rc.certified_rerank(q[i:i + 1], Y[i:i + 1], 9, 0.15, adaptive=True)
        assert torch.equal(o[i], oi[0]) and torch.equal(s[i], si[0]), f"seed {seed}, query {i}"


def test_adaptive_scalar_variant_matches(seed, monkeypatch):
    queries, db = make_data(seed, 2, 500, 100)
    q, Y = candidates(queries, db, 250)
    monkeypatch.setattr(rc, "ISA", "baseline")
    o, s = rc.rerank_cpu_bf16(q, Y, 9, 0.15, adaptive=True)
    ref_o, ref_s = rc.rerank_cpu_fp32(q, Y, 9, 0.15, adaptive=True)
    for b in range(2):
        assert_rankings_agree(ref_o[b], ref_s[b], o[b], s[b], rtol=0, atol=4e-6, context=f"seed {seed}, baseline")


def test_adaptive_non_finite_rows_take_the_exact_path():
    g = torch.Generator().manual_seed(1)
    Y = torch.nn.functional.normalize(torch.randn(2, 300, 32, generator=g), dim=2)
    Y[1, 5, 0] = float("inf")
    q = torch.randn(2, 32, generator=g)
    o, s, st = rc.certified_rerank(q, Y, 9, 0.15, adaptive=True)
    assert st["exact_queries"] == 1
    ref_o, ref_s = rc.rerank_cpu_fp32(q[:1], Y[:1], 9, 0.15, adaptive=True)
    assert_rankings_agree(ref_o[0], ref_s[0], o[0], s[0], rtol=0, atol=4e-6)


def test_likely_slot_is_checked():
    with pytest.raises(ValueError, match=r"^certified_rerank: likely_slot must be -1 \(faithful\) or in \[0, Kp\)"):
        _call("certified_rerank", likely_slot=5)
    with pytest.raises(ValueError, match=r"likely_slot must be -1"):
        _call("certified_rerank", likely_slot=-2)


@pytest.mark.parametrize("nq", [1, 3])
def test_non_finite_rows_take_the_exact_path(nq):
    # A query with a NaN row gets status 1 from the C++ entry and runs cpu_fp32, which reproduces the
    # reference's NaN handling; the others stay certified (one query: the row-threaded route).
    g = torch.Generator().manual_seed(0)
    Y = torch.nn.functional.normalize(torch.randn(nq, 300, 32, generator=g), dim=2)
    Y[-1, 17, 3] = float("nan")
    q = torch.randn(nq, 32, generator=g)
    o, s, st = rc.certified_rerank(q, Y, 9, 0.15)
    assert st["exact_queries"] == 1 and st["rows"] == (nq - 1) * 300, st
    assert bool(torch.isfinite(s[:-1]).all())
    ref_o, ref_s = rc.rerank_cpu_fp32(q[-1:], Y[-1:], 9, 0.15)
    assert torch.equal(o[-1], ref_o[0]) and torch.equal(s[-1].isnan(), ref_s[0].isnan())
    with pytest.raises(InputError, match="NaN or inf"):
        rerank_candidates(q, Y, impl="cpu_bf16")
    with pytest.raises(ValueError, match=rf"Y\[{nq - 1}\] holds a row that is not finite"):
        rc.gram_topk(Y, 10)
    with pytest.raises(ValueError, match=rf"Y\[{nq - 1}\] holds a row that is not finite"):
        rc.approx_gram_with_bound(Y)


def test_impl_names():
    info = rc.certified_info()
    assert info["available"] and info["built"] and info["gram"] == "avx512_bf16 triangle" and info["error"] is None
    assert resolve_impl("auto", "cpu", 400) == "cpu_bf16"
    assert resolve_impl("auto", "cpu", rc.CERT_MIN_M) == "cpu_bf16"
    assert resolve_impl("auto", "cpu", rc.CERT_MIN_M - 1) == "cpu_fp32"
    assert resolve_impl("cpu_bf16", "cpu", 100) == "cpu_bf16"
    assert resolve_impl("cpu_fp32", "cpu", 400) == "cpu_fp32"
    with pytest.raises(BackendUnavailableError, match="CPU tensors"):
        resolve_impl("cpu_bf16", "cuda", 400)


# ----------------------------------------------------------------------------- the C++ entries' checks
_rng = np.random.default_rng(0)
_Y = _rng.standard_normal((2, 20, 16)).astype(np.float32)
_q = _rng.standard_normal((2, 16)).astype(np.float32)
_c = np.zeros(2, np.float32)
_SETTINGS = dict(safety=1.0625, out_rel=2.0 ** -8, threads=1, isa="auto")


def _call(entry: str, **kw):
    args = {"certified_rerank": dict(Y=_Y, q=_q, Kp=5, beta=0.15, cap=10, **_SETTINGS),
            "certified_neighbours": dict(Y=_Y, q=_q, Kp=5, cap=10, **_SETTINGS),
            "approx_gram_bound": dict(Y=_Y, c=_c, **_SETTINGS)}[entry]
    args.update(kw)
    return getattr(rc._native, entry)(**args)


ALL = ("certified_rerank", "certified_neighbours", "approx_gram_bound")
WITH_Q = ("certified_rerank", "certified_neighbours")
WITH_KP = ("certified_rerank", "certified_neighbours")


@pytest.mark.parametrize("entries,kw,match", [
    (ALL, dict(Y=_Y.astype(np.float64)), r"Y must be float32, got float64"),
    (ALL, dict(Y=_Y.transpose(0, 2, 1)), r"Y must be C-contiguous"),
    (ALL, dict(Y=_Y[:, ::2]), r"Y must be C-contiguous"),
    (ALL, dict(Y=_Y[0]), r"Y must have 3 dimensions \[nq, M, D\], got shape \(20, 16\)"),
    (ALL, dict(Y=_Y[:, :0].copy()), r"Y has no candidates"),
    (ALL, dict(threads=0), r"threads must be >= 1, got 0"),
    (ALL, dict(isa="sse9"), r"isa 'sse9' is not available"),
    (ALL, dict(safety=-1.0), r"safety must be a finite number >= 0"),
    (ALL, dict(out_rel=0.5), r"out_rel must be in \[0, 0.5\)"),
    (WITH_Q, dict(q=_q.astype(np.float16)), r"q must be float32, got float16"),
    (WITH_Q, dict(q=_q[:, ::2]), r"q must be C-contiguous"),
    (WITH_Q, dict(q=_q[0]), r"q must have 2 dimensions \[nq, D\]"),
    (WITH_Q, dict(q=_q[:1].copy()), r"q has shape \(1, 16\) but Y has \(2, 20, 16\)"),
    (WITH_Q, dict(q=_q[:, :8].copy()), r"q has shape \(2, 8\) but Y has \(2, 20, 16\)"),
    (WITH_KP, dict(Kp=0), r"Kp must be in \[1, M\] = \[1, 20\], got 0"),
    (WITH_KP, dict(Kp=21), r"Kp must be in \[1, M\] = \[1, 20\], got 21"),
    (WITH_KP, dict(cap=-1), r"cap must be >= 0"),
    (("certified_rerank",), dict(beta=float("inf")), r"beta must be finite"),
    (("approx_gram_bound",), dict(c=np.zeros(3, np.float32)), r"c has shape \(3,\) but Y has \(2, 20, 16\)"),
    (("approx_gram_bound",), dict(c=np.zeros(2)), r"c must be float32, got float64"),
], ids=["Y-float64", "Y-transposed", "Y-strided", "Y-2D", "Y-M0", "threads", "isa", "safety", "out_rel", "q-float16",
        "q-strided", "q-1D", "q-nq", "q-D", "Kp-0", "Kp-M+1", "cap", "beta", "c-shape", "c-float64"])
def test_entries_check_their_arguments(entries, kw, match):
    """Every C++ entry checks dtype (no silent conversion), layout and shapes, and names the
    argument and the entry."""
    for entry in entries:
        with pytest.raises(ValueError, match=f"^{entry}: {match}"):
            _call(entry, **kw)


def test_entries_take_only_numpy_arrays():
    for entry in ALL:
        with pytest.raises(TypeError):
            _call(entry, Y=torch.from_numpy(_Y))
    order, scores, status, counts = _call("certified_rerank")
    assert order.shape == scores.shape == (2, 20) and order.dtype == np.int64 and scores.dtype == np.float32
    assert status.shape == (2,) and status.dtype == np.uint8 and len(counts) == 3
    v, n, _ = _call("certified_neighbours", q=None)
    assert v.shape == n.shape == (2, 20, 5) and v.dtype == np.float32 and n.dtype == np.int64
    x, e = _call("approx_gram_bound")
    assert x.shape == e.shape == (2, 20, 20) and x.dtype == e.dtype == np.float64
    o0, s0, st0, _ = _call("certified_rerank", Y=_Y[:0].copy(), q=_q[:0].copy())
    assert o0.shape == s0.shape == (0, 20) and st0.shape == (0,)
