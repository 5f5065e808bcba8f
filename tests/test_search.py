"""First-stage search (SPEC 5) against a float64 full sort, tie-aware; the C++ scan ("cpu_native")
against the "upcast" reference and at its binding; and the rows it reads from an Index
(search_index, DeviceRows: mapped segments, device residency, invalidation).

A result is a correct exact top-k when (1) its rows are distinct and in range, (2) each returned
score is the row's true score, (3) the true scores of the returned rows, in the returned order,
equal the k largest true scores. (3) is insensitive to which of several tied rows was chosen,
the same idea as FAISS's check_ref_knn_with_draws. "Equal" means within twice the error of a
plain float32 torch product against float64, plus a small atol.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

import sgengine.search.rows as rows_mod
from sgengine.errors import BackendUnavailableError, InputError
from sgengine.index import Index
from sgengine.kernels import search_cpu
from sgengine.search import (DeviceRows, device_room_shortfall, index_segments, resolve_impl, search_index,
                             topk_similarity)
from sgengine.search.exact import _split_query

NATIVE = search_cpu.native_info()
needs_native = pytest.mark.skipif(not NATIVE["available"], reason=f"C++ search kernel not built: {NATIVE['error']}")
# The C++ scan where it is built (what "auto" picks on the CPU), and always the reference.
CPU_IMPLS = ["upcast"] + (["cpu_native"] if NATIVE["available"] else [])

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
    s, r = topk_similarity(torch.from_numpy(q), torch.from_numpy(db), k, chunk_rows=chunk_rows, impl="upcast")
    assert_exact_topk(q, db, k, s, r)


@pytest.mark.parametrize("k", [1, 10, 517])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_float32_rows(impl, k):
    db = unit_rows(N, D, 0)
    q = unit_rows(5, D, 1)
    s, r = topk_similarity(torch.from_numpy(q), torch.from_numpy(db), k, impl=impl)
    assert_exact_topk(q, db, k, s, r)


@pytest.mark.parametrize("as_numpy", [True, False])
@pytest.mark.parametrize("impl,chunk_rows", [("upcast", None), ("upcast", 33), ("upcast", 500),
                                             *([("cpu_native", None)] if NATIVE["available"] else [])])
def test_float16_database(as_numpy, impl, chunk_rows):
    db16 = unit_rows(N, D, 2).astype(np.float16)
    q = unit_rows(4, D, 3)
    database = db16 if as_numpy else torch.from_numpy(db16)
    s, r = topk_similarity(torch.from_numpy(q), database, 50, chunk_rows=chunk_rows, impl=impl)
    # The stored rows are the float16 values; the product must not have been taken in float16.
    assert_exact_topk(q, db16.astype(np.float32), 50, s, r)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_float16_accumulates_in_float32(impl):
    # 4096 terms of 2^-12: a running float16 sum stalls at 0.5 (2^-12 is half an ulp there);
    # float32 accumulation gives exactly 1.
    d = 4096
    db = np.full((3, d), 1 / 64, dtype=np.float16)
    q = np.full((1, d), 1 / 64, dtype=np.float32)
    s, _ = topk_similarity(torch.from_numpy(q), db, 3, chunk_rows=2, impl=impl)
    np.testing.assert_allclose(s.numpy(), 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_memmap_database_in_place(tmp_path, impl):
    db = unit_rows(N, D, 4)
    np.save(tmp_path / "db.npy", db)
    mm = np.load(tmp_path / "db.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    q = unit_rows(3, D, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only memmap must not make torch warn
        s, r = topk_similarity(torch.from_numpy(q), mm, 20, chunk_rows=100, impl=impl)
    assert_exact_topk(q, db, 20, s, r)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_ties_are_resolved_tie_aware(impl):
    # 40 distinct rows repeated: every score occurs many times, so the chosen rows among a tie
    # are arbitrary, yet the score sequence must be exactly the reference's.
    base = unit_rows(40, D, 6)
    db = np.concatenate([base] * 13, axis=0)
    q = unit_rows(4, D, 7)
    s, r = topk_similarity(torch.from_numpy(q), torch.from_numpy(db), 100, chunk_rows=37, impl=impl)
    assert_exact_topk(q, db, 100, s, r)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_k_equal_n_is_a_full_sort(impl):
    db = unit_rows(100, 8, 8)
    q = unit_rows(2, 8, 9)
    s, r = topk_similarity(torch.from_numpy(q), db, 100, chunk_rows=9, impl=impl)
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


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_no_queries(impl):
    db = unit_rows(10, 8, 14)
    s, r = topk_similarity(torch.zeros(0, 8), db, 4, impl=impl)
    assert s.shape == (0, 4) and r.shape == (0, 4) and r.dtype == torch.int64 and s.dtype == torch.float32


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
    fast = "cpu_native" if NATIVE["available"] else "upcast"
    assert resolve_impl("auto", "cpu", torch.float16) == fast
    assert resolve_impl("auto", "cpu", np.dtype("float32")) == fast
    assert resolve_impl("auto", "cpu", "float32") == fast
    assert resolve_impl("auto", "cpu", torch.bfloat16) == "upcast"  # the C++ scan reads float16 and float32 only
    assert resolve_impl("split", "cpu", "float16") == "split"
    assert resolve_impl("upcast", "cpu", torch.float16) == "upcast"
    with pytest.raises(InputError, match="cpu_native.*float16 or float32 rows, these are float64"):
        resolve_impl("cpu_native", "cpu", torch.float64)
    if NATIVE["available"]:
        assert resolve_impl("cpu_native", "cpu", "float16") == "cpu_native"
        with pytest.raises(BackendUnavailableError, match="cpu_native.*runs on the CPU"):
            resolve_impl("cpu_native", "cuda", "float16")
    with pytest.raises(InputError, match="float16 rows"):
        resolve_impl("split", "cpu", torch.float32)
    with pytest.raises(InputError, match="impl must be"):
        resolve_impl("fast", "cpu", torch.float16)
    with pytest.raises(InputError, match="impl must be"):
        topk_similarity(torch.zeros(1, 4), np.eye(4, dtype=np.float32), 1, impl="fast")


def test_without_the_native_build_auto_is_upcast(monkeypatch):
    # A source tree without a C++ build keeps working: "auto" takes the reference, and asking for
    # the kernel says how to build it.
    monkeypatch.setattr(search_cpu, "_native", None)
    monkeypatch.setattr(search_cpu, "_native_error", "ImportError: no module named _search_cpu")
    assert resolve_impl("auto", "cpu", "float16") == "upcast"
    with pytest.raises(BackendUnavailableError, match="_search_cpu is not built.*pip install -e"):
        resolve_impl("cpu_native", "cpu", "float16")
    db = unit_rows(50, 8, 87).astype(np.float16)
    q = unit_rows(2, 8, 88)
    s, r = topk_similarity(torch.from_numpy(q), db, 5)
    assert_exact_topk(q, db.astype(np.float32), 5, s, r)


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


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_device_rows_on_cpu(tmp_path, dtype, impl, monkeypatch):
    x = unit_rows(200, DI, 55)
    ix = new_index(tmp_path, [x[:120], x[120:]], dtype)
    stored = x.astype(dtype).astype(np.float32)
    # The rows are read segment by segment as stored: never concatenated, never converted whole.
    monkeypatch.setattr(ix, "vectors", lambda: pytest.fail("Index.vectors() concatenates the segments"))
    rows = DeviceRows(ix, torch.device("cpu"))
    assert rows.index is ix and rows.device == torch.device("cpu")
    assert rows.preload() == "host" and rows.residency() == "host"
    segs = rows._copies().segments
    assert [type(a) for a in segs] == [np.memmap, np.memmap] and [len(a) for a in segs] == [120, 80]
    assert all(a.dtype == np.dtype(dtype) for a in segs)
    assert DeviceRows(ix, torch.device("cpu"))._copies() is rows._copies()  # one copy per Index and device
    q = unit_rows(5, DI, 56)
    s, r = rows.topk(torch.from_numpy(q), 30, impl)
    assert s.dtype == torch.float32 and r.dtype == torch.int64
    assert_exact_topk(q, stored, 30, s, r)
    assert rows._copies().segments is segs  # mapped once, not per query
    Y = rows.gather(r)
    assert Y.shape == (5, 30, DI) and Y.dtype == torch.float32
    np.testing.assert_array_equal(Y.numpy(), stored[r.numpy()])
    # Growth and compaction are noticed: the segments are mapped again.
    extra = unit_rows(7, DI, 57)
    ix.add(extra, names("e", 7))
    stored = np.concatenate([stored, extra.astype(dtype).astype(np.float32)])
    s, r = rows.topk(torch.from_numpy(q), 207, "auto")
    assert_exact_topk(q, stored, 207, s, r)
    assert len(rows._copies().segments) == 3
    s, r = rows.topk(torch.from_numpy(extra), 1, impl)
    assert r[:, 0].tolist() == list(range(200, 207))  # each new row finds itself
    np.testing.assert_array_equal(rows.gather(r).numpy(), stored[r.numpy()])
    monkeypatch.undo()
    ix.compact()
    s, r = rows.topk(torch.from_numpy(q), 50, impl)
    assert_exact_topk(q, stored, 50, s, r)
    assert len(rows._copies().segments) == 1
    rows.release()
    assert rows._copies().segments is None and rows.residency() == "host"
    empty = DeviceRows(Index.create(tmp_path / "empty", dim=DI, bundle_fingerprint=FP), torch.device("cpu"))
    assert empty.preload() == "host"


def test_index_segments(tmp_path):
    parts = [unit_rows(n, DI, 90 + n) for n in (30, 1, 45)]
    ix = new_index(tmp_path, parts, "float16")
    segs = index_segments(ix)
    assert [len(a) for a in segs] == [30, 1, 45] and all(isinstance(a, np.memmap) for a in segs)
    np.testing.assert_array_equal(np.concatenate(segs), np.concatenate(parts).astype(np.float16))
    stale = Index.open(ix.path)
    ix.compact()  # deletes the three files the stale object's manifest names
    got = index_segments(stale)  # falls back to the stale object's own rows
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(parts).astype(np.float16))
    assert [len(a) for a in index_segments(ix)] == [76]
    assert index_segments(Index.create(tmp_path / "e", dim=DI, bundle_fingerprint=FP)) == []


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


# ---------------------------------------------------------------- the C++ scan ("cpu_native") against "upcast"
def assert_agrees_with_upcast(q: np.ndarray, db: np.ndarray, k: int, s, r) -> None:
    """The scan's result is an exact top-k, and agrees with the reference's up to ties and float32
    reassociation (scores within twice a plain float32 product's error)."""
    stored = db.astype(np.float32)
    assert_exact_topk(q, stored, k, s, r)
    ref_s, ref_r = topk_similarity(torch.from_numpy(q), torch.from_numpy(stored), k, impl="upcast")
    tol = 2 * plain_error(q, stored) + 1e-6
    np.testing.assert_allclose(np.asarray(s), ref_s.numpy(), rtol=0, atol=tol)
    if assert_rankings_agree is not None:
        for i in range(q.shape[0]):
            assert_rankings_agree(ref_r[i].numpy(), ref_s[i].numpy(), np.asarray(r[i]), np.asarray(s[i]),
                                  rtol=0, atol=tol, truncated=k < db.shape[0])


def native_topk(segments, q: np.ndarray, k: int, *, isa: str, threads: int, tile: int, monkeypatch):
    monkeypatch.setattr(search_cpu, "ISA", isa)
    monkeypatch.setattr(search_cpu, "TILE_ROWS", tile)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s, r = search_cpu.topk_inner_product(segments, torch.from_numpy(q), k)
    finally:
        torch.set_num_threads(old)
    assert s.dtype == torch.float32 and r.dtype == torch.int64 and s.shape == r.shape == (q.shape[0], k)
    return s.numpy(), r.numpy()


ISAS = NATIVE["isas"] if NATIVE["available"] else ()
# Odd shapes: N not a multiple of the row blocks (8 or 4) or tiles, D not a multiple of 16 (or 8),
# k above the rows a thread holds, k = N; nq = 1 (one query group), 7 (two groups: 4 + 3), 20 (5 x 4).
SHAPES = [(1, 1, 1, 1), (5, 3, 7, 5), (517, 24, 1, 10), (517, 37, 7, 300), (203, 100, 20, 203),
          (1000, 33, 20, 400), (61, 2048, 7, 17)]


@needs_native
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("n,d,nq,k", SHAPES)
@pytest.mark.parametrize("isa", ISAS)
def test_native_matches_upcast(isa, n, d, nq, k, dtype, monkeypatch):
    seed = n * 7919 + d * 31 + nq
    db = unit_rows(n, d, seed).astype(dtype)
    q = unit_rows(nq, d, seed + 1)
    for threads, tile in ((1, 0), (2, 8), (2, 24)):
        s, r = native_topk([db], q, k, isa=isa, threads=threads, tile=tile, monkeypatch=monkeypatch)
        assert_agrees_with_upcast(q, db, k, s, r)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_native_ties_keep_lower_rows(isa, monkeypatch):
    # float16 rows with exact duplicates: every score occurs 9 times. The result is the first k in
    # the order (score descending, row ascending), the same for any threads, tiles and segments.
    base = unit_rows(37, 29, 70).astype(np.float16)
    db = np.concatenate([base] * 9)
    q = unit_rows(7, 29, 71)
    k = 100
    s, r = native_topk([db], q, k, isa=isa, threads=1, tile=0, monkeypatch=monkeypatch)
    assert_agrees_with_upcast(q, db, k, s, r)
    for i in range(q.shape[0]):
        for v in np.unique(s[i]):
            run = r[i][s[i] == v]
            assert (np.diff(run) > 0).all(), f"query {i}: tied rows not in ascending order {run}"
    # Equal stored rows give bitwise-equal scores and the distinct rows' scores are far apart, so
    # the rows are exactly the first k by (score, row) of the float64 scores.
    full = q.astype(np.float64) @ db.astype(np.float64).T
    for i in range(q.shape[0]):
        np.testing.assert_array_equal(r[i], np.lexsort((np.arange(len(db)), -full[i]))[:k])
    for threads, tile, parts in ((2, 8, [db]), (2, 16, [db[:50], db[50:51], db[51:]]), (1, 40, [db[:200], db[200:]])):
        s2, r2 = native_topk(parts, q, k, isa=isa, threads=threads, tile=tile, monkeypatch=monkeypatch)
        np.testing.assert_array_equal(s2, s)
        np.testing.assert_array_equal(r2, r)


@needs_native
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_native_memmap_segments(tmp_path, dtype, monkeypatch):
    # An index's segments on disk, memory-mapped and numbered one after the other, give the same
    # result as one in-memory array: nothing is copied or converted first.
    db = unit_rows(700, 45, 72).astype(dtype)
    q = unit_rows(20, 45, 73)
    bounds = [0, 100, 101, 450, 700]
    maps = []
    for j in range(4):
        np.save(tmp_path / f"seg{j}.npy", db[bounds[j]:bounds[j + 1]])
        maps.append(np.load(tmp_path / f"seg{j}.npy", mmap_mode="r"))
    assert all(isinstance(m, np.memmap) and not m.flags.writeable for m in maps)
    for k in (1, 250, 700):
        s, r = native_topk(maps, q, k, isa="auto", threads=2, tile=16, monkeypatch=monkeypatch)
        s1, r1 = native_topk([db], q, k, isa="auto", threads=2, tile=16, monkeypatch=monkeypatch)
        np.testing.assert_array_equal(s, s1)
        np.testing.assert_array_equal(r, r1)
        assert_agrees_with_upcast(q, db, k, s, r)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_native_float16_special_values(isa, monkeypatch):
    # Subnormal float16 rows (below 6.1e-5), signed zeros and the largest finite value convert
    # exactly: the scores are the float64 products of the stored values up to float32 rounding.
    rng = np.random.default_rng(86)
    db = (rng.standard_normal((64, 40)) * 1e-5).astype(np.float16)
    db[3] = 0.0
    db[4] = -0.0
    db[5, :3] = [65504.0, -65504.0, 2.0 ** -24]
    assert (np.abs(db[db != 0]) < 2.0 ** -14).any()  # subnormals present
    q = rng.standard_normal((3, 40)).astype(np.float32)
    s, r = native_topk([db], q, 64, isa=isa, threads=1, tile=0, monkeypatch=monkeypatch)
    x = db.astype(np.float64)
    true = np.take_along_axis(q.astype(np.float64) @ x.T, r, axis=1)
    bound = 1e-6 * np.take_along_axis(np.abs(q.astype(np.float64)) @ np.abs(x).T, r, axis=1)  # float32 sums
    assert (np.abs(s - true) <= bound).all(), np.abs(s - true).max()


@needs_native
def test_native_large_d_one_query_per_thread_range(monkeypatch):
    # D = 2048 as the model's descriptors, k larger than the rows of one thread's range.
    db = unit_rows(300, 2048, 74).astype(np.float16)
    q = unit_rows(1, 2048, 75)
    s, r = native_topk([db], q, 200, isa="auto", threads=2, tile=0, monkeypatch=monkeypatch)
    assert_agrees_with_upcast(q, db, 200, s, r)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_native_scores_do_not_depend_on_the_batch(isa, monkeypatch):
    # A query's scores are the same bits alone or in a batch of 20 (4 query groups, columns in
    # slices with carried accumulators), for any threads and tiles: dynamic batching in the
    # service does not change results.
    db = unit_rows(150, 2051, 84).astype(np.float16)
    q = unit_rows(20, 2051, 85)
    s20, r20 = native_topk([db], q, 150, isa=isa, threads=2, tile=16, monkeypatch=monkeypatch)
    for i in (0, 7, 19):
        s1, r1 = native_topk([db], q[i:i + 1], 150, isa=isa, threads=1, tile=0, monkeypatch=monkeypatch)
        np.testing.assert_array_equal(s1[0], s20[i])
        np.testing.assert_array_equal(r1[0], r20[i])


@needs_native
def test_native_query_blocks(monkeypatch):
    # A batch larger than QUERY_BLOCK is searched block by block: the same result as one pass.
    db = unit_rows(300, 40, 78).astype(np.float16)
    q = unit_rows(20, 40, 79)
    s1, r1 = native_topk([db], q, 50, isa="auto", threads=2, tile=0, monkeypatch=monkeypatch)
    monkeypatch.setattr(search_cpu, "QUERY_BLOCK", 6)
    s2, r2 = native_topk([db], q, 50, isa="auto", threads=2, tile=0, monkeypatch=monkeypatch)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(r1, r2)


@needs_native
def test_native_binding_rejects_bad_inputs():
    from sgengine.kernels import _search_cpu as nat
    db = unit_rows(50, 24, 76).astype(np.float16)
    q = unit_rows(3, 24, 77)
    nat.topk_inner_product([db], q, 5)  # the good call
    bad = [
        (([db.astype(np.float64)], q, 5), r"segments\[0\] must be float16 or float32, got float64"),
        (([db.view(np.int16)], q, 5), r"segments\[0\] must be float16 or float32, got int16"),
        (([db, db.astype(np.float32)], q, 5), r"segments\[1\] is float32 but segments\[0\] is float16"),
        (([db[:, ::2]], q[:, :12].copy(), 5), r"segments\[0\] must be C-contiguous"),
        (([np.asfortranarray(db)], q, 5), r"segments\[0\] must be C-contiguous"),
        (([db[0]], q, 5), r"segments\[0\] must be 2-D"),
        (([db, db[:, :20].copy()], q, 5), r"segments\[1\] has 20 columns but segments\[0\] has 24"),
        (([db], q[:, :23].copy(), 5), r"queries have dimension 23 but the rows \(segments\) have 24"),
        (([db], q.astype(np.float16), 5), r"queries must be float32, got float16"),
        (([db], q.astype(np.float64), 5), r"queries must be float32, got float64"),
        (([db], np.asfortranarray(q), 5), r"queries must be C-contiguous"),
        (([db], q[0], 5), r"queries must be 2-D"),
        (([], q, 5), r"segments is empty"),
        (([db], q, 0), r"k = 0 must be between 1 and the number of rows \(50\)"),
        (([db, db], q, 101), r"k = 101 must be between 1 and the number of rows \(100\)"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            nat.topk_inner_product(*args)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        nat.topk_inner_product([db], q, 5, threads=0)
    with pytest.raises(ValueError, match="isa 'sse9' is not available"):
        nat.topk_inner_product([db], q, 5, isa="sse9")
    with pytest.raises(ValueError, match="tile_rows must be >= 0"):
        nat.topk_inner_product([db], q, 5, tile_rows=-1)
    with pytest.raises(TypeError, match=r"segments\[1\] must be a numpy array"):
        nat.topk_inner_product([db, torch.from_numpy(db)], q, 5)


@needs_native
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads anonymous memory from /proc/self/status")
def test_native_search_of_a_mapped_index_allocates_no_copy(tmp_path):
    # 3 float16 segments, 24 MiB in all: opening and searching them must not allocate anything
    # the size of the index (a float32 copy would be 48 MiB, a concatenation 24 MiB).
    def anon_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024

    d = 512
    ix = Index.create(tmp_path / "big", dim=d, bundle_fingerprint=FP, dtype="float16")
    for j in range(3):
        ix.add(unit_rows(8192, d, 80 + j), names(f"b{j}", 8192))
    ix = Index.open(ix.path)  # a fresh object: nothing of the rows in anonymous memory
    q = torch.from_numpy(unit_rows(20, d, 83))
    search_index(Index.open(ix.path), q[:1].numpy(), 5)  # warm up torch, the kernel and their pools
    before = anon_mib()
    rows = DeviceRows(ix, torch.device("cpu"))
    rows.preload()
    s, r = rows.topk(q, 400, "cpu_native")
    grown = anon_mib() - before
    assert grown < 8, f"searching a 24 MiB float16 index grew anonymous memory by {grown:.1f} MiB"
    assert r.shape == (20, 400)
