"""The search service: `sgengine serve` (pip install 'sgengine[serve]').

- app.py: the ASGI app (Starlette): /search, /embed, /healthz, /readyz, /describe, /metrics, the
  page at / and /thumb/{row}; limits, token, error mapping
- batcher.py: dynamic batching on the engine's thread
- metrics.py: the Prometheus text exposition
- ray_serve.py: the same app as Ray Serve replicas (--ray)
- cli.py: the `serve` subcommand
- static/index.html: the search page

Kept free of imports so that `sgengine` runs without the serve extra.
"""
