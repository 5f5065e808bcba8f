"""The runtime: one object that turns images into descriptors and queries into ranked ids.

    engine = sgengine.Engine.load("bundle/", index="index/")
    result = engine.search("query.jpg", k=10)
    result.ids, result.scores, result.timings

Everything heavy is decided and built once, in `Engine.load`: the bundle is verified, the
backbone session is created, the whitening matrix is loaded, the head and rerank
implementations are chosen; `describe()` shows those choices. A call then runs
decode -> per scale (resize -> backbone -> pooling head -> L2 -> whitening) -> Scale-GeM ->
first-stage search -> SuperGlobal rerank, and records the milliseconds of each stage.

The first stage is the exact scan, or, when the index has a FAISS ANN and the engine's `ann`
setting lets it run (sgengine.search.ann: "auto" uses it only when it covers every row), the
ANN's M' candidates re-scored exactly from the stored rows; `SearchResult.first_stage` says which.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from . import head as head_stage
from . import rerank as rerank_stage
from . import search as search_stage
from .search import ann as ann_stage
from ._checks import check_bool, check_choice, check_finite, check_int, check_real, check_unit_rows, parse_device
from .backbone import load_backbone
from .bundle import Bundle
from .cublas import ieee_if_cuda
from .errors import BundleError, IndexError_, IndexMismatchError, InputError, MemoryLimitError
from .index import NORM_TOLERANCE, Index
from .preprocess import DecodedImage, describe_source, ensure_min_size, load_image, resize_for_scale, to_tensor


@dataclass
class QueryResult:
    """One query's ranked list: `ids` (external ids), `rows` (positions in the index) and `scores`, best first."""

    ids: list
    rows: np.ndarray
    scores: np.ndarray


@dataclass
class SearchResult:
    """Ranked results, always one row per query (as FAISS returns 2-D arrays): `ids` is a list of
    nq lists, `rows` [nq, k] int64 positions in the index, `scores` [nq, k] float32. `result[i]`
    is query i's `QueryResult` (`result[0].ids` for a single query). `timings` holds milliseconds
    per stage for the whole call; `notes` says what was adjusted (k clamped, image upscaled...).
    `first_stage` says what produced the candidates: "exact" (the exact scan, timed as "search"),
    "ann" (the index's FAISS ANN, timed as "ann", its candidates re-scored exactly from the stored
    rows, timed as "rescore"), or "ann+exact" (the ANN, except for the queries it could not give
    max(k, M) candidates, which the notes name and which ran the exact scan).
    """

    ids: list[list]
    rows: np.ndarray
    scores: np.ndarray
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    first_stage: str = "exact"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> QueryResult:
        return QueryResult(self.ids[i], self.rows[i], self.scores[i])

    def table(self) -> str:
        out = []
        for qi in range(len(self.ids)):
            if len(self.ids) > 1:
                out.append(f"query {qi}")
            out.append(f"{'rank':>4}  {'score':>8}  {'row':>7}  id")
            for r, (i, s, row) in enumerate(zip(self.ids[qi], self.scores[qi], self.rows[qi]), 1):
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


# Gathered candidate rows per re-score step: 64 MiB keeps a batch of queries from gathering
# nq x M' x D floats at once (64 queries x 800 x 2048 would be 420 MB).
_RESCORE_BLOCK_BYTES = 64 << 20

# Calls that decode and embed images at once, by default: one 2048 px query holds ~2 GB of
# activations at its largest scale (EfficientNet-Lite0, CPU), so N threads would hold N times that.
DEFAULT_MAX_CONCURRENT = 2
# Beyond this the neighbours' weights (beta * similarity, SPEC 6.3) swamp the row's own weight 1
# below float32 resolution; SPEC's default is 0.15.
MAX_BETA = 1e6
# How allocators word their failures (torch's CPU allocator, ONNX Runtime, CUDA, C++ new).
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate memory",
              "bad_alloc", "bad allocation")


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(w in str(e).lower() for w in _OOM_WORDS)


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent elsewhere (macOS, musl)
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS. glibc keeps what a large query freed in its
    arenas (one per thread that allocated), so without this the process stays at its peak."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _is_descriptor_input(query: Any) -> bool:
    if isinstance(query, torch.Tensor):
        return query.is_floating_point()
    return isinstance(query, np.ndarray) and np.issubdtype(query.dtype, np.floating)


def _graphable_rerank(q: torch.Tensor, Y: torch.Tensor, static: tuple[int, float, bool]):
    """The Triton rerank as a CUDA graph captures it (no host-side checks inside); the engine
    checks the scores after the replay."""
    from .kernels.rerank_triton import rerank_triton
    K, beta, adaptive = static
    return rerank_triton(q, Y, K, beta, adaptive=adaptive)


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

    def __init__(self, bundle: Bundle, backbone, index: Index | None, *, device: torch.device, head_impl: str,
                 rerank_impl: str, search_impl: str, max_side: int | None, cuda_graphs: bool | None,
                 ann: str = "auto", ann_candidates: int | None = None, ann_params: dict | None = None,
                 ann_device: str = "auto", max_concurrent_queries: int = DEFAULT_MAX_CONCURRENT) -> None:
        self.bundle = bundle
        self.backbone = backbone
        self.index = index
        self.device = device
        self.head_impl = head_impl
        self.rerank_impl = rerank_impl
        self.search_impl = search_impl
        self.max_side = max_side
        self.max_concurrent_queries = max_concurrent_queries
        self._slots = threading.BoundedSemaphore(max_concurrent_queries)
        self.scales = tuple(bundle.head_config.scales)
        self.normalization = bundle.normalization
        self.min_side = int(bundle.min_side)
        self.dim = int(bundle.dim)
        wb = bundle.whitening()
        self._whiten = None if wb is None else (wb[0].to(device, torch.float32), wb[1].to(device, torch.float32))
        self._pool = head_stage.IMPLS[head_impl]
        # The search stage: the index rows as this device reads them (resident copy, host cache).
        self._rows = None if index is None else search_stage.DeviceRows(index, device)
        self._rerank = rerank_stage.IMPLS[rerank_impl]
        # The ANN first stage: loaded when the index has a fresh one (or later, when one becomes
        # fresh in this process), never used stale (sgengine.search.ann).
        self.ann_mode = ann
        self.ann_candidates = ann_candidates
        self.ann_params = dict(ann_params) if ann_params else None
        self.ann_device = ann_device
        self._ann: ann_stage.Ann | None = None
        self._ann_lock = threading.Lock()
        self._rerank_graphs = None
        if device.type == "cuda" and rerank_impl == "triton" and cuda_graphs is not False:
            # At batch 1 the Triton rerank is ~0.07 ms of GPU work behind ~0.35 ms of launches
            # (H200): one graph per (nq, M') replays all of it with one launch.
            from .cuda_graphs import CudaGraphCache
            graphs = self._rerank_graphs = CudaGraphCache(_graphable_rerank, device, max_graphs=8)
            self._rerank = lambda q, Y, K, beta, adaptive=False: graphs(q.contiguous(), Y.contiguous(),
                                                                        static=(K, beta, adaptive))

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(cls, bundle: str | os.PathLike | Bundle, index: str | os.PathLike | Index | None = None,
             device: str = "cpu", backend: str = "auto", *, precision: str = "fp32", head_impl: str = "auto",
             rerank_impl: str = "auto", threads: int | None = None, max_side: int | None = None,
             cuda_graphs: bool | None = None, plan_cache: str | os.PathLike | None = None,
             build_plan: bool = True, search_impl: str = "auto", ann: str = "auto", ann_candidates: int | None = None,
             ann_params: dict | None = None, ann_device: str = "auto",
             max_concurrent_queries: int = DEFAULT_MAX_CONCURRENT, verify: bool = False) -> "Engine":
        """Verify the bundle, create the backbone session once, open the index (same bundle only),
        and choose every stage's implementation; `describe()` shows the choices.

        device: "cpu" or "cuda[:N]"; backend: "auto", "onnxruntime", "torch" or "tensorrt" (see
        sgengine.backbone). precision: "fp32" (the fidelity mode, SPEC.md), or opt-in "fp16" /
        "bf16" for the backbone (the pooling head always accumulates in fp32). head_impl: "auto"
        or a name in sgengine.head.IMPLS; rerank_impl: "auto" or a name in sgengine.rerank.IMPLS
        ("auto" on the CPU is chosen for the bundle's M, capped at the index size);
        search_impl: the exact first stage ("auto" or a name in sgengine.search.IMPLS: "upcast", "cpu_native", "split").
        max_side: long-side cap for decoded images (default: the bundle's, 2048; at least the bundle's
        min_side, the smallest side the network takes). max_concurrent_queries: how many calls that
        decode or embed images (search with images, embed, embed_decoded, decode) run at once; the
        others wait their turn, so memory is bounded by that many queries' working memory (default
        2; descriptor searches never wait). cuda_graphs:
        replay CUDA graphs of the torch backbone per input shape and of the Triton rerank
        (default on, on CUDA). verify: check every hash of the index (Index.verify, about 1.5-1.8 s
        per GB from the page cache on a 2-core VM) before using it; without it only the cheap checks
        of Index.open run (headers, sizes, unique ids). plan_cache / build_plan: where TensorRT plans are cached (default:
        beside the bundle) and whether a missing or stale one may be built now (minutes). On CUDA
        the index rows are uploaded here, once.

        The ANN first stage (an index with `sgengine index ann`; sgengine.search.ann):
        ann: "auto" (default) uses the index's ANN when it covers every row and runs the exact scan
        otherwise, with a note in each result saying why; "require" raises when there is no fresh
        ANN (here, or at a search after rows were added); "off" always runs the exact scan.
        ann_candidates: M', how many candidates the ANN proposes for exact re-scoring (default
        2 * max(k, M); raised to max(k, M) with a note when smaller). ann_params: search parameters
        overriding the ones tuned at build, e.g. {"nprobe": 64} or {"efSearch": 1000}. ann_device:
        "auto" (on a CUDA engine, the GPU when FAISS has GPU support, else the CPU, as describe()
        says), "cpu", or "cuda" (BackendUnavailableError without faiss-gpu). A fresh ANN is
        verified and loaded here: one of another index or revision, or a damaged one, raises.
        """
        if threads is not None:
            threads = check_int(threads, "threads", 1)
        max_concurrent_queries = check_int(max_concurrent_queries, "max_concurrent_queries", 1)
        check_choice(ann, "ann", ann_stage.MODES)
        check_choice(ann_device, "ann_device", ann_stage.DEVICES)
        if ann_candidates is not None:
            ann_candidates = check_int(ann_candidates, "ann_candidates", 1)
        if ann_params is not None and not isinstance(ann_params, dict):
            raise InputError(f"ann_params must be a dict like {{'nprobe': 64}}, got {type(ann_params).__name__}")
        if ann == "require" and index is None:
            raise InputError("ann='require' needs an index: Engine.load(bundle, index='index/', ann='require')")
        dev = parse_device(device)
        b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        if not b.head_config.pooling_is_spec():
            raise BundleError(f"{b.path}: head parameters {b.head_config} differ from SPEC 3's (sgengine.head: "
                              f"R-GeM p={head_stage.RGEM_P}, {head_stage.RGEM_SIZE}x{head_stage.RGEM_SIZE}, mix "
                              f"{head_stage.RGEM_MIX}; GeM+ p={head_stage.GEMP_P}, eps {head_stage.GEMP_EPS}), which "
                              f"the engine's head kernels compute")
        if max_side is not None:
            max_side = check_int(max_side, "max_side", 1)
            if max_side < b.min_side:
                raise InputError(f"max_side={max_side} is below {b.min_side}, the smallest side {b.path}'s network "
                                 "takes (SPEC 9): every image would be shrunk, then stretched back up")
        head = head_stage.resolve_impl(head_impl, dev)
        bb = load_backbone(b, device=str(dev), backend=backend, threads=threads, precision=precision,
                           cuda_graphs=cuda_graphs, plan_cache=plan_cache, build_plan=build_plan, max_side=max_side)
        if threads is not None:
            torch.set_num_threads(threads)
        idx = None
        m_default = int(b.rerank_defaults["M"])
        if index is not None:
            if isinstance(index, Index):
                idx = index
                if idx.bundle_fingerprint != b.fingerprint:  # Index.open checks this for paths
                    raise IndexMismatchError(
                        f"index {idx.path} was built by bundle {idx.bundle_fingerprint[:12]}, not by {b.path} "
                        f"({b.fingerprint[:12]}): rebuild the index with this bundle")
                if check_bool(verify, "verify"):
                    idx.verify()
            else:
                idx = Index.open(index, bundle_fingerprint=b.fingerprint, verify=check_bool(verify, "verify"))
            if idx.dim != b.dim:
                raise IndexMismatchError(f"index {idx.path} holds {idx.dim}-d descriptors; bundle {b.path} makes {b.dim}-d")
            if len(idx):
                m_default = min(m_default, len(idx))
            search = search_stage.resolve_impl(search_impl, dev, idx.dtype)
        else:
            search = search_stage.resolve_impl(search_impl, dev, "float32")
        rerank = rerank_stage.resolve_impl(rerank_impl, dev, m_default)
        engine = cls(b, bb, idx, device=dev, head_impl=head, rerank_impl=rerank, search_impl=search,
                     max_side=max_side if max_side is not None else b.max_side, cuda_graphs=cuda_graphs,
                     ann=ann, ann_candidates=ann_candidates, ann_params=ann_params, ann_device=ann_device,
                     max_concurrent_queries=max_concurrent_queries)
        if idx is not None and ann != "off":
            if ann == "require" or idx.ann_state() == "fresh":
                engine._ann_for(ann)  # verifies and loads it now; "require" raises when there is none fresh
            if threads is not None and engine._ann is not None:
                ann_stage.set_threads(threads)
        if engine._rows is not None:
            engine._rows.preload()
        return engine

    def describe(self) -> dict:
        """What runs where: model, backend, providers, precision, each stage's implementation, index."""
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
            "search_impl": self.search_impl,
            "rerank_impl": self.rerank_impl + (" +cuda_graphs" if self._rerank_graphs is not None else ""),
            # The modes search(rerank=...) takes ("faithful" is the default) and the impl each runs on.
            "rerank_modes": {mode: self.rerank_impl for mode in rerank_stage.MODES},
            "precision": getattr(self.backbone, "precision", "fp32"),
            "scales": list(self.scales),
            "max_side": self.max_side,
            "max_concurrent_queries": self.max_concurrent_queries,
            "index": None if self.index is None else {
                "path": str(self.index.path), "count": len(self.index), "dtype": self.index.dtype,
                "rows": self._rows.residency()},
            "ann": self._describe_ann(),
        }

    def _describe_ann(self) -> dict | None:
        """The ANN setting, the index's ANN (state, factory, library, device, params, bytes per
        row, recall measured at build) and what a search runs now ("first_stage")."""
        if self.index is None:
            return None
        state = self.index.ann_state()
        rec = self.index.ann
        out: dict[str, Any] = {
            "mode": self.ann_mode,
            "state": state if state != "stale" else f"stale: covers {rec['count']:,} of {len(self.index):,} rows",
            "candidates": (f"M' = max({self.ann_candidates}, k, M)" if self.ann_candidates is not None
                           else f"M' = {ann_stage.CANDIDATE_FACTOR} x max(k, M)"),
        }
        if self._ann is not None and rec is not None and self._ann.sha256 == rec["sha256"]:
            out.update(self._ann.describe())
        elif rec is not None:
            out.update(factory=rec["factory"], count=rec["count"], bytes=rec["bytes"],
                       bytes_per_row=round(rec["bytes"] / rec["count"], 1), file=rec["file"])
        out["first_stage"] = "ann" if self.ann_mode != "off" and state == "fresh" else "exact"
        return out

    def _ann_for(self, mode: str) -> tuple[ann_stage.Ann | None, str | None]:
        """The ANN a search in `mode` uses (None: the exact scan), and the note to add when the
        index has one that is not used. "require" raises instead of falling back."""
        if mode == "off":
            return None, None
        p = self.index.path
        state = self.index.ann_state()
        if state == "absent":
            if mode == "require":
                raise IndexError_(f"index {p} has no ANN and ann='require': build one (sgengine index ann {p}), "
                                  "or search with ann='auto' or 'off'")
            return None, None
        rec = self.index.ann
        if state == "stale":
            why = (f"the ANN of index {p} is stale: it covers {rec['count']:,} of the {len(self.index):,} rows "
                   "(rows were added after it was built)")
            if mode == "require":
                raise IndexError_(f"{why} and ann='require': update it (sgengine index ann {p} --update), or search "
                                  "with ann='auto' (the exact scan while it is stale) or 'off'")
            return None, f"{why}; the exact scan ran. Update it: sgengine index ann {p} --update"
        note = None
        if self._ann is None or self._ann.sha256 != rec["sha256"]:
            with self._ann_lock:
                if self._ann is None or self._ann.sha256 != rec["sha256"]:
                    if self._ann is not None:
                        note = f"loaded the index's new ANN ({rec['file']})"
                    self._ann = ann_stage.Ann.load(self.index, device=self.ann_device, engine_device=self.device,
                                                   params=self.ann_params)
        return self._ann, note

    # ---------------------------------------------------------------- embedding
    @contextlib.contextmanager
    def _working_memory(self):
        """One of the engine's `max_concurrent_queries` slots for a call that decodes or embeds
        images; what the call freed goes back to the OS when it ends."""
        with self._slots:
            yield
        release_free_memory()

    def decode(self, source: Any, *, name: str | None = None, color_order: str = "RGB") -> DecodedImage:
        """Decode one input to BGR uint8 (SPEC 1), capped at max_side. Raises ImageDecodeError/InputError naming it."""
        with self._working_memory():
            return load_image(source, name=name, color_order=color_order, max_side=self.max_side)

    def _head(self, fmap: torch.Tensor) -> torch.Tensor:
        """One scale's s4 map -> whitened descriptor (SPEC 3.3-3.6). The backbone's maps are
        well-formed by construction; only non-finite features can go wrong, and the pooled
        output shows them (sgengine.head.check_pooled)."""
        pooled = self._pool(fmap)
        head_stage.check_pooled(pooled, fmap.shape)
        g = head_stage.l2n(pooled)
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
            fmap = self.backbone(resize_for_scale(x, s))
            t0 = timer.add(f"backbone@{s:g}", t0)
            per_scale.append(self._head(fmap))
            timer.add("head", t0)
        t0 = timer.now()
        d = head_stage.scale_gem_max(per_scale)
        timer.add("head", t0)
        return d

    def _embed_on_device(self, images: Sequence[DecodedImage], *, batch_size: int, timer: _Timer
                         ) -> tuple[torch.Tensor, list[list[str]]]:
        """Decoded images -> (float32 [n, D] unit rows on the engine's device, notes per image).

        Images of equal size are batched together; each batch's 8-bit pixels are uploaded and
        normalized just before it runs (so float copies of at most `batch_size` images exist at
        once), and the SPEC 9 upscale and the per-scale resizes run on the device. An allocator's
        failure becomes MemoryLimitError naming the images."""
        out = torch.empty((len(images), self.dim), dtype=torch.float32, device=self.device)
        notes: list[list[str]] = [list(im.notes) for im in images]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            groups[im.bgr.shape].append(i)
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                try:
                    t0 = timer.now()
                    xs = []
                    for i in chunk:
                        x, note = ensure_min_size(to_tensor(images[i].bgr, self.normalization, device=self.device),
                                                  self.min_side, max_side=self.max_side)
                        if note:
                            notes[i].append(note)
                        xs.append(x)
                    x = xs[0] if len(xs) == 1 else torch.cat(xs)
                    del xs
                    timer.add("preprocess", t0)
                    d = self._embed_tensor(x, timer)
                    del x
                    check_finite(d, "descriptors")
                except InputError as e:  # NaN/inf features: say which images, not which batch slot
                    raise InputError(f"{self._names(images, chunk)}: {e}") from e
                except Exception as e:
                    if not _is_out_of_memory(e):
                        raise
                    h, w = images[chunk[0]].bgr.shape[:2]
                    raise MemoryLimitError(
                        f"{self._names(images, chunk)}: out of memory embedding {len(chunk)} image(s) of {w}x{h} px "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); lower max_side "
                        f"({self.max_side}), batch_size or max_concurrent_queries ({self.max_concurrent_queries}), "
                        "or give the process more memory") from e
                out[chunk] = d.float()
        return out, notes

    @staticmethod
    def _names(images: Sequence[DecodedImage], chunk: Sequence[int]) -> str:
        return ", ".join(images[i].name for i in chunk)

    def embed_decoded(self, images: Sequence[DecodedImage], *, batch_size: int = 8) -> tuple[np.ndarray, list[list[str]]]:
        """Decoded images -> (float32 [n, D] unit rows, notes per image). Equal sizes are batched together."""
        batch_size = check_int(batch_size, "batch_size", 1)
        with self._working_memory():
            return self._embed_decoded(images, batch_size)

    @_on_device
    def _embed_decoded(self, images: Sequence[DecodedImage], batch_size: int) -> tuple[np.ndarray, list[list[str]]]:
        timer = _Timer(self.device)
        out, notes = self._embed_on_device(images, batch_size=batch_size, timer=timer)
        timer.finish()
        return out.cpu().numpy(), notes

    def _decode_all(self, items: Sequence[Any], offset: int, many: bool, color_order: str) -> list[DecodedImage]:
        """Decode inputs, each named by its position in the caller's list when there are several. Trusts its inputs."""
        return [load_image(src, name=describe_source(src, offset + j) if many else None, color_order=color_order,
                           max_side=self.max_side) for j, src in enumerate(items)]

    def embed(self, inputs: Any, *, color_order: str = "RGB", batch_size: int = 8, progress: bool = False) -> np.ndarray:
        """Images -> float32 [n, D] unit rows (one input gives [1, D]).

        Inputs: file paths, encoded bytes, PIL images, or numpy uint8/uint16 arrays (HW or HWC), alone or
        in a list. Numpy arrays are read as RGB unless color_order="BGR". Bad inputs raise an error that
        names them (list position included).
        """
        batch_size = check_int(batch_size, "batch_size", 1)
        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        out = []
        it: Iterable = range(0, len(items), 64)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, total=(len(items) + 63) // 64, desc="embed", unit="batch")
        for start in it:
            with self._working_memory():
                decoded = self._decode_all(items[start:start + 64], start, len(items) > 1, color_order)
                out.append(self._embed_decoded(decoded, batch_size)[0])
                del decoded
        return np.concatenate(out) if out else np.empty((0, self.dim), np.float32)

    # ---------------------------------------------------------------- search
    def _query_descriptors(self, query: Any, color_order: str, timer: _Timer) -> tuple[torch.Tensor, list[str]]:
        """The query as float32 [nq, D] unit rows on the engine's device, and what was adjusted.
        Images are decoded and embedded in one of the engine's working-memory slots."""
        if _is_descriptor_input(query):
            return self._check_descriptors(query).to(self.device), []
        items = list(query) if isinstance(query, (list, tuple)) else [query]
        with self._working_memory():
            t0 = timer.now(host=True)
            decoded = self._decode_all(items, 0, len(items) > 1, color_order)
            timer.add("decode", t0)
            q, per_image = self._embed_on_device(decoded, batch_size=8, timer=timer)
            del decoded
        return q, [n for notes in per_image for n in notes]

    def _check_descriptors(self, query: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Floating [D] or [n, D] descriptors -> float32 [n, D] on the CPU, after the checks
        Index.add makes of stored rows: finite, unit L2 norm (InputError naming the row)."""
        if isinstance(query, torch.Tensor) and query.is_meta:
            raise InputError("query descriptors: a tensor on the 'meta' device holds no values; pass real values "
                             "(a numpy array, or a tensor on the CPU or the engine's device)")
        if isinstance(query, torch.Tensor) and query.layout != torch.strided:
            raise InputError(f"query descriptors: a {query.layout} tensor; pass a dense one (x.to_dense())")
        if isinstance(query, np.ndarray):  # native byte order, positive strides, a dtype torch has
            dtype = np.float64 if query.dtype.itemsize > 8 else query.dtype.newbyteorder("=")
            query = np.ascontiguousarray(query, dtype=dtype)
        x = torch.as_tensor(query).detach().to("cpu")
        if x.ndim == 1:
            x = x.reshape(1, -1)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(f"query descriptors must be [D] or [n, D] with D={self.dim}, got shape {list(query.shape)}")
        check_unit_rows(x, "query descriptor", NORM_TOLERANCE)
        return x.to(torch.float32)

    @_on_device
    def search(self, query: Any, k: int = 100, *, rerank: bool | str = True, M: int | None = None, K: int | None = None,
               beta: float | None = None, color_order: str = "RGB", ann: str | None = None) -> SearchResult:
        """Rank the index for one query or a batch: a `SearchResult` with one row per query.

        query: an image (path, bytes, PIL, uint8 array), a list of images, or precomputed descriptors
        (a floating numpy array / tensor, [D] or [n, D]). rerank=True (or "faithful") applies
        SuperGlobal reranking (SPEC 6), rerank="adaptive" its adaptive mode
        (docs/adaptive_rerank.md), to the first-stage top M (defaults from the bundle: M=400, K=9,
        beta=0.15; M >= 1, K >= 0, 0 <= beta <= MAX_BETA). k > len(index) is clamped to len(index) (noted in result.notes);
        k <= 0 is an error. Descriptors must be finite and unit length (|norm - 1| <= 1e-3, as
        Index.add requires); a stored row holding NaN/inf that reaches the results is an
        IndexError_ naming it (the index is damaged), never a result.
        ann: this call's ANN setting ("auto", "require", "off"; default: the engine's, see
        `Engine.load`); `result.first_stage` says what ran.
        """
        if self.index is None:
            raise InputError("this engine has no index: Engine.load(bundle, index='index/')")
        n = len(self.index)
        if n == 0:
            raise InputError(f"index {self.index.path} is empty: add images first (sgengine index build)")
        k = check_int(k, "k", 1)
        d = self.bundle.rerank_defaults
        M = check_int(d["M"] if M is None else M, "M", 1)
        K = check_int(d["K"] if K is None else K, "K", 0)
        beta = check_real(d["beta"] if beta is None else beta, "beta", 0.0, MAX_BETA)
        rerank, adaptive = rerank_stage.rerank_setting(rerank)
        mode = self.ann_mode if ann is None else check_choice(ann, "ann", ann_stage.MODES)
        t_start = time.perf_counter()
        timer = _Timer(self.device)

        q, notes = self._query_descriptors(query, color_order, timer)
        if k > n:
            notes.append(f"k={k} clamped to the index size {n}")
            k = n
        m = min(M, n) if rerank else 0
        ann_index, why = self._ann_for(mode)
        if why:
            notes.append(why)
        # From here on everything stays on the engine's device (the rows are resident there, or
        # streamed to it); only the final top-k ids and scores are copied back.
        if ann_index is not None and len(q):
            scores, rows, first_stage = self._ann_first_stage(ann_index, q, k, max(k, m), timer, notes)
            t0 = timer.now()
        else:
            first_stage = "exact"
            t0 = timer.now()
            scores, rows = self._rows.topk(q, max(k, m), self.search_impl)
            t0 = timer.add("search", t0)
        f = None
        if m and len(q):
            Y = self._rows.gather(rows[:, :m])
            t0 = timer.add("gather", t0)
            order, f = self._rerank(q, Y, min(K, m), beta, adaptive)
            timer.add("rerank", t0)
        self._check_scores(scores, rows, f, K, beta)
        if f is not None:
            rows, scores = rerank_stage.merge_reranked(rows, scores, m, order, f)
        rows_np = rows[:, :k].cpu().numpy()
        scores_np = scores[:, :k].to(torch.float32).cpu().numpy()
        ms = timer.finish()
        all_ids = self.index.ids
        ids = [[all_ids[r] for r in row] for row in rows_np]
        ms["total"] = (time.perf_counter() - t_start) * 1e3
        return SearchResult(ids, rows_np, scores_np, ms, notes, first_stage)

    def _check_scores(self, first: torch.Tensor, rows: torch.Tensor, f: torch.Tensor | None, K: int, beta: float
                      ) -> None:
        """One look (one device sync) at the first-stage scores [nq, k'] of `rows` and the rerank's
        scores f [nq, M'] (None: no rerank). The queries are finite, so a non-finite first-stage
        score means the stored row holds NaN/inf: the index is damaged (IndexError_ naming the
        row). With finite candidates, a non-finite rerank score can only come from the weights
        1 + beta * (neighbour similarities) cancelling (InputError naming beta)."""
        bad = ~torch.isfinite(first)
        seen = torch.stack([bad.any()] + ([] if f is None else [(~torch.isfinite(f)).any()])).cpu().tolist()
        if seen[0]:
            i, j = (int(t) for t in torch.nonzero(bad)[0])
            r = int(rows[i, j])
            raise IndexError_(f"index {self.index.path}: stored row {r} (id {self.index.ids[r]!r}) holds NaN or inf "
                              f"values (its score for query {i} is {float(first[i, j])}): the index is damaged; "
                              "Index.verify() names the file, and a rebuild replaces it")
        if len(seen) > 1 and seen[1]:
            i = int(torch.nonzero(~torch.isfinite(f))[0, 0])
            raise InputError(f"rerank scores of query {i} are not finite with K={K}, beta={beta:g}: the neighbour "
                             "weights 1 + beta * (sum of neighbour similarities) cancel (SPEC 6.3-6.4); use a smaller "
                             f"beta (default {self.bundle.rerank_defaults['beta']})")

    def _ann_first_stage(self, ann_index: ann_stage.Ann, q: torch.Tensor, k: int, need: int, timer: _Timer,
                         notes: list[str]) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The first stage through the ANN: its M' candidates, re-scored exactly, cut to the top
        `need` = max(k, M) by exact score -> (scores [nq, need] float32 descending, rows [nq, need]
        int64, first_stage) on the engine's device, as the exact scan returns them. A query the
        ANN cannot give `need` candidates runs the exact scan ("ann+exact", named in the notes).
        Trusts its inputs (q [nq >= 1, D] float32 on the device, 1 <= need <= len(index))."""
        n = len(self.index)
        want = self.ann_candidates if self.ann_candidates is not None else ann_stage.default_candidates(k, need)
        if want < need:
            notes.append(f"ann_candidates={want} raised to max(k, M) = {need}")
        mp = min(n, max(want, need))
        # FAISS reads host arrays: on CUDA this copy waits for the embedding, which its own
        # events have timed, so the "ann" clock starts after it.
        q_host = np.ascontiguousarray(q.detach().cpu().numpy(), dtype=np.float32)
        t0 = timer.now(host=True)
        cand = ann_index.search(q_host, mp)
        timer.add("ann", t0)
        t0 = timer.now()
        scores, rows = self._rescore(q, cand, need)
        timer.add("rescore", t0)
        short = np.flatnonzero((cand >= 0).sum(axis=1) < need)
        if not len(short):
            return scores, rows, "ann"
        t0 = timer.now()
        sel = torch.from_numpy(short).to(q.device)
        s_exact, r_exact = self._rows.topk(q[sel], need, self.search_impl)
        scores[sel], rows[sel] = s_exact, r_exact
        timer.add("search", t0)
        shown = ", ".join(str(int(i)) for i in short[:10]) + (" ..." if len(short) > 10 else "")
        notes.append(f"the ANN gave fewer than max(k, M) = {need} candidates for {len(short)} of {len(q)} queries "
                     f"({shown}): the exact scan ran for those (raise nprobe or efSearch)")
        return scores, rows, "ann+exact"

    @torch.no_grad()
    def _rescore(self, q: torch.Tensor, cand: np.ndarray, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact float32 scores q.x of the candidate rows (cand [nq, M'] int64, -1 = none), read
        from the stored rows, and the top `need` by that score: (scores, rows) [nq, need]. The same
        float32 products as the exact scan's, summed in another order (they differ by ~1e-6 at
        D = 1280), so whenever the candidates hold the exact top M the rerank gets the exact
        pipeline's candidates, in its order up to ties within that rounding (SPEC 6, ties)."""
        c = torch.from_numpy(cand).to(q.device)
        valid = c >= 0
        safe = torch.where(valid, c, torch.zeros_like(c))
        nq, mp = c.shape
        s = torch.empty(nq, mp, dtype=torch.float32, device=q.device)
        step = max(1, _RESCORE_BLOCK_BYTES // (4 * mp * self.dim))
        for a in range(0, nq, step):
            Y = self._rows.gather(safe[a:a + step])  # [b, M', D] float32
            with ieee_if_cuda(Y):  # float32 products: no TF32, whatever the process flags
                s[a:a + step] = torch.bmm(Y, q[a:a + step, :, None]).squeeze(2)
        s.masked_fill_(~valid, float("-inf"))
        top, pos = torch.topk(s, need, dim=1, largest=True, sorted=True)
        return top, torch.gather(safe, 1, pos)
