"""First-stage search (SPEC 5) against a float64 full sort, tie-aware; and the rows it reads
from an Index (search_index, DeviceRows: host copies, device residency, invalidation).

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

import sgengine.search.rows as rows_mod
from sgengine.errors import InputError
from sgengine.index import Index
from sgengine.search import DeviceRows, device_room_shortfall, resolve_impl, search_index, topk_similarity
from sgengine.search.exact import _split_query

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


# ---------------------------------------------------------------- over an Index: search_index, DeviceRows
FP = "f00dfeed" * 8  # bundle fingerprint (sha256-like hex)
DI = 16


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}/{i:04d}.jpg" for i in range(n)]


def new_index(tmp_path, parts, dtype="float32") -> Index:
    ix = Index.create(tmp_path / "ix", dim=parts[0].shape[1], bundle_fingerprint=FP, dtype=dtype)
    for j, p in enumerate(parts):
        ix.add(p, names(f"p{j}", len(p)))
    return ix


def test_search_index_validation_and_clamp(tmp_path):
    ix = Index.create(tmp_path / "ix", dim=DI, bundle_fingerprint=FP)
    with pytest.raises(InputError, match="is empty"):
        search_index(ix, unit_rows(1, DI, 49), 5)
    x = unit_rows(37, DI, 50)
    ix.add(x, names("s", 37))
    s, r = search_index(ix, unit_rows(3, DI, 51), 100)  # clamped to len
    assert s.shape == (3, 37) and sorted(r[0].tolist()) == list(range(37))
    s1, r1 = search_index(ix, x[4], 1)  # [D] query is one query; a stored row finds itself
    assert r1.shape == (1, 1) and r1[0, 0] == 4 and abs(s1[0, 0] - 1) < 1e-6
    for k in (0, -3):
        with pytest.raises(InputError, match="k must be >= 1"):
            search_index(ix, x[:1], k)
    for k in (2.5, True):
        with pytest.raises(InputError, match="k must be an integer"):
            search_index(ix, x[:1], k)
    q = x[:2].copy()
    q[1, 3] = np.nan
    with pytest.raises(InputError, match="query 1 contains NaN"):
        search_index(ix, q, 3)
    with pytest.raises(InputError, match=r"\[16\] or \[nq, 16\]"):
        search_index(ix, unit_rows(2, DI - 1, 52), 3)
    with pytest.raises(InputError, match="impl must be"):
        search_index(ix, x[:1], 3, impl="fast")
    with pytest.raises(InputError, match="device must be"):
        search_index(ix, x[:1], 3, device="tpu")
    with pytest.raises(InputError, match="Index"):
        search_index(x, x[:1], 3)
    q = unit_rows(5, DI, 52)
    s, r = search_index(ix, q, 10)
    assert isinstance(s, np.ndarray) and isinstance(r, np.ndarray)
    assert_exact_topk(q, x, 10, s, r)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_search_index_over_segments(tmp_path, dtype):
    parts = [unit_rows(n, DI, 60 + n) for n in (90, 1, 150, 60)]
    ix = new_index(tmp_path, parts, dtype)
    stored = np.concatenate(parts).astype(dtype).astype(np.float32)
    q = unit_rows(6, DI, 61)
    s, r = search_index(ix, q, 50)
    assert_exact_topk(q, stored, 50, s, r)
    s, r = search_index(ix, torch.from_numpy(q), 301)  # k = N
    assert_exact_topk(q, stored, 301, s, r)
    # Duplicated rows make ties; the result must still be a valid top-k.
    ix.add(parts[0][:20], names("dup", 20))
    stored = np.concatenate([stored, stored[:20]])
    s, r = search_index(ix, q, 60)
    assert_exact_topk(q, stored, 60, s, r)


def test_split_on_cpu_reads_the_float16_rows(tmp_path):
    # The CPU keeps a float32 copy of a small float16 index for "upcast"; "split" must still get
    # the float16 rows it needs (its CPU emulation has the CUDA path's arithmetic).
    x = unit_rows(300, DI, 53)
    ix = new_index(tmp_path, [x], "float16")
    q = unit_rows(4, DI, 54)
    stored = x.astype(np.float16).astype(np.float32)
    for impl in ("split", "upcast", "auto"):
        s, r = search_index(ix, q, 40, impl=impl)
        assert_exact_topk(q, stored, 40, s, r)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_device_rows_on_cpu(tmp_path, dtype):
    x = unit_rows(200, DI, 55)
    ix = new_index(tmp_path, [x[:120], x[120:]], dtype)
    stored = x.astype(dtype).astype(np.float32)
    rows = DeviceRows(ix, torch.device("cpu"))
    assert rows.index is ix and rows.device == torch.device("cpu")
    assert rows.preload() == "host" and rows.residency() == "host"
    host = rows._copies().host_f32
    if dtype == "float16":
        assert host is not None and host.dtype == np.float32  # converted once, at preload
        np.testing.assert_array_equal(host, stored)
    else:
        assert host is None  # float32 rows are searched in place
    assert DeviceRows(ix, torch.device("cpu"))._copies() is rows._copies()  # one copy per Index and device
    q = unit_rows(5, DI, 56)
    s, r = rows.topk(torch.from_numpy(q), 30, "upcast")
    assert s.dtype == torch.float32 and r.dtype == torch.int64
    assert_exact_topk(q, stored, 30, s, r)
    assert rows._copies().host_f32 is host  # not rebuilt per query
    Y = rows.gather(r)
    assert Y.shape == (5, 30, DI) and Y.dtype == torch.float32
    np.testing.assert_array_equal(Y.numpy(), stored[r.numpy()])
    # Growth and compaction are noticed: the copies are rebuilt from the new rows.
    extra = unit_rows(7, DI, 57)
    ix.add(extra, names("e", 7))
    stored = np.concatenate([stored, extra.astype(dtype).astype(np.float32)])
    s, r = rows.topk(torch.from_numpy(q), 207, "auto")
    assert_exact_topk(q, stored, 207, s, r)
    s, r = rows.topk(torch.from_numpy(extra), 1, "upcast")
    assert r[:, 0].tolist() == list(range(200, 207))  # each new row finds itself
    np.testing.assert_array_equal(rows.gather(r).numpy(), stored[r.numpy()])
    if dtype == "float16":
        assert rows._copies().host_f32 is not host and len(rows._copies().host_f32) == 207
    ix.compact()
    s, r = rows.topk(torch.from_numpy(q), 50, "upcast")
    assert_exact_topk(q, stored, 50, s, r)
    rows.release()
    assert rows._copies().host_f32 is None and rows.residency() == "host"
    empty = DeviceRows(Index.create(tmp_path / "empty", dim=DI, bundle_fingerprint=FP), torch.device("cpu"))
    assert empty.preload() == "host"


def test_device_room_shortfall():
    dev = torch.device("cuda")
    assert device_room_shortfall(dev, 4 << 30, free_bytes=80 << 30) is None
    why = device_room_shortfall(dev, 70 << 30, free_bytes=72 << 30)
    assert why is not None and "do not fit" in why and "70.00 GiB" in why
    assert device_room_shortfall(torch.device("cpu"), 1 << 40) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_device_rows_on_cuda(tmp_path, dtype):
    x = unit_rows(300, DI, 80)
    ix = new_index(tmp_path, [x], dtype)
    stored = x.astype(dtype).astype(np.float32)
    q = unit_rows(4, DI, 81)
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = DeviceRows(ix, dev)
    assert rows.residency() == "not loaded yet"
    assert rows.preload() == "resident"
    cached = rows._copies().resident
    assert cached.device == dev and cached.dtype == getattr(torch, dtype)  # uploaded in the stored dtype
    s, r = rows.topk(torch.from_numpy(q).to(dev), 20, "auto")
    assert s.is_cuda and r.is_cuda
    assert_exact_topk(q, stored, 20, s, r)
    assert rows._copies().resident is cached  # uploaded once
    assert DeviceRows(ix, torch.device("cuda"))._copies() is rows._copies()  # "cuda" and "cuda:N" are one GPU
    Y = rows.gather(r)
    assert Y.is_cuda and Y.dtype == torch.float32
    np.testing.assert_array_equal(Y.cpu().numpy(), stored[r.cpu().numpy()])
    s_np, r_np = search_index(ix, q, 20, device="cuda")
    assert isinstance(s_np, np.ndarray) and s_np.shape == (4, 20)
    assert rows._copies().resident is cached  # search_index shares the upload
    s_cpu, _ = search_index(ix, q, 20)
    np.testing.assert_allclose(s_np, s_cpu, atol=1e-6, rtol=0)
    extra = unit_rows(5, DI, 82)
    ix.add(extra, names("d", 5))  # invalidates the device copy
    assert rows.residency() == "not loaded yet"
    stored = np.concatenate([stored, extra.astype(dtype).astype(np.float32)])
    s2, r2 = search_index(ix, torch.from_numpy(q).cuda(), 305)
    assert r2.shape == (4, 305)
    assert_exact_topk(q, stored, 305, s2, r2)
    assert rows.residency() == "resident" and rows._copies().resident.shape[0] == 305
    rows.release()
    assert rows.residency() == "not loaded yet"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_rows_on_cuda_equal_resident(tmp_path, dtype, monkeypatch):
    x = unit_rows(3000, 64, 83)
    ix = new_index(tmp_path, [x], dtype)
    stored = x.astype(dtype).astype(np.float32)
    q = torch.from_numpy(unit_rows(6, 64, 84)).cuda()
    dev = torch.device("cuda", torch.cuda.current_device())
    resident = DeviceRows(ix, dev)
    assert resident.preload() == "resident"
    s_a, r_a = resident.topk(q, 100, "auto")
    other = Index.open(ix.path)  # another Index object: its own copies
    monkeypatch.setattr(rows_mod, "DEVICE_HEADROOM_BYTES", 1 << 60)  # nothing fits: stream from the host
    streamed = DeviceRows(other, dev)
    assert streamed.preload().startswith("streamed: ") and "do not fit" in streamed.residency()
    assert streamed._copies().resident is None
    s_b, r_b = streamed.topk(q, 100, "auto")
    assert s_b.is_cuda and r_b.is_cuda
    assert_exact_topk(q.cpu().numpy(), stored, 100, s_b, r_b)
    np.testing.assert_allclose(s_b.cpu().numpy(), s_a.cpu().numpy(), atol=1e-6, rtol=0)
    Y = streamed.gather(r_b)
    assert Y.is_cuda
    np.testing.assert_array_equal(Y.cpu().numpy(), stored[r_b.cpu().numpy()])
