"""The certified bfloat16 path of the CPU rerank (kernels/rerank_cpu.py, kernels/cpu/rerank_select.cpp).

Its claim is exactness of the neighbour selection: a bfloat16 Gram only rules columns out, under
a rigorous bound, and every column it cannot rule out gets an exact float32 dot. So the tests
check (1) the bound itself, entry by entry against a float64 Gram, on data of several kinds, and
that it is tight enough for such a check to catch a bound that is too small; (2) the selection
against float64 top-K' (tie-aware) on adversarial inputs: exact and near duplicates (where the
dense fallback must run), odd M' and D, M' <= K', K = 0, rows that are not unit norm; (3) whole
reranks and searches against the float64 chain and the float32 reference, tie-aware; (4) that a
too-small bound does produce wrong neighbours, i.e. that these tests can fail. Seeds are fresh
each run and printed in failures.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sgengine.compare import assert_rankings_agree, rankings_agree
from sgengine.errors import BackendUnavailableError, InputError
from sgengine.rerank import cpu_path, rerank_candidates, resolve_impl, superglobal_rerank
from test_rerank import assert_search_agrees, candidates, check_against_chain, make_data

rc = pytest.importorskip("sgengine.kernels.rerank_cpu")
if not rc.certified_info()["available"]:
    pytest.skip(f"the C++ kernel is not built here: {rc.certified_info()['error']}", allow_module_level=True)


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


native_gram = pytest.mark.skipif(not rc._native_gram_ok(), reason="no AVX512_BF16 here: gram_bf16 does not run")


@pytest.mark.parametrize("gram", ["full", "sym", pytest.param("native", marks=native_gram)])
def test_bound_holds_symmetric_blocks(seed, gram):
    Y = _data("clustered", np.random.default_rng(seed), 1, 300, 128)
    x, e = rc.approx_gram_with_bound(Y, 0.5, gram=gram)
    assert bool(((x - gram64(Y)).abs() <= e).all()), f"seed {seed}"
    assert bool((x == x.transpose(1, 2)).all()) or gram == "full"


def _operands(rng: np.random.Generator, b: int, M: int, D: int, c: float):
    """bfloat16 L = [h | 1 | 0..], R = [h | -c | 0..] with h = bf16(unit Gaussian rows), ld as the rerank pads it."""
    ld = (D + 1 + 15) // 16 * 16
    h = torch.from_numpy(rng.standard_normal((b, M, D))).float()
    h = torch.nn.functional.normalize(h, dim=2).bfloat16()
    L = torch.zeros(b, M, ld, dtype=torch.bfloat16)
    L[..., :D] = h
    R = L.clone()
    L[..., D] = 1.0
    R[..., D] = -c
    return L, R, ld


@native_gram
@pytest.mark.parametrize("b,M,D", [(1, 400, 2048), (3, 97, 130), (2, 33, 64), (1, 1, 16), (2, 13, 7), (1, 417, 96)])
def test_native_gram(seed, b, M, D):
    # The triangle kernel: every entry written (NaN beforehand), the lower triangle an exact mirror,
    # each entry within the bound's accumulation and output-rounding terms of the float64 product
    # of the same bfloat16 operands, and the same bits at one and two threads (one writer per entry).
    L, R, ld = _operands(np.random.default_rng(seed), b, M, D, 0.375)
    A = torch.full((b, M, M), float("nan"), dtype=torch.bfloat16)
    rc._native.gram_bf16(L.data_ptr(), R.data_ptr(), A.data_ptr(), b, M, ld, 2)
    assert not bool(torch.isnan(A).any()), f"seed {seed}: entries left unwritten"
    assert torch.equal(A, A.transpose(1, 2)), f"seed {seed}"
    exact = torch.bmm(L.double(), R.double().transpose(1, 2))
    terms = torch.bmm(L.double().abs(), R.double().abs().transpose(1, 2))
    n = ld
    acc = n * 2.0 ** -24 / (1 - n * 2.0 ** -24) * terms + 1e-30
    err = (A.double() - exact).abs()
    bound = acc + 2.0 ** -8 * A.double().abs()
    assert bool((err <= bound).all()), f"seed {seed}: error {float((err / bound).max()):.3f}x the bound"
    # Rounded to nearest: within half a bfloat16 ulp (<= 2^-8 |x|) of the float32 sum; truncation
    # would be off by up to a whole ulp on about half the entries.
    assert bool((err <= 2.0 ** -8 * exact.abs() * (1 + 2.0 ** -7) + 2 * acc).all()), f"seed {seed}"
    A1 = torch.empty_like(A)
    rc._native.gram_bf16(L.data_ptr(), R.data_ptr(), A1.data_ptr(), b, M, ld, 1)
    assert torch.equal(A, A1), f"seed {seed}: one and two threads disagree"
    # Without R: packed from L with the shift column replaced (even and odd D both appear above).
    c = torch.full((b,), 0.375)
    A2 = torch.full_like(A, float("nan"))
    rc._native.gram_bf16(L.data_ptr(), 0, A2.data_ptr(), b, M, ld, 2, D, c.data_ptr())
    assert torch.equal(A, A2), f"seed {seed}: R made from L differs"


@native_gram
def test_native_gram_matches_torch_product(seed):
    # Against oneDNN's bfloat16 product of the same operands: both round float32 sums of the
    # same exact products, so they differ by at most a bfloat16 ulp or two where the sums' orders
    # part ways at a rounding boundary.
    L, R, ld = _operands(np.random.default_rng(seed), 1, 300, 512, 0.0)
    A = torch.empty(1, 300, 300, dtype=torch.bfloat16)
    rc._native.gram_bf16(L.data_ptr(), R.data_ptr(), A.data_ptr(), 1, 300, ld, 2)
    T = torch.mm(L[0], R[0].T)
    diff = (A[0].float() - T.float()).abs()
    ulp = 2.0 ** (torch.floor(torch.log2(T.float().abs().clamp_min(2.0 ** -20))) - 7)
    assert bool((diff <= 2 * ulp).all()), f"seed {seed}: {float((diff / ulp).max()):.1f} ulp apart"
    assert float((diff == 0).float().mean()) > 0.9, f"seed {seed}"


def test_gram_option_errors():
    Y = torch.nn.functional.normalize(torch.randn(1, 300, 32), dim=2)
    with pytest.raises(ValueError, match="gram must be one of"):
        rc.rerank_candidates_cpu(torch.randn(1, 32), Y, gram="blocked")
    with pytest.raises(ValueError, match="certified path's bfloat16 product"):
        rc.rerank_candidates_cpu(torch.randn(1, 32), Y, select="exact", gram="native")


# ----------------------------------------------------------------------------- the selection
@pytest.mark.parametrize("nq,M,D,K", [(1, 400, 2048, 9), (2, 333, 96, 9), (2, 257, 37, 9), (3, 12, 64, 9),
                                      (3, 5, 16, 9), (2, 200, 64, 0), (2, 64, 48, 31)])
def test_neighbours_match_float64(seed, nq, M, D, K):
    queries, db = make_data(seed, nq, 3 * M, D)
    q, Y = candidates(queries, db, M)
    Kp = min(K + 1, M)
    st = {}
    v, n = rc.gram_topk(Y, Kp, q, stats=st)
    assert v.shape == n.shape == (nq, M, Kp)
    assert_neighbours_exact(Y, v, n, f"seed {seed}")
    assert st["rows"] == nq * M and st["exact_dots"] >= nq * M * Kp / 2


@pytest.mark.parametrize("kind", ["relu", "float16", "scaled"])
def test_neighbours_odd_data(seed, kind):
    Y = _data(kind, np.random.default_rng(seed), 2, 150, 80)
    v, n = rc.gram_topk(Y, 10)
    # Scaled rows: values up to 1e6, so float32 dots differ from float64 by up to ~1e-1 absolute.
    atol = 2e-6 * float(gram64(Y).abs().amax()) if kind == "scaled" else 2e-6
    assert_neighbours_exact(Y, v, n, f"seed {seed}, {kind}", atol=atol)


def test_exact_duplicates(seed):
    # Every row three times: each Gram row ties in threes everywhere, slot 0 included.
    queries, base = make_data(seed, 2, 100, 48)
    Y = torch.from_numpy(np.repeat(base, 3, axis=0))[None].repeat(2, 1, 1).contiguous()
    v, n = rc.gram_topk(Y, 10, torch.from_numpy(queries))
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
    st = {}
    v, n = rc.gram_topk(Y, 10, stats=st)
    assert 200 <= st["dense_rows"] < 300, f"seed {seed}: {st}"
    assert_neighbours_exact(Y, v, n, f"seed {seed}")


def test_float32_near_ties_are_decided_in_float64(seed):
    # 300 rows within ~2e-6 of one vector: the Gram values of a row sit within ~1e-6 of each other,
    # at the scale float32 dots err by, so a float32 path picks its top K' partly by rounding
    # (the float32 Gram path below does, in hundreds of rows), while the float64 values are
    # ~1e-8 apart and well defined. The certified path recomputes the window around each cut in
    # float64, so its set must be float64's exactly. (With that window shrunk to 0, 30-90 of these
    # 900 rows differed, seeds 0-4.)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 1, 256))
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    Y = torch.from_numpy(x + 2e-6 * rng.standard_normal((3, 300, 256))).float().contiguous()
    v64, n64 = torch.topk(gram64(Y), 11, dim=2)
    decided = ((v64[..., 9] - v64[..., 10]).abs() > 1e-12).numpy()
    v, n = rc.gram_topk(Y, 10)
    for b, i in zip(*np.nonzero(decided)):
        assert set(n[b, i].tolist()) == set(n64[b, i, :10].tolist()), f"seed {seed}, query {b}, row {i}"
    _, ne = rc.gram_topk(Y, 10, select="exact")
    flips = sum(set(ne[b, i].tolist()) != set(n64[b, i, :10].tolist()) for b, i in zip(*np.nonzero(decided)))
    assert flips > 0, f"seed {seed}: the float32 Gram resolved every row; the data do not exercise the window"


def test_cap_forces_whole_rows(seed):
    queries, db = make_data(seed, 2, 600, 64)
    q, Y = candidates(queries, db, 200)
    st = {}
    v, n = rc.gram_topk(Y, 10, q, cap=10, stats=st)
    assert st["dense_rows"] >= 100, f"seed {seed}: {st}"  # rows with exactly K' candidates stay certified
    assert_neighbours_exact(Y, v, n, f"seed {seed}")


def test_too_small_a_bound_is_caught():
    # Bench-like data: ~100 rows per cluster at cosine ~0.5, K'-th neighbours 0.004 apart, so
    # the bfloat16 error (~0.002) reorders the cut of many rows. With the bound scaled to 0 the
    # kernel trusts the approximate top K' and must pick wrong neighbours somewhere; with the
    # bound it must not. This is what makes the exactness tests above able to fail.
    g = torch.Generator().manual_seed(0)
    D = 512
    centres = torch.nn.functional.normalize(torch.randn(3, D, generator=g), dim=1)
    lab = torch.randint(0, 3, (1, 300), generator=g)
    Y = torch.nn.functional.normalize(centres[lab] + torch.randn(1, 300, D, generator=g) / D ** 0.5, dim=2)
    v, n = rc.gram_topk(Y, 10, bound_scale=0.0)
    G = gram64(Y)
    v64, n64 = torch.topk(G, 10, dim=2)
    ok, _ = rankings_agree(n64[0], v64[0], n[0], v[0], rtol=0, atol=2e-6, truncated=True)
    assert not ok, "a zero bound still gave the exact neighbours: the data do not exercise the bound"
    v, n = rc.gram_topk(Y, 10)
    assert_neighbours_exact(Y, v, n, "bound_scale=1")


def test_scalar_variant_matches(seed, monkeypatch):
    queries, db = make_data(seed, 2, 500, 100)
    q, Y = candidates(queries, db, 250)
    v, n = rc.gram_topk(Y, 10, q)
    monkeypatch.setattr(rc, "_ISA", "baseline")
    vb, nb = rc.gram_topk(Y, 10, q)
    assert_neighbours_exact(Y, vb, nb, f"seed {seed}, baseline")
    for b in range(2):
        assert_rankings_agree(n[b], v[b], nb[b], vb[b], rtol=0, atol=2e-6, context=f"seed {seed}")


# ----------------------------------------------------------------------------- whole reranks
@pytest.mark.parametrize("nq,M,D,K", [(2, 400, 2048, 9), (3, 257, 96, 9), (3, 200, 40, 0), (4, 11, 32, 9)])
def test_rerank_matches_chain(seed, nq, M, D, K):
    queries, db = make_data(seed, nq, 3 * M, D)
    q, Y = candidates(queries, db, M)
    check_against_chain(q, Y, K, 0.15, seed, impls=("cpu_bf16", "cpu_fp32", "cpu"))


@pytest.mark.parametrize("gram", ["sym", "full"])
def test_rerank_torch_gram_fallback(seed, gram):
    # Where gram_bf16 does not run (no AVX512_BF16), the certified path multiplies with torch.
    queries, db = make_data(seed, 2, 900, 128)
    q, Y = candidates(queries, db, 300)
    o, s = rc.rerank_candidates_cpu(q, Y, select="certified", gram=gram)
    ref_o, ref_s = rc.rerank_candidates_cpu(q, Y, select="exact")
    for b in range(2):
        assert_rankings_agree(ref_o[b], ref_s[b], o[b], s[b], rtol=0, atol=4e-6, context=f"seed {seed}, {gram}")


def test_rerank_duplicates_and_ties(seed):
    # The certified path end to end (C++ selection and finish) where every Gram row has exact
    # ties, slot 0 may be a duplicate, s1 ties at the expansion's cut and final scores tie in threes.
    queries, base = make_data(seed, 3, 100, 64)
    db = np.repeat(base, 3, axis=0)
    q, Y = candidates(queries, db, 240)
    check_against_chain(q, Y, 9, 0.15, seed, impls=("cpu_bf16",))


def test_batch_split_over_threads_equals_one_by_one(seed):
    # Batches run their queries on separate threads, single-threaded kernels; one query runs the
    # kernels on every thread. The arithmetic is the same either way: identical bits.
    queries, db = make_data(seed, 5, 900, 96)
    q, Y = candidates(queries, db, 300)
    st = {}
    o, s = rc.rerank_candidates_cpu(q, Y, select="certified", stats=st)
    assert st["rows"] == 5 * 300 and st.get("exact_queries", 0) == 0, st
    for i in range(5):
        oi, si = rc.rerank_candidates_cpu(q[i:i + 1], Y[i:i + 1], select="certified")
        assert torch.equal(o[i], oi[0]) and torch.equal(s[i], si[0]), f"seed {seed}, query {i}"


def test_rerank_float16_rows(seed):
    # An index stored in float16: the candidates are not exactly unit norm.
    queries, db = make_data(seed, 3, 900, 256)
    db = db.astype(np.float16).astype(np.float32)
    q, Y = candidates(queries, db, 300)
    check_against_chain(q, Y, 9, 0.15, seed, impls=("cpu_bf16",))


def test_search_top100(seed):
    # The acceptance: identical top-100 (tie-aware) to the chain, at the default M, K.
    queries, db = make_data(seed, 3, 2000, 128)
    ids, sc = superglobal_rerank(queries, db, M=400, K=9, k=100, impl="cpu_bf16")
    assert_search_agrees(queries, db, 400, 9, 0.15, ids, sc, seed, k=100)
    ref_ids, ref_sc = superglobal_rerank(queries, db, M=400, K=9, k=100, impl="reference")
    assert_rankings_agree(ref_ids, ref_sc, ids, sc, rtol=0, atol=4e-6, context=f"seed {seed}")


def test_non_finite_rows_take_the_exact_path():
    Y = torch.nn.functional.normalize(torch.randn(2, 300, 32), dim=2)
    Y[1, 17, 3] = float("nan")
    st = {}
    o, s = rc.rerank_candidates_cpu(torch.randn(2, 32), Y, select="certified", stats=st)
    # The chunk holding the bad row: that query alone where the C++ Gram runs (one query per step).
    assert st["exact_queries"] == (1 if rc._native_gram_ok() else 2)
    assert bool(torch.isfinite(s[0]).all())
    assert not bool(torch.isfinite(s[1]).all())
    with pytest.raises(InputError, match="NaN or inf"):
        rerank_candidates(torch.randn(2, 32), Y, impl="cpu_bf16")


def test_impl_names():
    info = rc.certified_info()
    assert info["gram"] == ("avx512_bf16 triangle" if rc._native_gram_ok() else "torch")
    assert cpu_path("cpu", 400) == ("cpu_bf16" if info["bf16_hardware"] else "cpu_fp32")
    assert cpu_path("cpu", 100) == "cpu_fp32"
    assert resolve_impl("cpu_bf16", "cpu") == "cpu_bf16"
    assert resolve_impl("cpu_fp32", "cpu") == "cpu_fp32"
    with pytest.raises(BackendUnavailableError, match="CPU tensors"):
        resolve_impl("cpu_bf16", "cuda")
