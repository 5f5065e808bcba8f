"""sgengine.cuda_graphs.CudaGraphCache's bookkeeping without a GPU: torch.cuda's graph API is
replaced by a stand-in with a real graph's semantics (capture records the work and computes
nothing, so the static outputs hold garbage until a replay; a replay rewrites the same output
tensors in place). What a stand-in cannot show (that the ops really capture) is
tests/test_serving.py's GPU tests' job."""
from __future__ import annotations

import contextlib

import pytest
import torch

from sgengine.cuda_graphs import CudaGraphCache
from sgengine.errors import InputError


class _Stream:
    def wait_stream(self, other) -> None:
        pass


class _Graph:
    def __init__(self) -> None:
        self.work: list = []

    def replay(self) -> None:
        with torch.inference_mode():  # a real replay writes memory, whatever kind of tensor owns it
            self._run()

    def _run(self) -> None:
        for fn, args, static, out in self.work:
            res = fn(*args, static=static)
            for dst, src in zip(out if isinstance(out, tuple) else (out,), res if isinstance(res, tuple) else (res,)):
                dst.copy_(src)


class _FakeCuda:
    """What CudaGraphCache touches in torch.cuda; `capturing` is the graph being captured."""

    def __init__(self) -> None:
        self.capturing: _Graph | None = None

    def install(self, monkeypatch) -> None:
        fake = self
        monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: _Stream())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)

        @contextlib.contextmanager
        def graph(g, pool=None, **kw):
            fake.capturing = g
            try:
                yield
            finally:
                fake.capturing = None
        monkeypatch.setattr(torch.cuda, "graph", graph)

    def op(self, fn):
        """Wrap the work a test hands the cache: under capture it is recorded, and its outputs
        are garbage (NaN) until a replay, as on a GPU."""
        def run(*args, static=None):
            out = fn(*args, static=static)
            if self.capturing is not None:
                self.capturing.work.append((fn, args, static, out))
                for t in out if isinstance(out, tuple) else (out,):
                    t.fill_(float("nan"))
            return out
        return run


@pytest.fixture
def fake(monkeypatch):
    f = _FakeCuda()
    f.install(monkeypatch)
    return f


def _affine(x, static=None):
    return x * 2 + (0 if static is None else static)


def test_capture_on_the_nth_sight_and_replay_into_clones(fake):
    calls = []

    def fn(x, static=None):
        calls.append(fake.capturing is not None)
        return _affine(x, static)

    cache = CudaGraphCache(fake.op(fn), "cpu", capture_after=2)
    x1, x2, x3 = (torch.full((2, 3), float(v)) for v in (1, 2, 3))
    assert torch.equal(cache(x1), _affine(x1)) and cache.captures == 0 and len(cache) == 0
    out2 = cache(x2)  # second sight: warm-up runs, capture, then a replay gives the result
    assert cache.captures == 1 and cache.replays == 1 and torch.equal(out2, _affine(x2))
    assert calls.count(True) == 1  # one capture; the warm-up ran outside it
    out3 = cache(x3)
    assert torch.equal(out3, _affine(x3)) and cache.replays == 2
    # Results are clones: the replay for x3 rewrote the graph's outputs, not what x2's call returned.
    assert torch.equal(out2, _affine(x2))
    out3.add_(100)  # and a caller may write into its result without touching the graph's
    assert torch.equal(cache(x1), _affine(x1))


def test_signature_covers_shape_dtype_strides_and_static(fake):
    cache = CudaGraphCache(fake.op(_affine), "cpu", capture_after=1)
    x = torch.arange(12.0).reshape(3, 4)
    for args, static in [((x,), None), ((x,), 5), ((x.t(),), None), ((x[:2],), None), ((x.double(),), None)]:
        assert torch.equal(cache(*args, static=static), _affine(*args, static))
    assert cache.captures == 5 and len(cache) == 5
    assert torch.equal(cache(x + 1, static=5), _affine(x + 1, 5)) and cache.captures == 5


def test_tuple_outputs_are_cloned(fake):
    def two(x, static=None):
        return x + 1, x.sum(dim=1)

    cache = CudaGraphCache(fake.op(two), "cpu", capture_after=1)
    a = cache(torch.ones(2, 2))
    b = cache(torch.zeros(2, 2))
    assert isinstance(a, tuple) and torch.equal(a[0], torch.full((2, 2), 2.0)) and torch.equal(a[1], torch.full((2,), 2.0))
    assert torch.equal(b[0], torch.ones(2, 2)) and torch.equal(b[1], torch.zeros(2))


def test_least_recently_used_graph_is_dropped(fake):
    cache = CudaGraphCache(fake.op(_affine), "cpu", max_graphs=2, capture_after=1)
    a, b, c = torch.ones(1), torch.ones(2), torch.ones(3)
    cache(a), cache(b), cache(a), cache(c)  # b is the least recently used when c arrives
    assert len(cache) == 2 and cache.captures == 3
    cache(a)
    assert cache.captures == 3  # still held
    assert torch.equal(cache(b), _affine(b)) and cache.captures == 4  # dropped, captured again


def test_a_failed_capture_runs_that_signature_eagerly_from_then_on(fake):
    attempts = []

    def fn(x, static=None):
        if fake.capturing is not None:
            attempts.append(tuple(x.shape))
            if x.shape[0] == 3:
                raise RuntimeError("operation not permitted when stream is capturing")
        return _affine(x)

    cache = CudaGraphCache(fake.op(fn), "cpu", capture_after=1)
    bad, good = torch.ones(3, 2), torch.ones(2, 2)
    for _ in range(3):
        assert torch.equal(cache(bad), _affine(bad))
    assert attempts == [(3, 2)] and len(cache) == 0 and cache.captures == 0
    assert "not permitted" in cache.describe()["capture_failures"][0]
    assert torch.equal(cache(good), _affine(good)) and len(cache) == 1


def test_arguments_are_checked():
    with pytest.raises(InputError):
        CudaGraphCache(_affine, "cpu", max_graphs=0)
    with pytest.raises(InputError):
        CudaGraphCache(_affine, "cpu", capture_after=0)


def test_inference_mode_at_capture_does_not_bind_later_calls(fake):
    """A graph captured under torch.inference_mode (an engine searched inside one) keeps serving
    calls made outside it: its static inputs are ordinary tensors, not inference tensors."""
    cache = CudaGraphCache(fake.op(_affine), "cpu", capture_after=1)
    with torch.inference_mode():
        assert torch.equal(cache(torch.ones(4)), _affine(torch.ones(4)))
    assert torch.equal(cache(torch.zeros(4)), _affine(torch.zeros(4))) and cache.replays == 2
    with torch.inference_mode():
        assert torch.equal(cache(torch.ones(4)), _affine(torch.ones(4)))
