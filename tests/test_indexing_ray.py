"""Indexing on a real local Ray cluster: the same index as the one-process build, row by row, and
neither a worker killed mid-job nor a driver killed mid-job loses or duplicates a row."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sgengine import Engine, Index
from sgengine.errors import InputError

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'sgengine[ray]') is not installed")

from sgengine.indexing import build_index  # noqa: E402
from sgengine.indexing_ray import build_index_ray  # noqa: E402

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower")
# Workers and the one-process reference both run the backbone on one thread: the descriptors are
# then equal to the last bit (measured: batch composition does not change a row; 2 threads
# against 1 moves rows by up to 1.6e-7, so a thread count that differs would need a tolerance).
THREADS = 1


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos) -> Path:
    """Small real photos (long side <= 144 px: the run stays cheap on 2 cores), two views of each, one
    below the bundle's minimum side (upscaled, so it carries a note) and two unreadable files."""
    d = tmp_path_factory.mktemp("ray_photos")
    for name in NAMES:
        img = Image.fromarray(photos[name])
        img.thumbnail((144, 144))
        (d / name).mkdir()
        img.save(d / name / "full.jpg", quality=90)
        img.rotate(12, resample=Image.Resampling.BILINEAR).save(d / name / "rot.png")
    Image.fromarray(photos["coffee"]).resize((64, 48)).save(d / "tiny.png")
    (d / "broken.jpg").write_bytes(b"not a jpeg at all")
    (d / "coffee" / "empty.png").write_bytes(b"")
    return d


@pytest.fixture(scope="module")
def reference(default_bundle, photo_dir, tmp_path_factory):
    """The one-process build of the same folder: (index dir, report)."""
    out = tmp_path_factory.mktemp("ray_ref") / "index"
    rep = build_index(Engine.load(default_bundle, threads=THREADS), photo_dir, out, commit_every=5, progress=False)
    assert rep.added == 2 * len(NAMES) + 1 and len(rep.failed) == 2 and rep.notes
    return out, rep


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real local Ray cluster with 2 CPUs; its workers see SGENGINE_RAY_CRASH_ONCE (armed by a test
    writing that file)."""
    marker = tmp_path_factory.mktemp("ray_crash") / "armed"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"SGENGINE_RAY_CRASH_ONCE": str(marker)}})
    try:
        yield {"address": ray.get_runtime_context().gcs_address, "marker": marker}
    finally:
        ray.shutdown()


def assert_same_index(got_dir: Path, want_dir: Path) -> None:
    got, want = Index.open(got_dir), Index.open(want_dir)
    assert len(set(got.ids)) == len(got.ids), "duplicate ids"
    assert got.ids == want.ids, (sorted(set(got.ids) ^ set(want.ids)), got.ids, want.ids)
    a, b = np.asarray(got.vectors()), np.asarray(want.vectors())
    assert a.dtype == b.dtype and a.shape == b.shape
    if not np.array_equal(a, b):
        rows = np.flatnonzero((a != b).any(axis=1))
        raise AssertionError(f"{len(rows)} row(s) differ, first {got.ids[rows[0]]!r}; "
                             f"max |diff| {np.abs(a - b).max():.3g}")


def assert_same_report(got, want) -> None:
    assert (got.added, got.skipped, got.total) == (want.added, want.skipped, want.total)
    assert sorted(got.failed) == sorted(want.failed)
    assert sorted(got.notes) == sorted(want.notes)


def _build(default_bundle, photo_dir, out):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = build_index_ray(default_bundle, photo_dir, out, workers=2, threads=THREADS, batch_size=3,
                              commit_every=5, progress=False)
    assert not [w for w in caught if "delivered twice" in str(w.message)]
    return rep


def test_ray_build_equals_the_one_process_build(cluster, default_bundle, photo_dir, reference, tmp_path):
    out = tmp_path / "index"
    rep = _build(default_bundle, photo_dir, out)
    assert_same_report(rep, reference[1])
    assert {rel for rel, _ in rep.failed} == {"broken.jpg", "coffee/empty.png"}
    assert any(rel == "tiny.png" for rel, _ in rep.notes)
    assert_same_index(out, reference[0])
    assert Index.open(out).segments == 1  # compacted, as the one-process build is


def test_a_killed_driver_and_a_killed_worker_lose_and_duplicate_nothing(cluster, default_bundle, photo_dir, reference,
                                                                         tmp_path, capsys):
    """The CLI driver, connected to the cluster by address, dies right after its first commit. The
    same command run again (in this process, reusing its connection) resumes, and one of its
    workers dies after embedding a batch, before returning it: the index still equals the
    one-process build."""
    out = tmp_path / "index"
    env = dict(os.environ, SGENGINE_INDEX_CRASH_AT="after-manifest")
    cmd = [sys.executable, "-m", "sgengine", "index", "build", str(default_bundle), str(photo_dir), "-o", str(out),
           "--commit-every", "4", "--threads", str(THREADS), "--workers", "2", "--quiet", "--ray", cluster["address"]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 77, proc.stderr[-3000:]
    partial, want = Index.open(out), Index.open(reference[0])
    assert partial.ids == want.ids[:4]  # commits follow the folder's order
    assert np.array_equal(np.asarray(partial.vectors()), np.asarray(want.vectors())[:4])

    marker = cluster["marker"]
    marker.write_text("")  # armed: the first worker to finish a batch dies without returning it
    from sgengine.cli import main
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(cmd[3:-1]) == 0  # index build ... --ray: without the address, this process's connection
    assert not [w for w in caught if "delivered twice" in str(w.message)]
    assert not marker.exists() and Path(f"{marker}.fired").exists(), "no worker died: the test tested nothing"
    printed = capsys.readouterr().out
    assert f"indexed {reference[1].added - 4} new image(s), skipped 4" in printed and "2 unreadable" in printed
    assert_same_index(out, reference[0])


def test_bad_arguments_are_refused_before_any_work(default_bundle, photo_dir, tmp_path, capsys):
    for kwargs, fragment in (({"device": "cuda:1"}, "device"), ({"workers": 0}, "workers"),
                             ({"commit_every": 0}, "commit_every"), ({"dtype": "int8"}, "dtype")):
        with pytest.raises(InputError, match=fragment):
            build_index_ray(default_bundle, photo_dir, tmp_path / "index", progress=False, **kwargs)
    with pytest.raises(InputError, match="not a directory"):
        build_index_ray(default_bundle, tmp_path / "missing", tmp_path / "index", progress=False)
    assert not (tmp_path / "index").exists()
    from sgengine.cli import main
    argv = ["index", "build", str(default_bundle), str(photo_dir), "-o", str(tmp_path / "i"), "--workers", "2"]
    assert main(argv) == 2
    assert "--workers" in capsys.readouterr().err
