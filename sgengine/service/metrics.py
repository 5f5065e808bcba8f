"""Counters, gauges and histograms for `GET /metrics`, in the Prometheus text exposition format.

Written out here rather than taken from prometheus_client: the service needs a dozen series and
one lock, and the text format (version 0.0.4) is a few lines of rules.
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a descriptor search on a small index (~1 ms) to a large image on a busy CPU.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    esc = lambda v: v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in pairs) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += 1
        self.sum += v


class Metrics:
    """The service's series. Updated from the event loop and the batcher's thread, so one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple, int] = defaultdict(int)  # (endpoint, status)
        self._errors: dict[tuple, int] = defaultdict(int)  # (endpoint, type)
        self._stages: dict[str, _Histogram] = {}
        self._batches = _Histogram(BATCH_BUCKETS)

    def request(self, endpoint: str, status: int, error_type: str | None = None) -> None:
        with self._lock:
            self._requests[(endpoint, str(status))] += 1
            if error_type is not None:
                self._errors[(endpoint, error_type)] += 1

    def stage(self, stage: str, seconds: float) -> None:
        with self._lock:
            h = self._stages.get(stage)
            if h is None:
                h = self._stages[stage] = _Histogram(LATENCY_BUCKETS)
            h.observe(seconds)

    def batch(self, size: int) -> None:
        with self._lock:
            self._batches.observe(size)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges` (name -> (help, value)) are read at scrape time."""
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        def histogram(name: str, h: _Histogram, labels: tuple[tuple[str, str], ...]) -> None:
            for b, c in zip(h.buckets, h.counts):
                out.append(f"{name}_bucket{_labels(labels + (('le', _num(b)),))} {c}")
            out.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {h.total}")
            out.append(f"{name}_sum{_labels(labels)} {_num(h.sum)}")
            out.append(f"{name}_count{_labels(labels)} {h.total}")

        with self._lock:
            family("sgengine_requests_total", "counter", "HTTP requests answered, by endpoint and status code.")
            for (ep, st), n in sorted(self._requests.items()):
                out.append(f"sgengine_requests_total{_labels((('endpoint', ep), ('status', st)))} {n}")
            family("sgengine_errors_total", "counter", "Requests answered with an error, by endpoint and error type.")
            for (ep, ty), n in sorted(self._errors.items()):
                out.append(f"sgengine_errors_total{_labels((('endpoint', ep), ('type', ty)))} {n}")
            family("sgengine_stage_seconds", "histogram",
                   "Seconds per request spent in each stage (queue, decode, embed, search, gather, rerank, total).")
            for stage in sorted(self._stages):
                histogram("sgengine_stage_seconds", self._stages[stage], (("stage", stage),))
            family("sgengine_batch_size", "histogram", "Requests run together in one engine batch.")
            histogram("sgengine_batch_size", self._batches, ())
            for name, (help_, value) in sorted(gauges.items()):
                family(name, "gauge", help_)
                out.append(f"{name} {_num(value)}")
        return "\n".join(out) + "\n"
