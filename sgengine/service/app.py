"""The search service as an ASGI app (Starlette): the same app runs on uvicorn (`sgengine serve`) and
as the Ray Serve ingress of each replica (sgengine.service.ray_serve).

    POST /search   an image (multipart upload or raw body) or {"descriptor": [...]} as JSON;
                   k, rerank, M, K, beta in the query string (or in the JSON) -> ids, scores, timings
    POST /embed    an image -> its descriptor
    GET  /healthz  liveness;  GET /readyz  the engine is loaded and one query has run
    GET  /describe the engine's describe() and the service limits
    GET  /metrics  Prometheus text format
    GET  /         the search page;  GET /thumb/{row}  a small JPEG of an indexed image (--images)

Every error is JSON {"error": {"type", "message"}} with the status that says who must act: 400 a
malformed request, 401 a missing or wrong token, 413 a body or image over the limits, 422 an input
the engine refuses (its message), 503 a full queue (with Retry-After) or a draining server, 504 a
request over the time limit. No traceback ever reaches a client.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import io
import json
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .._checks import check_finite, check_int, check_real
from ..errors import InputError, SgengineError
from .batcher import Batcher, Job, QueueFull, SearchParams, ShuttingDown
from .metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("sgengine.service")
STATIC = Path(__file__).parent / "static"
THUMB_SIDE = 160


@dataclass
class ServiceConfig:
    """The service's limits and batching. Times in seconds."""
    max_batch: int = 16
    max_delay: float = 0.005
    queue: int = 64
    timeout: float = 30.0
    max_body_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    token: str | None = None
    images: str | None = None  # the folder the index was built from: thumbnails for the page
    rerank: str = "faithful"  # the mode of a search that names none: faithful, adaptive or off

    def __post_init__(self) -> None:
        check_int(self.max_batch, "max_batch", 1)
        check_int(self.queue, "queue", 1)
        check_int(self.max_body_bytes, "max_body_bytes", 1)
        check_int(self.max_pixels, "max_pixels", 1)
        if check_real(self.max_delay, "max_delay") < 0:
            raise InputError(f"max_delay must be >= 0 seconds, got {self.max_delay}")
        if check_real(self.timeout, "timeout") <= 0:
            raise InputError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.token is not None and not self.token.strip():
            raise InputError("token must not be empty: give a token, or none to serve without one")
        if self.rerank not in RERANK_SETTINGS:
            raise InputError(f"rerank must be one of {', '.join(RERANK_SETTINGS)}, got {self.rerank!r}")
        if self.images is not None and not Path(self.images).is_dir():
            raise InputError(f"images folder {self.images}: not a directory (give the folder the index was built from)")

    def public(self) -> dict:
        d = asdict(self)
        d["token"] = self.token is not None
        return d


class ServiceError(Exception):
    """An error answered to the client with `status`; `type` names it in the JSON and the metrics."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.headers = status, type_, headers or {}


PARAMS = ("k", "rerank", "M", "K", "beta")
# The server-wide default (--rerank) and what each means to Engine.search's rerank=.
RERANK_SETTINGS = {"faithful": True, "adaptive": "adaptive", "off": False}


def rerank_name(value: bool | str) -> str:
    """The mode a search ran with, as the response reports it: faithful, adaptive or off."""
    return "adaptive" if value == "adaptive" else "faithful" if value is True else "off"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_params(query: dict[str, str], body: dict[str, Any], n_index: int,
                 default_rerank: bool | str = True) -> SearchParams:
    """Search parameters from the query string (strings) and a JSON body (typed values); a name in
    both, or an unknown name, is an error. Ranges are the engine's (sgengine._checks). A search
    that names no rerank gets `default_rerank` (the server's --rerank)."""
    unknown = sorted(set(query) - set(PARAMS))
    if unknown:
        raise InputError(f"unknown query parameter(s) {', '.join(unknown)}: the parameters are {', '.join(PARAMS)}")
    both = sorted(set(query) & set(body))
    if both:
        raise InputError(f"{', '.join(both)} given both in the query string and in the JSON body: give each once")
    v: dict[str, Any] = dict(body)
    for name, s in query.items():
        if name == "rerank":
            if s.lower() not in _TRUE + _FALSE + ("adaptive",):
                raise InputError(f"rerank must be true, false or adaptive, got {s!r}")
            v[name] = "adaptive" if s.lower() == "adaptive" else s.lower() in _TRUE
        else:
            kind = float if name == "beta" else int
            try:
                v[name] = kind(s)
            except ValueError:
                raise InputError(f"{name} must be {'a real number' if kind is float else 'an integer'}, "
                                 f"got {s!r}") from None
    rerank = v.get("rerank", default_rerank)
    if not isinstance(rerank, bool) and rerank != "adaptive":
        raise InputError(f"rerank must be true, false or \"adaptive\" (docs/adaptive_rerank.md), got {rerank!r}")
    return SearchParams(
        k=check_int(v.get("k", min(10, max(n_index, 1))), "k", 1),
        rerank=rerank,
        M=None if v.get("M") is None else check_int(v["M"], "M", 1),
        K=None if v.get("K") is None else check_int(v["K"], "K", 0),
        beta=None if v.get("beta") is None else check_real(v["beta"], "beta"),
    )


class Service:
    """The engine, its batcher, the limits and the metrics behind the routes."""

    def __init__(self, engine, config: ServiceConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = Metrics()
        self.batcher = Batcher(engine, max_batch=config.max_batch, max_delay=config.max_delay,
                               queue_limit=config.queue, on_batch=self.metrics.batch)
        self.ready = False
        self.not_ready_reason = "warming up: one query has not run yet"
        self.server_id = f"{socket.gethostname()}:{os.getpid()}"
        self._images_root = None if config.images is None else Path(config.images).resolve()
        self._thumbs = functools.lru_cache(maxsize=1024)(self._thumbnail)

    # ------------------------------------------------------------------ start and stop
    async def warm_up(self) -> None:
        """One image query through the batcher, as a client's would run; then /readyz says ready."""
        rng = np.random.default_rng(0)
        img = (rng.random((240, 320, 3)) * 255).astype(np.uint8)
        try:
            decoded = await asyncio.to_thread(self.engine.decode, img, name="warm-up image")
            has_index = self.engine.index is not None
            params = SearchParams(k=1, rerank=True, M=None, K=None, beta=None) if has_index else None
            await asyncio.wrap_future(self.batcher.admit().submit(Job(decoded, None, params)))
            self.ready, self.not_ready_reason = True, None
        except Exception as e:  # readyz reports it; requests still get their own errors
            self.not_ready_reason = f"warm-up query failed: {e}"
            log.error("warm-up query failed: %s", e)

    def close(self) -> None:
        drained = self.batcher.close(self.config.timeout + 5)
        log.info("engine thread %s", "drained" if drained else "still busy after the timeout")

    # ------------------------------------------------------------------ request pieces
    def check_token(self, request: Request) -> None:
        if self.config.token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.config.token.encode()):
            raise ServiceError(401, "unauthorized", "this server needs 'Authorization: Bearer <token>' "
                               "(the token given to sgengine serve --token or SGENGINE_TOKEN)" if not got else
                               "the bearer token is wrong", {"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ServiceError(413, "body_too_large", f"request body is {int(declared):,} bytes, over this "
                               f"server's limit of {limit:,} (--max-body-bytes)")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise ServiceError(413, "body_too_large", f"request body is over this server's limit of "
                                   f"{limit:,} bytes (--max-body-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_image(self, request: Request, body: bytes) -> tuple[bytes, str]:
        """The image bytes and a name for messages: the one file of a multipart form, or the raw body."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            async def replay():
                return {"type": "http.request", "body": body, "more_body": False}
            try:
                form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
            except Exception as e:  # the multipart parser's own message says what is malformed
                raise ServiceError(400, "bad_request", f"malformed multipart body: {getattr(e, 'detail', e)}") from None
            files = [v for v in form.values() if hasattr(v, "read")]
            if len(files) != 1:
                raise ServiceError(400, "bad_request", f"the multipart form must hold one image file, got {len(files)}")
            return await files[0].read(), files[0].filename or "uploaded image"
        return body, "request body"

    def decode(self, data: bytes, name: str):
        """Decoded image, refusing more than max_pixels from the header alone (before decoding)."""
        if not data:
            raise InputError(f"{name}: is empty; send an image (JPEG, PNG, ...) as the body or as a multipart file")
        try:
            w, h = Image.open(io.BytesIO(data)).size
        except Exception:  # not readable as an image: the engine's decoder names the problem
            w = h = 0
        if w * h > self.config.max_pixels:
            raise ServiceError(413, "too_many_pixels", f"{name}: image is {w}x{h} = {w * h / 1e6:.1f} MP, over this "
                               f"server's limit of {self.config.max_pixels / 1e6:.1f} MP (--max-pixels)")
        return self.engine.decode(data, name=name)

    def parse_descriptor(self, value: Any) -> np.ndarray:
        dim = self.engine.dim
        try:
            d = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(f"descriptor must be a list of {dim} numbers") from None
        if d.shape != (dim,):
            raise InputError(f"descriptor must be a list of {dim} numbers (this bundle's dimension), "
                             f"got shape {list(d.shape)}")
        check_finite(d, "descriptor")
        return d

    async def run_job(self, request: Request, image: bool) -> dict:
        """Admit, then read, parse, decode, batch and wait within the time limit: one /search or
        /embed request up to its result. A request timed out while queued never runs."""
        try:
            admission = self.batcher.admit()
        except QueueFull as e:
            raise ServiceError(503, "queue_full", str(e), {"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise ServiceError(503, "shutting_down", str(e), {"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(self._job(request, image, admission), self.config.timeout)
        except asyncio.TimeoutError:
            raise ServiceError(504, "timeout", f"the request took over this server's limit of {self.config.timeout:g} "
                               "s (--timeout); the server is busy or the image is large") from None
        finally:
            admission.release()

    async def _job(self, request: Request, image: bool, admission) -> dict:
        body = await self.read_body(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        query = dict(request.query_params)
        decode_ms = 0.0
        if ctype == "application/json":
            if not image:
                raise ServiceError(400, "bad_request", "POST /embed takes an image (raw body or multipart "
                                   "upload), not JSON")
            try:
                obj = json.loads(body)
            except ValueError as e:
                raise ServiceError(400, "bad_request", f"request body is not valid JSON ({e})") from None
            if not isinstance(obj, dict) or "descriptor" not in obj:
                raise ServiceError(400, "bad_request", 'a JSON query is {"descriptor": [...], "k": 10, ...}')
            obj = dict(obj)
            desc = self.parse_descriptor(obj.pop("descriptor"))
            extra = sorted(set(obj) - set(PARAMS))
            if extra:
                raise ServiceError(400, "bad_request", f"unknown JSON field(s) {', '.join(extra)}: the fields are "
                                   f"descriptor, {', '.join(PARAMS)}")
            job = Job(None, desc, self._params(query, obj))
        else:
            params = self._params(query, {}) if image else None
            if not image and query:
                raise ServiceError(400, "bad_request", f"POST /embed takes no query parameters, got {', '.join(query)}")
            data, name = await self.read_image(request, body)
            t = time.perf_counter()
            decoded = await asyncio.to_thread(self.decode, data, name)
            decode_ms = (time.perf_counter() - t) * 1e3
            job = Job(decoded, None, params)
        result = await asyncio.wrap_future(admission.submit(job))
        if job.params is not None:
            result["rerank"] = rerank_name(job.params.rerank)
        if decode_ms:
            result["timings"] = {"decode": decode_ms, **result["timings"]}
        return result

    def _params(self, query: dict, body: dict) -> SearchParams:
        try:
            return parse_params(query, body, len(self.engine.index) if self.engine.index is not None else 0,
                                RERANK_SETTINGS[self.config.rerank])
        except InputError as e:
            raise ServiceError(400, "bad_request", str(e)) from None

    def _thumbnail(self, row: int) -> bytes:
        root = self._images_root
        path = (root / self.engine.index.ids[row]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise ServiceError(404, "not_found", f"row {row}: its image is not a file under {root}")
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((THUMB_SIDE, THUMB_SIDE))
            out = io.BytesIO()
            im.save(out, "JPEG", quality=85)
        return out.getvalue()

    async def thumbnail(self, row_text: str) -> bytes:
        if self._images_root is None:
            raise ServiceError(404, "not_found", "this server has no image folder: start it with --images DIR "
                               "(the folder the index was built from) to serve thumbnails")
        n = len(self.engine.index) if self.engine.index is not None else 0
        if not row_text.isdigit() or int(row_text) >= n:
            raise ServiceError(404, "not_found", f"row {row_text!r}: rows are 0..{n - 1}")
        try:
            return await asyncio.to_thread(self._thumbs, int(row_text))
        except OSError as e:
            raise ServiceError(404, "not_found", f"row {row_text}: cannot read its image ({e})") from None


def _json(data: Any, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=headers)


def _result_json(r: dict) -> dict:
    out = {"timings_ms": {k: round(v, 3) for k, v in r["timings"].items()}, "notes": r["notes"],
           "batch_size": r["batch_size"]}
    if "ids" in r:
        out.update(ids=list(r["ids"]), rows=[int(x) for x in r["rows"]], scores=[float(x) for x in r["scores"]],
                   first_stage=r["first_stage"], rerank=r.get("rerank"))
    else:
        out.update(descriptor=[float(x) for x in r["descriptor"]], dim=len(r["descriptor"]))
    return out


def create_app(engine, config: ServiceConfig | None = None) -> Starlette:
    """The ASGI app over a loaded `Engine` (with an index for /search)."""
    svc = Service(engine, config or ServiceConfig())

    def endpoint(name: str, *, auth: bool = True):
        """Token check, error mapping, request metrics and the total time around a route."""
        def wrap(fn):
            @functools.wraps(fn)
            async def handler(request: Request) -> Response:
                started = time.perf_counter()
                error_type = None
                try:
                    if auth:
                        svc.check_token(request)
                    response = await fn(request, started)
                except ServiceError as e:
                    error_type = e.type
                    response = _json({"error": {"type": e.type, "message": str(e)}}, e.status, e.headers)
                except InputError as e:  # the engine's own checks: the input is at fault
                    error_type = "invalid_input"
                    response = _json({"error": {"type": error_type, "message": str(e)}}, 422)
                except SgengineError as e:  # the server's bundle or index, not the request
                    error_type = "engine"
                    response = _json({"error": {"type": error_type, "message": str(e)}}, 500)
                except Exception:
                    log.exception("%s failed", name)
                    error_type = "internal"
                    response = _json({"error": {"type": "internal", "message": f"internal error in {name}; "
                                                "the server log has the details"}}, 500)
                response.headers["X-Served-By"] = svc.server_id
                svc.metrics.request(name, response.status_code, error_type)
                if response.status_code < 400 and name in ("search", "embed"):
                    svc.metrics.stage("total", time.perf_counter() - started)
                return response
            return handler
        return wrap

    def finish(r: dict, started: float) -> dict:
        r["timings"]["total"] = (time.perf_counter() - started) * 1e3
        for stage, ms in r["timings"].items():
            if stage != "total":
                svc.metrics.stage(stage, ms / 1e3)
        return _result_json(r)

    @endpoint("search")
    async def search(request: Request, started: float) -> Response:
        if engine.index is None:
            raise ServiceError(404, "not_found", "this server has no index: start it with BUNDLE and INDEX")
        return _json(finish(await svc.run_job(request, image=True), started))

    @endpoint("embed")
    async def embed(request: Request, started: float) -> Response:
        return _json(finish(await svc.run_job(request, image=False), started))

    @endpoint("healthz", auth=False)
    async def healthz(request: Request, started: float) -> Response:
        return _json({"status": "ok"})

    @endpoint("readyz", auth=False)
    async def readyz(request: Request, started: float) -> Response:
        if svc.ready:
            return _json({"ready": True})
        return _json({"ready": False, "reason": svc.not_ready_reason}, 503, {"Retry-After": "1"})

    @endpoint("describe")
    async def describe(request: Request, started: float) -> Response:
        body = {**engine.describe(), "service": svc.config.public(), "server": svc.server_id}
        return Response(json.dumps(body, default=str), media_type="application/json")

    @endpoint("metrics")
    async def metrics(request: Request, started: float) -> Response:
        depth = svc.batcher.depth()
        gauges = {
            "sgengine_queue_depth": ("Requests admitted and not yet running (being read or decoded, or queued).",
                                     depth["incoming"] + depth["queued"]),
            "sgengine_batch_running": ("Requests in the batch the engine is running now.", depth["running"]),
            "sgengine_ready": ("1 once the engine has answered its warm-up query.", int(svc.ready)),
        }
        return Response(svc.metrics.render(gauges), media_type=CONTENT_TYPE)

    @endpoint("page", auth=False)
    async def page(request: Request, started: float) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @endpoint("thumb")
    async def thumb(request: Request, started: float) -> Response:
        data = await svc.thumbnail(request.path_params["row"])
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        return _json({"error": {"type": "not_found" if status == 404 else "method_not_allowed",
                                "message": f"{request.method} {request.url.path}: no such endpoint "
                                "(POST /search, POST /embed, GET /healthz /readyz /describe /metrics /)"}}, status)

    @asynccontextmanager
    async def lifespan(app):
        warm = asyncio.create_task(svc.warm_up())
        try:
            yield
        finally:
            warm.cancel()
            await asyncio.to_thread(svc.close)

    routes = [
        Route("/search", search, methods=["POST"]),
        Route("/embed", embed, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/describe", describe, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/thumb/{row}", thumb, methods=["GET"]),
        Route("/", page, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.service = svc
    return app
