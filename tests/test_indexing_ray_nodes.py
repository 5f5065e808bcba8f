"""Indexing across two Ray nodes on loopback: a head and a second node (ray.cluster_utils.Cluster,
real raylets, one CPU each), the CLI driver connected by address. Each actor needs one CPU, so
the two workers run one per node; the index must equal the one-process build row by row.

Its own module: the cluster here must be the only Ray connection of this process while it runs
(tests/test_indexing_ray.py holds a module-wide one)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sgengine import Engine, Index

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'sgengine[ray]') is not installed")
from ray.cluster_utils import Cluster  # noqa: E402

from sgengine.indexing import build_index  # noqa: E402

NAMES = ("astronaut", "coffee", "chelsea")


@pytest.fixture
def two_nodes():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def test_two_nodes_build_the_one_process_index(two_nodes, default_bundle, photos, tmp_path):
    d = tmp_path / "photos"
    for name in NAMES:
        img = Image.fromarray(photos[name])
        img.thumbnail((128, 128))
        (d / name).mkdir(parents=True)
        img.save(d / name / "full.jpg", quality=90)
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(d / name / "flip.png")
    want = tmp_path / "reference"
    build_index(Engine.load(default_bundle, threads=1), d, want, commit_every=2, progress=False)

    assert not ray.is_initialized(), "this process must not be connected to Ray here"
    out = tmp_path / "index"
    cmd = [sys.executable, "-m", "sgengine", "index", "build", str(default_bundle), str(d), "-o", str(out),
           "--commit-every", "2", "--threads", "1", "--workers", "2", "--quiet", "--ray", two_nodes.address]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    got, ref = Index.open(out), Index.open(want)
    assert got.ids == ref.ids and len(got.ids) == 2 * len(NAMES)
    assert np.array_equal(np.asarray(got.vectors()), np.asarray(ref.vectors()))
    # Both raylets were alive for the whole build (a dead node would have lost its actor).
    ray.init(address=two_nodes.address, logging_level="WARNING")
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 2 and sum(n["Resources"].get("CPU", 0) for n in alive) == 2
    finally:
        ray.shutdown()
