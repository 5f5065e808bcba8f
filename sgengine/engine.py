"""The runtime: one object that turns images into descriptors and queries into ranked ids.

    engine = sgengine.Engine.load("bundle/", index="index/")
    result = engine.search("query.jpg", k=10)
    result.ids, result.scores, result.timings

Everything heavy is decided and built once, in `Engine.load`: the bundle is verified, the
backbone session is created, the whitening matrix is loaded, the head and rerank
implementations are chosen; `describe()` shows those choices. A call then runs
decode -> per scale (resize -> backbone -> pooling head -> L2 -> whitening) -> Scale-GeM ->
first-stage search -> SuperGlobal rerank, and records the milliseconds of each stage.
"""
from __future__ import annotations

import functools
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .backbone import load_backbone
from .bundle import Bundle
from .cublas import ieee_if_cuda
from .errors import BackendUnavailableError, BundleError, IndexMismatchError, InputError
from .index import Index
from .model.head import HeadConfig, l2n, scale_gem_max

_FUSED_HEAD_FIELDS = ("rgem_p", "rgem_size", "rgem_mix", "gemp_p", "gemp_eps")
from .preprocess import (DecodedImage, check_finite, describe_source, ensure_min_size, load_image,
                         resize_for_scale, to_tensor)


@dataclass
class SearchResult:
    """Ranked results. One query: 1-D `rows`/`scores` and a flat `ids` list; a batch: [nq, k] and a list per query.

    `rows` are positions in the index, `ids` the external ids stored with them. `timings` holds
    milliseconds per stage for the whole call; `notes` says what was adjusted (k clamped, image
    upscaled...).
    """

    ids: list
    rows: np.ndarray
    scores: np.ndarray
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def table(self) -> str:
        ids = [self.ids] if self.rows.ndim == 1 else self.ids
        rows = self.rows.reshape(len(ids), -1)
        scores = self.scores.reshape(len(ids), -1)
        out = []
        for qi in range(len(ids)):
            if len(ids) > 1:
                out.append(f"query {qi}")
            out.append(f"{'rank':>4}  {'score':>8}  {'row':>7}  id")
            for r, (i, s, row) in enumerate(zip(ids[qi], scores[qi], rows[qi]), 1):
                out.append(f"{r:>4}  {s:8.4f}  {row:7d}  {i}")
        return "\n".join(out)


class _Timer:
    """Milliseconds per stage. Host stages use the wall clock. On CUDA, device stages are bracketed
    by CUDA events and resolved once, at `finish()` (the one synchronization the call needs anyway,
    when ids come back): a host clock would only time kernel launches, and a synchronization per
    stage would serialize the host and the device."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self._cuda = device is not None and device.type == "cuda"
        self._pending: list[tuple[str, Any, Any]] = []

    def now(self, *, host: bool = False):
        if self._cuda and not host:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def add(self, stage: str, t0):
        """Charge the time since t0 (from now()) to `stage`; returns a new t0 of the same kind."""
        if isinstance(t0, float):
            now = time.perf_counter()
            self.ms[stage] += (now - t0) * 1e3
            return now
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self._pending.append((stage, t0, e))
        return e

    def finish(self) -> dict[str, float]:
        if self._pending:
            self._pending[-1][2].synchronize()
            for stage, a, b in self._pending:
                self.ms[stage] += a.elapsed_time(b)
            self._pending = []
        return dict(self.ms)


def _is_descriptor_input(query: Any) -> bool:
    if isinstance(query, torch.Tensor):
        return query.is_floating_point()
    return isinstance(query, np.ndarray) and np.issubdtype(query.dtype, np.floating)


def _resolve_impls(head_impl: str, rerank_impl: str, device: torch.device) -> tuple[str, str]:
    """Fix the kernel choices at load time, so describe() shows what runs and a kernel that cannot
    run here fails now rather than on every search."""
    from .ops import cpu_path, resolve_impl as resolve_head
    from .rerank import resolve_impl as resolve_rerank
    head = resolve_head(head_impl, device)
    if head == "cpu":
        head = cpu_path(device)
    return head, resolve_rerank(rerank_impl, device)


def _graphable_rerank(q: torch.Tensor, Y: torch.Tensor, static: tuple[int, float]):
    """The Triton rerank without the host-side checks that would break a CUDA graph capture; the
    caller (rerank_first_stage) checks the scores after the replay."""
    from .kernels.rerank_triton import rerank_candidates_triton
    K, beta = static
    return rerank_candidates_triton(q, Y, K, beta)


def _parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device={device!r} asked for, but torch sees no CUDA GPU on this machine")
    if dev.type == "cuda" and dev.index is None:
        # One GPU for every part (ORT's device_id, streams, Triton, graphs): "cuda" is the current one, now.
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise BackendUnavailableError(f"device={device!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    return dev


def _on_device(method):
    """Run an Engine method with the engine's GPU current: Triton launches, CUDA graph captures and
    timing events go to the *current* device, not to the tensors' (for device="cuda:1" in a process
    whose current device is 0)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.device.type != "cuda":
            return method(self, *args, **kwargs)
        with torch.cuda.device(self.device):
            return method(self, *args, **kwargs)
    return wrapper


class Engine:
    """SuperGlobal retrieval over a bundle (and optionally an index). Build with `Engine.load`."""

    def __init__(self, bundle: Bundle, backbone, index: Index | None, *, device: str,
                 head_impl: str, rerank_impl: str, max_side: int | None) -> None:
        self.bundle = bundle
        self.backbone = backbone
        self.index = index
        self.device = torch.device(device)
        self.head_impl = head_impl
        self.rerank_impl = rerank_impl
        self.max_side = max_side
        self.scales = tuple(bundle.head_config.scales)
        self.normalization = bundle.normalization
        self.min_side = int(bundle.min_side)
        wb = bundle.whitening()
        self._whiten = None if wb is None else (wb[0].to(self.device, torch.float32), wb[1].to(self.device, torch.float32))
        self.dim = int(bundle.dim)
        self.search_impl = "auto"
        self._rerank_graphs = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(cls, bundle: str | os.PathLike | Bundle, index: str | os.PathLike | Index | None = None,
             device: str = "cpu", backend: str = "auto", *, precision: str = "fp32", head_impl: str = "auto",
             rerank_impl: str = "auto", threads: int | None = None, max_side: int | None = None,
             cuda_graphs: bool | None = None, plan_cache: str | os.PathLike | None = None,
             build_plan: bool = True, search_impl: str = "auto") -> "Engine":
        """Verify the bundle, create the backbone session once, open the index (same bundle only).

        device: "cpu" or "cuda[:N]"; backend: "auto", "onnxruntime", "torch" or "tensorrt" (see
        sgengine.backbone). precision: "fp32" (the fidelity mode, SPEC.md), or opt-in "fp16" /
        "bf16" for the backbone (the pooling head always accumulates in fp32). head_impl /
        rerank_impl: "auto", "triton", "cpu" or "reference". max_side: long-side cap for decoded
        images (default: the bundle's, 2048). cuda_graphs: replay CUDA graphs of the torch
        backbone per input shape (default on for torch on CUDA). plan_cache / build_plan: where
        TensorRT plans are cached (default: beside the bundle) and whether a missing or stale one
        may be built now (minutes). search_impl: the first-stage product ("auto", "upcast" or
        "split", see sgengine.search). On CUDA the index rows are uploaded here, once.
        """
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        dev = _parse_device(device)
        b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        if any(getattr(b.head_config, f) != getattr(HeadConfig(), f) for f in _FUSED_HEAD_FIELDS):
            # The fused head kernels implement SPEC 3's constants; only the scales are free.
            raise BundleError(f"{b.path}: head parameters {b.head_config} differ from SPEC 3's (R-GeM p=2.5, 5x5, "
                              "mix 0.5; GeM+ p=4.6, eps 1e-8), which the engine's head kernels implement")
        head, rerank = _resolve_impls(head_impl, rerank_impl, dev)
        from .search import IMPLS as _SEARCH_IMPLS
        if search_impl not in _SEARCH_IMPLS:
            raise InputError(f"search_impl must be one of {_SEARCH_IMPLS}, got {search_impl!r}")
        bb = load_backbone(b, device=str(dev), backend=backend, threads=threads, precision=precision,
                           cuda_graphs=cuda_graphs, plan_cache=plan_cache, build_plan=build_plan, max_side=max_side)
        if threads is not None:
            torch.set_num_threads(threads)
        idx = None
        if index is not None:
            if isinstance(index, Index):
                idx = index
                if idx.bundle_fingerprint != b.fingerprint:  # Index.open checks this for paths
                    raise IndexMismatchError(
                        f"index {idx.path} was built by bundle {idx.bundle_fingerprint[:12]}, not by {b.path} "
                        f"({b.fingerprint[:12]}): rebuild the index with this bundle")
            else:
                idx = Index.open(index, bundle_fingerprint=b.fingerprint)
            if idx.dim != b.dim:
                raise IndexMismatchError(f"index {idx.path} holds {idx.dim}-d descriptors; bundle {b.path} makes {b.dim}-d")
            idx.preload(dev)
            from .search import resolve_impl as _resolve_search
            _resolve_search(search_impl, dev, idx.dtype)  # e.g. "split" on float32 rows: an error now, not per search
        engine = cls(b, bb, idx, device=str(dev), head_impl=head, rerank_impl=rerank,
                     max_side=max_side if max_side is not None else b.max_side)
        engine.search_impl = search_impl
        if dev.type == "cuda" and rerank == "triton" and cuda_graphs is not False:
            # At batch 1 the Triton rerank is ~0.07 ms of GPU work behind ~0.35 ms of launches
            # (H200, issue 3): one graph per (nq, M') replays all of it with one launch.
            from .cuda_graphs import CudaGraphCache
            engine._rerank_graphs = CudaGraphCache(_graphable_rerank, dev, max_graphs=8)
        return engine

    def describe(self) -> dict:
        """What runs where: model, backend, providers, precision, kernels, index."""
        m = self.bundle.manifest["model"]
        return {
            "model": m.get("name") or m.get("family"),
            "family": m.get("family"),
            "depth": m.get("depth"),
            "dim": self.dim,
            "bundle": str(self.bundle.path),
            "bundle_fingerprint": self.bundle.fingerprint[:16],
            "device": str(self.device),
            "backend": self.backbone.describe(),
            "head_impl": self.head_impl,
            "rerank_impl": self._rerank_path(),
            "search_impl": self._search_path(),
            "precision": getattr(self.backbone, "precision", "fp32"),
            "scales": list(self.scales),
            "max_side": self.max_side,
            "index": None if self.index is None else {
                "path": str(self.index.path), "count": len(self.index), "dtype": self.index.dtype,
                "rows": self.index.residency(self.device)},
        }

    def _rerank_path(self) -> str:
        if self._rerank_graphs is not None:
            return self.rerank_impl + " +cuda_graphs"
        if self.rerank_impl == "cpu":
            from .rerank import cpu_path
            return f"cpu ({cpu_path(self.device, int(self.bundle.rerank_defaults['M']))} at M'={self.bundle.rerank_defaults['M']})"
        return self.rerank_impl

    def _search_path(self) -> str:
        if self.index is None:
            return self.search_impl
        from .search import resolve_impl
        return resolve_impl(self.search_impl, self.device, self.index.dtype)

    # ---------------------------------------------------------------- embedding
    def decode(self, source: Any, *, name: str | None = None, color_order: str = "RGB") -> DecodedImage:
        """Decode one input to BGR uint8 (SPEC 1), capped at max_side. Raises ImageDecodeError/InputError naming it."""
        return load_image(source, name=name, color_order=color_order, max_side=self.max_side)

    def _pool_head(self, fmap: torch.Tensor) -> torch.Tensor:
        from .ops import gem_pool
        g = l2n(gem_pool(fmap, impl=self.head_impl))
        if self._whiten is not None:
            w, b = self._whiten
            with ieee_if_cuda(g):  # float32 whitening: no TF32, whatever the process flags
                g = torch.addmm(b, g, w.t())
        return g

    @torch.inference_mode()
    def _embed_tensor(self, x: torch.Tensor, timer: _Timer) -> torch.Tensor:
        """Normalized batch [B,3,H,W] (same size, on the engine's device) -> descriptors [B, D] there."""
        per_scale = []
        for s in self.scales:
            t0 = timer.now()
            xs = resize_for_scale(x, s)
            fmap = self.backbone(xs)
            t0 = timer.add(f"backbone@{s:g}", t0)
            per_scale.append(self._pool_head(fmap))
            timer.add("head", t0)
        t0 = timer.now()
        d = scale_gem_max(per_scale)
        timer.add("head", t0)
        return d

    def _embed_on_device(self, images: Sequence[DecodedImage], *, batch_size: int, timer: _Timer
                         ) -> tuple[torch.Tensor, list[list[str]]]:
        """Decoded images -> (float32 [n, D] unit rows on the engine's device, notes per image).

        Each image's 8-bit pixels are uploaded once; normalization, the SPEC 9 upscale and the
        per-scale resizes run on the device. Images of equal size are batched together."""
        out = torch.empty((len(images), self.dim), dtype=torch.float32, device=self.device)
        notes: list[list[str]] = [list(im.notes) for im in images]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        tensors: dict[int, torch.Tensor] = {}
        for i, im in enumerate(images):
            t0 = timer.now()
            x = to_tensor(im.bgr, self.normalization, device=self.device)
            x, note = ensure_min_size(x, self.min_side, max_side=self.max_side)
            if note:
                notes[i].append(note)
            tensors[i] = x
            groups[tuple(x.shape[-2:])].append(i)
            timer.add("preprocess", t0)
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                x = tensors[chunk[0]] if len(chunk) == 1 else torch.cat([tensors[i] for i in chunk])
                try:
                    d = self._embed_tensor(x, timer)
                    check_finite(d, "descriptors")
                except InputError as e:  # NaN/inf features: say which images, not which batch slot
                    names = ", ".join(images[i].name for i in chunk)
                    raise InputError(f"{names}: {e}") from e
                out[chunk] = d.float()
        return out, notes

    @_on_device
    def embed_decoded(self, images: Sequence[DecodedImage], *, batch_size: int = 8,
                      timer: _Timer | None = None) -> tuple[np.ndarray, list[list[str]]]:
        """Decoded images -> (float32 [n, D] unit rows, notes per image). Equal sizes are batched together."""
        timer = timer or _Timer(self.device)
        out, notes = self._embed_on_device(images, batch_size=batch_size, timer=timer)
        timer.finish()
        return out.cpu().numpy(), notes

    def embed(self, inputs: Any, *, color_order: str = "RGB", batch_size: int = 8, progress: bool = False) -> np.ndarray:
        """Images -> float32 [n, D] unit rows (one input gives [1, D]).

        Inputs: file paths, encoded bytes, PIL images, or numpy uint8/uint16 arrays (HW or HWC), alone or
        in a list. Numpy arrays are read as RGB unless color_order="BGR". Bad inputs raise an error that
        names them (list position included).
        """
        items = self._as_list(inputs)
        out = []
        it: Iterable = range(0, len(items), 64)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, total=(len(items) + 63) // 64, desc="embed", unit="batch")
        for start in it:
            chunk = items[start:start + 64]
            decoded = [self.decode(src, name=describe_source(src, start + j) if len(items) > 1 else None,
                                   color_order=color_order) for j, src in enumerate(chunk)]
            out.append(self.embed_decoded(decoded, batch_size=batch_size)[0])
        return np.concatenate(out) if out else np.empty((0, self.dim), np.float32)

    @staticmethod
    def _as_list(inputs: Any) -> list:
        if isinstance(inputs, (list, tuple)):
            return list(inputs)
        return [inputs]

    # ---------------------------------------------------------------- search
    @_on_device
    def search(self, query: Any, k: int = 100, *, rerank: bool = True, M: int | None = None, K: int | None = None,
               beta: float | None = None, color_order: str = "RGB") -> SearchResult:
        """Rank the index for one query or a batch.

        query: an image (path, bytes, PIL, uint8 array), a list of images, or precomputed descriptors
        (a floating numpy array / tensor, [D] for one query or [n, D] for a batch). rerank=True applies
        SuperGlobal reranking to the first-stage top M (defaults from the bundle: M=400, K=9, beta=0.15).
        k > len(index) is clamped to len(index) (noted in result.notes); k <= 0 is an error.
        """
        if self.index is None:
            raise InputError("this engine has no index: Engine.load(bundle, index='index/')")
        n = len(self.index)
        if n == 0:
            raise InputError(f"index {self.index.path} is empty: add images first (sgengine index build)")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise InputError(f"k must be a positive integer, got {k!r}")
        from .rerank import _check_beta, _check_int
        d = self.bundle.rerank_defaults
        M = _check_int(d["M"] if M is None else M, "M", 1)
        K = _check_int(d["K"] if K is None else K, "K", 0)
        beta = _check_beta(d["beta"] if beta is None else beta)
        timer = _Timer(self.device)
        notes: list[str] = []
        t_start = time.perf_counter()
        single = True
        if _is_descriptor_input(query):
            q = torch.as_tensor(query).detach().to("cpu", torch.float32)
            single = q.ndim == 1
            q = q.reshape(1, -1) if single else q
            if q.ndim != 2 or q.shape[1] != self.dim:
                raise InputError(f"query descriptors must be [D] or [n, D] with D={self.dim}, got shape {list(torch.as_tensor(query).shape)}")
            check_finite(q, "query descriptors")
            q = q.to(self.device)
        else:
            single = not isinstance(query, (list, tuple))
            items = self._as_list(query)
            t0 = timer.now(host=True)
            decoded = [self.decode(src, name=describe_source(src, j) if not single else None, color_order=color_order)
                       for j, src in enumerate(items)]
            timer.add("decode", t0)
            q, per_notes = self._embed_on_device(decoded, batch_size=8, timer=timer)
            notes += [n_ for ns in per_notes for n_ in ns]
        if k > n:
            notes.append(f"k={k} clamped to the index size {n}")
            k = n
        m_eff = min(M, n) if rerank else 0
        # From here on everything stays on the engine's device: the index rows are resident there
        # (Index.preload at load), the candidates are gathered there, and only the final top-k
        # ids and scores are copied back.
        t0 = timer.now()
        scores, rows = self.index.search_tensor(q, max(k, m_eff), device=self.device, impl=self.search_impl)
        timer.add("search", t0)
        if rerank and len(q):
            from .rerank import rerank_first_stage

            def gather(top: torch.Tensor) -> torch.Tensor:
                t0 = timer.now()
                Y = self.index.gather_tensor(top)
                timer.add("gather", t0)
                return Y

            graphs = self._rerank_graphs

            def replay(q_, Y_, K_, beta_):
                return graphs(q_.contiguous(), Y_.contiguous(), static=(int(K_), float(beta_)))
            impl: Any = self.rerank_impl if graphs is None else replay
            t0 = timer.now()
            rows, scores = rerank_first_stage(q, scores, rows, gather, m_eff, K, beta, impl)
            timer.add("rerank", t0)
        rows_k, scores_k = rows[:, :k], scores[:, :k]
        rows_np = rows_k.cpu().numpy()
        scores_np = scores_k.to(torch.float32).cpu().numpy()
        ms = timer.finish()
        if "rerank" in ms:
            ms["rerank"] -= ms.get("gather", 0.0)  # gather is its own stage
        all_ids = self.index.ids
        ids = [[all_ids[r] for r in row] for row in rows_np]
        ms["total"] = (time.perf_counter() - t_start) * 1e3
        if single:
            return SearchResult(ids[0], rows_np[0], scores_np[0], ms, notes)
        return SearchResult(ids, rows_np, scores_np, ms, notes)
