"""CUDA graphs for repeated shapes: one captured graph per input signature, replayed thereafter.

A query at a fixed image size launches the same few hundred kernels every time (backbone at 3
scales, rerank); launched from Python one by one, their launch cost exceeds the GPU work at
batch 1. A graph replays them all with one launch. Used by the torch backbone and the engine's
GPU rerank.
"""
from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from typing import Callable, Hashable

import torch

from .errors import InputError


def _signature(tensors: tuple[torch.Tensor, ...], static: Hashable) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.stride(), str(t.device)) for t in tensors) + (static,)


class CudaGraphCache:
    """Run `fn(*tensors)` through a CUDA graph captured for the tensors' shapes, dtypes and strides
    (plus a hashable `static` key for non-tensor arguments baked into the graph).

    A signature is captured the `capture_after`-th time it is seen (the first calls run eagerly,
    and let cuDNN autotune), at most `max_graphs` graphs are kept (least recently used dropped),
    all in one memory pool. A call copies its tensors into the graph's static inputs, replays, and
    returns clones of the static outputs (a tensor or a tuple of tensors), so a caller may keep
    results across calls. If capture fails (an op that cannot be captured), that signature runs
    eagerly from then on and `failures` says why: describe() shows it, the results stay right.
    `eager(*tensors, static=)`, when given, runs the calls that are not replayed (default: fn).
    """

    def __init__(self, fn: Callable, device: torch.device | str, *, max_graphs: int = 16,
                 capture_after: int = 2, eager: Callable | None = None) -> None:
        if max_graphs < 1 or capture_after < 1:
            raise InputError(f"max_graphs and capture_after must be >= 1, got {max_graphs}, {capture_after}")
        self.fn = fn
        # Calls that are not (yet) captured may run another variant: the torch backbone autotunes
        # cuDNN only for shapes worth a graph, and uses cuDNN's heuristics for one-off shapes.
        self.eager = eager or fn
        self.device = torch.device(device)
        self.max_graphs = int(max_graphs)
        self.capture_after = int(capture_after)
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self._seen: Counter = Counter()
        self._pool = None
        self.failures: dict[str, str] = {}
        self._lock = threading.RLock()
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def _capture(self, tensors: tuple[torch.Tensor, ...], static: Hashable):
        with torch.inference_mode(False):
            # Ordinary tensors even when the capture happens under inference_mode: a later call
            # made outside it copies into them, which an inference tensor refuses.
            static_in = tuple(torch.empty_like(t).copy_(t) for t in tensors)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, autotuning, allocator
            for _ in range(2):
                self.fn(*static_in, static=static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # Captured on a stream of this cache's device: torch.cuda.graph's default capture stream is
        # one class-wide stream, made on whichever device was current when it was first used.
        with torch.cuda.graph(graph, pool=self._pool, stream=side):
            static_out = self.fn(*static_in, static=static)
        self.captures += 1
        return graph, static_in, static_out

    def __call__(self, *tensors: torch.Tensor, static: Hashable = None):
        # One call at a time (the static inputs and outputs are shared), with this cache's GPU
        # current (capture_begin and Triton launches use the current device).
        with self._lock, torch.cuda.device(self.device):
            return self._call(tensors, static)

    def _call(self, tensors: tuple[torch.Tensor, ...], static: Hashable):
        key = _signature(tensors, static)
        entry = self._graphs.get(key)
        if entry is None:
            self._seen[key] += 1
            if self._seen[key] < self.capture_after or str(key) in self.failures:
                return self.eager(*tensors, static=static)
            try:
                entry = self._capture(tensors, static)
            except Exception as e:  # noqa: BLE001 - any capture error: run this signature eagerly
                torch.cuda.synchronize(self.device)
                self.failures[str(key)] = f"{type(e).__name__}: {e}"
                return self.eager(*tensors, static=static)
            self._graphs[key] = entry
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, tensors):
            dst.copy_(src)
        graph.replay()
        self.replays += 1
        if isinstance(static_out, tuple):
            return tuple(t.clone() for t in static_out)
        return static_out.clone()

    def describe(self) -> dict:
        d = {"captured": len(self._graphs), "max": self.max_graphs, "capture_after": self.capture_after,
             "replays": self.replays}
        if self.failures:
            d["capture_failures"] = list(self.failures.values())[:3]
        return d
