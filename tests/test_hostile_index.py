"""Hostile inputs for the index, folder builds and concurrency: each case asserts the exact
sgengine error type, or the documented outcome.

Everything is real: indexes on disk damaged the way a careless user or another program would,
files whose names are not UTF-8, paths the OS refuses, child processes killed with SIGKILL at
random moments, processes racing on one directory. A permission can only be refused to a user
without privileges: when the tests run as root (who passes every permission check), those cases
run in a forked child that drops to the `nobody` user.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sgengine import cli, indexing
from sgengine.errors import IndexError_, InputError
from sgengine.index import Index
from sgengine.indexing import build_index, embed_files
from sgengine.search import ann, search_index

FP = "5eed" * 16  # bundle fingerprint of the indexes made without a bundle
D = 16
NOBODY = 65534
LONG = "n" * 300  # one path component over NAME_MAX (255 bytes)


# ----------------------------------------------------------------------------- helpers
def unit_rows(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_index(path: Path, n: int = 40, *, batches: int = 1, seed: int = 0) -> tuple[Index, np.ndarray]:
    ix = Index.create(path, dim=D, bundle_fingerprint=FP)
    x = unit_rows(n, seed=seed)
    for part in np.array_split(np.arange(n), batches):
        ix.add(x[part], [f"img/{i:04d}.jpg" for i in part])
    return ix, x


def seg_file(path: Path, k: int = 0, ext: str = ".npy") -> Path:
    return path / "segments" / f"seg-{k:06d}{ext}"


def edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def write_ids_with_hash(path: Path, k: int, data: bytes) -> None:
    """Replace segment k's ids file and its sha256 in the manifest: only a look at the ids can tell."""
    seg_file(path, k, ".ids.json").write_bytes(data)
    edit_manifest(path, lambda m: m["segments"][k].update(ids_sha256=hashlib.sha256(data).hexdigest()))


def append(f: Path, data: bytes) -> None:
    with open(f, "ab") as fh:
        fh.write(data)


def rows_offset(npy: Path) -> int:
    with open(npy, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def write_images(folder: Path, n: int, *, seed: int = 0, suffix: str = ".png", subdirs: int = 4) -> list[str]:
    """n small random images (40-96 px sides) in `subdirs` sub-folders; returns their ids."""
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(40, 97, 2))
        rel = f"d{i % subdirs}/{i:03d}{suffix}"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / rel)
        ids.append(rel)
    return ids


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, err)


def sg(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """The CLI in a new process."""
    return subprocess.run([sys.executable, "-m", "sgengine", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def unprivileged(fn, *args):
    """fn(*args) in a forked child without privileges (as `nobody` when this process is root):
    ("ok", result), ("error", exception), or ("skip", why) when privileges cannot be dropped."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        os.close(r)
        try:
            try:
                if os.geteuid() == 0:
                    os.setgroups([])
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
            except OSError as e:
                out = ("skip", f"cannot drop to uid {NOBODY}: {e}")
            else:
                try:
                    out = ("ok", fn(*args))
                except Exception as e:
                    out = ("error", e)
            data = pickle.dumps(out)
        except BaseException as e:
            data = pickle.dumps(("error", RuntimeError(f"child failed: {e!r}")))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = pickle.loads(data)
    if out[0] == "skip":
        pytest.skip(out[1])
    return out


def expect_error(out, cls, *needles):
    assert out[0] == "error" and type(out[1]) is cls, out
    for n in needles:
        assert n in str(out[1]), (n, str(out[1]))


@pytest.fixture
def open_tmp():
    """A temporary directory an unprivileged child can enter (pytest's tmp_path is private to its owner)."""
    d = Path(tempfile.mkdtemp(prefix="sgengine-hostile-"))
    d.chmod(0o777)
    yield d
    for dirpath, dirnames, _ in os.walk(d):
        for name in dirnames:  # give back what a test locked, before os.walk goes in
            os.chmod(os.path.join(dirpath, name), 0o755)
    shutil.rmtree(d)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A random two-convolution trunk (32-d descriptors) exported as a bundle: milliseconds per image."""
    import torch
    from sgengine.export import export_bundle
    from sgengine.model import from_trunk
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 32, 3, stride=2))
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    export_bundle(from_trunk(trunk, name="tiny"), out, check=False, progress=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def tiny_engine(tiny_bundle):
    """The tiny bundle's engine with one thread (descriptors then equal the CLI's --threads 1 bit for bit)."""
    import torch
    from sgengine import Engine
    threads = torch.get_num_threads()
    engine = Engine.load(tiny_bundle, threads=1)
    torch.set_num_threads(threads)  # Engine.load set the process-wide count: give the other tests theirs
    return engine


# ----------------------------------------------------------------------------- damaged manifests
def _manifest_cases():
    def seg0(**kw):
        return lambda m: m["segments"][0].update(**kw)
    return {
        "truncated-json": lambda p: (p / "manifest.json").write_text((p / "manifest.json").read_text()[:50]),
        "binary-garbage": lambda p: (p / "manifest.json").write_bytes(b"\xff\xfe\x00garbage"),
        "deeply-nested": lambda p: (p / "manifest.json").write_text("[" * 100_000 + "]" * 100_000),
        "json-list": lambda p: (p / "manifest.json").write_text("[1, 2, 3]"),
        "other-format": lambda p: edit_manifest(p, lambda m: m.update(format="something-else")),
        "future-version": lambda p: edit_manifest(p, lambda m: m.update(format_version=2)),
        "version-string": lambda p: edit_manifest(p, lambda m: m.update(format_version="1")),
        "count-is-bool": lambda p: edit_manifest(p, lambda m: (m.update(count=True), seg0(count=True)(m))),
        "negative-count": lambda p: edit_manifest(p, lambda m: m.update(count=-40)),
        "dim-zero": lambda p: edit_manifest(p, lambda m: m.update(dim=0)),
        "segment-listed-twice": lambda p: edit_manifest(
            p, lambda m: (m["segments"].append(dict(m["segments"][0])), m.update(count=80))),
        "path-escape": lambda p: edit_manifest(p, seg0(file="../../etc/passwd")),
        "ann-covers-too-many": lambda p: edit_manifest(p, lambda m: m.update(ann={
            "file": "ann/ann-000001.faiss", "meta_file": "ann/ann-000001.json", "sha256": "0", "meta_sha256": "0",
            "factory": "Flat", "bytes": 1, "count": 41, "generation": 1})),
    }


@pytest.mark.parametrize("case", list(_manifest_cases()))
def test_a_damaged_manifest_is_named(tmp_path, case):
    path = tmp_path / "ix"
    make_index(path)
    _manifest_cases()[case](path)
    with pytest.raises(IndexError_) as e:
        Index.open(path)
    assert str(path) in str(e.value)
    assert "upgrade sgengine" in str(e.value) if case == "future-version" else True


# ----------------------------------------------------------------------------- damaged segment files
def _segment_cases():
    def replace(make):
        return lambda p: np.save(seg_file(p), make(np.load(seg_file(p))))
    return {
        "missing-rows": (lambda p: seg_file(p).unlink(), "seg-000000.npy is missing"),
        "missing-ids": (lambda p: seg_file(p, 0, ".ids.json").unlink(), "seg-000000.ids.json is missing"),
        "truncated": (lambda p: os.truncate(seg_file(p), seg_file(p).stat().st_size - 64), "truncated"),
        "bytes-appended": (lambda p: append(seg_file(p), b"\0" * 64), "bytes appended"),
        "other-shape": (replace(lambda x: x[:10]), "the manifest says float32 [40, 16]"),
        "float16-rows": (replace(lambda x: x.astype(np.float16)), "float16"),
        "big-endian": (replace(lambda x: x.astype(">f4")), ">f4"),
        "fortran-order": (replace(np.asfortranarray), "Fortran order"),
        "not-npy": (lambda p: seg_file(p).write_bytes(b"this is not an npy file" * 200), "not a readable .npy"),
    }


@pytest.mark.parametrize("case", list(_segment_cases()))
def test_a_damaged_segment_is_named_on_open(tmp_path, case):
    path = tmp_path / "ix"
    make_index(path)
    damage, says = _segment_cases()[case]
    damage(path)
    with pytest.raises(IndexError_) as e:
        Index.open(path)
    assert str(path) in str(e.value) and says in str(e.value), str(e.value)


def _ids_cases():
    ids = [f"img/{i:04d}.jpg" for i in range(40)]
    return {
        "duplicated-id": (json.dumps(ids[:39] + [ids[3]]), "'img/0003.jpg' is stored twice, at row 3"),
        "empty-id": (json.dumps(ids[:39] + [""]), "row 39"),
        "number-id": (json.dumps(ids[:39] + [7]), "is 7, not a string"),
        "too-few": (json.dumps(ids[:39]), "does not list 40 ids"),
        "object": (json.dumps({"ids": ids}), "does not list 40 ids"),
        "not-json": ("[\"img/0000.jpg\", ", "not a JSON list"),
        "not-utf8": (b"\xff\xfe[]", "not a JSON list"),
    }


@pytest.mark.parametrize("case", list(_ids_cases()))
def test_damaged_ids_with_a_matching_hash_are_named(tmp_path, case):
    path = tmp_path / "ix"
    make_index(path)
    data, says = _ids_cases()[case]
    write_ids_with_hash(path, 0, data if isinstance(data, bytes) else data.encode())
    with pytest.raises(IndexError_) as e:
        Index.open(path)
    assert "damaged" in str(e.value) and says in str(e.value), str(e.value)


def test_an_id_stored_in_two_segments_is_refused(tmp_path):
    path = tmp_path / "ix"
    make_index(path, 40, batches=2)
    ids = [f"img/{i:04d}.jpg" for i in range(20, 40)]
    ids[5] = "img/0002.jpg"  # also row 2, in segment 0
    write_ids_with_hash(path, 1, json.dumps(ids).encode())
    with pytest.raises(IndexError_, match=r"stored twice, at row 2 \(seg-000000.ids.json\) and row 25 "
                                          r"\(seg-000001.ids.json\)"):
        Index.open(path)


def test_ids_edited_without_their_hash_are_refused(tmp_path):
    path = tmp_path / "ix"
    make_index(path)
    seg_file(path, 0, ".ids.json").write_text(json.dumps([f"x/{i}" for i in range(40)]))
    with pytest.raises(IndexError_, match="seg-000000.ids.json does not match its sha256"):
        Index.open(path)


# ----------------------------------------------------------------------------- verify and info
def test_a_same_size_edit_of_the_rows_is_found_by_verify(tmp_path, capsys):
    path = tmp_path / "ix"
    _, x = make_index(path)
    npy = seg_file(path)
    with open(npy, "r+b") as f:  # swap two rows in place: same size, still unit rows
        f.seek(rows_offset(npy))
        f.write(np.concatenate([x[1:2], x[0:1], x[2:]]).tobytes())
    ix = Index.open(path)  # the cheap checks cannot see it (no descriptor byte is read on open)
    with pytest.raises(IndexError_, match="seg-000000.npy does not match its sha256 in the manifest"):
        ix.verify()
    with pytest.raises(IndexError_, match="seg-000000.npy does not match its sha256"):
        Index.open(path, verify=True)
    rc, out, err = run_cli(capsys, "index", "verify", path)
    assert_one_line_error(rc, err, str(path), "seg-000000.npy does not match its sha256")


def test_verify_passes_on_a_sound_index_and_reports_what_it_read(tmp_path, capsys):
    path = tmp_path / "ix"
    make_index(path, 60, batches=3)
    ann.build(Index.open(path), "Flat", recall_queries=0)
    rep = Index.open(path, verify=True).verify()
    assert rep["rows"] == 60 and rep["files"] == 8 and rep["bytes"] > 60 * D * 4 and rep["seconds"] >= 0
    rc, out, err = run_cli(capsys, "index", "verify", path)
    assert rc == 0 and "OK: 60 rows, 8 files" in out, err


def _ann_damage():
    def sidecar(p):
        return next((p / "ann").glob("*.json"))

    def faiss_file(p):
        return next((p / "ann").glob("*.faiss"))
    return {
        "sidecar-missing": (lambda p: sidecar(p).unlink(), "sidecar"),
        "ann-file-missing": (lambda p: faiss_file(p).unlink(), "is missing"),
        "ann-file-truncated": (lambda p: os.truncate(faiss_file(p), 10), "the manifest says"),
        "sidecar-of-another-index": (None, "belongs to another index"),
    }


@pytest.mark.parametrize("case", list(_ann_damage()))
def test_info_reports_what_a_cheap_look_finds(tmp_path, capsys, case):
    path = tmp_path / "ix"
    ix, _ = make_index(path, 60)
    ann.build(ix, "Flat", recall_queries=0)
    damage, says = _ann_damage()[case]
    if damage is None:  # another index's ANN files copied over this one's
        other, _ = make_index(tmp_path / "other", 60, seed=1)
        ann.build(other, "Flat", recall_queries=0)
        for a, b in zip(sorted((tmp_path / "other" / "ann").iterdir()), sorted((path / "ann").iterdir())):
            shutil.copyfile(a, b)
    else:
        damage(path)
    rc, out, err = run_cli(capsys, "index", "info", path)
    assert_one_line_error(rc, err, str(path), says)
    info = json.loads(out)
    assert info["count"] == 60 and len(info["problems"]) == 1 and says in info["problems"][0]


def test_info_on_a_sound_index_exits_0_and_lists_no_problem(tmp_path, capsys):
    make_index(tmp_path / "ix")
    rc, out, err = run_cli(capsys, "index", "info", tmp_path / "ix")
    assert rc == 0 and json.loads(out)["problems"] == [] and err == ""


# ----------------------------------------------------------------------------- paths the OS refuses
def test_index_path_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "ix"
    f.write_text("not an index")
    with pytest.raises(IndexError_, match="is a file, not an index directory"):
        Index.open(f)
    with pytest.raises(IndexError_, match="exists and is not a directory"):
        Index.create(f, dim=D, bundle_fingerprint=FP)
    for sub in ("info", "verify", "ann"):
        rc, _, err = run_cli(capsys, "index", sub, f)
        assert_one_line_error(rc, err, str(f))


def test_a_name_over_name_max_is_named_not_raw(tmp_path, capsys):
    path = tmp_path / LONG / "ix"
    for call in (lambda: Index.open(path), lambda: Index.create(path, dim=D, bundle_fingerprint=FP)):
        with pytest.raises(IndexError_, match="longer than the file system allows") as e:
            call()
        assert str(tmp_path) in str(e.value)
    with pytest.raises(InputError, match="longer than the file system allows"):
        indexing.scan_folder(tmp_path / LONG)
    rc, _, err = run_cli(capsys, "index", "info", path)
    assert_one_line_error(rc, err, "longer than the file system allows")


def test_refused_permissions_are_named(open_tmp):
    """A manifest or segment this user may not read, an index folder it may not write, a sub-folder
    it may not list: sgengine errors naming the path (a listing gap goes into the scan's report)."""
    make_index(open_tmp / "ix")
    (open_tmp / "ix" / "manifest.json").chmod(0o000)
    expect_error(unprivileged(Index.open, open_tmp / "ix"), IndexError_, "manifest.json", "permission denied")
    make_index(open_tmp / "ix2")
    seg_file(open_tmp / "ix2").chmod(0o000)
    expect_error(unprivileged(Index.open, open_tmp / "ix2"), IndexError_, "seg-000000.npy", "permission denied")
    (open_tmp / "readonly").mkdir()
    (open_tmp / "readonly").chmod(0o555)
    expect_error(unprivileged(lambda: Index.create(open_tmp / "readonly" / "ix", dim=D, bundle_fingerprint=FP)),
                 IndexError_, "readonly", "permission denied")

    photos = open_tmp / "photos"
    write_images(photos / "ok", 2, subdirs=1)
    write_images(photos / "locked", 2, subdirs=1)
    (photos / "locked").chmod(0o000)
    indexing.image_suffixes()  # the child cannot import Pillow's plugins from a private install
    status, scan = unprivileged(indexing.scan_folder, photos)
    assert status == "ok", scan
    assert [p.relative_to(photos).as_posix() for p in scan.files] == ["ok/d0/000.png", "ok/d0/001.png"]
    assert scan.unreadable_dirs == [(str(photos / "locked"), scan.unreadable_dirs[0][1])]
    assert "permission denied" in scan.unreadable_dirs[0][1]
    photos.chmod(0o000)
    expect_error(unprivileged(indexing.scan_folder, photos), InputError, str(photos), "permission denied")


# ----------------------------------------------------------------------------- writing
def test_an_id_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path):
    ix, _ = make_index(tmp_path / "ix")
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "ix").rglob("*") if p.is_file())
    bad = os.fsdecode(b"photos/bad\xff.jpg")
    with pytest.raises(InputError, match=r"row 1 \(photos/bad\\xff.jpg\) is not UTF-8 text"):
        ix.add(unit_rows(2, seed=5), ["photos/good.jpg", bad])
    after = sorted((p.name, p.read_bytes()) for p in (tmp_path / "ix").rglob("*") if p.is_file())
    assert after == before and len(Index.open(tmp_path / "ix")) == 40


def test_skip_existing_adds_only_the_new_ids(tmp_path):
    ix, x = make_index(tmp_path / "ix", 10)
    y = unit_rows(4, seed=9)
    ids = ["img/0002.jpg", "new/a.jpg", "img/0007.jpg", "new/b.jpg"]
    assert ix.add(y, ids, skip_existing=True) == 2
    assert ix.add(y, ids, skip_existing=True) == 0
    re = Index.open(tmp_path / "ix")
    assert re.ids[-2:] == ["new/a.jpg", "new/b.jpg"]
    np.testing.assert_array_equal(re.vectors(), np.concatenate([x, y[[1, 3]]]))


def _fork_all(fn, args_list):
    """Run fn(*args) in one forked child per args, started together (a barrier); their results."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(len(args_list)), ctx.Queue()

    def child(k, args):
        barrier.wait()
        try:
            queue.put((k, "ok", fn(*args)))
        except Exception as e:
            queue.put((k, type(e).__name__, str(e)))

    procs = [ctx.Process(target=child, args=(k, a)) for k, a in enumerate(args_list)]
    for p in procs:
        p.start()
    out = {k: tuple(rest) for k, *rest in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [out[k] for k in range(len(args_list))]


@pytest.mark.parametrize("exist_ok", [False, True])
def test_concurrent_creates_make_exactly_one_index(tmp_path, exist_ok):
    def create(path):
        return Index.create(path, dim=D, bundle_fingerprint=FP, exist_ok=exist_ok).uid

    for rnd in range(4):
        path = tmp_path / f"ix{rnd}"
        got = _fork_all(create, [(path,)] * 8)
        uid = Index.open(path).uid
        winners = [g for g in got if g[0] == "ok"]
        if exist_ok:  # the others open the one that won
            assert winners == [("ok", uid)] * 8, got
        else:  # the others are told it is there
            assert winners == [("ok", uid)], got
            assert all(g[0] == "IndexError_" and "already holds an index" in g[1] for g in got if g[0] != "ok"), got
        assert sorted(p.name for p in path.iterdir()) == ["index.lock", "manifest.json", "segments"]


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    path = tmp_path / "ix"
    Index.create(path, dim=D, bundle_fingerprint=FP)

    def write(w):
        ix = Index.open(path)
        for b in range(5):
            ix.add(unit_rows(7, seed=10 * w + b), [f"w{w}/{b}/{i}" for i in range(7)])
        return len(ix)

    got = _fork_all(write, [(w,) for w in range(4)])
    assert all(g[0] == "ok" for g in got), got
    ix = Index.open(path, verify=True)
    assert len(ix) == 4 * 5 * 7 and sorted(ix.ids) == sorted(f"w{w}/{b}/{i}" for w in range(4) for b in range(5)
                                                             for i in range(7))
    for w in range(4):
        for b in range(5):
            rows = [ix.row_of(f"w{w}/{b}/{i}") for i in range(7)]
            np.testing.assert_array_equal(ix.gather(np.array(rows)), unit_rows(7, seed=10 * w + b))


def test_searches_during_another_process_adds_see_their_snapshot(tmp_path):
    path = tmp_path / "ix"
    make_index(path, 50)
    reader = Index.open(path)
    q = unit_rows(3, seed=77)
    want = search_index(reader, q, 10)
    import multiprocessing as mp
    ctx = mp.get_context("fork")

    def writer():
        ix = Index.open(path)
        for b in range(15):
            ix.add(unit_rows(8, seed=100 + b), [f"new/{b}/{i}" for i in range(8)])

    p = ctx.Process(target=writer)
    p.start()
    while True:
        writing = p.is_alive()
        s, r = search_index(reader, q, 10)
        np.testing.assert_array_equal(s, want[0])
        np.testing.assert_array_equal(r, want[1])
        now = Index.open(path)  # a reader opened mid-way sees one whole commit
        assert (len(now) - 50) % 8 == 0 and len(now.ids) == len(now) == len(now.vectors())
        if not writing:
            break
    p.join()
    assert p.exitcode == 0 and len(reader) == 50
    assert len(Index.open(path, verify=True)) == 50 + 15 * 8


def test_a_compaction_by_another_process_leaves_an_open_index_its_snapshot(tmp_path):
    path = tmp_path / "ix"
    _, x = make_index(path, 60, batches=3)
    reader = Index.open(path)
    q = unit_rows(2, seed=3)
    want = search_index(reader, q, 7)
    writer = Index.open(path)
    writer.add(unit_rows(5, seed=4), [f"late/{i}" for i in range(5)])
    writer.compact()  # deletes every segment file the reader maps
    assert not seg_file(path, 0).exists()
    reader.check_unchanged()  # deleted is not changed: the maps keep the bytes
    s, r = search_index(reader, q, 7)
    np.testing.assert_array_equal(s, want[0])
    np.testing.assert_array_equal(r, want[1])
    np.testing.assert_array_equal(reader.vectors(), x)


# ----------------------------------------------------------------------------- a live index edited under an engine
LIVE_CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np
    from sgengine import Engine
    from sgengine.errors import IndexError_
    from sgengine.index import Index
    bundle = sys.argv[1]
    for index, mode in zip(sys.argv[2:], ("rewrite", "truncate")):
        engine = Engine.load(bundle, index=index, threads=1)
        ix = Index.open(index)
        q = ix.gather(np.array([0, 1, 2]))
        before = engine.search(q, k=5)
        npy = index + "/" + ix.manifest["segments"][0]["file"]
        if mode == "truncate":
            os.truncate(npy, 300)
        else:  # every row rewritten in place, in reverse order: same size, other rows
            with open(npy, "r+b") as f:
                np.lib.format.read_magic(f)
                np.lib.format.read_array_header_1_0(f)
                f.write(np.ascontiguousarray(ix.vectors()[::-1]).tobytes())
        try:
            after = engine.search(q, k=5)
            print(mode, "SEARCHED, same ids:", after.ids == before.ids, flush=True)
        except IndexError_ as e:
            print(mode, "REFUSED", e, flush=True)
""")


def test_a_segment_edited_under_a_running_engine_is_refused(tiny_engine, tiny_bundle, tmp_path):
    """Truncating a mapped segment used to kill the process (SIGBUS); rewriting it gave wrong ids."""
    paths = [tmp_path / "rewritten", tmp_path / "truncated"]
    for path in paths:
        ix = Index.create(path, dim=32, bundle_fingerprint=tiny_engine.bundle.fingerprint)
        ix.add(unit_rows(3000, 32, seed=8), [f"r{i}" for i in range(3000)])
    r = subprocess.run([sys.executable, "-c", LIVE_CHILD, str(tiny_bundle), *map(str, paths)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])  # -7 would be SIGBUS
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["rewrite", "REFUSED"], ["truncate", "REFUSED"]], r.stdout
    for line, says in zip(lines, ("written to after it was mapped", "is now 300 bytes")):
        assert "seg-000000.npy" in line and "changed on disk under this open index" in line and says in line


# ----------------------------------------------------------------------------- folders
def test_an_empty_folder_builds_an_empty_index(tiny_engine, tmp_path):
    (tmp_path / "empty").mkdir()
    rep = build_index(tiny_engine, tmp_path / "empty", tmp_path / "ix", progress=False)
    assert (rep.added, rep.total, rep.failed, rep.ignored) == (0, 0, [], {})
    assert len(Index.open(tmp_path / "ix")) == 0


def test_a_folder_of_non_images_reports_what_it_passed_over(tiny_engine, tmp_path, capsys, tiny_bundle):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "README", "c.pdf", "d.h5"):
        (folder / name).write_bytes(b"not an image")
    rep = build_index(tiny_engine, folder, tmp_path / "ix", progress=False)
    assert rep.total == 0 and rep.ignored == {"": 1, ".h5": 1, ".pdf": 1, ".txt": 2}
    rc, out, err = run_cli(capsys, "index", "build", tiny_bundle, folder, "-o", tmp_path / "ix2", "--quiet")
    assert rc == 0 and "passed over 5 file(s) of types this Pillow does not decode: (no suffix) 1, .h5 1, " \
                       ".pdf 1, .txt 2" in out, out


def test_every_format_this_pillow_decodes_is_indexed(tiny_engine, tmp_path):
    """The suffixes come from the installed Pillow (what it opens and has a codec for), not a fixed list."""
    from PIL import features
    suffixes = indexing.image_suffixes()
    assert {".jpg", ".png", ".webp", ".tiff"} <= suffixes and not {".pdf", ".h5", ".txt"} & suffixes
    assert (".avif" in suffixes) == bool(features.check("avif")) and (".jp2" in suffixes) == features.check("jpg_2000")
    folder = tmp_path / "fmt"
    folder.mkdir()
    rng = np.random.default_rng(1)
    want = []
    for suffix in (".avif", ".jp2", ".qoi", ".tga", ".jpg"):
        if suffix in suffixes:
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"x{suffix}")
            want.append(f"x{suffix}")
    rep = build_index(tiny_engine, folder, tmp_path / "ix", progress=False)
    assert rep.failed == [] and sorted(Index.open(tmp_path / "ix").ids) == sorted(want) and len(want) >= 3


def test_hidden_files_and_folders_are_skipped(tmp_path):
    folder = tmp_path / "p"
    write_images(folder, 2, subdirs=1)
    write_images(folder / ".thumbs", 2, subdirs=1)
    shutil.copy(folder / "d0" / "000.png", folder / ".hidden.png")
    assert [p.relative_to(folder).as_posix() for p in indexing.scan_folder(folder).files] == ["d0/000.png", "d0/001.png"]


def test_a_symlink_loop_does_not_trap_the_walk(tiny_engine, tmp_path):
    folder = tmp_path / "p"
    ids = write_images(folder, 3, subdirs=1)
    (folder / "d0" / "loop").symlink_to(folder, target_is_directory=True)
    rep = build_index(tiny_engine, folder, tmp_path / "ix", progress=False)
    assert rep.added == 3 and sorted(Index.open(tmp_path / "ix").ids) == sorted(ids)


def test_broken_and_looping_file_symlinks_are_listed_unreadable(tiny_engine, tmp_path):
    folder = tmp_path / "p"
    write_images(folder, 2, subdirs=1)
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "a.png").symlink_to(folder / "b.png")
    (folder / "b.png").symlink_to(folder / "a.png")
    rep = build_index(tiny_engine, folder, tmp_path / "ix", progress=False)
    assert rep.added == 2 and sorted(rel for rel, _ in rep.failed) == ["a.png", "b.png", "gone.png"]
    assert len(Index.open(tmp_path / "ix")) == 2


def test_a_file_deleted_between_listing_and_decoding_is_listed(tiny_engine, tmp_path):
    folder = tmp_path / "p"
    write_images(folder, 3, subdirs=1)
    ix = Index.create(tmp_path / "ix", dim=tiny_engine.dim, bundle_fingerprint=tiny_engine.bundle.fingerprint)
    todo, _ = indexing.pending_images(folder, ix)
    (folder / "d0" / "001.png").unlink()
    got = embed_files(tiny_engine, todo)
    assert got.ids == ["d0/000.png", "d0/002.png"] and [rel for rel, _ in got.failed] == ["d0/001.png"]
    assert "no such file" in got.failed[0][1]


def _mkdir_deep(top: Path, levels: int) -> bytes:
    """Nested 250-byte folder names, made through directory fds (their full path outgrows PATH_MAX)."""
    fd = os.open(top, os.O_RDONLY)
    path = os.fsencode(top)
    for _ in range(levels):
        name = b"L" * 250
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, path = nfd, path + b"/" + name
    os.close(fd)
    return path


def _write_at(path: bytes, name: bytes, data: bytes) -> None:
    """Write a file whose full path may be over PATH_MAX: walk there by directory fds."""
    parts = path.split(b"/")
    fd = os.open(b"/", os.O_RDONLY)
    for p in parts:
        if p:
            nfd = os.open(p, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    wfd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(wfd, data)
    os.close(wfd)
    os.close(fd)


def test_folders_beyond_path_max_are_reported_and_the_build_finishes(tiny_engine, tmp_path):
    folder = tmp_path / "p"
    write_images(folder, 2, subdirs=1)
    png = (folder / "d0" / "000.png").read_bytes()
    base = len(os.fsencode(folder))
    levels = -(-(4095 - base) // 251)  # the first level whose path reaches PATH_MAX (4096 with its NUL)
    deep = _mkdir_deep(folder, levels)
    _write_at(deep, b"lost.png", png)  # in the folder that cannot be listed
    listable = deep.rsplit(b"/", 1)[0]  # listed; a file in it whose full path outgrows PATH_MAX cannot be read
    _write_at(listable, b"x" * max(3, 4093 - len(listable)) + b".png", png)
    rep = build_index(tiny_engine, folder, tmp_path / "ix", progress=False)
    assert rep.added == 2 and len(rep.unreadable_dirs) == 1 and len(rep.failed) == 1, (rep.unreadable_dirs, rep.failed)
    assert rep.unreadable_dirs[0][0] == os.fsdecode(deep) and "longer than the file system allows" in rep.unreadable_dirs[0][1]
    assert rep.failed[0][0].endswith("xxx.png") and "xxx.png" in rep.failed[0][1]  # the decoder's words


def test_a_file_name_that_is_not_utf8_is_listed_and_the_build_resumes(tiny_engine, tiny_bundle, tmp_path, capsys):
    """Such a file used to stop every build at the same chunk (UnicodeEncodeError writing the ids)."""
    folder = tmp_path / "p"
    ids = write_images(folder, 6, subdirs=2)
    fd = os.open(os.fsencode(folder / "d0") + b"/bad\xff.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, (folder / "d0" / "000.png").read_bytes())
    os.close(fd)
    rep = build_index(tiny_engine, folder, tmp_path / "ix", commit_every=2, progress=False)
    assert rep.added == 6 and rep.total == 7 and [rel for rel, _ in rep.failed] == ["d0/bad\\xff.png"]
    assert "not UTF-8" in rep.failed[0][1]
    assert sorted(Index.open(tmp_path / "ix").ids) == sorted(ids)
    rc, out, err = run_cli(capsys, "index", "build", tiny_bundle, folder, "-o", tmp_path / "ix", "--quiet")
    assert rc == 0 and "indexed 0 new image(s), skipped 6" in out and "d0/bad\\xff.png: the file name" in out, out
    Index.open(tmp_path / "ix", verify=True)


def test_bad_folder_arguments(tiny_engine, tiny_bundle, tmp_path, capsys):
    with pytest.raises(InputError, match="not a directory"):
        build_index(tiny_engine, tmp_path / "missing", tmp_path / "ix", progress=False)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(InputError, match="file.png: not a directory"):
        build_index(tiny_engine, tmp_path / "file.png", tmp_path / "ix", progress=False)
    for folder, out_dir in ((tmp_path / "missing", tmp_path / "ix"), (tmp_path, tmp_path / LONG / "ix")):
        rc, _, err = run_cli(capsys, "index", "build", tiny_bundle, folder, "-o", out_dir, "--quiet")
        assert_one_line_error(rc, err)


# ----------------------------------------------------------------------------- two builds, kills
def test_two_builds_of_one_folder_at_once_index_each_file_once(tiny_bundle, tmp_path):
    folder = tmp_path / "p"
    ids = write_images(folder, 60)
    cmd = [sys.executable, "-m", "sgengine", "index", "build", str(tiny_bundle), str(folder), "-o",
           str(tmp_path / "ix"), "--commit-every", "2", "--threads", "1", "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    added = [int(out.split("indexed ")[1].split()[0]) for out, _ in outs]
    assert sum(added) == 60, outs
    ix = Index.open(tmp_path / "ix", verify=True)
    assert sorted(ix.ids) == sorted(ids) and len(set(ix.ids)) == 60


def _kill_after(cmd: list[str], marker: bytes, delay: float) -> int:
    """Start cmd, wait until its stderr shows `marker` (the phase it is in), SIGKILL it `delay` s later."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    while marker not in seen:
        chunk = p.stderr.read1(4096)
        if not chunk:
            break
        seen += chunk
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.stderr.read()
    return p.wait(timeout=60)


def test_a_build_killed_at_random_moments_resumes_to_the_one_process_index(tiny_engine, tiny_bundle, tmp_path):
    folder = tmp_path / "p"
    write_images(folder, 120)
    ref = tmp_path / "ref"
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI's --threads 1: the pooling's sums then run in the same order
    try:
        build_index(tiny_engine, folder, ref, commit_every=4, progress=False)
    finally:
        torch.set_num_threads(threads)
    ref_ix = Index.open(ref)
    path = tmp_path / "ix"
    cmd = [sys.executable, "-m", "sgengine", "index", "build", str(tiny_bundle), str(folder), "-o", str(path),
           "--commit-every", "4", "--threads", "1"]
    rng = random.Random(13)
    for _ in range(5):  # ~110 images/s on 2 idle cores: each kill lands before the build can finish
        _kill_after(cmd, b"indexing", rng.uniform(0.0, 0.2))
        if (path / "manifest.json").exists():
            ix = Index.open(path, verify=True)  # whatever was committed is whole and exact
            assert ix.ids == ref_ix.ids[:len(ix)]
            np.testing.assert_array_equal(ix.vectors(), ref_ix.vectors()[:len(ix)])
    r = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ix = Index.open(path, verify=True)
    assert ix.ids == ref_ix.ids
    np.testing.assert_array_equal(ix.vectors(), ref_ix.vectors())


def test_an_ann_build_killed_at_random_moments_never_leaves_a_wrong_ann(tmp_path):
    path = tmp_path / "ix"
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((32, 32))
    x = centers[rng.integers(0, 32, 100_000)] + 0.3 * rng.standard_normal((100_000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    Index.create(path, dim=32, bundle_fingerprint=FP).add(x, [f"r{i}" for i in range(len(x))])
    cmd = [sys.executable, "-m", "sgengine", "index", "ann", str(path), "--factory", "IVF32,Flat", "--nprobe", "32",
           "--recall-queries", "100", "--M", "50"]
    q = x[:20]
    s_exact, r_exact = search_index(Index.open(path), q, 50)
    kills = random.Random(5)
    # One kill while it trains, one while it adds, three after it starts measuring recall: while it
    # measures, writes the .faiss file and its sidecar, or commits.
    for marker, most in ((b"training", 0.1), (b"ann add", 0.1), (b"tuning", 0.05), (b"tuning", 0.15), (b"tuning", 0.4)):
        _kill_after(cmd, marker, kills.uniform(0.0, most))
        ix = Index.open(path, verify=True)  # the rows, and any ANN the manifest lists, match their hashes
        assert len(ix) == 100_000 and ix.ann_state() in ("absent", "fresh")
        if ix.ann_state() == "fresh":  # committed whole: with every list probed it finds the exact top rows
            a = ann.Ann.load(ix)
            assert a.factory == "IVF32,Flat" and (np.sort(a.search(q, 50), axis=1) == np.sort(r_exact, axis=1)).all()
    r = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ix = Index.open(path, verify=True)
    a = ann.Ann.load(ix)
    assert ix.ann_state() == "fresh" and (np.sort(a.search(q, 50), axis=1) == np.sort(r_exact, axis=1)).all()
    assert sorted(p.name for p in (path / "ann").iterdir()) == sorted(
        Path(ix.ann[k]).name for k in ("file", "meta_file"))  # what the kills left behind is gone


# ----------------------------------------------------------------------------- one line, status 2, every subcommand
def test_cli_errors_are_one_line_with_status_2(tiny_engine, tiny_bundle, tmp_path, capsys):
    Index.create(tmp_path / "ix", dim=32, bundle_fingerprint=tiny_engine.bundle.fingerprint).add(
        unit_rows(5, 32), [f"r{i}" for i in range(5)])
    (tmp_path / "afile").write_text("x")
    long_query = tmp_path / (LONG + ".jpg")
    cases = [
        (["search", tiny_bundle, tmp_path / "missing", "q.jpg"], "missing"),
        (["search", tiny_bundle, tmp_path / "ix", long_query], LONG[:30]),
        (["search", tiny_bundle, tmp_path / "ix", tmp_path / "afile"], "afile"),
        (["describe", tmp_path / "afile"], "afile"),
        (["describe", tiny_bundle, "--index", tmp_path / LONG], "longer than the file system allows"),
        (["index", "ann", tmp_path / "missing"], "missing"),
        (["index", "ann", tmp_path / "ix", "--drop", "--update"], "exclude each other"),
        (["index", "build", tiny_bundle, tmp_path / "afile", "-o", tmp_path / "ix3", "--quiet"], "afile"),
        (["demo", "--workdir", tmp_path / "afile"], "afile"),
        (["export", tmp_path / "no-such.pth", "-o", tmp_path / "b"], "no-such.pth"),
    ]
    for args, says in cases:
        rc, _, err = run_cli(capsys, *args)
        assert_one_line_error(rc, err, says)


def test_engine_load_verify_finds_a_same_size_edit(tmp_path, default_bundle):
    """Engine.load(verify=True) runs the full check; without it only the cheap ones (they cannot see
    rows swapped in place)."""
    from sgengine import Engine
    from sgengine.bundle import Bundle
    b = Bundle.load(default_bundle)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, b.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = tmp_path / "ix"
    Index.create(path, dim=b.dim, bundle_fingerprint=b.fingerprint).add(x, [f"r{i}" for i in range(12)])
    npy = seg_file(path)
    with open(npy, "r+b") as f:
        f.seek(rows_offset(npy))
        f.write(np.concatenate([x[1:2], x[0:1], x[2:]]).tobytes())
    Engine.load(b, index=path)  # the cheap checks pass
    with pytest.raises(IndexError_, match="does not match its sha256"):
        Engine.load(b, index=path, verify=True)
    with pytest.raises(IndexError_, match="does not match its sha256"):
        Engine.load(b, index=Index.open(path), verify=True)
    with pytest.raises(InputError, match="verify must be True or False"):
        Engine.load(b, index=path, verify="yes")
