"""The search service on a real uvicorn server on loopback: every endpoint, dynamic batching against
the in-process engine, every limit (413, 503 + Retry-After, 504, 401, 400/422 with the message),
thumbnails without path traversal, and a graceful SIGTERM of `sgengine serve` with a request in flight."""
from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (pip install 'sgengine[serve]') is not installed")
pytest.importorskip("starlette", reason="the serve extra (pip install 'sgengine[serve]') is not installed")

from sgengine import Engine, Index  # noqa: E402
from sgengine.compare import assert_rankings_agree  # noqa: E402
from sgengine.errors import InputError  # noqa: E402
from sgengine.indexing import build_index  # noqa: E402
from sgengine.service.app import ServiceConfig, create_app  # noqa: E402

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower")


# ---------------------------------------------------------------- a real server and a plain HTTP client
@contextmanager
def live_server(engine, **config):
    """uvicorn serving create_app(engine, ServiceConfig(**config)) on a loopback socket bound here (no
    port race), until the block ends; waits for /readyz."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(engine, ServiceConfig(**config))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def _auth(token):
    return {"Authorization": f"Bearer {token}"} if token else {}


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if request(url, "GET", "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout} s")


def request(url, method, path, body=None, headers=None, chunked=False):
    """(status, headers, body bytes) of one request on a new connection."""
    host, port = url.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def post_json(url, path, obj, headers=None):
    status, h, body = request(url, "POST", path, json.dumps(obj).encode(),
                              {"Content-Type": "application/json", **(headers or {})})
    return status, h, json.loads(body)


def post_image(url, path, data: bytes, headers=None):
    status, h, body = request(url, "POST", path, data, {"Content-Type": "image/jpeg", **(headers or {})})
    return status, h, json.loads(body)


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def metric(text: str, name: str, **labels) -> float:
    """The value of one series of a Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    for line in text.splitlines():
        m = re.match(pat, line)
        if m:
            return float(m.group(1))
    return 0.0


def assert_error(status, body, want_status, *needles):
    assert status == want_status, (status, body)
    msg = body["error"]["message"]
    assert "Traceback" not in msg
    for n in needles:
        assert n in msg, (n, msg)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos) -> Path:
    """Small real photos (long side 256) and a rotated view of each."""
    d = tmp_path_factory.mktemp("service_photos")
    for name in NAMES:
        img = Image.fromarray(photos[name])
        img.thumbnail((256, 256))
        (d / name).mkdir()
        img.save(d / name / "full.jpg", quality=92)
        img.rotate(12, resample=Image.Resampling.BILINEAR).save(d / name / "rot.jpg", quality=90)
    return d


@pytest.fixture(scope="module")
def engine(default_bundle, photo_dir, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("service_index") / "index"
    rep = build_index(Engine.load(default_bundle), photo_dir, index_dir, progress=False)
    assert rep.added == 2 * len(NAMES)
    return Engine.load(default_bundle, index=index_dir)


@pytest.fixture(scope="module")
def server(engine, photo_dir):
    with live_server(engine, images=str(photo_dir)) as url:
        yield url


def jpeg(photos, name: str, side: int) -> bytes:
    img = Image.fromarray(photos[name])
    img.thumbnail((side, side))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


# ---------------------------------------------------------------- endpoints
def test_health_ready_describe_metrics_page(server, engine):
    assert request(server, "GET", "/healthz")[0] == 200
    status, _, body = request(server, "GET", "/readyz")
    assert status == 200 and json.loads(body) == {"ready": True}
    status, _, body = request(server, "GET", "/describe")
    d = json.loads(body)
    assert status == 200 and d["dim"] == engine.dim and d["index"]["count"] == len(engine.index)
    assert d["service"]["max_batch"] == 16 and d["service"]["token"] is False
    assert post_json(server, "/search", {"descriptor": [1.0] + [0.0] * (engine.dim - 1), "k": 2})[0] == 200
    status, h, body = request(server, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and h["content-type"].startswith("text/plain; version=0.0.4")
    assert metric(text, "sgengine_batch_size_count") >= 1  # the warm-up query
    assert metric(text, "sgengine_requests_total", endpoint="readyz", status="200") >= 1
    assert metric(text, "sgengine_ready") == 1
    assert "# TYPE sgengine_stage_seconds histogram" in text and 'sgengine_stage_seconds_bucket{stage="total"' in text
    status, h, body = request(server, "GET", "/")
    assert status == 200 and h["content-type"].startswith("text/html") and b'id="file"' in body
    status, _, body = request(server, "GET", "/nowhere")
    assert_error(status, json.loads(body), 404, "no such endpoint")


def test_search_forms_match_the_engine(server, engine, photo_dir):
    """Raw body, multipart upload and JSON descriptor give the in-process engine's ranking."""
    data = (photo_dir / "coffee" / "rot.jpg").read_bytes()
    for rerank in (True, False, "adaptive"):
        want = engine.search(data, k=5, rerank=rerank, K=3, beta=0.2)
        q = f"/search?k=5&rerank={str(rerank).lower()}&K=3&beta=0.2"
        status, h, raw = post_image(server, q, data)
        body, ctype = multipart("image", "rot.jpg", data)
        status2, _, form = request(server, "POST", q, body, {"Content-Type": ctype})
        assert status == status2 == 200, (raw, form)
        form = json.loads(form)
        for got in (raw, form):
            assert got["ids"] == want[0].ids and got["rows"] == want[0].rows.tolist()
            np.testing.assert_allclose(got["scores"], want[0].scores, rtol=0, atol=1e-6)
            assert {"decode", "queue", "embed", "search", "total"} <= set(got["timings_ms"])
            assert ("rerank" in got["timings_ms"]) == bool(rerank)
        assert h["x-served-by"]

    status, _, emb = post_image(server, "/embed", data)
    assert status == 200 and emb["dim"] == engine.dim
    np.testing.assert_array_equal(np.float32(emb["descriptor"]), engine.embed(data)[0])
    status, _, by_desc = post_json(server, "/search", {"descriptor": emb["descriptor"], "k": 5, "K": 3, "beta": 0.2})
    want = engine.search(np.float32(emb["descriptor"]), k=5, K=3, beta=0.2)
    assert status == 200 and by_desc["ids"] == want[0].ids
    np.testing.assert_array_equal(np.float32(by_desc["scores"]), want[0].scores)


def test_concurrent_requests_are_batched_and_match_the_engine(engine, photos):
    """Concurrent descriptor and image queries run in batches > 1, each answered as engine.search answers it alone."""
    rng = np.random.default_rng(1)
    descs = rng.standard_normal((12, engine.dim)).astype(np.float32)
    descs /= np.linalg.norm(descs, axis=1, keepdims=True)
    images = [jpeg(photos, n, 200) for n in NAMES]
    with live_server(engine, max_delay=0.25) as url:
        gate = threading.Barrier(len(descs) + len(images))

        def ask(item):
            gate.wait()
            if isinstance(item, bytes):
                return post_image(url, "/search?k=6", item)
            return post_json(url, "/search", {"descriptor": item.tolist(), "k": 6})

        with concurrent.futures.ThreadPoolExecutor(len(descs) + len(images)) as pool:
            answers = list(pool.map(ask, list(descs) + images))
        text = request(url, "GET", "/metrics")[2].decode()
    for item, (status, _, got) in zip(list(descs) + images, answers):
        assert status == 200, got
        want = engine.search(item, k=6)
        assert_rankings_agree(got["ids"], got["scores"], want[0].ids, want[0].scores, context="service vs engine")
    assert max(got["batch_size"] for _, _, got in answers) > 1
    batches = metric(text, "sgengine_batch_size_count")
    singles = metric(text, "sgengine_batch_size_bucket", le="1")
    assert batches - singles >= 1, text
    assert metric(text, "sgengine_batch_size_sum") == len(answers) + 1  # + the warm-up


# ---------------------------------------------------------------- limits
def test_server_default_rerank_applies_where_a_search_names_none(engine, photo_dir):
    """--rerank adaptive: a search without rerank runs the adaptive mode (and says so); one that names
    a mode gets that mode; /describe shows the setting."""
    queries = np.concatenate([engine.embed(photo_dir / n / "rot.jpg") for n in NAMES])
    mixed = (queries[:-1] + queries[1:]) / 2  # between two scenes: where the two modes part
    queries = np.concatenate([queries, mixed / np.linalg.norm(mixed, axis=1, keepdims=True)])
    n = len(engine.index)
    faithful = engine.search(queries, k=n, rerank=True)
    adaptive = engine.search(queries, k=n, rerank="adaptive")
    differ = [i for i in range(len(queries)) if faithful[i].ids != adaptive[i].ids]
    assert differ, "no query where the modes differ: the test would not tell them apart"
    with live_server(engine, rerank="adaptive") as url:
        for i in differ:
            status, _, got = post_json(url, "/search", {"descriptor": queries[i].tolist(), "k": n})
            assert status == 200 and got["rerank"] == "adaptive"
            assert got["ids"] == adaptive[i].ids
            status, _, got = post_json(url, "/search", {"descriptor": queries[i].tolist(), "k": n, "rerank": True})
            assert status == 200 and got["rerank"] == "faithful" and got["ids"] == faithful[i].ids
        status, _, got = post_json(url, "/search?rerank=false", {"descriptor": queries[0].tolist(), "k": 3})
        assert status == 200 and got["rerank"] == "off" and "rerank" not in got["timings_ms"]
        status, _, info = request(url, "GET", "/describe")
        assert status == 200 and json.loads(info)["service"]["rerank"] == "adaptive"
    with pytest.raises(InputError, match="rerank must be one of faithful, adaptive, off"):
        ServiceConfig(rerank="sometimes")


def test_bad_input_gets_400_or_422_with_the_message(server, engine):
    d = [0.0] * engine.dim
    cases = [
        (post_image(server, "/search?k=0", b"x"), 400, "k must be >= 1"),
        (post_image(server, "/search?k=ten", b"x"), 400, "k must be an integer"),
        (post_image(server, "/search?rerank=maybe", b"x"), 400, "rerank must be true, false or adaptive"),
        (post_image(server, "/search?m=4", b"x"), 400, "unknown query parameter(s) m"),
        (post_json(server, "/search?k=3", {"descriptor": d, "k": 3}), 400, "both in the query string"),
        (post_json(server, "/search", {"descriptor": d, "top": 3}), 400, "unknown JSON field(s) top"),
        (post_json(server, "/search", {"vector": d}), 400, '{"descriptor"'),
        (post_json(server, "/embed", {"descriptor": d}), 400, "takes an image"),
        (post_image(server, "/search", b"definitely not an image"), 422, "not a recognised image format"),
        (post_image(server, "/search", b""), 422, "is empty"),
        (post_json(server, "/search", {"descriptor": [0.5, 0.5]}), 422, f"{engine.dim} numbers"),
        (post_json(server, "/search", {"descriptor": [float("nan")] * engine.dim}), 422, "NaN"),
    ]
    for (status, _, body), want, needle in cases:
        assert_error(status, body, want, needle)
    status, _, body = request(server, "POST", "/search", b"{not json", {"Content-Type": "application/json"})
    assert_error(status, json.loads(body), 400, "not valid JSON")
    body, ctype = multipart("image", "a.jpg", b"")
    no_file = body.replace(b'filename="a.jpg"', b"")
    status, _, got = request(server, "POST", "/search", no_file, {"Content-Type": ctype})
    assert_error(status, json.loads(got), 400, "one image file, got 0")
    text = request(server, "GET", "/metrics")[2].decode()
    assert metric(text, "sgengine_errors_total", endpoint="search", type="invalid_input") >= 4
    assert metric(text, "sgengine_errors_total", endpoint="search", type="bad_request") >= 6


def test_body_and_pixel_limits_give_413(engine, photos):
    big = jpeg(photos, "astronaut", 512)
    wide = io.BytesIO()
    Image.new("RGB", (3000, 2000), (90, 120, 200)).save(wide, "PNG")  # 6 MP in a few kB
    assert len(wide.getvalue()) < 100_000 < len(big) * 2
    with live_server(engine, max_body_bytes=100_000, max_pixels=4_000_000) as url:
        status, _, body = post_image(url, "/search", big * 2)
        assert_error(status, body, 413, f"{2 * len(big):,} bytes", "100,000")
        status, _, body = request(url, "POST", "/search", iter([big, big]), {"Content-Type": "image/jpeg"},
                                  chunked=True)
        assert_error(status, json.loads(body), 413, "over this server's limit of 100,000 bytes")
        status, _, body = post_image(url, "/search", wide.getvalue())
        assert_error(status, body, 413, "3000x2000 = 6.0 MP", "4.0 MP")
        assert post_image(url, "/search?k=2", big)[0] == 200


def test_full_queue_gives_503_with_retry_after(engine, photos):
    data = jpeg(photos, "chelsea", 400)
    with live_server(engine, queue=1, max_batch=1) as url:
        gate = threading.Barrier(8)

        def ask(_):
            gate.wait()
            return post_image(url, "/search?k=3", data)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        text = request(url, "GET", "/metrics")[2].decode()
        statuses = sorted(a[0] for a in answers)
        assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
        for status, h, body in answers:
            if status == 503:
                assert h["retry-after"] == "1"
                assert_error(status, body, 503, "queue limit is 1")
        assert metric(text, "sgengine_errors_total", endpoint="search", type="queue_full") == statuses.count(503)
        assert post_image(url, "/search?k=3", data)[0] == 200  # it recovers


def test_slow_request_gets_504(engine, photos):
    with live_server(engine, timeout=0.02) as url:
        status, _, body = post_image(url, "/search", jpeg(photos, "astronaut", 1024))
        assert_error(status, body, 504, "0.02 s")
        assert request(url, "GET", "/healthz")[0] == 200


def test_token_guards_everything_but_health(engine):
    with live_server(engine, token="s3cret") as url:
        d = {"descriptor": [1.0] + [0.0] * (engine.dim - 1), "k": 2}
        status, h, body = post_json(url, "/search", d)
        assert_error(status, body, 401, "Authorization: Bearer")
        assert h["www-authenticate"] == "Bearer"
        assert_error(*post_json(url, "/search", d, _auth("wrong"))[::2], 401, "wrong")
        assert post_json(url, "/search", d, _auth("s3cret"))[0] == 200
        for path in ("/metrics", "/describe", "/thumb/0"):
            assert request(url, "GET", path)[0] == 401, path
        for path in ("/healthz", "/readyz", "/"):
            assert request(url, "GET", path)[0] == 200, path


def test_thumbnails_stay_inside_the_image_folder(server, engine, photo_dir, default_bundle, tmp_path):
    status, h, body = request(server, "GET", "/thumb/0")
    assert status == 200 and h["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(body))
    assert im.format == "JPEG" and max(im.size) <= 160
    status, _, body = request(server, "GET", f"/thumb/{len(engine.index)}")
    assert_error(status, json.loads(body), 404, f"rows are 0..{len(engine.index) - 1}")
    # An index whose ids climb out of the folder: the file exists, but it is not served.
    (tmp_path / "secret.jpg").write_bytes((photo_dir / "coffee" / "full.jpg").read_bytes())
    (tmp_path / "photos").mkdir()
    idx = Index.create(tmp_path / "index", dim=engine.dim, bundle_fingerprint=engine.bundle.fingerprint)
    idx.add(engine.embed(tmp_path / "secret.jpg"), ["../secret.jpg"])
    with live_server(Engine.load(default_bundle, index=tmp_path / "index"), images=str(tmp_path / "photos")) as url:
        status, _, body = request(url, "GET", "/thumb/0")
        assert_error(status, json.loads(body), 404, "not a file under")
    with live_server(engine) as url:
        status, _, body = request(url, "GET", "/thumb/0")
        assert_error(status, json.loads(body), 404, "--images")


# ---------------------------------------------------------------- the command
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    from sgengine.cli import main
    assert main(["serve", "--demo", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "run `sgengine demo" in err and "\n" not in err
    assert main(["serve", str(tmp_path / "nothing"), "--replicas", "2"]) == 2
    assert "--ray" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--images", str(tmp_path / "no")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_sigterm_finishes_the_request_in_flight(default_bundle, engine, photos, tmp_path):
    """`sgengine serve` (token from SGENGINE_TOKEN) takes SIGTERM while a request runs: the request is
    answered in full, the server exits 0 and takes no more connections."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "SGENGINE_TOKEN": "tok"}
    proc = subprocess.Popen([sys.executable, "-m", "sgengine", "serve", str(default_bundle), str(engine.index.path),
                             "--port", str(port), "--threads", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=90)
        data = jpeg(photos, "rocket", 1024)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(post_image, url, "/search?k=4", data, _auth("tok"))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # wait until the engine runs it
                text = request(url, "GET", "/metrics", headers=_auth("tok"))[2].decode()
                if metric(text, "sgengine_batch_running") == 1:
                    break
                time.sleep(0.005)
            else:
                raise AssertionError("the request never started")
            proc.send_signal(signal.SIGTERM)
            status, _, body = slow.result(60)
        assert status == 200 and len(body["ids"]) == 4, body
        assert body["ids"][0].startswith("rocket/")
        assert proc.wait(60) == 0
        with pytest.raises(OSError):
            request(url, "GET", "/healthz")
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "Traceback" not in out, out
