"""The search service as replicas on Ray Serve.

Each replica loads the engine once and runs the same ASGI app as `sgengine serve` (its own
dynamic batcher, limits, metrics and page) as the deployment's ingress; Ray Serve's HTTP proxy
spreads the requests over the replicas. `X-Served-By` (host:pid) says which replica answered.

    app = application("bundle/", "index/", ServiceConfig(), {"threads": 1}, replicas=2)
    serve.run(app, name="sgengine", route_prefix="/")
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

from ray import serve

from .app import ServiceConfig, create_app


@serve.ingress()
class SearchReplica:
    """One replica: the engine, loaded once, behind the service's app."""

    def __init__(self, bundle: str, index: str | None, config: ServiceConfig, engine_kwargs: dict) -> None:
        from ..engine import Engine
        self._engine = Engine.load(bundle, index=index, **engine_kwargs)
        self._config = config

    def __serve_build_asgi_app__(self):
        return create_app(self._engine, self._config)


SearchDeployment = serve.deployment(name="sgengine")(SearchReplica)


def application(bundle: str | os.PathLike, index: str | os.PathLike | None, config: ServiceConfig,
                engine_kwargs: dict | None = None, *, replicas: int = 1):
    """The Ray Serve application: `replicas` copies of the service, each with `threads` CPUs
    (engine_kwargs["threads"], default 1). Paths are made absolute: every node must see them."""
    kw = dict(engine_kwargs or {})
    kw["threads"] = kw.get("threads") or 1
    if config.images is not None:
        config = dataclasses.replace(config, images=str(Path(config.images).resolve()))
    resources = {"num_cpus": kw["threads"]}
    if str(kw.get("device", "cpu")).startswith("cuda"):
        resources["num_gpus"] = 1
    # Ray Serve queues beyond this per replica; the app's own queue limit answers 503 past it.
    ongoing = config.queue + config.max_batch
    return SearchDeployment.options(num_replicas=replicas, ray_actor_options=resources,
                                    max_ongoing_requests=ongoing).bind(
        str(Path(bundle).resolve()), None if index is None else str(Path(index).resolve()), config, kw)


def serve_on_ray(bundle, index, config: ServiceConfig, engine_kwargs: dict, *, address: str, replicas: int,
                 host: str, port: int) -> int:
    """`sgengine serve --ray`: deploy, then wait for Ctrl-C or SIGTERM and take the deployment down."""
    import ray
    from ..errors import InputError
    if replicas < 1:
        raise InputError(f"--replicas must be >= 1, got {replicas}")
    ray.init(address=None if address == "local" else address, logging_level="WARNING")
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(bundle, index, config, engine_kwargs, replicas=replicas), name="sgengine",
                  route_prefix="/")
        print(f"sgengine serve: {replicas} Ray Serve replica(s) of {bundle} + {index or 'no index'} on "
              f"http://{host}:{port}/ (Ctrl-C stops them)", file=sys.stderr)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        serve.delete("sgengine")
        if address == "local":
            serve.shutdown()
    finally:
        ray.shutdown()
    return 0
