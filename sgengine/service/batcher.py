"""Dynamic batching: requests that arrive together run as one batched embed and one batched search.

A request is *admitted* when it arrives (before its body is read), *submitted* once its image is
decoded or its descriptor parsed, and *run* by the engine thread in a batch. The engine thread
takes the oldest submitted request and waits for more only while other admitted requests are
still on their way, and never past `max_delay` after the oldest was submitted, nor beyond
`max_batch` requests. Then all images of the batch go through one `embed_decoded` call, and the
searches through one `Engine.search` call per distinct set of parameters (k, rerank, M, K, beta).

Admitted requests that have not started running are bounded by `queue_limit`: the next one is
refused at once (QueueFull, 503), before its body is read, so an overload costs neither memory
nor latency for the requests already admitted.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

from ..errors import SgengineError
from ..preprocess import DecodedImage

log = logging.getLogger("sgengine.service")


class QueueFull(SgengineError):
    """More requests are waiting than the queue limit allows (answered 503 with Retry-After)."""


class ShuttingDown(SgengineError):
    """The service is draining for shutdown and takes no new requests (503)."""


class SearchParams(NamedTuple):
    k: int
    rerank: bool | str  # True (faithful), False, or "adaptive"
    M: int | None
    K: int | None
    beta: float | None


@dataclass
class Job:
    """One request's work: an image (decoded) or a descriptor (float32 [D]); `params` None = embed only."""
    image: DecodedImage | None
    descriptor: np.ndarray | None
    params: SearchParams | None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    submitted: float = 0.0


class Admission:
    """A request's place in the queue, from arrival until `submit` (or `release` if it fails first)."""

    def __init__(self, batcher: "Batcher") -> None:
        self._batcher = batcher
        self._open = True

    def submit(self, job: Job) -> concurrent.futures.Future:
        assert self._open, "an admission is submitted once"
        self._open = False
        return self._batcher._enqueue(job)

    def release(self) -> None:
        """Give the place back (the request failed before it was submitted); no-op after submit."""
        if self._open:
            self._open = False
            self._batcher._withdraw()


class Batcher:
    """Runs every engine call on one thread, in batches (see the module docstring)."""

    def __init__(self, engine, *, max_batch: int = 16, max_delay: float = 0.005, queue_limit: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.queue_limit = queue_limit
        self._on_batch = on_batch or (lambda n: None)
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._incoming = 0  # admitted, not yet submitted (body being read, image being decoded)
        self._running = 0  # jobs in the batch the engine is running now
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="sgengine-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the request side
    def admit(self) -> Admission:
        """A place in the queue, or QueueFull / ShuttingDown at once."""
        with self._cv:
            if self._closing:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            waiting = self._incoming + len(self._queue)
            if waiting >= self.queue_limit:
                raise QueueFull(f"{waiting} requests are already waiting (the queue limit is {self.queue_limit}): "
                                "retry later")
            self._incoming += 1
        return Admission(self)

    def _enqueue(self, job: Job) -> concurrent.futures.Future:
        with self._cv:
            self._incoming -= 1
            job.submitted = time.perf_counter()
            self._queue.append(job)
            self._cv.notify_all()
        return job.future

    def _withdraw(self) -> None:
        with self._cv:
            self._incoming -= 1
            self._cv.notify_all()

    def depth(self) -> dict[str, int]:
        """Requests admitted and not yet submitted, submitted and waiting, and running now."""
        with self._cv:
            return {"incoming": self._incoming, "queued": len(self._queue), "running": self._running}

    def close(self, timeout: float | None = None) -> bool:
        """Take no new requests, finish every admitted one, stop the engine thread. True when drained."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ the engine thread
    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while not self._queue and not (self._closing and self._incoming == 0):
                self._cv.wait()
            if not self._queue:
                return None
            deadline = self._queue[0].submitted + self.max_delay
            while len(self._queue) < self.max_batch and self._incoming > 0:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            n = min(self.max_batch, len(self._queue))
            batch = [self._queue.popleft() for _ in range(n)]
            self._running = n
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            # A request whose client gave up (timeout) before its batch started is dropped here.
            jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
            try:
                if jobs:
                    self._on_batch(len(jobs))
                    self.run(jobs)
            except BaseException as e:  # never lose the engine thread: fail the batch instead
                log.exception("batch of %d failed", len(jobs))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
            finally:
                with self._cv:
                    self._running = 0

    def run(self, jobs: list[Job]) -> None:
        """One batch: one embed for all its images, one search per distinct parameter set."""
        t0 = time.perf_counter()
        timings = {id(j): {"queue": (t0 - j.submitted) * 1e3} for j in jobs}
        results: dict[int, dict[str, Any]] = {id(j): {"notes": []} for j in jobs}
        imgs = [j for j in jobs if j.image is not None]

        def embed(group: list[Job]) -> None:
            t = time.perf_counter()
            d, notes = self.engine.embed_decoded([j.image for j in group], batch_size=len(group))
            ms = (time.perf_counter() - t) * 1e3
            for j, row, n in zip(group, d, notes):
                j.descriptor = row
                timings[id(j)]["embed"] = ms
                results[id(j)]["notes"] += n

        _isolating(imgs, embed)
        groups: dict[SearchParams, list[Job]] = defaultdict(list)
        for j in jobs:
            if j.future.done():  # its image failed to embed
                continue
            if j.params is None:
                results[id(j)]["descriptor"] = j.descriptor
            else:
                groups[j.params].append(j)

        def search(group: list[Job]) -> None:
            p = group[0].params
            res = self.engine.search(np.stack([j.descriptor for j in group]), k=p.k, rerank=p.rerank,
                                     M=p.M, K=p.K, beta=p.beta)
            stages = {s: ms for s, ms in res.timings.items() if s != "total"}
            for i, j in enumerate(group):
                timings[id(j)].update(stages)
                r = results[id(j)]
                r.update(ids=res.ids[i], rows=res.rows[i], scores=res.scores[i], first_stage=res.first_stage)
                r["notes"] += res.notes

        for group in groups.values():
            _isolating(group, search)
        for j in jobs:
            if not j.future.done():
                r = results[id(j)]
                r["timings"] = timings[id(j)]
                r["batch_size"] = len(jobs)
                j.future.set_result(r)


def _isolating(jobs: list[Job], fn: Callable[[list[Job]], None]) -> None:
    """fn(jobs) for the whole batch; when it raises an sgengine error (one bad input in the batch),
    each job alone, so the error reaches only the request that caused it."""
    if not jobs:
        return
    try:
        fn(jobs)
        return
    except SgengineError as e:
        if len(jobs) == 1:
            jobs[0].future.set_exception(e)
            return
    for j in jobs:
        try:
            fn([j])
        except SgengineError as e:
            j.future.set_exception(e)
