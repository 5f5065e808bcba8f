"""`sgengine serve`: the search service on uvicorn, or as replicas on Ray Serve (--ray)."""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from ..errors import InputError

DEMO_DIR = "sgengine-demo"


def add_serve_parser(sub) -> None:
    """Register `serve` on the `sgengine` subcommand parser; imports nothing heavy."""
    from ..cli import _add_engine_args
    p = sub.add_parser("serve", help="serve search over HTTP (search page, JSON API, metrics); "
                       "needs pip install 'sgengine[serve]'")
    p.add_argument("bundle", nargs="?", help=f"bundle directory (default: the demo's, {DEMO_DIR}/bundle)")
    p.add_argument("index", nargs="?", help=f"index directory (default: the demo's, {DEMO_DIR}/index)")
    p.add_argument("--demo", action="store_true", help="serve what `sgengine demo` built under --workdir "
                   "(also what runs when BUNDLE is not given)")
    p.add_argument("--workdir", default=DEMO_DIR, help=f"the demo's folder for --demo (default ./{DEMO_DIR})")
    p.add_argument("--images", default=None, help="the folder the index was built from: the search page then shows "
                   "thumbnails (default with --demo: the demo's photos)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most requests run as one batch (default 16; 1 = no batching)")
    p.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="longest a request waits for others to join its batch (default 5 ms)")
    p.add_argument("--queue", type=int, default=64,
                   help="requests admitted and not yet running; beyond it 503 with Retry-After (default 64)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request before 504 (default 30)")
    p.add_argument("--max-body-bytes", type=int, default=20 << 20, help="largest request body (default 20 MiB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, from its header (default 40 MP)")
    p.add_argument("--token", default=None, help="bearer token required for every endpoint but /healthz, /readyz "
                   "and the page (default: $SGENGINE_TOKEN, or none)")
    p.add_argument("--rerank", default="faithful", choices=("faithful", "adaptive", "off"),
                   help="the rerank of a search that names none (default faithful, SPEC 6 as published; adaptive "
                   "for collections with few matches per query, docs/adaptive_rerank.md; off = global only)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="deploy as Ray Serve replicas (pip install 'sgengine[ray]'): a new local cluster, or the "
                   "one at ADDRESS ('auto', HOST:PORT, ray://HOST:PORT); every node must see BUNDLE and INDEX")
    p.add_argument("--replicas", type=int, default=None, help="Ray Serve replicas, one engine each (default 1)")
    _add_engine_args(p)
    p.set_defaults(func=run)


def resolve_paths(a) -> tuple[Path, Path | None, str | None]:
    """(bundle, index, images): the arguments, or the demo's folders when BUNDLE is not given / --demo."""
    if a.demo or a.bundle is None:
        if a.bundle is not None:
            raise InputError("--demo serves the demo's bundle and index: give either --demo or BUNDLE [INDEX]")
        w = Path(a.workdir)
        bundle, index, images = w / "bundle", w / "index", w / "database"
        missing = [str(p) for p in (bundle / "manifest.json", index / "manifest.json") if not p.exists()]
        if missing:
            raise InputError(f"{', '.join(missing)}: not found; run `sgengine demo --workdir {w}` first, "
                             "or give BUNDLE and INDEX")
        return bundle, index, a.images or (str(images) if images.is_dir() else None)
    return Path(a.bundle), None if a.index is None else Path(a.index), a.images


def service_config(a, images: str | None):
    from .app import ServiceConfig
    return ServiceConfig(max_batch=a.max_batch, max_delay=a.max_delay_ms / 1e3, queue=a.queue, timeout=a.timeout,
                         max_body_bytes=a.max_body_bytes, max_pixels=a.max_pixels,
                         token=a.token if a.token is not None else os.environ.get("SGENGINE_TOKEN") or None,
                         images=images, rerank=a.rerank)


def engine_kwargs(a) -> dict:
    return {"device": a.device, "backend": a.backend, "threads": a.threads, "precision": a.precision}


def run(a) -> int:
    bundle, index, images = resolve_paths(a)
    config = service_config(a, images)
    if not 0 < a.port < 65536:
        raise InputError(f"--port must be 1..65535, got {a.port}")
    if a.ray is not None:
        from .ray_serve import serve_on_ray
        return serve_on_ray(bundle, index, config, engine_kwargs(a), address=a.ray, replicas=a.replicas or 1,
                            host=a.host, port=a.port)
    if a.replicas is not None:
        raise InputError("--replicas sets the number of Ray Serve replicas: use it with --ray [ADDRESS]")
    try:
        import uvicorn
        from .app import create_app
    except ImportError as e:
        raise InputError(f"sgengine serve needs the serve extra (pip install 'sgengine[serve]'): {e}") from None
    from ..engine import Engine
    engine = Engine.load(bundle, index=index, **engine_kwargs(a))
    app = create_app(engine, config)
    n = len(engine.index) if engine.index is not None else 0
    print(f"sgengine serve: {bundle} + {index or 'no index'} ({n:,} images) on http://{a.host}:{a.port}/ "
          f"(batches of up to {config.max_batch}, {a.max_delay_ms:g} ms delay, queue {config.queue}, "
          f"timeout {config.timeout:g} s{', bearer token required' if config.token else ''})", file=sys.stderr)
    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM (every admitted request is answered), then
    # raises the signal again for the handler it found: these make that a plain exit, status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                timeout_graceful_shutdown=int(config.timeout) + 5)
    return 0
