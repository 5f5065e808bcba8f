"""The approximate first stage: a FAISS index over an Index's rows, kept in the index folder, whose
candidates are re-scored exactly before the rerank.

    build(index, factory="auto", memory_budget="4GiB")  train, add every row, tune, commit
    update(index)                                       add the rows appended since (no retraining)
    drop(index)                                         remove it
    Ann.load(index, device="cpu", params=None)          verify and open; ann.search(q, m') -> rows
    measure_recall(index, ann, queries, M)              recall@M of its candidates (below)
    choose_factory(n, dim, memory_budget)               the "auto" factory string, and why

Storage (sgengine.index holds the protocol; nothing here writes a file itself): the ANN is
`ann/ann-<generation>.faiss` (faiss.write_index's bytes) and its JSON sidecar, installed by
`Index.commit_ann` under the index's writer lock and atomic manifest commit, so a crash
during a build leaves the index and the previous ANN as they were. The ANN covers rows
0..count-1; rows are append-only and keep their numbers, so it is *fresh* when count equals the
index's size and *stale* otherwise. `Index.add` never opens FAISS: the commit that appends rows
makes the ANN stale, and `update` (`sgengine index ann INDEX --update`) adds the missing rows to
the trained index in one more commit; IVF, HNSW and flat indexes all take additions without
retraining. Loading hashes the file and checks its sidecar against the manifest (same index
uid, bundle, dim and revision) before FAISS parses a byte: an ANN of another index or of
another revision is refused.

Who uses a stale ANN: nobody, silently. The engine's `ann=` setting decides, and every result
says what ran (`SearchResult.first_stage`): "auto" uses the ANN only when it is fresh and
otherwise runs the exact scan with a note saying why; "require" raises instead; "off" never uses
it. The rule is the same for an ANN that goes stale while an engine holds it.

Query time: the ANN proposes M' >= max(k, M) rows by its own (approximate) score; their exact
float32 scores q.x are recomputed from the stored rows, and the top max(k, M) by exact score
go on to the rerank exactly as the exact scan's would. So whenever the M' candidates contain the
exact top M, the rerank input equals the exact pipeline's. recall@M measures how often: the
fraction of the exact top M (SPEC 5) found among the M' candidates, where a candidate tied with
the M-th exact score (within SPEC 6's 1e-6 relative) counts as found.

The probe. A graph or IVF first stage routes a query by the dominant directions of the rows, and
image descriptors put most of their variance in a few of them. Two views of one scene agree
across hundreds of low-variance directions, which lifts their inner product above the crowd, yet
they can sit far apart along the dominant ones: the query's route then never reaches them
(measured on 1M calibrated rows: HNSW32 at efSearch 800 missed one of the exact top 10 for 9 of
50 queries, and those were its scene's other views, found at whitened ranks 0-10). The
probe is a second FAISS index over the same rows in a PCA-whitened space (`PROBE_FACTORY`,
PCAW64,L2norm,PQ32x4fs: each of 64 principal directions scaled to unit variance, then 4-bit
fast-scan codes, 16 B/row, scanned exhaustively), where such views are each other's nearest
rows. Its top `PROBE_CANDIDATES` join the main index's M' candidates before the exact re-score,
so it can only add candidates: the re-score decides. The file holds the main index's bytes, then
the probe's (the sidecar's "probe" record says where they start; a reader that knows no probe
reads the main index and stops there). Search parameter "probe": how many of its candidates join
(0: none). `build(probe="auto")` adds it to an approximate main index when D >= 128 and N >= 1,000;
`set_probe` adds, replaces or removes it on an existing ANN without rebuilding the main index.

"auto" (`choose_factory`) follows autofaiss's get_optimal_index_keys_v2, with B = the memory
budget per row, and one change: the graph holds 8-bit codes, not a float32 copy of the rows,
because the exact re-score orders the candidates anyway (measured on 1M calibrated rows x 2048:
HNSW32,SQ8 has the recall@400 of HNSW32 at every efSearch, at 0.27x the memory and 0.74x the
search time). Under 1,000 rows Flat; else HNSW32,SQ8 (or HNSW{m},SQ8, m >= 8) when the codes and
the graph fit (D + 8*m + 16 B/row); else IVF{nlist},SQ8 when D + 8 fit; else
OPQ{m}_{y},IVF{nlist},PQ{m}x8 with the largest m in 256..4 that fits m + 8. nlist is 4*sqrt(N) rounded to a power of two (the low end of FAISS's
4-16*sqrt(N) guideline, keeping k-means affordable on a CPU), at most N/39 and 65,536; the coarse
quantizer is an HNSW32 from 1,024 lists on. Training uses 64 rows per list (at least 65,536, at
most N), sampled with a fixed seed. The search parameter (nprobe, or efSearch for HNSW) is then
the smallest that reaches the target recall@M on stored rows used as queries; the sweep is kept
in the sidecar and printed by the CLI.
"""
from __future__ import annotations

import math
import re
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .._checks import check_choice, check_int, check_real
from ..errors import BackendUnavailableError, IndexError_, InputError
from ..index import Index

__all__ = ["Ann", "build", "update", "set_probe", "drop", "info", "measure_recall", "choose_factory", "parse_bytes",
           "default_candidates", "resolve_device", "set_threads", "BuildReport", "RecallReport", "FactoryChoice",
           "MODES", "DEVICES", "PROBE_FACTORY", "PROBE_CANDIDATES",
           "DEFAULT_MEMORY_BUDGET", "DEFAULT_M", "TARGET_RECALL", "CANDIDATE_FACTOR"]

MODES = ("auto", "require", "off")  # Engine.load(ann=...): module docstring
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MEMORY_BUDGET = 4 << 30
DEFAULT_M = 400  # the bundles' rerank M: what the build tunes recall@M for
# M' = 2 max(k, M) by default: compressed codes misorder candidates near the M-th; twice as many
# candidates costs one more gather of M rows and brings most of those back.
CANDIDATE_FACTOR = 2
TARGET_RECALL = 0.95
RECALL_QUERIES = 200
TIE_RTOL = 1e-6  # SPEC 6, ties
FLAT_BELOW = 1000
HNSW_OVERHEAD = 16  # B/row beyond the codes and 2m level-0 links (measured: 2,320 B/row for HNSW32,SQ8 at D = 2048)
PQ_MIN_ROWS = 10_000  # 256 centroids per sub-quantizer want >= 39 points each
_PQ_M = (256, 128, 64, 48, 32, 24, 16, 8, 4)
# The probe (module docstring, "The probe"): a second, tiny FAISS index over the same rows in a
# PCA-whitened space, exhaustively scanned with 4-bit fast-scan codes; its top PROBE_CANDIDATES
# join the main ANN's candidates.
PROBE_FACTORY = "PCAW64,L2norm,PQ32x4fs"
PROBE_CANDIDATES = 32
PROBE_MIN_DIM = 128   # whitening to 64 dimensions must reduce D at least twofold
PROBE_MIN_ROWS = FLAT_BELOW
_ADD_BLOCK_BYTES = 64 << 20
_RESCORE_BLOCK_BYTES = 64 << 20
# Fields of the sidecar that Index.commit_ann fills in; the rest are the builder's and survive an update.
_INDEX_FIELDS = {"format", "format_version", "index_uid", "bundle_fingerprint", "dim", "index_dtype", "generation",
                 "count", "file", "sha256", "bytes", "committed"}


def _faiss():
    try:
        import faiss
    except ImportError as e:  # a core dependency; a broken install should say how to fix it
        raise BackendUnavailableError(f"the ANN first stage needs FAISS ({e}): pip install faiss-cpu") from e
    return faiss


def _utcnow() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _faiss_message(e: Exception) -> str:
    """FAISS's exception text without its C++ location prefix."""
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", msg)


# ----------------------------------------------------------------------------- sizes and the auto factory
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_bytes(value: str | int, what: str = "memory budget") -> int:
    """"4GiB", "512MiB", "4G" (binary, as autofaiss reads it), "4GB" (decimal) or an int of bytes."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        n = int(value)
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)) \
            and m.group(2).lower() in _UNITS:
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise InputError(f"{what} must be bytes like '4GiB', '512MiB' or an integer, got {value!r}")
    if n <= 0:
        raise InputError(f"{what} must be positive, got {value!r}")
    return n


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _nlist(n: int) -> int:
    nl = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = 2 ** int(math.floor(math.log2(max(1, n // 39))))
    return int(max(1, min(nl, cap, 65536)))


def _train_rows(factory: str, n: int) -> int:
    m = re.search(r"IVF(\d+)", factory)
    want = max(64 * int(m.group(1)), 1 << 16) if m else 1 << 16
    return min(n, want)


@dataclass(frozen=True)
class FactoryChoice:
    """`choose_factory`'s answer: the FAISS factory string, why, and its estimated bytes per row."""
    factory: str
    why: str
    bytes_per_row: float


def choose_factory(n: int, dim: int, memory_budget: str | int = DEFAULT_MEMORY_BUDGET) -> FactoryChoice:
    """The "auto" factory for n rows of dimension dim within memory_budget (module docstring)."""
    n = check_int(n, "rows", 1)
    d = check_int(dim, "dim", 1)
    budget = parse_bytes(memory_budget)
    per_row = budget / n
    have = f"{_fmt_bytes(budget)} for {n:,} rows is {per_row:,.0f} B/row"
    if n < FLAT_BELOW:
        return FactoryChoice("Flat", f"{n:,} rows (< {FLAT_BELOW:,}): a flat scan, nothing to train", 4.0 * d)
    m_hnsw = int((per_row - d - HNSW_OVERHEAD) // 8)
    if m_hnsw >= 8:
        m_hnsw = min(m_hnsw, 32)
        return FactoryChoice(f"HNSW{m_hnsw},SQ8", f"{have}: 8-bit codes of the rows and an HNSW{m_hnsw} graph fit "
                             f"({d + 8 * m_hnsw + HNSW_OVERHEAD:,} B/row), the fastest search for its recall; the exact "
                             "re-score orders their candidates", d + 8.0 * m_hnsw + HNSW_OVERHEAD)
    nlist = _nlist(n)
    coarse = f"IVF{nlist}" if nlist < 1024 else f"IVF{nlist}_HNSW32"
    lists = f"{nlist} lists (4*sqrt(N) as a power of two)"
    if d + 8 <= per_row:
        return FactoryChoice(f"{coarse},SQ8", f"{have}: 8-bit scalar codes in {lists} fit ({d + 8:,} B/row); "
                             "the exact re-score orders their candidates", d + 8.0)
    if n >= PQ_MIN_ROWS:
        for m in _PQ_M:
            if m < d and m + 8 <= per_row:
                y = (min(d // m, 6) + 1) * m  # OPQ's output: a multiple of m, near d (autofaiss's rule)
                return FactoryChoice(f"OPQ{m}_{y},{coarse},PQ{m}x8",
                                     f"{have}: only product-quantized codes fit; PQ{m} ({m + 8} B/row) is the "
                                     f"largest that does, after an OPQ rotation to {y} dims, in {lists}", m + 8.0)
    least = 12 if n >= PQ_MIN_ROWS else d + 8
    raise InputError(f"memory budget {_fmt_bytes(budget)} is too small for an ANN over {n:,} rows of dim {d}: the "
                     f"smallest that fits needs ~{least} B/row ({_fmt_bytes(least * n)}); raise --memory-budget, "
                     "or keep the exact first stage")


def default_candidates(k: int, M: int) -> int:
    """M' when the engine is not told: CANDIDATE_FACTOR * max(k, M)."""
    return CANDIDATE_FACTOR * max(k, M)


# ----------------------------------------------------------------------------- search parameters
def _structure(fx) -> dict[str, Any]:
    """The FAISS sub-indexes whose search parameters we set: "ivf", "hnsw", "quantizer_hnsw"."""
    faiss = _faiss()
    out: dict[str, Any] = {}
    try:
        out["ivf"] = faiss.extract_index_ivf(fx)
    except (RuntimeError, AttributeError):
        pass
    inner = faiss.downcast_index(fx)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        out["hnsw"] = inner
    if "ivf" in out:
        qz = faiss.downcast_index(out["ivf"].quantizer)
        if isinstance(qz, faiss.IndexHNSW):
            out["quantizer_hnsw"] = qz
    return out


def _get_params(fx) -> dict[str, int]:
    s = _structure(fx)
    out = {}
    if "ivf" in s:
        out["nprobe"] = int(s["ivf"].nprobe)
    if "hnsw" in s:
        out["efSearch"] = int(s["hnsw"].hnsw.efSearch)
    if "quantizer_hnsw" in s:
        out["quantizer_efSearch"] = int(s["quantizer_hnsw"].hnsw.efSearch)
    return out


def _check_params(fx, params: dict[str, int], what: str) -> dict[str, int]:
    """fx's search parameters (_get_params) with `params` applied: names it has, integers >= 1,
    nprobe <= nlist. InputError otherwise. Nothing is set on fx."""
    s = _structure(fx)
    have = {"nprobe": "ivf", "efSearch": "hnsw", "quantizer_efSearch": "quantizer_hnsw"}
    out = _get_params(fx)
    for name, value in params.items():
        if name not in have or have[name] not in s:
            names = [k for k, v in have.items() if v in s]
            raise InputError(f"{what} has no search parameter {name!r}; it has {names or 'none'}")
        v = check_int(value, f"{what}: {name}", 1)
        if name == "nprobe" and v > int(s["ivf"].nlist):
            raise InputError(f"{what}: nprobe={v} exceeds its {int(s['ivf'].nlist)} lists")
        out[name] = v
    return out


def _set_params(fx, params: dict[str, int], what: str) -> None:
    """Set search parameters on fx itself (the build's own index, and GPU copies)."""
    s = _structure(fx)
    for name, v in _check_params(fx, params, what).items():
        if name == "nprobe":
            s["ivf"].nprobe = v
        else:
            s["hnsw" if name == "efSearch" else "quantizer_hnsw"].hnsw.efSearch = v


def _split_probe(params: dict, probe, meta: dict, what: str, current: int | None = None) -> tuple[dict, int]:
    """(params without "probe", the probe's candidate count): "probe" given (an integer >= 0, 0
    turning it off) or else `current`, or else the count the build recorded. InputError for
    "probe" on an ANN that has none."""
    params = dict(params)
    k = params.pop("probe", None)
    if probe is None:
        if k is not None:
            raise InputError(f"{what} has no probe (search parameter 'probe'): add one with "
                             "sgengine index ann INDEX --set-probe auto")
        return params, 0
    if k is None:
        k = current if current is not None else meta["probe"]["candidates"]
    return params, check_int(k, f"{what}: probe", 0)


class _Unsupported(Exception):
    """fx has a wrapper whose per-call search parameters we do not build."""


def _search_params(fx, params: dict[str, int]) -> tuple[Any, list]:
    """FAISS per-call search parameters equal to setting `params` on fx (checked by
    _check_params), as (root, objects to keep alive), or (None, []) when fx has none to set.
    Per-call parameters let several Ann objects share one loaded FAISS index, each with its own
    nprobe / efSearch, without a lock around the search. _Unsupported for an index structure
    this does not walk (an ANN whose parameters are set on the index itself instead)."""
    faiss = _faiss()
    if not params:
        return None, []
    keep: list = []

    def walk(ix):
        ix = faiss.downcast_index(ix)
        if isinstance(ix, faiss.IndexPreTransform):
            p = faiss.SearchParametersPreTransform()
            p.index_params = walk(ix.index)
        elif isinstance(ix, faiss.IndexRefine):
            p = faiss.IndexRefineSearchParameters()
            p.base_index_params = walk(ix.base_index)
            p.k_factor = ix.k_factor
        elif isinstance(ix, faiss.IndexHNSW):
            p = faiss.SearchParametersHNSW()
            p.efSearch = params["efSearch"]
        elif isinstance(ix, faiss.IndexIVF):
            p = faiss.SearchParametersIVF()
            p.nprobe = params["nprobe"]
            if "quantizer_efSearch" in params:
                qp = faiss.SearchParametersHNSW()
                qp.efSearch = params["quantizer_efSearch"]
                keep.append(qp)
                p.quantizer_params = qp
        else:
            raise _Unsupported(type(ix).__name__)
        keep.append(p)
        return p

    return walk(fx), keep


# Loaded CPU FAISS indexes, one per Index object (the latest ANN file it loaded), held weakly:
# engines and measurements over one Index share one copy of what may be gigabytes, each with its
# own search parameters (_search_params); the copy goes when the last Ann using it goes.
_SHARED: "weakref.WeakKeyDictionary[Index, tuple[str, weakref.ref]]" = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


class _Loaded:
    """The FAISS indexes of one ANN file: the main index and its probe (or None)."""
    __slots__ = ("fx", "probe", "__weakref__")

    def __init__(self, fx, probe) -> None:
        self.fx, self.probe = fx, probe


def _bounded(read: Callable[[int], bytes], size: int) -> Callable[[int], bytes]:
    """A reader of the next `size` bytes of `read` and no more (one FAISS index of a file holding two)."""
    left = [size]

    def part(n: int) -> bytes:
        b = read(min(n, left[0])) if left[0] > 0 else b""
        left[0] -= len(b)
        return b
    return part


def _parse(read: Callable[[int], bytes], meta: dict) -> _Loaded:
    """Parse an ANN file (module docstring, "Storage"): the main index, then the probe's bytes
    when the sidecar records one."""
    faiss = _faiss()
    pr = meta.get("probe")
    if not pr:
        return _Loaded(faiss.read_index(faiss.PyCallbackIOReader(read)), None)
    fx = faiss.read_index(faiss.PyCallbackIOReader(_bounded(read, int(pr["offset"]))))
    probe = faiss.read_index(faiss.PyCallbackIOReader(_bounded(read, int(pr["bytes"]))))
    return _Loaded(fx, probe)


def _read_shared(index: Index) -> tuple[_Loaded, dict]:
    """The index's ANN as CPU FAISS indexes and its sidecar: the copy already loaded for this
    Index object when its sha256 still matches the manifest, otherwise read (Index.read_ann)."""
    with _SHARED_LOCK:
        sha = index.ann["sha256"]
        hit = _SHARED.get(index)
        got = hit[1]() if hit is not None and hit[0] == sha else None
        if got is not None:
            return got, index.ann_meta()
        got, meta = _read_parsed(index)
        _SHARED[index] = (sha, weakref.ref(got))
        return got, meta


def _read_parsed(index: Index) -> tuple[_Loaded, dict]:
    """Verify and parse the index's ANN file (Index.read_ann, then _parse with its sidecar)."""
    meta = index.ann_meta()
    return index.read_ann(lambda read: _parse(read, meta))


def _caught_up(ix: Index, progress: bool, state: dict) -> tuple[_Loaded, dict, int]:
    """Under commit_ann's lock: the committed ANN, its main index given the rows appended since it
    was written; (loaded, sidecar, the row count it covered). Fills state["added"], ["add_s"]."""
    got, meta = _read_parsed(ix)
    start = int(meta["count"])
    state["added"] = len(ix) - start
    state["add_s"] = _add_rows(got.fx, ix, start, len(ix), progress)
    return got, meta, start


def _writer(fx, probe, fields: dict) -> Callable[[Any], None]:
    """write(stream) for Index.commit_ann: the main index's bytes, then the probe's; records
    where the probe starts in fields["probe"] (commit_ann reads `fields` after the write)."""
    faiss = _faiss()

    def write(w) -> None:
        size = [0]

        def counted(b) -> None:
            size[0] += len(b)
            w.write(b)
        faiss.write_index(fx, faiss.PyCallbackIOWriter(counted))
        if probe is not None:
            start = size[0]
            faiss.write_index(probe, faiss.PyCallbackIOWriter(counted))
            fields["probe"] = {**fields["probe"], "offset": start, "bytes": size[0] - start}
    return write


# ----------------------------------------------------------------------------- devices
def set_threads(n: int) -> None:
    """FAISS's OpenMP threads (its own runtime, apart from torch's); the engine's `threads`."""
    _faiss().omp_set_num_threads(check_int(n, "threads", 1))


def _faiss_gpus() -> int:
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def resolve_device(requested: str, engine_device: torch.device | str = "cpu") -> str:
    """Where the ANN searches: "cpu" or "cuda:N". "auto": the engine's GPU when this FAISS has GPU
    support (faiss-gpu), else the CPU (describe() says so); "cuda" without faiss-gpu is an error."""
    check_choice(requested, "ann_device", DEVICES)
    dev = torch.device(engine_device)
    gpus = _faiss_gpus()
    if requested == "cuda":
        if gpus == 0:
            raise BackendUnavailableError(
                f"ann_device='cuda' needs FAISS with GPU support, and this FAISS ({_faiss().__version__}) sees no GPU "
                "(faiss.get_num_gpus() == 0): install faiss-gpu, or use ann_device='cpu'")
        return f"cuda:{dev.index or 0}" if dev.type == "cuda" else "cuda:0"
    if requested == "auto" and dev.type == "cuda" and gpus > 0:
        return f"cuda:{dev.index or 0}"
    return "cpu"


def _to_gpu(fx, device: str, what: str):
    faiss = _faiss()
    res = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(res, int(device.split(":")[1]), fx), res
    except (RuntimeError, AttributeError) as e:
        raise BackendUnavailableError(f"{what}: FAISS cannot run it on the GPU ({_faiss_message(e)}); "
                                      "use ann_device='cpu'") from e


# ----------------------------------------------------------------------------- the search object
class Ann:
    """A verified FAISS index over an Index's first `count` rows, ready to search. Build with `Ann.load`.

    On the CPU every Ann over one Index object shares one loaded FAISS index (_read_shared) and
    passes its own search parameters with each search, so two engines, or an engine and
    `measure_recall`, cost one copy of the ANN's memory. A GPU Ann owns its GPU copy.
    """

    def __init__(self, fx, meta: dict, record: dict, device: str, note: str | None, params: dict[str, int],
                 gpu_resources=None, loaded: _Loaded | None = None, probe_k: int = 0) -> None:
        self._fx = fx
        self._gpu_resources = gpu_resources  # kept alive as long as the GPU index
        self._loaded = loaded  # keeps the shared copy (main and probe) alive while this Ann lives
        self._probe = loaded.probe if loaded is not None else None
        self._probe_k = int(probe_k) if self._probe is not None else 0
        self._params = dict(params)
        self._per_call = (None, [])  # (FAISS SearchParameters, the objects it points to)
        self.meta = meta
        self.record = record
        self.device = device
        self.device_note = note
        self._lock = threading.Lock()
        if device == "cpu" and self._params:
            self._per_call = _search_params(fx, self._params)

    @classmethod
    def load(cls, index: Index, *, device: str = "cpu", engine_device: torch.device | str = "cpu",
             params: dict[str, int] | None = None) -> "Ann":
        """Verify the index's ANN (Index.read_ann: sidecar against the manifest, sha256 of the
        file) and open it, or reuse the copy another Ann over this Index object loaded; `params`
        ({"nprobe": 32}, {"efSearch": 800}...) override the tuned ones the sidecar records.
        device: one of DEVICES (resolve_device)."""
        faiss = _faiss()
        if not isinstance(index, Index):
            raise InputError(f"index must be an sgengine Index, got {type(index).__name__}")
        if index.ann is None:
            raise InputError(f"index {index.path} has no ANN: build one with sgengine index ann {index.path}")
        if params is not None and not isinstance(params, dict):
            raise InputError(f"ann_params must be a dict like {{'nprobe': 32}}, got {type(params).__name__}")
        dev = resolve_device(device, engine_device)
        record = index.ann
        loaded, meta = _read_shared(index)
        fx = loaded.fx
        if fx.d != index.dim or fx.ntotal != record["count"] or fx.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexError_(f"index {index.path}: {record['file']} holds a {fx.d}-d index of {fx.ntotal} vectors "
                              f"(metric {fx.metric_type}), not the {index.dim}-d inner-product index of "
                              f"{record['count']} rows its sidecar records; rebuild it "
                              f"(sgengine index ann {index.path})")
        what = f"the ANN {meta.get('factory')!r} of index {index.path}"
        p, probe_k = _split_probe({**meta.get("params", {}), **(params or {})}, loaded.probe, meta, what)
        p = _check_params(fx, p, what)
        note, res = None, None
        if dev != "cpu":
            if "hnsw" in _structure(fx) and device == "auto":
                dev, note = "cpu", "faiss-gpu has no HNSW index: searched on the CPU"
            else:
                # The GPU copy is this Ann's own; parameters are set on it (the shared CPU copy is untouched).
                fx, res = _to_gpu(fx, dev, what)
                # The GPU copy's coarse quantizer is a flat GPU index: nprobe is its only parameter.
                p = {k: v for k, v in p.items() if k == "nprobe"}
                for name, value in p.items():
                    faiss.GpuParameterSpace().set_index_parameter(fx, name, value)
        if dev == "cpu" and torch.device(engine_device).type == "cuda" and note is None:
            note = "faiss-cpu: the ANN searches on the CPU; its candidates move to the GPU for the re-score"
        try:
            return cls(fx, meta, record, dev, note, p, res, loaded, probe_k)
        except _Unsupported:
            # A structure whose per-call parameters we do not build: a private copy with them set on it.
            own = faiss.clone_index(fx)
            _set_params(own, p, what)
            ann = cls(own, meta, record, dev, note, {}, res, loaded, probe_k)
            ann._params = p
            return ann

    @property
    def factory(self) -> str:
        return str(self.meta.get("factory"))

    @property
    def count(self) -> int:
        return int(self.record["count"])

    @property
    def sha256(self) -> str:
        return self.record["sha256"]

    @property
    def library(self) -> str:
        faiss = _faiss()
        return f"{'faiss-gpu' if self.device != 'cpu' else 'faiss-cpu'} {faiss.__version__}"

    @property
    def params(self) -> dict[str, int]:
        """The search parameters in effect (nprobe, efSearch, quantizer_efSearch: those it has;
        probe: how many of the probe's candidates join, when it has a probe)."""
        return {**self._params, **({"probe": self._probe_k} if self._probe is not None else {})}

    @property
    def probe(self) -> dict | None:
        """The probe's sidecar record (factory, candidates built with, offset, bytes), or None."""
        return self.meta.get("probe") if self._probe is not None else None

    def set_params(self, params: dict[str, int]) -> None:
        """Change nprobe / efSearch / quantizer_efSearch (names this index has; InputError otherwise).
        On the CPU this Ann's own setting (other Ann over the same Index keep theirs); safe while
        other threads search (a search uses the setting in effect when it starts)."""
        if not isinstance(params, dict):
            raise InputError(f"params must be a dict like {{'nprobe': 32}}, got {type(params).__name__}")
        what = f"the ANN {self.factory!r}"
        with self._lock:
            params, probe_k = _split_probe(params, self._probe, self.meta, what, self._probe_k)
            if self.device == "cpu":
                merged = _check_params(self._fx, {**self._params, **params}, what)
                try:
                    per_call = _search_params(self._fx, merged)
                except _Unsupported:  # a private copy (Ann.load): set on it
                    _set_params(self._fx, merged, what)
                    per_call = (None, [])
                self._params, self._per_call = merged, per_call
            else:
                unknown = set(params) - set(self._params)
                if unknown:
                    raise InputError(f"{what} has no search parameter {sorted(unknown)[0]!r}; "
                                     f"it has {sorted(self._params)}")
                for name, value in params.items():
                    _faiss().GpuParameterSpace().set_index_parameter(self._fx, name, check_int(value, name, 1))
                    self._params[name] = int(value)
            self._probe_k = probe_k

    def search(self, q: np.ndarray, m_prime: int) -> np.ndarray:
        """Candidate rows [nq, m' (+ probe)] int64: the main index's m', best first by its
        approximate score, then the probe's candidates that are not among them; -1 where there
        is no candidate (an IVF probing few lists; a probe candidate the main index also found).
        Trusts its inputs: q float32 C-contiguous [nq, dim], 1 <= m' <= count."""
        sp, _keep = self._per_call  # one read: a concurrent set_params swaps the pair whole
        if sp is None:
            _, rows = self._fx.search(q, m_prime)
        else:
            _, rows = self._fx.search(q, m_prime, params=sp)
        t = min(self._probe_k, self.count)
        if t == 0:
            return rows
        _, extra = self._probe.search(q, t)
        seen = (extra[:, :, None] == rows[:, None, :]).any(axis=2)
        return np.concatenate([rows, np.where(seen, -1, extra)], axis=1)

    def describe(self) -> dict:
        out = {"factory": self.factory, "library": self.library, "device": self.device, "params": self.params,
               "count": self.count, "bytes": int(self.record["bytes"]),
               "bytes_per_row": round(self.record["bytes"] / max(1, self.count), 1), "file": self.record["file"],
               "built": self.meta.get("built"), "recall_at_build": self.meta.get("recall")}
        if self._probe is not None:
            pr = self.meta["probe"]
            out["probe"] = {"factory": pr["factory"], "candidates": self._probe_k, "bytes": int(pr["bytes"]),
                            "device": "cpu"}
        if self.device_note:
            out["note"] = self.device_note
        return out


# ----------------------------------------------------------------------------- recall
@dataclass
class RecallReport:
    """recall@M of an ANN's M' candidates over `queries` queries (module docstring): the mean, the
    worst query, the fraction of queries that found all M, and the ANN's milliseconds per query."""
    M: int
    candidates: int
    queries: int
    recall: float
    min_recall: float
    all_found: float
    ms_per_query: float
    params: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("recall", "min_recall", "all_found"):
            d[k] = round(d[k], 6)
        d["ms_per_query"] = round(d["ms_per_query"], 4)
        return d


def _exact_top(index: Index, q: np.ndarray, M: int) -> np.ndarray:
    """The M-th best exact score per query (SPEC 5), float32 [nq]."""
    from .rows import search_index
    s, _ = search_index(index, q, M)
    return s[:, M - 1]


def _found(index: Index, q: np.ndarray, cand: np.ndarray, thr: np.ndarray, M: int) -> np.ndarray:
    """Per query, how many of the exact top M are among `cand` (ties with the M-th count)."""
    nq, mp = cand.shape
    found = np.zeros(nq, dtype=np.int64)
    step = max(1, _RESCORE_BLOCK_BYTES // (4 * mp * index.dim))
    for a in range(0, nq, step):
        c = cand[a:a + step]
        Y = index.gather(np.where(c >= 0, c, 0))
        s = np.einsum("qmd,qd->qm", Y, q[a:a + step])
        s[c < 0] = -np.inf
        t = thr[a:a + step, None]
        found[a:a + step] = np.minimum(M, (s >= t - TIE_RTOL * np.abs(t)).sum(axis=1))
    return found


def _recall(index: Index, ann_search: Callable[[np.ndarray, int], np.ndarray], q: np.ndarray, thr: np.ndarray,
            M: int, mp: int, params: dict) -> RecallReport:
    t0 = time.perf_counter()
    cand = ann_search(q, mp)
    ms = (time.perf_counter() - t0) * 1e3 / max(1, len(q))
    r = _found(index, q, cand, thr, M) / M
    return RecallReport(M, mp, len(q), float(r.mean()), float(r.min()), float((r >= 1).mean()), ms, dict(params))


def measure_recall(index: Index, ann: Ann, queries, *, M: int = DEFAULT_M,
                   candidates: int | None = None) -> RecallReport:
    """recall@M of `ann` against the exact first stage over `queries` ([nq, D] float, finite):
    the fraction of each query's exact top M (M capped at the index size) found among the ANN's
    M' candidates (default CANDIDATE_FACTOR * M, capped at the ANN's rows), averaged. When
    every query's recall is 1 the engine's rerank input equals the exact pipeline's."""
    if not isinstance(ann, Ann):
        raise InputError(f"ann must be an Ann (Ann.load(index)), got {type(ann).__name__}")
    q = np.ascontiguousarray(_check_queries(queries, index.dim))
    if ann.count != len(index):
        raise InputError(f"the ANN covers {ann.count} of index {index.path}'s {len(index)} rows (stale): "
                         f"update it first (sgengine index ann {index.path} --update)")
    M = min(check_int(M, "M", 1), len(index))
    mp = min(ann.count, max(M, check_int(candidates, "candidates", 1) if candidates is not None
                            else default_candidates(M, M)))
    return _recall(index, ann.search, q, _exact_top(index, q, M), M, mp, ann.params)


def _check_queries(queries, dim: int) -> np.ndarray:
    q = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if q.ndim != 2 or q.shape[1] != dim or not np.issubdtype(q.dtype, np.floating):
        raise InputError(f"queries must be floating [nq, {dim}], got {q.dtype} {list(q.shape)}")
    q = q.astype(np.float32)
    if not np.isfinite(q).all():
        raise InputError("queries contain NaN or Inf")
    return q


# ----------------------------------------------------------------------------- build, update, drop
@dataclass
class BuildReport:
    """What `build` (or `update`) made: the committed manifest record, the sidecar's fields, timings."""
    record: dict
    meta: dict
    train_s: float = 0.0
    add_s: float = 0.0
    tune_s: float = 0.0
    added: int = 0  # rows added to the FAISS index by this call

    def summary(self) -> str:
        m, r = self.meta, self.record
        lines = [f"ANN {m['factory']} over {r['count']:,} rows (dim {m['dim']}): {_fmt_bytes(r['bytes'])}, "
                 f"{r['bytes'] / r['count']:,.0f} B/row, committed as {r['file']} (generation {r['generation']})"]
        if m.get("requested") == "auto":
            lines.append(f"  auto: {m['why']}")
        if m.get("trained_on"):
            lines.append(f"  trained on {m['trained_on']:,} sampled rows in {self.train_s:.1f} s")
        lines.append(f"  added {self.added:,} rows in {self.add_s:.1f} s")
        pr = m.get("probe")
        if pr:
            lines.append(f"  probe {pr['factory']}: {_fmt_bytes(pr.get('bytes', 0))}, its top {pr['candidates']} join "
                         f"the candidates ({pr.get('build_seconds', 0):.1f} s to build)")
        for t in m.get("tuning") or []:
            p = ", ".join(f"{k}={v}" for k, v in t["params"].items()) or "no parameters"
            lines.append(f"  {p:<34} recall@{t['M']} {t['recall']:.4f} (min {t['min_recall']:.3f}) "
                         f"with M'={t['candidates']}, {t['ms_per_query']:.3f} ms/query")
        rec = m.get("recall")
        if rec:
            p = ", ".join(f"{k}={v}" for k, v in m.get("params", {}).items()) or "no search parameters"
            lines.append(f"  search with {p}: recall@{rec['M']} = {rec['recall']:.4f} over {rec['queries']} stored "
                         f"rows as queries (M'={rec['candidates']}, {rec['ms_per_query']:.3f} ms/query)")
        return "\n".join(lines)


def _progress_bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="row", unit_scale=True)


def _add_rows(fx, index: Index, start: int, stop: int, progress: bool) -> float:
    t0 = time.perf_counter()
    bar = _progress_bar(stop - start, "ann add", progress) if stop > start else None
    block = max(1, _ADD_BLOCK_BYTES // (4 * index.dim))
    for _, x in index.iter_rows(start, stop, block_rows=block):
        fx.add(np.ascontiguousarray(x))
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()
    return time.perf_counter() - t0


def _tune(fx, index: Index, *, M: int, mp: int, target: float, nq: int, seed: int, fixed: dict | None
          ) -> tuple[dict, list[dict], RecallReport | None]:
    """Pick the search parameter: the smallest nprobe (IVF) or efSearch (HNSW) whose recall@M on
    `nq` stored rows used as queries reaches `target`; `fixed` parameters are used as given.
    Returns (params, the sweep, the recall at the chosen params)."""
    if nq == 0:
        if fixed:
            _set_params(fx, fixed, "the ANN")
        return _get_params(fx), [], None
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(len(index), size=min(nq, len(index)), replace=False))
    q = np.ascontiguousarray(index.gather(rows))
    thr = _exact_top(index, q, M)
    search = lambda x, m: fx.search(x, m)[1]  # noqa: E731
    s = _structure(fx)
    grid: list[dict] = []
    if fixed:
        grid = [fixed]
    elif "ivf" in s:
        nlist = int(s["ivf"].nlist)
        probes = sorted({min(nlist, 2 ** i) for i in range(0, 17)} | {nlist})
        for p in probes:
            grid.append({"nprobe": p, **({"quantizer_efSearch": max(64, 2 * p)} if "quantizer_hnsw" in s else {})})
    elif "hnsw" in s:
        grid = [{"efSearch": e} for e in sorted({max(mp, 2 ** i) for i in range(4, 13)})]
    sweep: list[dict] = []
    chosen = None
    for params in grid or [{}]:
        _set_params(fx, params, "the ANN")
        r = _recall(index, search, q, thr, M, mp, _get_params(fx))
        sweep.append(r.as_dict())
        chosen = r
        if r.recall >= target:
            break
    return _get_params(fx), (sweep if len(grid) > 1 else []), chosen


def _check_build_device(device: str) -> str | None:
    check_choice(device, "device", ("cpu", "cuda"))
    if device == "cpu":
        return None
    return resolve_device("cuda", "cuda")


def _probe_choice(requested: str, main_factory: str, n: int, d: int) -> tuple[str | None, str]:
    """(the probe's factory or None, why) for probe=`requested` ("auto", "off" or a FAISS factory)."""
    if not isinstance(requested, str) or not requested.strip():
        raise InputError(f"probe must be 'auto', 'off' or a FAISS factory string, got {requested!r}")
    requested = requested.strip()
    if requested == "off":
        return None, "probe off"
    if requested != "auto":
        return requested, "given"
    if main_factory == "Flat":
        return None, "auto: no probe for an exact (Flat) main index"
    if d < PROBE_MIN_DIM:
        return None, f"auto: no probe for dim {d} < {PROBE_MIN_DIM}"
    if n < PROBE_MIN_ROWS:
        return None, f"auto: no probe under {PROBE_MIN_ROWS:,} rows"
    return PROBE_FACTORY, (f"auto: {PROBE_FACTORY}, the top {PROBE_CANDIDATES} in a PCA-whitened 64-d space join "
                           "the candidates")


def _build_probe(index: Index, factory: str, n: int, seed: int, say: Callable[[str], None], progress: bool
                 ) -> tuple[Any, int, float]:
    """Train the probe on a seeded sample of rows 0..n-1 and add them: (faiss index, trained on, seconds)."""
    faiss = _faiss()
    t0 = time.perf_counter()
    try:
        px = faiss.index_factory(index.dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise InputError(f"probe factory {factory!r}: FAISS cannot build it ({_faiss_message(e)})") from e
    rows = min(n, 1 << 16)
    if not px.is_trained:
        pick = np.sort(np.random.default_rng(seed + 2).choice(n, size=rows, replace=False))
        say(f"training the probe {factory} on {rows:,} sampled rows")
        try:
            px.train(np.ascontiguousarray(index.gather(pick)))
        except RuntimeError as e:
            raise InputError(f"probe factory {factory!r}: training on {rows:,} rows failed "
                             f"({_faiss_message(e)})") from e
    _trim_pca(px)
    _add_rows(px, index, 0, n, progress)
    return px, rows, time.perf_counter() - t0


def _trim_pca(fx) -> None:
    """Drop the eigenvectors a trained PCA transform does not use: FAISS keeps all D x D (16 MiB
    at D = 2048) though it applies only d_out x D (held in its matrix A; the kept rows are the
    leading ones that any recomputation of A reads)."""
    faiss = _faiss()
    if not isinstance(faiss.downcast_index(fx), faiss.IndexPreTransform):
        return
    chain = faiss.downcast_index(fx).chain
    for i in range(chain.size()):
        t = faiss.downcast_VectorTransform(chain.at(i))
        if isinstance(t, faiss.PCAMatrix) and t.is_trained and t.PCAMat.size() > t.d_out * t.d_in:
            t.PCAMat.resize(t.d_out * t.d_in)


def build(index: Index, factory: str = "auto", *, memory_budget: str | int = DEFAULT_MEMORY_BUDGET,
          sample: int | None = None, params: dict[str, int] | None = None, M: int = DEFAULT_M,
          candidates: int | None = None, target_recall: float = TARGET_RECALL, recall_queries: int = RECALL_QUERIES,
          device: str = "cpu", seed: int = 0, progress: bool = False, ef_construction: int | None = None,
          probe: str = "auto", probe_candidates: int | None = None,
          log: Callable[[str], None] | None = None) -> BuildReport:
    """Build the index's ANN and commit it (replacing any previous one only at the commit).

    factory: "auto" (`choose_factory` within memory_budget) or any FAISS factory string; the
    metric is always the inner product (SPEC 5). sample: training rows (default: 64 per IVF list,
    at least 65,536, at most N). params: fixed search parameters ({"nprobe": 16}); without them
    the smallest nprobe/efSearch reaching target_recall (recall@M with M' = candidates, default
    CANDIDATE_FACTOR * M) on recall_queries stored rows is chosen (0 skips the measurement).
    device: "cpu", or "cuda" to train and add on a GPU with faiss-gpu (an error without it).
    ef_construction: an HNSW graph's build-time search width (FAISS's default, 40, when None):
    larger links tight clusters better, at a build time roughly proportional to it; an error for a
    factory without an HNSW graph over the rows.
    probe: "auto" (PROBE_FACTORY when the main index is approximate, D >= PROBE_MIN_DIM and N >=
    PROBE_MIN_ROWS), "off", or a FAISS factory string; probe_candidates: how many of its
    candidates join by default (PROBE_CANDIDATES). Module docstring, "The probe".
    Rows appended by other writers while it builds are added under the commit's lock.
    """
    faiss = _faiss()
    if not isinstance(index, Index):
        raise InputError(f"index must be an sgengine Index, got {type(index).__name__}")
    n, d = len(index), index.dim
    if n == 0:
        raise InputError(f"index {index.path} is empty: add images first (sgengine index build)")
    if not isinstance(factory, str) or not factory.strip():
        raise InputError(f"factory must be 'auto' or a FAISS factory string like 'IVF1024,SQ8', got {factory!r}")
    factory = factory.strip()
    M = min(check_int(M, "M", 1), n)
    mp = min(n, max(M, check_int(candidates, "candidates", 1) if candidates is not None else default_candidates(M, M)))
    target_recall = check_real(target_recall, "target_recall")
    if not 0 < target_recall <= 1:
        raise InputError(f"target_recall must be in (0, 1], got {target_recall}")
    recall_queries = check_int(recall_queries, "recall_queries", 0)
    if params is not None and not isinstance(params, dict):
        raise InputError(f"params must be a dict like {{'nprobe': 16}}, got {type(params).__name__}")
    gpu = _check_build_device(device)
    say = log or (lambda _: None)
    if factory == "auto":
        choice = choose_factory(n, d, memory_budget)
        fac, why = choice.factory, choice.why
        say(f"auto: {fac} ({why})")
    else:
        fac, why = factory, "given"
    probe_fac, probe_why = _probe_choice(probe, fac, n, d)
    if probe_fac is not None:
        try:  # a bad probe factory fails now, not after the main index is trained
            faiss.index_factory(d, probe_fac, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise InputError(f"probe factory {probe_fac!r}: FAISS cannot build it ({_faiss_message(e)})") from e
    probe_k = PROBE_CANDIDATES if probe_candidates is None else check_int(probe_candidates, "probe_candidates", 1)
    t_start = time.perf_counter()
    try:
        fx = faiss.index_factory(d, fac, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise InputError(f"factory {fac!r}: FAISS cannot build it ({_faiss_message(e)}); see "
                         "https://github.com/facebookresearch/faiss/wiki/The-index-factory") from e
    if ef_construction is not None:
        efc = check_int(ef_construction, "ef_construction", 1)
        s = _structure(fx)
        if "hnsw" not in s:
            raise InputError(f"ef_construction applies to an HNSW graph over the rows; factory {fac!r} has none")
        s["hnsw"].hnsw.efConstruction = efc
    work, res = (fx, None) if gpu is None else _to_gpu(fx, gpu, f"factory {fac!r}")
    train_rows, train_s = 0, 0.0
    if not fx.is_trained:
        train_rows = _train_rows(fac, n) if sample is None else min(n, check_int(sample, "sample", 1))
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=train_rows, replace=False))
        say(f"training {fac} on {train_rows:,} sampled rows")
        t0 = time.perf_counter()
        try:
            work.train(np.ascontiguousarray(index.gather(rows)))
        except RuntimeError as e:
            raise InputError(f"factory {fac!r}: training on {train_rows:,} rows failed ({_faiss_message(e)}); "
                             "raise --sample or choose fewer lists") from e
        train_s = time.perf_counter() - t0
    add_s = _add_rows(work, index, 0, n, progress)
    if gpu is not None:
        fx = faiss.index_gpu_to_cpu(work)
        del work, res
    t0 = time.perf_counter()
    if recall_queries:
        say(f"tuning search parameters for recall@{M} >= {target_recall} with M'={mp} on "
            f"{min(recall_queries, n)} stored rows")
    chosen, sweep, recall = _tune(fx, index, M=M, mp=mp, target=target_recall, nq=recall_queries, seed=seed,
                                  fixed=params)
    tune_s = time.perf_counter() - t0
    px, probe_fields = None, None
    if probe_fac is not None:
        px, trained, secs = _build_probe(index, probe_fac, n, seed, say, progress)
        probe_fields = {"factory": probe_fac, "requested": probe, "why": probe_why, "candidates": probe_k,
                        "trained_on": trained, "build_seconds": round(secs, 3)}
    state = {"added": 0}
    graph = _structure(fx).get("hnsw")
    graph_efc = int(graph.hnsw.efConstruction) if graph is not None else None

    def prepare(ix: Index):
        # Under the writer lock: rows appended by others since we read n go in now.
        state["added"] = len(ix) - n
        state["add_s"] = _add_rows(fx, ix, n, len(ix), False)
        if px is not None:
            _add_rows(px, ix, n, len(ix), False)
        fields = {"factory": fac, "requested": factory, "why": why, "metric": "inner_product",
                  "faiss_version": faiss.__version__, "trained_on": train_rows, "sample_seed": seed,
                  "ef_construction": graph_efc,
                  "params": chosen, "recall": None if recall is None else {**recall.as_dict(), "rows": n},
                  "tuning": sweep, "target_recall": target_recall, "built": _utcnow(),
                  "build_seconds": round(time.perf_counter() - t_start, 3), "updates": []}
        if probe_fields is not None:
            fields["probe"] = probe_fields
        state["fields"] = fields
        return _writer(fx, px, fields), fields, len(ix)

    record = index.commit_ann(prepare)
    meta = {**state["fields"], "dim": d}
    return BuildReport(record, meta, train_s, add_s + state["add_s"], tune_s, n + state["added"])


def update(index: Index, *, progress: bool = False) -> BuildReport:
    """Add the rows appended since the ANN was built or last updated (no retraining) and commit
    it again. A fresh ANN is left alone (nothing is written)."""
    if not isinstance(index, Index):
        raise InputError(f"index must be an sgengine Index, got {type(index).__name__}")
    if index.ann is None:
        raise InputError(f"index {index.path} has no ANN to update: build one with sgengine index ann {index.path}")
    state: dict[str, Any] = {}

    def prepare(ix: Index):
        got, meta, start = _caught_up(ix, progress, state)
        if got.probe is not None:
            _add_rows(got.probe, ix, start, len(ix), False)
        fields = {k: v for k, v in meta.items() if k not in _INDEX_FIELDS}
        fields["updates"] = list(fields.get("updates", [])) + [{"from": start, "to": len(ix), "at": _utcnow()}]
        state["fields"] = fields
        return _writer(got.fx, got.probe, fields), fields, len(ix)

    if index.ann_state() == "fresh":
        return BuildReport(index.ann, {**index.ann_meta()}, added=0)
    record = index.commit_ann(prepare)
    return BuildReport(record, {**state["fields"], "dim": index.dim}, add_s=state["add_s"], added=state["added"])


def set_probe(index: Index, probe: str = "auto", *, candidates: int | None = None, seed: int = 0,
              progress: bool = False, log: Callable[[str], None] | None = None) -> BuildReport:
    """Give the index's existing ANN a new probe (probe as in `build`), or remove it ("off"),
    and commit the ANN again; the main index is kept as it is (rows appended meanwhile are added
    to it, as `update` does). No retraining of the main index: minutes, not the hours a 1M graph
    takes."""
    if not isinstance(index, Index):
        raise InputError(f"index must be an sgengine Index, got {type(index).__name__}")
    if index.ann is None:
        raise InputError(f"index {index.path} has no ANN: build one with sgengine index ann {index.path}")
    n, d = len(index), index.dim
    main = index.ann_meta().get("factory", "")
    fac, why = _probe_choice(probe, main, n, d)
    if probe == "auto" and fac is None:
        raise InputError(f"index {index.path}: {why.removeprefix('auto: ')}; give a probe factory to force one")
    k = PROBE_CANDIDATES if candidates is None else check_int(candidates, "probe candidates", 1)
    say = log or (lambda _: None)
    px, fields_probe = None, None
    if fac is not None:
        px, trained, secs = _build_probe(index, fac, n, seed, say, progress)
        fields_probe = {"factory": fac, "requested": probe, "why": why, "candidates": k, "trained_on": trained,
                        "build_seconds": round(secs, 3)}
    state: dict[str, Any] = {}

    def prepare(ix: Index):
        got, meta, _ = _caught_up(ix, False, state)
        if px is not None:
            _add_rows(px, ix, n, len(ix), False)
        fields = {key: v for key, v in meta.items() if key not in _INDEX_FIELDS and key != "probe"}
        if fields_probe is not None:
            fields["probe"] = fields_probe
        state["fields"] = fields
        return _writer(got.fx, px, fields), fields, len(ix)

    record = index.commit_ann(prepare)
    return BuildReport(record, {**state["fields"], "dim": d}, add_s=state["add_s"], added=state["added"])


def drop(index: Index) -> bool:
    """Remove the index's ANN (one commit). False when it had none."""
    if not isinstance(index, Index):
        raise InputError(f"index must be an sgengine Index, got {type(index).__name__}")
    return index.drop_ann()


def info(index: Index) -> dict | None:
    """The ANN as `sgengine index info` shows it (from the sidecar; FAISS is not opened), or None."""
    rec = index.ann
    if rec is None:
        return None
    meta = index.ann_meta()
    state = index.ann_state()
    out = {"state": state if state == "fresh" else f"stale: covers {rec['count']:,} of {len(index):,} rows "
           f"(sgengine index ann {index.path} --update)",
           "factory": rec["factory"], "count": rec["count"], "bytes": rec["bytes"],
           "bytes_per_row": round(rec["bytes"] / rec["count"], 1), "file": rec["file"],
           "params": meta.get("params", {}), "recall_at_build": meta.get("recall"), "built": meta.get("built"),
           "faiss_version": meta.get("faiss_version"), "updates": len(meta.get("updates", []))}
    if meta.get("requested") == "auto":
        out["why"] = meta.get("why")
    if meta.get("probe"):
        pr = meta["probe"]
        out["probe"] = {"factory": pr["factory"], "candidates": pr["candidates"], "bytes": pr["bytes"]}
    return out
