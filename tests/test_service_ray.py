"""The search service as two Ray Serve replicas on a real local Ray cluster (2 CPUs): both replicas
answer, and they answer identically (to the last bit) and as the in-process engine ranks."""
from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import socket
import time

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'sgengine[ray]') is not installed")
serve = pytest.importorskip("ray.serve", reason="Ray Serve (pip install 'sgengine[ray]') is not installed")
pytest.importorskip("starlette", reason="the serve extra (pip install 'sgengine[serve]') is not installed")

from sgengine import Engine  # noqa: E402
from sgengine.compare import assert_rankings_agree  # noqa: E402
from sgengine.indexing import build_index  # noqa: E402
from sgengine.service.app import ServiceConfig  # noqa: E402
from sgengine.service.ray_serve import application  # noqa: E402

NAMES = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def engine(default_bundle, photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_serve_photos")
    for name in NAMES:
        img = Image.fromarray(photos[name])
        img.thumbnail((200, 200))
        (root / name).mkdir()
        img.save(root / name / "full.jpg", quality=92)
        img.rotate(10).save(root / name / "rot.jpg", quality=90)
    index_dir = tmp_path_factory.mktemp("ray_serve_index") / "index"
    build_index(Engine.load(default_bundle), root, index_dir, progress=False)
    return Engine.load(default_bundle, index=index_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: bytes, ctype: str):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("POST", path, body=body, headers={"Content-Type": ctype})
        r = c.getresponse()
        return r.status, r.getheader("X-Served-By"), json.loads(r.read())
    finally:
        c.close()


@pytest.fixture(scope="module")
def replicas(engine):
    """Two replicas (one CPU each) behind Ray Serve's proxy on a loopback port; all stopped after."""
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(engine.bundle.path, engine.index.path, ServiceConfig(), {"threads": 1}, replicas=2),
                  name="sgengine", route_prefix="/")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_identically(replicas, engine, photos):
    rng = np.random.default_rng(7)
    descs = rng.standard_normal((3, engine.dim)).astype(np.float32)
    descs /= np.linalg.norm(descs, axis=1, keepdims=True)
    img = io.BytesIO()
    Image.fromarray(photos["coffee"]).resize((240, 180)).save(img, "JPEG", quality=90)
    queries = [("/search", json.dumps({"descriptor": d.tolist(), "k": 5}).encode(), "application/json")
               for d in descs]
    queries.append(("/search?k=5", img.getvalue(), "image/jpeg"))

    # Ask every query until two replicas have answered it (bounded: Ray Serve's router picks one
    # of the two at random per request when both are idle).
    answers: dict[int, dict[str, dict]] = {i: {} for i in range(len(queries))}
    deadline = time.monotonic() + 60
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while any(len(a) < 2 for a in answers.values()):
            assert time.monotonic() < deadline, {i: list(a) for i, a in answers.items()}
            todo = [i for i, a in answers.items() if len(a) < 2 for _ in range(2)]
            for i, (status, who, body) in zip(todo, pool.map(lambda i: _post(replicas, *queries[i]), todo)):
                assert status == 200, body
                answers[i].setdefault(who, body)

    servers = {who for a in answers.values() for who in a}
    assert len(servers) == 2, servers
    for i, by_replica in answers.items():
        a, b = by_replica.values()
        assert a["ids"] == b["ids"] and a["scores"] == b["scores"] and a["rows"] == b["rows"], i
        q = descs[i] if i < len(descs) else queries[i][1]
        want = engine.search(q, k=5)
        assert_rankings_agree(a["ids"], a["scores"], want[0].ids, want[0].scores, rtol=1e-5, atol=1e-5,
                              context=f"query {i}: replica vs in-process engine")
