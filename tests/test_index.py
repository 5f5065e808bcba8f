"""The persisted index: round trips across processes, refusals that write nothing, crash safety.

Crashes are real: a child process appends with SGENGINE_INDEX_CRASH_AT set and dies by
os._exit at that point of the commit (no cleanup, no atexit), then this process reopens the
directory it left behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sgengine.errors import IndexError_, IndexMismatchError, InputError
from sgengine.index import NORM_TOLERANCE, Index
from sgengine.search import search_index

FP = "f00dfeed" * 8  # bundle fingerprint (sha256-like hex)
OTHER_FP = "0badc0de" * 8
D = 16


def unit_rows(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}/{i:04d}.jpg" for i in range(n)]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under the index directory with its bytes (the lock file is not data)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "index.lock"}


CHILD = textwrap.dedent("""
    import sys, json, numpy as np
    from sgengine.index import Index
    path, fp, npy, ids_json, create = sys.argv[1:6]
    x = np.load(npy)
    ids = json.load(open(ids_json))
    if create == "1":
        ix = Index.create(path, dim=x.shape[1], bundle_fingerprint=fp)
    else:
        ix = Index.open(path, bundle_fingerprint=fp)
    ix.add(x, ids)
    print(len(ix))
""")


def run_child(tmp_path: Path, index_dir: Path, x: np.ndarray, ids: list[str], *, create: bool,
              crash_at: str | None = None) -> subprocess.CompletedProcess:
    tag = ids[0].split("/")[0]
    np.save(tmp_path / f"{tag}.npy", x)
    (tmp_path / f"{tag}.json").write_text(json.dumps(ids))
    env = dict(os.environ)
    env.pop("SGENGINE_INDEX_CRASH_AT", None)
    if crash_at:
        env["SGENGINE_INDEX_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", CHILD, str(index_dir), FP, str(tmp_path / f"{tag}.npy"),
                           str(tmp_path / f"{tag}.json"), "1" if create else "0"],
                          env=env, capture_output=True, text=True, timeout=120)


def brute_force_check(ix: Index, stored: np.ndarray, q: np.ndarray, k: int) -> None:
    """search_index equals a float64 full sort over the stored rows (tie-aware: compares true scores)."""
    s, r = search_index(ix, q, k)
    q = q.numpy() if isinstance(q, torch.Tensor) else q
    kk = min(k, len(stored))
    assert s.shape == (len(q), kk) and r.shape == (len(q), kk)
    assert s.dtype == np.float32 and r.dtype == np.int64
    full = q.astype(np.float64) @ stored.astype(np.float64).T
    ref = -np.sort(-full, axis=1)[:, :kk]
    tol = 2e-6
    for i in range(len(q)):
        assert len(set(r[i].tolist())) == kk
        np.testing.assert_allclose(s[i], full[i, r[i]], atol=tol, rtol=0)
        np.testing.assert_allclose(full[i, r[i]], ref[i], atol=tol, rtol=0)


# ---------------------------------------------------------------- round trips
def test_round_trip_across_processes(tmp_path):
    path = tmp_path / "ix"
    a, b = unit_rows(150, seed=1), unit_rows(130, seed=2)
    ida, idb = names("a", 150), names("b", 130)
    r1 = run_child(tmp_path, path, a, ida, create=True)
    assert r1.returncode == 0, r1.stderr
    r2 = run_child(tmp_path, path, b, idb, create=False)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.split() == ["280"]
    ix = Index.open(path, bundle_fingerprint=FP)
    assert len(ix) == 280 and ix.dim == D and ix.dtype == "float32" and ix.segments == 2
    assert ix.bundle_fingerprint == FP
    assert ix.ids == ida + idb
    np.testing.assert_array_equal(ix.vectors(), np.concatenate([a, b]))
    assert "b/0003.jpg" in ix and "c/0000.jpg" not in ix and 3 not in ix
    assert ix.row_of("b/0003.jpg") == 153
    np.testing.assert_array_equal(ix.gather(np.array([[153, 0]])), np.stack([b[3], a[0]])[None])
    brute_force_check(ix, np.concatenate([a, b]), unit_rows(4, seed=3), 25)
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "sgengine-index" and m["format_version"] == 1 and m["count"] == 280
    assert [s["count"] for s in m["segments"]] == [150, 130]
    ix.verify()


def test_float16_storage(tmp_path):
    x = unit_rows(200, seed=4)
    ix = Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP, dtype="float16")
    ix.add(torch.from_numpy(x), names("h", 200))
    ix = Index.open(tmp_path / "ix")
    stored = x.astype(np.float16)
    assert ix.dtype == "float16" and ix.vectors().dtype == np.float16
    np.testing.assert_array_equal(ix.vectors(), stored)
    g = ix.gather(np.array([[5, 7, 199]]))
    assert g.dtype == np.float32 and g.shape == (1, 3, D)
    np.testing.assert_array_equal(g[0], stored[[5, 7, 199]].astype(np.float32))
    brute_force_check(ix, stored.astype(np.float32), unit_rows(3, seed=5), 40)


def test_mmap_is_used_and_concatenation_is_cached(tmp_path):
    ix = Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP)
    assert len(ix) == 0 and ix.vectors().shape == (0, D)
    x = unit_rows(300, seed=6)
    ix.add(x[:100], names("m", 300)[:100])
    assert isinstance(ix.vectors(), np.memmap)
    reopened = Index.open(tmp_path / "ix")
    assert isinstance(reopened.vectors(), np.memmap)
    assert not reopened.vectors().flags.writeable  # the index cannot be scribbled on through it
    assert not isinstance(Index.open(tmp_path / "ix", mmap=False).vectors(), np.memmap)
    ix.add(x[100:], names("m", 300)[100:])
    v = ix.vectors()
    assert v is ix.vectors()  # built once, not per query
    np.testing.assert_array_equal(v, x)
    ix.add(unit_rows(5, seed=7), names("n", 5))
    assert ix.vectors() is not v and len(ix.vectors()) == 305  # invalidated by add


def test_compact(tmp_path):
    ix = Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP)
    parts = [unit_rows(n, seed=10 + n) for n in (50, 70, 30)]
    for j, p in enumerate(parts):
        ix.add(p, names(f"c{j}", len(p)))
    ids = list(ix.ids)
    ix.compact()
    assert ix.segments == 1 and isinstance(ix.vectors(), np.memmap)
    files = sorted(p.name for p in (tmp_path / "ix" / "segments").iterdir())
    assert files == ["seg-000003.ids.json", "seg-000003.npy"]
    re = Index.open(tmp_path / "ix")
    assert re.ids == ids and re.segments == 1
    np.testing.assert_array_equal(re.vectors(), np.concatenate(parts))
    re.verify()


def test_revision_changes_with_the_rows(tmp_path):
    # Copies of the rows kept by the search stage are valid while the revision is unchanged.
    ix = Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP)
    r0 = ix.revision
    ix.add(np.zeros((0, D), np.float32), [])
    assert ix.revision == r0  # nothing added
    ix.add(unit_rows(3, seed=90), names("a", 3))
    r1 = ix.revision
    assert r1 != r0
    ix.vectors(), ix.gather(np.array([0])), len(ix)
    assert ix.revision == r1  # reads change nothing
    other = Index.open(tmp_path / "ix")
    assert other.revision not in (r0, r1)  # unique per load, even of the same commit
    other.add(unit_rows(2, seed=91), names("b", 2))
    ix.add(unit_rows(1, seed=92), names("c", 1))  # picks up other's commit under the lock
    r2 = ix.revision
    assert r2 != r1 and len(ix) == 6
    ix.compact()
    assert ix.revision != r2 and ix.segments == 1


def test_two_writers_do_not_overwrite_each_other(tmp_path):
    Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP)
    w1, w2 = Index.open(tmp_path / "ix"), Index.open(tmp_path / "ix")
    w1.add(unit_rows(10, seed=20), names("w1", 10))
    w2.add(unit_rows(12, seed=21), names("w2", 12))  # w2's view is stale: it must pick up w1's commit
    with pytest.raises(InputError, match="w1/0000.jpg.*already in index"):
        w2.add(unit_rows(1, seed=22), ["w1/0000.jpg"])
    assert Index.open(tmp_path / "ix").ids == names("w1", 10) + names("w2", 12)


# ---------------------------------------------------------------- refusals
def test_bundle_fingerprint_mismatch(tmp_path):
    ix = Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP)
    ix.add(unit_rows(3), names("x", 3))
    with pytest.raises(IndexMismatchError) as e:
        Index.open(tmp_path / "ix", bundle_fingerprint=OTHER_FP)
    msg = str(e.value)
    assert FP[:12] in msg and OTHER_FP[:12] in msg and "Rebuild" in msg and str(tmp_path / "ix") in msg
    with pytest.raises(IndexMismatchError):
        Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=OTHER_FP, exist_ok=True)


def test_create_refusals(tmp_path):
    Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP)
    with pytest.raises(IndexError_, match="already holds an index"):
        Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP)
    assert Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP, exist_ok=True).dim == D
    with pytest.raises(IndexMismatchError, match="16-d float32"):
        Index.create(tmp_path / "ix", dim=8, bundle_fingerprint=FP, exist_ok=True)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(IndexError_, match="not empty"):
        Index.create(tmp_path / "photos", dim=D, bundle_fingerprint=FP)
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["a.jpg"]  # refused before the lock file
    with pytest.raises(InputError, match="dtype"):
        Index.create(tmp_path / "ix2", dim=D, bundle_fingerprint=FP, dtype="bfloat16")
    with pytest.raises(InputError, match="dim must be >= 1"):
        Index.create(tmp_path / "ix3", dim=0, bundle_fingerprint=FP)
    with pytest.raises(InputError, match="dim must be an integer"):
        Index.create(tmp_path / "ix3", dim=True, bundle_fingerprint=FP)
    assert not (tmp_path / "ix3").exists()  # refused before anything was written


def _bad_batches():
    good = unit_rows(6, seed=30)
    nan = good.copy()
    nan[4, 2] = np.nan
    inf = good.copy()
    inf[1, 0] = np.inf
    zero = good.copy()
    zero[3] = 0
    long = good.copy()
    long[2] *= 1 + 3 * NORM_TOLERANCE
    ids = names("new", 6)
    return [
        ("nan", nan, ids, "row 4 contains NaN"),
        ("inf", inf, ids, "row 1 contains NaN or Inf"),
        ("zero", zero, ids, "row 3 is all zeros"),
        ("not-unit", long, ids, "row 2 has L2 norm"),
        ("wrong-dim", unit_rows(6, D + 1), ids, r"\[n, 16\]"),
        ("1-d", good[0], ids[:1], r"\[n, 16\]"),
        ("ints", (good * 0).astype(np.int64), ids, "floating"),
        ("count", good, ids[:5], "6 descriptor rows but 5 ids"),
        ("empty-id", good, ids[:5] + [""], "row 5 must be a non-empty string"),
        ("non-str-id", good, ids[:5] + [5], "row 5 must be a non-empty string"),
        ("dup-in-batch", good, ids[:5] + [ids[1]], "new/0001.jpg' appears twice"),
        ("dup-in-index", good, ids[:5] + ["old/0002.jpg"], "old/0002.jpg' .*already in index"),
        ("single-str", good[:1], "abc", "not a single string"),
    ]


@pytest.mark.parametrize("case,x,ids,msg", _bad_batches(), ids=[c[0] for c in _bad_batches()])
def test_bad_add_writes_nothing(tmp_path, case, x, ids, msg):
    ix = Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP)
    old = unit_rows(10, seed=31)
    ix.add(old, names("old", 10))
    before = snapshot(tmp_path / "ix")
    with pytest.raises(InputError, match=msg):
        ix.add(x, ids)
    assert snapshot(tmp_path / "ix") == before
    assert len(ix) == 10 and ix.ids == names("old", 10)
    re = Index.open(tmp_path / "ix")
    assert len(re) == 10
    np.testing.assert_array_equal(re.vectors(), old)


def test_empty_add_is_a_noop(tmp_path):
    ix = Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP)
    before = snapshot(tmp_path / "ix")
    ix.add(np.zeros((0, D), np.float32), [])
    assert snapshot(tmp_path / "ix") == before and len(ix) == 0


# ---------------------------------------------------------------- crashes
@pytest.mark.parametrize("crash_at", ["after-segment", "before-manifest"])
def test_crash_mid_append_loses_nothing_committed(tmp_path, crash_at):
    path = tmp_path / "ix"
    a = unit_rows(120, seed=40)
    ix = Index.create(path, dim=D, bundle_fingerprint=FP)
    ix.add(a, names("a", 120))
    committed = (path / "manifest.json").read_bytes()
    b = unit_rows(90, seed=41)
    r = run_child(tmp_path, path, b, names("b", 90), create=False, crash_at=crash_at)
    assert r.returncode == 77, (r.returncode, r.stderr)
    # The child really got as far as writing the new segment.
    assert (path / "segments" / "seg-000001.npy").exists()
    assert (path / "manifest.json.tmp").exists() == (crash_at == "before-manifest")
    assert (path / "manifest.json").read_bytes() == committed

    re = Index.open(path, bundle_fingerprint=FP)
    assert len(re) == 120 and re.ids == names("a", 120) and re.segments == 1
    np.testing.assert_array_equal(re.vectors(), a)
    assert "b/0000.jpg" not in re
    brute_force_check(re, a, unit_rows(2, seed=42), 10)

    # The next append works (the same ids: the crashed batch never existed) and removes the orphan.
    re.add(b, names("b", 90))
    files = sorted(p.name for p in (path / "segments").iterdir())
    assert files == ["seg-000000.ids.json", "seg-000000.npy", "seg-000001.ids.json", "seg-000001.npy"]
    assert not (path / "manifest.json.tmp").exists()
    final = Index.open(path, bundle_fingerprint=FP)
    assert final.ids == names("a", 120) + names("b", 90)
    np.testing.assert_array_equal(final.vectors(), np.concatenate([a, b]))
    final.verify()


def test_crash_right_after_commit_keeps_the_batch(tmp_path):
    path = tmp_path / "ix"
    Index.create(path, dim=D, bundle_fingerprint=FP).add(unit_rows(5, seed=43), names("a", 5))
    r = run_child(tmp_path, path, unit_rows(7, seed=44), names("b", 7), create=False, crash_at="after-manifest")
    assert r.returncode == 77, r.stderr
    assert len(Index.open(path)) == 12


def test_orphans_from_a_crashed_compaction_are_ignored(tmp_path):
    path = tmp_path / "ix"
    ix = Index.create(path, dim=D, bundle_fingerprint=FP)
    ix.add(unit_rows(5, seed=45), names("a", 5))
    # Leftovers of any interrupted write: a temp segment and an unlisted segment.
    (path / "segments" / "seg-000007.npy.tmp").write_bytes(b"partial")
    np.save(path / "segments" / "seg-000001.npy", unit_rows(3, seed=46))
    re = Index.open(path)
    assert len(re) == 5 and re.segments == 1
    re.add(unit_rows(2, seed=47), names("b", 2))
    assert sorted(p.name for p in (path / "segments").iterdir()) == [
        "seg-000000.ids.json", "seg-000000.npy", "seg-000001.ids.json", "seg-000001.npy"]
    assert len(Index.open(path)) == 7


# ---------------------------------------------------------------- damaged indexes
def test_missing_and_corrupt_manifest(tmp_path):
    path = tmp_path / "ix"
    with pytest.raises(IndexError_, match="does not exist"):
        Index.open(path)
    path.mkdir()
    with pytest.raises(IndexError_, match="manifest.json is missing") as e:
        Index.open(path)
    assert str(path) in str(e.value)
    Index.create(tmp_path / "good", dim=D, bundle_fingerprint=FP).add(unit_rows(4), names("a", 4))
    good = json.loads((tmp_path / "good" / "manifest.json").read_text())
    cases = {
        "truncated": (tmp_path / "good" / "manifest.json").read_text()[:40],
        "not-json": "\x00\x01garbage",
        "wrong-format": json.dumps({**good, "format": "something-else"}),
        "future-version": json.dumps({**good, "format_version": 2}),
        "count-mismatch": json.dumps({**good, "count": 5}),
        "no-dim": json.dumps({k: v for k, v in good.items() if k != "dim"}),
        "path-escape": json.dumps({**good, "segments": [{**good["segments"][0], "file": "../../etc/passwd"}]}),
    }
    for case, text in cases.items():
        (path / "manifest.json").write_text(text)
        with pytest.raises(IndexError_) as e:
            Index.open(path)
        assert str(path) in str(e.value), case


def test_damaged_segments(tmp_path):
    path = tmp_path / "ix"
    Index.create(path, dim=D, bundle_fingerprint=FP).add(unit_rows(4), names("a", 4))
    ids_file = path / "segments" / "seg-000000.ids.json"
    ids_file.write_text(json.dumps(names("z", 4)))
    with pytest.raises(IndexError_, match="sha256"):
        Index.open(path)
    ids_file.unlink()
    with pytest.raises(IndexError_, match="missing"):
        Index.open(path)
    path2 = tmp_path / "ix2"
    Index.create(path2, dim=D, bundle_fingerprint=FP).add(unit_rows(4), names("a", 4))
    npy = path2 / "segments" / "seg-000000.npy"
    npy.write_bytes(npy.read_bytes()[:-8])  # truncated rows
    with pytest.raises(IndexError_, match="seg-000000.npy"):
        Index.open(path2)


# ---------------------------------------------------------------- gather
def test_gather(tmp_path):
    ix = Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP)
    x = unit_rows(40, seed=70)
    ix.add(x[:25], names("g", 25))
    ix.add(x[25:], names("h", 15))
    rows = np.array([[0, 39, 24, 25], [7, 7, 30, 1]], dtype=np.int64)
    g = ix.gather(rows)
    assert g.shape == (2, 4, D) and g.dtype == np.float32
    np.testing.assert_array_equal(g, x[rows])
    np.testing.assert_array_equal(ix.gather(torch.from_numpy(rows)), x[rows])
    with pytest.raises(InputError, match="row 40 is out of range"):
        ix.gather(np.array([[1, 40]]))
    with pytest.raises(InputError, match="row -1 is out of range"):
        ix.gather(np.array([[-1]]))
    with pytest.raises(InputError, match="integers"):
        ix.gather(np.array([[1.0]]))
    assert ix._concat is None  # read from each segment: several segments are never concatenated for a gather


def test_iter_rows_reads_segment_by_segment(tmp_path):
    ix = Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP, dtype="float16")
    x = unit_rows(50, seed=71)
    for a, b in ((0, 20), (20, 23), (23, 50)):
        ix.add(x[a:b], names(f"s{a}", b - a))
    stored = x.astype(np.float16).astype(np.float32)
    for start, stop, block in ((0, None, 7), (5, 45, 100), (21, 22, 1), (50, 50, 3)):
        got = list(ix.iter_rows(start, stop, block_rows=block))
        stop_ = 50 if stop is None else stop
        assert [r for r, _ in got] == sorted(r for r, _ in got) and all(len(b) <= block for _, b in got)
        assert all(b.dtype == np.float32 for _, b in got)
        cat = np.concatenate([b for _, b in got]) if got else np.empty((0, D), np.float32)
        np.testing.assert_array_equal(cat, stored[start:stop_])
    assert ix._concat is None
    with pytest.raises(InputError, match="out of range"):
        list(ix.iter_rows(10, 51))


def test_uid_and_ann_commits_leave_the_rows_alone(tmp_path):
    ix = Index.create(tmp_path / "ix", dim=D, bundle_fingerprint=FP)
    assert isinstance(ix.uid, str) and len(ix.uid) == 32
    assert Index.create(tmp_path / "other", dim=D, bundle_fingerprint=FP).uid != ix.uid
    ix.add(unit_rows(10, seed=72), names("u", 10))
    assert ix.ann is None and ix.ann_state() == "absent"
    writer = Index.open(tmp_path / "ix")
    rec = writer.commit_ann(lambda i: ((lambda w: w.write(b"not faiss, just bytes")), {"factory": "X"}, len(i)))
    assert rec["count"] == 10 and rec["bytes"] == 21 and writer.ann_state() == "fresh"
    assert writer.ann_meta()["factory"] == "X" and writer.read_ann(lambda read: read(100))[0] == b"not faiss, just bytes"
    rev = ix.revision
    ix.add(unit_rows(2, seed=73), names("v", 2))  # picks up the ANN commit under the lock, then appends
    assert ix.ann == rec and ix.ann_state() == "stale" and ix.revision != rev
    rev = ix.revision
    ix.commit_ann(lambda i: ((lambda w: w.write(b"again")), {"factory": "X"}, len(i)))
    assert ix.revision == rev  # an ANN commit changes no row: copies of the rows stay valid
    with pytest.raises(InputError, match="cannot belong"):
        ix.commit_ann(lambda i: ((lambda w: w.write(b"")), {}, len(i) + 1))


def test_row_checks_name_rows_past_the_first_block(tmp_path):
    # Rows are checked a block of 65,536 at a time (float64 copies of a 1M-row batch would take
    # ~36 GiB); a bad row in a later block is still named by its position in the whole batch.
    ix = Index.create(tmp_path / "ix", dim=4, bundle_fingerprint=FP)
    x = unit_rows(70_000, 4, seed=3)
    x[66_001, 2] = np.nan
    with pytest.raises(InputError, match="row 66001 contains NaN"):
        ix.add(x, names("r", 70_000))
    x[66_001] = 0.0
    with pytest.raises(InputError, match="row 66001 is all zeros"):
        ix.add(x, names("r", 70_000))
    x[66_001] = [2.0, 0, 0, 0]
    with pytest.raises(InputError, match="row 66001 has L2 norm 2"):
        ix.add(x, names("r", 70_000))
    assert len(ix) == 0  # nothing was added
    x[66_001] = [1.0, 0, 0, 0]
    ix.add(x, names("r", 70_000))
    assert len(ix) == 70_000


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_index_files_follow_the_umask(tmp_path, mask, mode):
    """A service user must be able to read an index its builder wrote: files get the mode a plain
    open() would give them, not the 0600 of the temporary files they were written as."""
    old = os.umask(mask)
    try:
        ix = Index.create(tmp_path / "ix", dim=4, bundle_fingerprint="ab" * 32)
        ix.add(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
        ix.add(np.eye(4, dtype=np.float32)[::-1].copy(), ["e", "f", "g", "h"])
        ix.compact()
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "ix").rglob("*") if p.is_file() and p.name != "index.lock"]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(mode)}
