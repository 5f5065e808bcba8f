"""SuperGlobal reranking (SPEC 6).

Three layers, each swappable by one argument:

- `rerank_candidates_reference(q, Y, K, beta)`: plain PyTorch, step by step as SPEC 6 reads,
  batched over queries (the query axis is chunked to bound memory, never looped one by one).
- `rerank_candidates(q, Y, K, beta, impl)`: validates once and dispatches to the Triton kernel
  (CUDA), the CPU fast path (`sgengine.kernels.rerank_cpu`) or the reference. The CPU fast path
  finds the neighbours one of two ways, both giving the float32 selection: "cpu_fp32" (float32
  Gram, torch.topk) or "cpu_bf16" (a bfloat16 Gram with a rigorous error bound only rules
  columns out; the candidates left get exact float32 dots). "cpu" takes "cpu_bf16" where the
  CPU has bfloat16 dot-product instructions and M' is large enough; `cpu_path` says which.
- `superglobal_rerank(queries, database, M, K, beta, k, impl)`: first-stage exact top-M
  (`sgengine.search.topk_similarity`), gather, rerank, and the final id list.

`rerank_loop_chain` is the loop-per-query transcription with full sorts, in any dtype
(float64 for tests): the yardstick the tests compare against and the "chain" the benchmark
times.

All rerank outputs: `order` [nq, M'] int64 indexes the candidate axis of Y (best first),
`scores` [nq, M'] float32 are the final scores f in that order.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .cublas import ieee_if_cuda
from .errors import BackendUnavailableError, InputError

__all__ = [
    "IMPLS",
    "cpu_path",
    "rerank_candidates",
    "rerank_candidates_reference",
    "rerank_loop_chain",
    "superglobal_rerank",
]

IMPLS = ("auto", "triton", "cpu", "cpu_fp32", "cpu_bf16", "reference")

# Working set per query chunk of the reference (Gram plus a few [M', D] buffers). 256 MiB keeps
# each bmm large while M' = 1600 still fits several queries per chunk.
_WORK_BYTES = 256 << 20


def _query_chunk(M: int, D: int, budget: int = _WORK_BYTES) -> int:
    per_query = 4 * (M * M + 3 * M * D)
    return max(1, budget // per_query)


# ----------------------------------------------------------------------------- reference
@torch.no_grad()
def rerank_candidates_reference(q: torch.Tensor, Y: torch.Tensor, K: int = 9, beta: float = 0.15
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 6 steps 2-8 in plain PyTorch. q [nq, D] f32, Y [nq, M', D] f32 (candidates in
    first-stage order) -> (order [nq, M'] int64, scores [nq, M'] f32). No input validation:
    `rerank_candidates` does that once."""
    nq, M, D = Y.shape
    Kp = min(K + 1, M)  # K' = min(K + 1, M')
    order = torch.empty(nq, M, dtype=torch.int64, device=Y.device)
    scores = torch.empty(nq, M, dtype=torch.float32, device=Y.device)
    step = _query_chunk(M, D)
    with ieee_if_cuda(Y):  # float32 products: no TF32, whatever the process flags
        for a in range(0, nq, step):
            _reference_chunk(q[a:a + step], Y[a:a + step], Kp, beta, order[a:a + step], scores[a:a + step])
    return order, scores


def _reference_chunk(qb: torch.Tensor, Yb: torch.Tensor, Kp: int, beta: float, order: torch.Tensor,
                     scores: torch.Tensor) -> None:
    b = Yb.shape[0]
    batch = torch.arange(b, device=Yb.device)[:, None]
    # 2. Gram of the candidates.
    G = torch.bmm(Yb, Yb.transpose(1, 2))  # [b, M, M]
    # 3. K' largest per row, descending. Slot 0 is *assumed* to be the row itself; its weight
    # is forced to 1 even when an exact duplicate took the slot (SPEC quirk, kept).
    v, n = torch.topk(G, Kp, dim=2, largest=True, sorted=True)  # [b, M, K']
    w = beta * v
    w[..., 0] = 1.0
    # 4. Weighted mean of the neighbours. Not re-normalized (SPEC quirk, kept).
    Yr = torch.zeros_like(Yb)
    for j in range(Kp):  # loop over neighbour slots (K' <= K+1), not over queries
        Yr += w[..., j:j + 1] * Yb[batch, n[..., j]]
    Yr /= w.sum(dim=2, keepdim=True)
    # 5. First score against the refined candidates.
    s1 = torch.bmm(Yr, qb[:, :, None]).squeeze(2)  # [b, M]
    # 6. Expansion: elementwise max of the K' best refined rows by s1. q itself is not part
    # of it, and it is not normalized (SPEC quirks, kept).
    o = torch.argsort(s1, dim=1, descending=True)[:, :Kp]
    qe = Yr[batch, o].amax(dim=1)  # [b, D]
    # 7. Second score.
    s2 = torch.bmm(Yr, qe[:, :, None]).squeeze(2)
    # 8. Final score and order.
    f = (s1 + s2) / 2
    fs, idx = torch.sort(f, dim=1, descending=True)
    order[:], scores[:] = idx, fs


# ----------------------------------------------------------------------------- loop chain
@torch.no_grad()
def rerank_loop_chain(q, Y, K: int = 9, beta: float = 0.15, *, dtype: torch.dtype = torch.float64
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 6 transcribed one query at a time with full sorts, computed in `dtype`.

    The yardstick for tests (float64) and the "chain" the benchmark times: what a straight
    port of the reference does, query by query, sorting every Gram row in full. Same contract
    as `rerank_candidates_reference`; scores come back in `dtype`.
    """
    q = torch.as_tensor(q)
    Y = torch.as_tensor(Y)
    nq, M, D = Y.shape
    Kp = min(K + 1, M)
    order = torch.empty(nq, M, dtype=torch.int64, device=Y.device)
    scores = torch.empty(nq, M, dtype=dtype, device=Y.device)
    for i in range(nq):
        y = Y[i].to(dtype)
        qi = q[i].to(dtype)
        G = y @ y.T
        ranks = torch.argsort(G, dim=1, descending=True)  # full sort of every row
        nbr = ranks[:, :Kp]
        w = beta * torch.gather(G, 1, nbr)
        w[:, 0] = 1.0  # slot 0 assumed to be the row itself
        yr = torch.zeros_like(y)
        for j in range(Kp):
            yr += w[:, j:j + 1] * y[nbr[:, j]]
        yr /= w.sum(dim=1, keepdim=True)  # not re-normalized
        s1 = yr @ qi
        top = torch.argsort(s1, descending=True)[:Kp]
        qe = yr[top].max(dim=0).values  # elementwise max, q excluded, not normalized
        f = (s1 + yr @ qe) / 2
        o = torch.argsort(f, descending=True)
        order[i], scores[i] = o, f[o]
    return order, scores


# ----------------------------------------------------------------------------- dispatch
def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_beta(beta) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise InputError(f"beta must be a real number, got {beta!r}") from None
    if not math.isfinite(b):
        raise InputError(f"beta must be finite, got {beta!r}")
    return b


def _triton_available() -> bool:
    try:
        from .kernels import rerank_triton  # noqa: F401
    except Exception:  # ImportError, or triton failing to initialise
        return False
    return True


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """The implementation `impl` stands for on `device` ("auto": Triton on CUDA when it imports, else cpu).
    "cpu_bf16" raises BackendUnavailableError where it cannot run (not a CPU device, or the C++
    kernel is not built); `cpu_path` says what "cpu" runs."""
    if impl not in IMPLS:
        raise InputError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if torch.device(device).type == "cuda" and _triton_available() else "cpu"
    if impl == "cpu_bf16":
        from .kernels.rerank_cpu import certified_info
        info = certified_info()
        if torch.device(device).type != "cpu":
            raise BackendUnavailableError(f"impl='cpu_bf16' runs on CPU tensors, not {device}; use impl='cpu'")
        if not info["available"]:
            raise BackendUnavailableError(f"impl='cpu_bf16' needs the C++ kernel sgengine.kernels._rerank_cpu, "
                                          f"which does not import here ({info['error']}); use impl='cpu_fp32'")
    return impl


def cpu_path(device: torch.device | str = "cpu", M: int = 400) -> str:
    """What impl="cpu" runs for M' candidates on `device`: "cpu_bf16" (bfloat16 Gram, certified
    float32 selection) on a CPU with bfloat16 dot-product instructions (AVX512_BF16 or AMX), the
    C++ kernel built and M' >= 128; else "cpu_fp32" (float32 Gram). Both give the float32
    selection; "cpu_bf16" measured 2.2x faster at M' = 400 (issue 3)."""
    from .kernels.rerank_cpu import certified_path
    return "cpu_bf16" if certified_path(device, M) else "cpu_fp32"


def _run(q: torch.Tensor, Y: torch.Tensor, K: int, beta: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = resolve_impl(impl, Y.device)
    if impl == "reference":
        return rerank_candidates_reference(q, Y, K, beta)
    if impl in ("cpu", "cpu_fp32", "cpu_bf16"):
        from .kernels.rerank_cpu import rerank_candidates_cpu
        select = {"cpu": "auto", "cpu_fp32": "exact", "cpu_bf16": "certified"}[impl]
        return rerank_candidates_cpu(q, Y, K, beta, select=select)
    try:
        from .kernels.rerank_triton import rerank_candidates_triton
    except Exception as e:
        raise BackendUnavailableError(f"impl='triton' asked for, but sgengine.kernels.rerank_triton "
                                      f"does not import here ({type(e).__name__}: {e}); use impl='cpu'") from e
    return rerank_candidates_triton(q, Y, K, beta)


def _check_output(scores: torch.Tensor, what: str) -> None:
    # Any NaN/inf in a candidate row reaches that row's own score: G[i, i] is non-finite, and
    # slot 0 (weight 1) brings Y_i into Y'_i, so s1_i is non-finite. Checking the [nq, M']
    # output is therefore an exact test of the inputs at a fraction of a pass over Y.
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        i, j = (int(t) for t in torch.nonzero(bad)[0])
        raise InputError(f"{what} contain NaN or inf (first seen at query {i}): "
                         f"descriptors must be finite")


@torch.no_grad()
def rerank_candidates(q: torch.Tensor, Y: torch.Tensor, K: int = 9, beta: float = 0.15,
                      impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """SuperGlobal rerank of given candidates (SPEC 6 steps 2-8).

    q: [nq, D] query descriptors; Y: [nq, M', D] each query's candidates in first-stage order
    (floating; computed in float32, on Y's device). K >= 0 neighbours (K' = min(K + 1, M')),
    beta: neighbour weight. impl: "auto" (Triton when Y is on CUDA and it imports, else the
    CPU fast path, which is device-agnostic torch), "triton", "cpu" (picks "cpu_bf16" or
    "cpu_fp32", see `cpu_path`), "cpu_fp32", "cpu_bf16" (CPU only) or "reference".
    Returns (order [nq, M'] int64 into Y's candidate axis, best first; scores [nq, M'] float32
    final scores f in that order). Equal scores come in unspecified order (SPEC 6, ties).
    """
    if not isinstance(q, torch.Tensor) or not isinstance(Y, torch.Tensor):
        bad = "q" if not isinstance(q, torch.Tensor) else "Y"
        raise InputError(f"{bad} must be a torch.Tensor, got {type(q if bad == 'q' else Y).__name__}")
    if Y.ndim != 3:
        raise InputError(f"Y (candidates) must be 3-D [nq, M', D], got shape {list(Y.shape)}")
    if q.ndim != 2:
        raise InputError(f"q (queries) must be 2-D [nq, D], got shape {list(q.shape)}")
    if q.shape[0] != Y.shape[0] or q.shape[1] != Y.shape[2]:
        raise InputError(f"q has shape {list(q.shape)} but Y has {list(Y.shape)}: expected q [nq, D], Y [nq, M', D]")
    if not q.is_floating_point() or not Y.is_floating_point():
        raise InputError(f"q and Y must be floating point, got {q.dtype} and {Y.dtype}")
    if Y.shape[1] == 0:
        raise InputError("Y has no candidates (M' = 0)")
    K = _check_int(K, "K", 0)
    beta = _check_beta(beta)
    impl = resolve_impl(impl, Y.device)
    nq, M = Y.shape[0], Y.shape[1]
    if nq == 0:
        return (torch.empty(0, M, dtype=torch.int64, device=Y.device),
                torch.empty(0, M, dtype=torch.float32, device=Y.device))
    q = q.to(device=Y.device, dtype=torch.float32).contiguous()
    Y = Y.to(torch.float32).contiguous()
    if not bool(torch.isfinite(q).all()):
        raise InputError("q (queries) contain NaN or inf: descriptors must be finite")
    order, scores = _run(q, Y, K, beta, impl)
    _check_output(scores, "Y (candidate descriptors)")
    return order, scores


# ----------------------------------------------------------------------------- full search
@torch.no_grad()
def superglobal_rerank(queries, database, *, M: int = 400, K: int = 9, beta: float = 0.15,
                       k: int | None = None, impl: str = "auto"):
    """First-stage exact top-M' by q.X, SuperGlobal rerank, final ranking (SPEC 5-6).

    queries: [nq, D] numpy array or tensor; database: [N, D] numpy array (memmap used in place)
    or tensor, float32 or float16; computed in float32 on the queries' device. Numpy queries
    give numpy outputs, tensor queries give tensors (on the queries' device).
    M >= 1 candidates (M' = min(M, N)), K >= 0, beta finite, impl as in `rerank_candidates`.
    k: how many to return, 1 <= k <= N; None returns all N.
    Returns (ids [nq, k] int64 database rows, scores [nq, k] float32): the M' reranked
    candidates in final order with their final scores f = (s1 + s2) / 2, then every item
    beyond M' in first-stage order with its first-stage similarity q.x. The two kinds of score
    are not on one scale, so the scores are descending within each part, not across the seam.

    Validation is one cheap pass: queries are checked for NaN/inf; a non-finite database row
    makes its similarity NaN or +-inf, and NaN/+inf rank first, so checking the returned
    first-stage scores and the reranked scores catches every bad row that could reach the
    output (a row scoring -inf for every query is never returned and is not reported).
    """
    as_numpy = isinstance(queries, np.ndarray)
    from .search import check_queries_and_database, topk_similarity
    q, db = check_queries_and_database(queries, database)
    N, D = db.shape
    if N == 0:
        raise InputError("database is empty: nothing to rank")
    M = _check_int(M, "M", 1)
    K = _check_int(K, "K", 0)
    beta = _check_beta(beta)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise InputError(f"k must be an integer or None, got {k!r}")
        if k <= 0:
            raise InputError(f"k must be >= 1 (or None for all), got k={k}")
        if k > N:
            raise InputError(f"k={k} is larger than the database (N={N} rows): ask for k <= {N} or k=None")
    kk = N if k is None else int(k)
    device = q.device
    impl = resolve_impl(impl, device)
    q = q.to(torch.float32)
    if not bool(torch.isfinite(q).all()):
        raise InputError("queries contain NaN or inf: descriptors must be finite")
    nq = q.shape[0]
    Mp = min(M, N)

    def out(ids: torch.Tensor, sc: torch.Tensor):
        return (ids.cpu().numpy(), sc.cpu().numpy()) if as_numpy else (ids, sc)

    if nq == 0:
        return out(torch.empty(0, kk, dtype=torch.int64, device=device),
                   torch.empty(0, kk, dtype=torch.float32, device=device))

    first_s, rows = topk_similarity(q, db, max(kk, Mp))
    bad = ~torch.isfinite(first_s)
    if bool(bad.any()):
        i, j = (int(t) for t in torch.nonzero(bad)[0])
        raise InputError(f"database row {int(rows[i, j])} contains NaN or inf (its similarity to query {i} "
                         f"is {float(first_s[i, j])}): descriptors must be finite")
    def gather(top: torch.Tensor) -> torch.Tensor:
        # Only the candidates (nq * M' rows), never the database; a CPU/memmap database with
        # CUDA queries moves just these rows.
        Y = db.index_select(0, top.reshape(-1).to(db.device)).to(device=device, dtype=torch.float32)
        return Y.view(nq, Mp, D)

    ids, scores = rerank_first_stage(q, first_s, rows, gather, Mp, K, beta, impl)
    return out(ids[:, :kk].to(torch.int64), scores[:, :kk].to(torch.float32))


def rerank_first_stage(q: torch.Tensor, first_scores: torch.Tensor, rows: torch.Tensor, gather, m: int, K: int,
                       beta: float, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rerank the first m columns of a first-stage result (SPEC 6.8): the m candidates in final
    order with their final scores, then every later column in first-stage order with its
    first-stage score. `gather(top [nq, m] rows) -> Y [nq, m, D]` float32 on q's device.
    impl: a name (see rerank_candidates) or a callable (q, Y, K, beta) -> (order, scores).
    The one place the engine and superglobal_rerank turn a first stage into a final ranking."""
    top = rows[:, :m]
    Y = gather(top)
    # impl may be a callable (q, Y, K, beta) -> (order, f): the engine's CUDA-graph replay of the
    # Triton rerank, which must skip the host-side checks that a capture cannot contain.
    order, f = impl(q, Y, K, beta) if callable(impl) else _run(q, Y, K, beta, impl)
    _check_output(f, "database rows among the candidates")
    ids = torch.cat([torch.gather(top, 1, order.to(top.device)), rows[:, m:]], dim=1)
    scores = torch.cat([f.to(first_scores.device), first_scores[:, m:].to(torch.float32)], dim=1)
    return ids, scores
