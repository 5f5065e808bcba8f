"""The rerank stage: SuperGlobal reranking (SPEC 6), its reference, its checks and its dispatch.

    rerank_candidates(q [nq, D], Y [nq, M', D], K, beta, impl="auto", mode="faithful") -> (order [nq, M'], scores [nq, M'])
    superglobal_rerank(queries, database, *, M, K, beta, k, impl="auto", mode="faithful") -> (ids [nq, k], scores [nq, k])

Modes (`MODES`): "faithful" is SPEC 6 exactly, the default. "adaptive" (docs/adaptive_rerank.md)
lets a neighbour into a candidate's refined descriptor only when it is at least as similar to the
candidate as the query is, and a candidate into the expansion only when the query ranks among its
`ADAPTIVE_RANK` nearest other candidates, and the expansion's members keep their first-stage order
among themselves (`keep_expansion_order`); with neither, a candidate keeps its first-stage score.
Every implementation runs both (`adaptive=` on the functions below).

Implementations (`IMPLS`; the same names in `Engine.describe()`, the benchmark providers and the
functions), all with the contract of `rerank_reference`:

| name        | function                                          | runs on                              |
|-------------|---------------------------------------------------|--------------------------------------|
| `reference` | `rerank_reference` (below)                        | any device: SPEC 6 step by step      |
| `cpu_fp32`  | `sgengine.kernels.rerank_cpu.rerank_cpu_fp32`     | any device (tuned for the CPU)       |
| `cpu_bf16`  | `sgengine.kernels.rerank_cpu.rerank_cpu_bf16`     | CPU with AVX512_BF16, C++ built      |
| `triton`    | `sgengine.kernels.rerank_triton.rerank_triton`    | CUDA (CPU under TRITON_INTERPRET=1)  |

cpu_bf16 gives the float32 selection too: a bfloat16 Gram with a rigorous error bound only rules
columns out, and the columns left get exact dots (kernels/rerank_cpu.py holds the argument).
"auto" (`resolve_impl`) takes triton on CUDA, cpu_bf16 on a CPU that runs it when M' >= 128
(below, the Gram is too small for the halved product to pay for the extra passes), else cpu_fp32.

`rerank_loop_chain` is the loop-per-query transcription with full sorts, in any dtype (float64
for tests): the yardstick the tests compare against and the "chain" the benchmarks time.

The public entries check their inputs once; everything they call trusts them. All rerank outputs:
`order` [nq, M'] int64 indexes the candidate axis of Y (best first), `scores` [nq, M'] float32 are
the final scores f in that order.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ._checks import check_choice, check_int, check_real, check_tensor
from .cublas import ieee_if_cuda
from .errors import BackendUnavailableError, InputError

__all__ = [
    "IMPLS",
    "MODES",
    "ADAPTIVE_RANK",
    "keep_expansion_order",
    "check_mode",
    "rerank_setting",
    "resolve_impl",
    "rerank_candidates",
    "rerank_reference",
    "rerank_loop_chain",
    "merge_reranked",
    "check_reranked",
    "superglobal_rerank",
]

# Working set per query chunk of the reference (Gram plus a few [M', D] buffers). 256 MiB keeps
# each bmm large while M' = 1600 still fits several queries per chunk.
_WORK_BYTES = 256 << 20


MODES = ("faithful", "adaptive")
# Adaptive mode: a candidate y_j is "likely relevant" (may join the expansion) when the query is at
# least as similar to it as its ADAPTIVE_RANK-th nearest other candidate: q . y_j >= G[j, n_jr] with
# r = min(ADAPTIVE_RANK, K' - 1) (slot 0 is the row itself). Derived and measured in
# docs/adaptive_rerank.md.
ADAPTIVE_RANK = 3


def keep_expansion_order(f: torch.Tensor, pos: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """The adaptive mode's step F (docs/adaptive_rerank.md): the expansion's members keep their
    first-stage order among themselves. f [b, M'] final scores; pos [b, K'] positions of the K'
    best by s1 (any order); member [b, K'] bool, the ones that joined the expansion. Returns f with
    the members' values sorted descending and handed out to the members in ascending position
    (first-stage order); other entries unchanged."""
    big = torch.iinfo(torch.int64).max
    p_sorted = torch.sort(torch.where(member, pos.to(torch.int64), big), dim=1).values
    vals = torch.where(member, torch.gather(f, 1, pos.to(torch.int64)), float("-inf"))
    v_sorted = torch.sort(vals, dim=1, descending=True).values
    valid = p_sorted != big
    out = f.clone()
    rows = torch.arange(f.shape[0], device=f.device)[:, None].expand_as(p_sorted)
    out[rows[valid], p_sorted[valid]] = v_sorted[valid]
    return out


def check_mode(mode) -> bool:
    """True for "adaptive", False for "faithful"; InputError naming the allowed modes otherwise."""
    return check_choice(mode, "rerank mode", MODES) == "adaptive"


def rerank_setting(value) -> tuple[bool, bool]:
    """A search's `rerank=` as (rerank, adaptive): True or "faithful" -> (True, False), "adaptive"
    -> (True, True), False -> (False, False); InputError for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value), False
    if isinstance(value, str) and value in MODES:
        return True, value == "adaptive"
    raise InputError(f"rerank must be True or False, or a mode in {MODES}, got {value!r}")


def _query_chunk(M: int, D: int, budget: int = _WORK_BYTES) -> int:
    per_query = 4 * (M * M + 3 * M * D)
    return max(1, budget // per_query)


# ----------------------------------------------------------------------------- reference
@torch.no_grad()
def rerank_reference(q: torch.Tensor, Y: torch.Tensor, K: int = 9, beta: float = 0.15, adaptive: bool = False
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 6 steps 2-8 in plain PyTorch (adaptive: the mode of docs/adaptive_rerank.md). q [nq, D]
    f32, Y [nq, M', D] f32 (candidates in first-stage order) -> (order [nq, M'] int64, scores
    [nq, M'] f32). Trusts its inputs: `rerank_candidates` checks them once."""
    nq, M, D = Y.shape
    Kp = min(K + 1, M)  # K' = min(K + 1, M')
    order = torch.empty(nq, M, dtype=torch.int64, device=Y.device)
    scores = torch.empty(nq, M, dtype=torch.float32, device=Y.device)
    step = _query_chunk(M, D)
    with ieee_if_cuda(Y):  # float32 products: no TF32, whatever the process flags
        for a in range(0, nq, step):
            _reference_chunk(q[a:a + step], Y[a:a + step], Kp, beta, adaptive, order[a:a + step], scores[a:a + step])
    return order, scores


def _reference_chunk(qb: torch.Tensor, Yb: torch.Tensor, Kp: int, beta: float, adaptive: bool, order: torch.Tensor,
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
    if adaptive:
        # First-stage scores d_i = q . y_i; a neighbour counts only when G[i, n] >= d_i.
        d = torch.bmm(Yb, qb[:, :, None]).squeeze(2)  # [b, M]
        w[..., 1:] = torch.where(v[..., 1:] >= d[:, :, None], w[..., 1:], 0.0)
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
    if not adaptive:
        qe = Yr[batch, o].amax(dim=1)  # [b, D]
        # 7. Second score.
        s2 = torch.bmm(Yr, qe[:, :, None]).squeeze(2)
    else:
        # Only the likely relevant among the K' best; none at all: s2 = s1.
        likely = d >= v[..., min(ADAPTIVE_RANK, Kp - 1)]  # [b, M]
        member = torch.gather(likely, 1, o)  # [b, K']
        qe = Yr[batch, o].masked_fill(~member[:, :, None], float("-inf")).amax(dim=1)
        has = member.any(dim=1)
        qe = torch.where(has[:, None], qe, 0.0)
        s2 = torch.where(has[:, None], torch.bmm(Yr, qe[:, :, None]).squeeze(2), s1)
    # 8. Final score and order.
    f = (s1 + s2) / 2
    if adaptive:
        f = keep_expansion_order(f, o, member)
    fs, idx = torch.sort(f, dim=1, descending=True)
    order[:], scores[:] = idx, fs


# ----------------------------------------------------------------------------- loop chain
@torch.no_grad()
def rerank_loop_chain(q, Y, K: int = 9, beta: float = 0.15, *, dtype: torch.dtype = torch.float64,
                      adaptive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 6 transcribed one query at a time with full sorts, computed in `dtype` (adaptive: the
    mode of docs/adaptive_rerank.md, transcribed from its prose).

    The yardstick for tests (float64) and the "chain" the benchmark times: what a straight
    port of the reference does, query by query, sorting every Gram row in full. Same contract
    as `rerank_reference`; scores come back in `dtype`.
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
        vals = torch.gather(G, 1, nbr)
        w = beta * vals
        w[:, 0] = 1.0  # slot 0 assumed to be the row itself
        d = y @ qi
        if adaptive:  # a neighbour less similar to its row than the query is weighs 0
            w[:, 1:] = torch.where(vals[:, 1:] < d[:, None], 0.0, w[:, 1:])
        yr = torch.zeros_like(y)
        for j in range(Kp):
            yr += w[:, j:j + 1] * y[nbr[:, j]]
        yr /= w.sum(dim=1, keepdim=True)  # not re-normalized
        s1 = yr @ qi
        top = torch.argsort(s1, descending=True)[:Kp]
        if adaptive:
            r = min(ADAPTIVE_RANK, Kp - 1)
            top = [int(t) for t in top if d[t] >= vals[t, r]]  # the likely relevant only
        if len(top):
            qe = yr[top].max(dim=0).values  # elementwise max, q excluded, not normalized
            s2 = yr @ qe
        else:
            s2 = s1
        f = (s1 + s2) / 2
        if adaptive and len(top) > 1:  # the members keep their first-stage order among themselves
            ranked = sorted((float(f[t]) for t in top), reverse=True)
            f = f.clone()
            for t, val in zip(sorted(top), ranked):
                f[t] = val
        o = torch.argsort(f, descending=True)
        order[i], scores[i] = o, f[o]
    return order, scores


# ----------------------------------------------------------------------------- dispatch
# Every implementation: fn(q, Y, K, beta, adaptive=False) -> (order, scores).
RerankFn = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def _cpu_fp32(q, Y, K, beta, adaptive=False):
    from .kernels.rerank_cpu import rerank_cpu_fp32
    return rerank_cpu_fp32(q, Y, K, beta, adaptive)


def _cpu_bf16(q, Y, K, beta, adaptive=False):
    from .kernels.rerank_cpu import rerank_cpu_bf16
    return rerank_cpu_bf16(q, Y, K, beta, adaptive)


def _triton(q, Y, K, beta, adaptive=False):
    from .kernels.rerank_triton import rerank_triton
    return rerank_triton(q, Y, K, beta, adaptive=adaptive)


IMPLS: dict[str, RerankFn] = {
    "reference": rerank_reference,
    "cpu_fp32": _cpu_fp32,
    "cpu_bf16": _cpu_bf16,
    "triton": _triton,
}


def _why_not(impl: str, device: torch.device) -> str | None:
    """Why `impl` cannot run on tensors on `device`, or None when it can."""
    if impl == "cpu_bf16":
        if device.type != "cpu":
            return f"it runs on CPU tensors, not {device}; use 'cpu_fp32' or 'auto'"
        from .kernels.rerank_cpu import certified_available, certified_info
        if not certified_available():
            info = certified_info()
            why = info["error"] or "this CPU has no AVX512_BF16 instructions"
            return f"it needs the C++ kernel sgengine.kernels._rerank_cpu and AVX512_BF16 ({why}); use 'cpu_fp32'"
    if impl == "triton":
        try:
            from .kernels import rerank_triton
        except Exception as e:  # ImportError, or triton failing to initialise
            return f"sgengine.kernels.rerank_triton does not import here ({type(e).__name__}: {e}); use 'cpu_fp32'"
        if device.type != "cuda" and not rerank_triton.interpreting():
            return (f"the Triton rerank runs on CUDA tensors, not {device} (CPU only under TRITON_INTERPRET=1, "
                    f"for tests)")
    return None


def resolve_impl(impl: str, device: torch.device | str, M: int) -> str:
    """The implementation `impl` stands for with M' candidates on `device` ("auto": triton on CUDA
    where it imports; on the CPU cpu_bf16 where it runs and M' >= CERT_MIN_M, else cpu_fp32).
    BackendUnavailableError when an explicit impl cannot run there."""
    check_choice(impl, "rerank impl", ("auto", *IMPLS))
    device = torch.device(device)
    if impl == "auto":
        if device.type == "cuda":
            return "triton" if _why_not("triton", device) is None else "cpu_fp32"
        from .kernels.rerank_cpu import CERT_MIN_M
        return "cpu_bf16" if M >= CERT_MIN_M and _why_not("cpu_bf16", device) is None else "cpu_fp32"
    why = _why_not(impl, device)
    if why is not None:
        raise BackendUnavailableError(f"rerank impl={impl!r} cannot run on {device}: {why}")
    if impl == "triton":
        from .kernels.rerank_triton import MAX_CANDIDATES
        if M > MAX_CANDIDATES:
            raise InputError(f"M'={M} candidates; the Triton rerank takes at most {MAX_CANDIDATES} "
                             f"(rerank fewer, or use impl='reference')")
    return impl


def check_reranked(scores: torch.Tensor, what: str) -> None:
    """InputError when a final score is not finite. Any NaN/inf in a candidate row reaches that
    row's own score (G[i, i] is non-finite, and slot 0, weight 1, brings Y_i into Y'_i), so
    checking the [nq, M'] output is an exact test of the candidates at a fraction of a pass."""
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise InputError(f"{what} contain NaN or inf (first seen at query {i}): descriptors must be finite")


@torch.no_grad()
def rerank_candidates(q: torch.Tensor, Y: torch.Tensor, K: int = 9, beta: float = 0.15,
                      impl: str = "auto", mode: str = "faithful") -> tuple[torch.Tensor, torch.Tensor]:
    """SuperGlobal rerank of given candidates (SPEC 6 steps 2-8).

    q: [nq, D] query descriptors; Y: [nq, M', D] each query's candidates in first-stage order
    (floating; computed in float32, on Y's device). K >= 0 neighbours (K' = min(K + 1, M')),
    beta: neighbour weight. impl: "auto" or a name in IMPLS (see `resolve_impl`). mode:
    "faithful" (SPEC 6) or "adaptive" (docs/adaptive_rerank.md).
    Returns (order [nq, M'] int64 into Y's candidate axis, best first; scores [nq, M'] float32
    final scores f in that order). Equal scores come in unspecified order (SPEC 6, ties).
    """
    check_tensor(q, "q (queries)", 2, "[nq, D]")
    check_tensor(Y, "Y (candidates)", 3, "[nq, M', D]")
    if q.shape[0] != Y.shape[0] or q.shape[1] != Y.shape[2]:
        raise InputError(f"q has shape {list(q.shape)} but Y has {list(Y.shape)}: expected q [nq, D], Y [nq, M', D]")
    if Y.shape[1] == 0:
        raise InputError("Y has no candidates (M' = 0)")
    K = check_int(K, "K", 0)
    beta = check_real(beta, "beta")
    adaptive = check_mode(mode)
    nq, M = Y.shape[0], Y.shape[1]
    fn = IMPLS[resolve_impl(impl, Y.device, M)]
    if nq == 0:
        return (torch.empty(0, M, dtype=torch.int64, device=Y.device),
                torch.empty(0, M, dtype=torch.float32, device=Y.device))
    q = q.to(device=Y.device, dtype=torch.float32).contiguous()
    Y = Y.to(torch.float32).contiguous()
    if not bool(torch.isfinite(q).all()):
        raise InputError("q (queries) contain NaN or inf: descriptors must be finite")
    order, scores = fn(q, Y, K, beta, adaptive)
    check_reranked(scores, "Y (candidate descriptors)")
    return order, scores


def merge_reranked(rows: torch.Tensor, first_scores: torch.Tensor, m: int, order: torch.Tensor,
                   f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 6.8: the first m columns of a first-stage result (rows, first_scores [nq, k']) in the
    rerank's final order with their final scores f, then every later column in first-stage order
    with its first-stage score. Trusts its inputs."""
    top = rows[:, :m]
    ids = torch.cat([torch.gather(top, 1, order.to(top.device)), rows[:, m:]], dim=1)
    scores = torch.cat([f.to(first_scores.device), first_scores[:, m:].to(torch.float32)], dim=1)
    return ids, scores


# ----------------------------------------------------------------------------- full search
@torch.no_grad()
def superglobal_rerank(queries, database, *, M: int = 400, K: int = 9, beta: float = 0.15,
                       k: int | None = None, impl: str = "auto", mode: str = "faithful"):
    """First-stage exact top-M' by q.X, SuperGlobal rerank, final ranking (SPEC 5-6).

    queries: [nq, D] numpy array or tensor; database: [N, D] numpy array (memmap used in place)
    or tensor, float32 or float16; computed in float32 on the queries' device. Numpy queries
    give numpy outputs, tensor queries give tensors (on the queries' device).
    M >= 1 candidates (M' = min(M, N)), K >= 0, beta finite, impl and mode as in `rerank_candidates`.
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
    from .search import check_queries_and_database, exact
    as_numpy = isinstance(queries, np.ndarray)
    q, db = check_queries_and_database(queries, database)
    N, D = db.shape
    if N == 0:
        raise InputError("database is empty: nothing to rank")
    M = check_int(M, "M", 1)
    K = check_int(K, "K", 0)
    beta = check_real(beta, "beta")
    adaptive = check_mode(mode)
    if k is not None:
        k = check_int(k, "k", 1)
        if k > N:
            raise InputError(f"k={k} is larger than the database (N={N} rows): ask for k <= {N} or k=None")
    kk = N if k is None else k
    device = q.device
    Mp = min(M, N)
    fn = IMPLS[resolve_impl(impl, device, Mp)]
    q = q.to(torch.float32)
    if not bool(torch.isfinite(q).all()):
        raise InputError("queries contain NaN or inf: descriptors must be finite")
    nq = q.shape[0]

    def out(ids: torch.Tensor, sc: torch.Tensor):
        return (ids.cpu().numpy(), sc.cpu().numpy()) if as_numpy else (ids, sc)

    if nq == 0:
        return out(torch.empty(0, kk, dtype=torch.int64, device=device),
                   torch.empty(0, kk, dtype=torch.float32, device=device))

    first_s, rows = exact.exact_topk(q, db, max(kk, Mp), None, exact.resolve_impl("auto", device, db.dtype))
    bad = ~torch.isfinite(first_s)
    if bool(bad.any()):
        i, j = (int(t) for t in torch.nonzero(bad)[0])
        raise InputError(f"database row {int(rows[i, j])} contains NaN or inf (its similarity to query {i} "
                         f"is {float(first_s[i, j])}): descriptors must be finite")
    # Only the candidates (nq * M' rows), never the database: a CPU/memmap database with CUDA
    # queries moves just these rows.
    top = rows[:, :Mp]
    Y = db.index_select(0, top.reshape(-1).to(db.device)).to(device=device, dtype=torch.float32).view(nq, Mp, D)
    order, f = fn(q.contiguous(), Y, K, beta, adaptive)
    check_reranked(f, "database rows among the candidates")
    ids, scores = merge_reranked(rows, first_s, Mp, order, f)
    return out(ids[:, :kk].to(torch.int64), scores[:, :kk].to(torch.float32))
