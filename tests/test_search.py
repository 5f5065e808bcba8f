"""First-stage search (SPEC 5) against a float64 full sort, tie-aware.

A result is a correct exact top-k when (1) its rows are distinct and in range, (2) each returned
score is the row's true score, (3) the true scores of the returned rows, in the returned order,
equal the k largest true scores. (3) is insensitive to which of several tied rows was chosen,
the same idea as FAISS's check_ref_knn_with_draws. "Equal" means within twice the error of a
plain float32 torch product against float64, plus a small atol.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sgengine.errors import InputError
from sgengine.search import _split_query, resolve_impl, topk_similarity

try:  # written by another module owner; used when present, never required
    from sgengine.compare import assert_rankings_agree
except ImportError:  # pragma: no cover - depends on the tree's state
    assert_rankings_agree = None


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def plain_error(q: np.ndarray, db: np.ndarray) -> float:
    """Max abs error of a plain float32 torch product against float64: the yardstick for tolerances."""
    ref = q.astype(np.float64) @ db.astype(np.float64).T
    plain = (torch.from_numpy(q.astype(np.float32)) @ torch.from_numpy(db.astype(np.float32)).T).double().numpy()
    return float(np.abs(plain - ref).max())


def assert_exact_topk(q: np.ndarray, db: np.ndarray, k: int, scores, rows) -> None:
    scores = scores.cpu().numpy() if isinstance(scores, torch.Tensor) else scores
    rows = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows
    nq, n = q.shape[0], db.shape[0]
    assert scores.shape == (nq, k) and rows.shape == (nq, k)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    full = q.astype(np.float64) @ db.astype(np.float64).T  # [nq, N]
    tol = 2 * plain_error(q, db) + 1e-6
    ref_sorted = -np.sort(-full, axis=1)[:, :k]
    for i in range(nq):
        r = rows[i]
        assert ((r >= 0) & (r < n)).all(), f"query {i}: rows out of range {r}"
        assert len(set(r.tolist())) == k, f"query {i}: repeated rows"
        true = full[i, r]
        np.testing.assert_allclose(scores[i], true, rtol=0, atol=tol, err_msg=f"query {i}: score != q.x[row]")
        assert (np.diff(scores[i]) <= 0).all(), f"query {i}: scores not descending"
        np.testing.assert_allclose(true, ref_sorted[i], rtol=0, atol=tol,
                                   err_msg=f"query {i}: not the k best rows (beyond ties)")
    if assert_rankings_agree is not None:
        ref_rows = np.argsort(-full, axis=1, kind="stable")[:, :k]
        for i in range(nq):
            assert_rankings_agree(ref_rows[i], ref_sorted[i].astype(np.float32), rows[i], scores[i])


N, D = 517, 24


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 64, 100, 516, 517, 4096])
@pytest.mark.parametrize("k", [1, 10, 517])
def test_float32_matches_full_sort(chunk_rows, k):
    db = unit_rows(N, D, 0)
    q = unit_rows(5, D, 1)
    s, r = topk_similarity(torch.from_numpy(q), torch.from_numpy(db), k, chunk_rows=chunk_rows)
    assert_exact_topk(q, db, k, s, r)


@pytest.mark.parametrize("as_numpy", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 33, 500])
def test_float16_database(as_numpy, chunk_rows):
    db16 = unit_rows(N, D, 2).astype(np.float16)
    q = unit_rows(4, D, 3)
    database = db16 if as_numpy else torch.from_numpy(db16)
    s, r = topk_similarity(torch.from_numpy(q), database, 50, chunk_rows=chunk_rows)
    # The stored rows are the float16 values; the product must not have been taken in float16.
    assert_exact_topk(q, db16.astype(np.float32), 50, s, r)


def test_float16_accumulates_in_float32():
    # 4096 terms of 2^-12: a running float16 sum stalls at 0.5 (2^-12 is half an ulp there);
    # float32 accumulation gives exactly 1.
    d = 4096
    db = np.full((3, d), 1 / 64, dtype=np.float16)
    q = np.full((1, d), 1 / 64, dtype=np.float32)
    s, _ = topk_similarity(torch.from_numpy(q), db, 3, chunk_rows=2)
    np.testing.assert_allclose(s.numpy(), 1.0, rtol=0, atol=1e-6)


def test_memmap_database_in_place(tmp_path):
    db = unit_rows(N, D, 4)
    np.save(tmp_path / "db.npy", db)
    mm = np.load(tmp_path / "db.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    q = unit_rows(3, D, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only memmap must not make torch warn
        s, r = topk_similarity(torch.from_numpy(q), mm, 20, chunk_rows=100)
    assert_exact_topk(q, db, 20, s, r)


def test_ties_are_resolved_tie_aware():
    # 40 distinct rows repeated: every score occurs many times, so the chosen rows among a tie
    # are arbitrary, yet the score sequence must be exactly the reference's.
    base = unit_rows(40, D, 6)
    db = np.concatenate([base] * 13, axis=0)
    q = unit_rows(4, D, 7)
    s, r = topk_similarity(torch.from_numpy(q), torch.from_numpy(db), 100, chunk_rows=37)
    assert_exact_topk(q, db, 100, s, r)


def test_k_equal_n_is_a_full_sort():
    db = unit_rows(100, 8, 8)
    q = unit_rows(2, 8, 9)
    s, r = topk_similarity(torch.from_numpy(q), db, 100, chunk_rows=9)
    assert_exact_topk(q, db, 100, s, r)
    assert sorted(r[0].tolist()) == list(range(100))


@pytest.mark.parametrize("k", [0, -1, 101])
def test_k_out_of_range(k):
    db = unit_rows(100, 8, 10)
    with pytest.raises(InputError, match=f"k={k} must be between 1"):
        topk_similarity(torch.from_numpy(unit_rows(1, 8, 11)), db, k)


def test_bad_inputs_are_named():
    db = unit_rows(10, 8, 12)
    q = torch.from_numpy(unit_rows(1, 8, 13))
    with pytest.raises(InputError, match="dimension 7"):
        topk_similarity(q[:, :7], db, 3)
    with pytest.raises(InputError, match="empty"):
        topk_similarity(q, db[:0], 1)
    with pytest.raises(InputError, match="2-D"):
        topk_similarity(q[0], db, 3)
    bad = q.clone()
    bad[0, 2] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        topk_similarity(bad, db, 3)
    with pytest.raises(InputError, match="floating"):
        topk_similarity(q, db.astype(np.int32), 3)


def test_no_queries():
    db = unit_rows(10, 8, 14)
    s, r = topk_similarity(torch.zeros(0, 8), db, 4)
    assert s.shape == (0, 4) and r.shape == (0, 4) and r.dtype == torch.int64


@pytest.mark.parametrize("chunk_rows", [None, 33])
def test_split_impl_matches_full_sort(chunk_rows):
    # On CPU "split" runs an emulation with the same arithmetic as the CUDA path (float16 x
    # float16 products are exact in float32), so the decomposition is tested everywhere.
    db16 = unit_rows(N, D, 17).astype(np.float16)
    q = unit_rows(4, D, 18)
    s, r = topk_similarity(torch.from_numpy(q), db16, 60, chunk_rows=chunk_rows, impl="split")
    assert_exact_topk(q, db16.astype(np.float32), 60, s, r)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 3e4])
def test_split_query_keeps_22_bits(scale):
    q = torch.from_numpy(unit_rows(6, 512, 19)) * scale
    q[0, :7] = torch.tensor([1e-9, -3e-7, 5e-5, 0.0, 2.0 ** -20, -(2.0 ** -14), 1e-30]) * scale
    Q, e = _split_query(q)
    assert Q.dtype == torch.float16 and torch.isfinite(Q).all()
    back = (Q[:6].double() + Q[6:].double() / 2 ** 12) * e.double()
    err = (back - q.double()).abs().max(dim=1).values
    assert (err <= 2.0 ** -22 * q.abs().amax(dim=1).double() * 2).all(), err


def test_resolve_impl():
    assert resolve_impl("auto", "cpu", torch.float16) == "upcast"
    assert resolve_impl("auto", "cpu", np.dtype("float32")) == "upcast"
    assert resolve_impl("split", "cpu", "float16") == "split"
    with pytest.raises(InputError, match="float16 rows"):
        resolve_impl("split", "cpu", torch.float32)
    with pytest.raises(InputError, match="impl must be"):
        resolve_impl("fast", "cpu", torch.float16)
    with pytest.raises(InputError, match="impl must be"):
        topk_similarity(torch.zeros(1, 4), np.eye(4, dtype=np.float32), 1, impl="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["auto", "upcast", "split"])
@pytest.mark.parametrize("where", ["cuda-fp16", "cuda-fp32", "host-memmap"])
def test_cuda(where, impl, tmp_path):
    if impl == "split" and where == "cuda-fp32":
        pytest.skip("split is for float16 rows")
    db = unit_rows(5000, 64, 15)
    q = unit_rows(8, 64, 16)
    if where == "host-memmap":
        np.save(tmp_path / "db.npy", db.astype(np.float16))
        database = np.load(tmp_path / "db.npy", mmap_mode="r")
        ref_db = db.astype(np.float16).astype(np.float32)
    elif where == "cuda-fp16":
        database = torch.from_numpy(db).half().cuda()
        ref_db = db.astype(np.float16).astype(np.float32)
    else:
        database, ref_db = torch.from_numpy(db).cuda(), db
    s, r = topk_similarity(torch.from_numpy(q).cuda(), database, 100, chunk_rows=777, impl=impl)
    assert s.is_cuda and r.is_cuda
    assert_exact_topk(q, ref_db, 100, s, r)
