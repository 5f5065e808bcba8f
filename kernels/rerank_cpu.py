"""The SuperGlobal rerank on the CPU (SPEC 6), with the contract of `sgengine.rerank.rerank_reference`:

    rerank_cpu_fp32(q [nq, D], Y [nq, M', D], K, beta, adaptive=False) -> (order [nq, M'] int64, scores [nq, M'] float32)
    rerank_cpu_bf16(q, Y, K, beta, adaptive=False)      -> the same, through the certified C++ path
    certified_rerank(q, Y, K, beta, adaptive=False)     -> (order, scores, stats: dict)
    certified_available(), certified_info()             -> whether (and how) the certified path runs here

Both kernels trust their input (`sgengine.rerank.rerank_candidates` checks it once: q [nq, D] and
Y [nq, M', D] float32, contiguous, on one device; K >= 0; beta finite). adaptive=True runs the
adaptive mode (docs/adaptive_rerank.md): it needs only d, the neighbours' values and the top-K' by
s1, which both paths already have, so it changes the weights and the expansion set and nothing
else (the neighbour selection, and so the certification, are the faithful mode's).

The only O(M'^2 D) work is the Gram product; everything else is rearranged so that no [M', D]
refined matrix is ever built:

    Y'_i = sum_j w_ij Y[n_ij] / W_i              (W_i = sum_j w_ij)
    s1_i = q . Y'_i  = sum_j w_ij (q . Y[n_ij]) / W_i
    s2_i = q'. Y'_i  = sum_j w_ij (q'. Y[n_ij]) / W_i

so s1 needs only d = Y q (one [M', D] matrix-vector product) gathered at the neighbour indices,
and s2 only e = Y q'. The expansion q' needs the refined rows of the K' best candidates alone:
K' x K' gathered rows. Per query that is one Gram product, one top-K' over its rows, two
matrix-vector products and O(M' K' + K'^2 D) gathers. The results equal the reference up to float
reassociation; where that reorders near-equal scores, compare tie-aware.

Two ways to get the neighbours (step 3):

- cpu_fp32: the float32 Gram (upper block triangle from M' >= SYM_MIN_M, mirrored) and
  torch.topk, then the steps above in torch. Plain torch, so it also runs on CUDA.
- cpu_bf16: a bfloat16 Gram, about 2x faster than float32 with AVX512_BF16, used only to
  *exclude* columns: a rigorous bound on its error says which columns cannot be among a row's
  exact top K', and the rest (the candidates, ~2 K' per row on clustered data, ~1.4 K' dots once
  pairs both rows hold are shared) get exact float32 dots, of which the top K' are kept. Where
  float32 dots cannot order two candidates at the cut (within their own rounding bound), they are
  recomputed in float64, so the set is the exact top K' of the true Gram, which the float32
  reference itself only matches up to such near-ties. All of it, and the steps after the
  neighbours, run in one C++ call (`_rerank_cpu.certified_rerank`, kernels/cpu/rerank_select.cpp)
  whose Gram multiplies only the upper triangle with AVX512_BF16 pair dot products. Without
  AVX512_BF16 (`certified_available()` false) rerank_cpu_bf16 runs rerank_cpu_fp32.

The bound (cpu_bf16). Per query, y_i (float32 rows), h_i = bf16(y_i) rounded to nearest even,
d_i = y_i - h_i (exact in float32: y and h are within a factor 2, Sterbenz), n_i = ||y_i||,
r_i = ||d_i|| (summed in float64). The GEMM gets L_i = [h_i, 1] and R_j = [h_j, -c] (c: a
bfloat16 constant near the rows' K'-th values, see below) and returns a_ij = bf16(s_ij), s_ij the
float32-accumulated sum of the D + 1 terms. Then, with G_ij = y_i . y_j and x_ij = a_ij + c
(evaluated in float64, exactly):

1. input rounding: h_i . h_j - G_ij = -y_i . d_j - d_i . y_j + d_i . d_j, so by Cauchy-Schwarz
   |h_i . h_j - G_ij| <= n_i r_j + r_i n_j + r_i r_j. (Elementwise, |d_ik| <= 2^-8 |y_ik|, so
   r_i <= 2^-8 n_i; r_i / n_i ~ 1/600 on Gaussian-like rows.)
2. accumulation: products of two bfloat16 values have <= 16 significant bits, so they are exact
   in float32, and 1 * (-c) is exact; any order of D additions in float32 (blocked, vectorized,
   AVX512_BF16 pair dot products) errs by at most gamma_{D+1} * sum_k |terms| with
   gamma_n = n u / (1 - n u), u = 2^-24, and sum_k |h_ik h_jk| <= ||h_i|| ||h_j|| <=
   (n_i + r_i)(n_j + r_j) (Cauchy-Schwarz again).
3. output rounding to bfloat16, nearest even: |a_ij - s_ij| <= 2^-8 |a_ij| (half an ulp of a
   value in [2^e, 2^(e+1)) is 2^(e-8)). The shift c makes a_ij small near the cut, where the
   bound matters; far from it (the diagonal) the larger error is harmless.
4. subnormal products and sums may be flushed to zero (DAZ/FTZ in the bfloat16 instructions):
   at most (D + 1) 2^-126 per entry, an absolute term.

So |x_ij - G_ij| <= e_ij = base_i + 2^-8 |a_ij| with, over the query's rows,
base_i = n_i rmax + r_i nmax + r_i rmax + gamma_{D+1} ((n_i + r_i)(nmax + rmax) + |c|)
(+ the absolute term). Both terms get the factor SAFETY = 1.0625: the bound is evaluated in
float64 (relative error ~1e-13) and nothing else is estimated, so the factor is spare room, not a
fudge. What it relies on (fp32 accumulation of exact products, nearest-even output) is what the
kernel does and what oneDNN documents for bfloat16 matmul; tests/test_rerank_cpu.py checks
max |x - G| <= e on random data, and a truncating output would break that check.

Certification of row i: let t be the K'-th largest a_ij. x - e(x) and x + e(x) grow with x, so
the K' columns with the largest a_ij all have G_ij >= lo = (t + c) - e(t): the exact K'-th
largest value is >= lo. Any column with x_ij + e_ij < lo has G_ij < lo, so it is in no exact
top K', whatever the tie-breaking. The rest are the candidates: exact dots, top K' by exact value
(ties: lower column), values used for the weights as SPEC 6.3 says. A row with more than
CAP_FRACTION * M' candidates (near-duplicate rows, values packed within the bound) takes its whole
exact row instead, streamed in order: the same result, dense.

Choice of c: the K'-th largest first-stage similarity among the query's candidates, q . Y, is a
guess at the rows' K'-th Gram values (query and database rows are descriptors of the same kind).
A poor guess costs candidates, never correctness: e_ij uses the stored a_ij. The C++ pass that
rounds Y to bfloat16 computes d = Y q on the way, so s1 reuses it.
"""
from __future__ import annotations

import math
import threading

import torch

try:
    from . import _rerank_cpu as _native
    _native_error: str | None = None
except ImportError as e:  # not built, or built for another Python: cpu_fp32 stays
    _native = None
    _native_error = f"{type(e).__name__}: {e}"

__all__ = ["rerank_cpu_fp32", "rerank_cpu_bf16", "certified_rerank", "certified_available", "certified_info",
           "gram_topk", "approx_gram_with_bound", "CERT_MIN_M", "SAFETY", "OUT_REL", "CAP_FRACTION", "ISA",
           "SYM_MIN_M"]

# cpu_bf16: the bound's spare factor and the output-rounding term (see the module docstring),
# and the share of a row beyond which a row's candidates are dotted as a whole row.
SAFETY = 1.0625
OUT_REL = 2.0 ** -8
CAP_FRACTION = 0.5
# Where "auto" takes cpu_bf16 (sgengine.rerank.resolve_impl). On the 2-core EPYC VM (2 threads,
# clustered unit rows, D = 2048) one query is faster certified from M' = 64, but 70 queries at
# M' = 64-100 are not (a query per thread has too little work); at M' = 128 it wins at both
# (1.6x and 1.1x), at 200 by 1.9x and 1.4x.
CERT_MIN_M = 128
# The C++ variant ("auto": the best this CPU runs; tests pin "baseline" to check the scalar one).
ISA = "auto"

# cpu_fp32. The Gram is symmetric: from M' >= SYM_MIN_M it is built from the upper block triangle
# of a 4 x 4 block split (10 of 16 blocks, 62.5% of the flops) and mirrored: 25-30% faster than one
# full product at M' = 400 and 1600 on the 2-core EPYC VM, one thread (the smaller output blocks
# also stay in cache); no gain below ~256. CUDA takes one product (a loop of small ones loses there).
SYM_MIN_M = 256
_SYM_BLOCKS = 4
# Queries per chunk: one chunk's Gram ([b, M', M'] float32) is kept near 1 MiB so that the top-K'
# pass reads it from cache right after the product wrote it (torch.topk on a 400 x 400 Gram costs
# ~1.5 ms per query from cache, 2.5-3 ms once the chunk is 4+ queries). At M' = 100 a chunk still
# holds ~26 queries, which amortizes the per-op overhead.
_GRAM_CHUNK_BYTES = 1 << 20

# The Gram buffer is kept per thread between calls: a fresh large allocation is mmapped, and
# faulting its pages in on first write costs milliseconds per call. Buffers above this size are
# not kept.
_SCRATCH_MAX_BYTES = 64 << 20
_scratch_local = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized [shape] tensor; on the CPU a view of this thread's buffer `name`."""
    n = math.prod(shape)
    if device.type != "cpu" or n * dtype.itemsize > _SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = _scratch_local.__dict__.setdefault("bufs", {})
    buf = bufs.get((name, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(name, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


# ----------------------------------------------------------------------------- availability
def certified_available() -> bool:
    """Whether cpu_bf16 runs its certified path here: the C++ kernel built, and AVX512_BF16 (the
    bfloat16 Gram's instructions) on this CPU."""
    return _native is not None and bool(_native.gram_bf16_available())


def certified_info() -> dict:
    """{"available": certified_available(), "built": the C++ module imports, "bf16_hardware":
    AVX512_BF16 or AMX-BF16 on this CPU, "isa": the variant "auto" runs, "gram": what computes the
    bfloat16 Gram ("avx512_bf16 triangle" or None), "error": why it is not available, or None}."""
    if _native is None:
        return {"available": False, "built": False, "bf16_hardware": False, "isa": None, "gram": None,
                "error": _native_error}
    ok = certified_available()
    return {"available": ok, "built": True, "bf16_hardware": bool(_native.bf16_hardware()),
            "isa": _native.isas()[0], "gram": "avx512_bf16 triangle" if ok else None,
            "error": None if ok else "this CPU has no AVX512_BF16 instructions"}


# ----------------------------------------------------------------------------- cpu_fp32
def _gram(Yb: torch.Tensor, out: torch.Tensor, blocks: int) -> torch.Tensor:
    """out[:] = Yb Yb^T, [b, M, M]; with blocks > 1 only the upper block triangle is multiplied."""
    Yt = Yb.transpose(1, 2)
    if blocks <= 1:
        return torch.bmm(Yb, Yt, out=out)
    M = Yb.shape[1]
    edges = [round(i * M / blocks) for i in range(blocks + 1)]
    for r0, r1 in zip(edges[:-1], edges[1:]):
        blk = torch.bmm(Yb[:, r0:r1], Yt[:, :, r0:])  # rows r0:r1 against columns r0:
        out[:, r0:r1, r0:] = blk
        out[:, r1:, r0:r1] = blk[:, :, r1 - r0:].transpose(1, 2)
    return out


@torch.no_grad()
def rerank_cpu_fp32(q: torch.Tensor, Y: torch.Tensor, K: int = 9, beta: float = 0.15, adaptive: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 6 steps 2-8 with the float32 Gram and torch.topk: q [nq, D], Y [nq, M', D] float32
    contiguous -> (order [nq, M'] int64, scores [nq, M'] float32). Torch only: any device.
    adaptive: the adaptive mode (docs/adaptive_rerank.md)."""
    from ..rerank import ADAPTIVE_RANK, keep_expansion_order
    nq, M, D = Y.shape
    Kp = min(K + 1, M)
    order = torch.empty(nq, M, dtype=torch.int64, device=Y.device)
    scores = torch.empty(nq, M, dtype=torch.float32, device=Y.device)
    blocks = min(_SYM_BLOCKS, M) if M >= SYM_MIN_M and Y.device.type == "cpu" else 1
    step = max(1, _GRAM_CHUNK_BYTES // (4 * M * M))
    G_buf = _scratch("G", (min(step, nq), M, M), Y.dtype, Y.device)
    # Final scores of every query; step F and the sort run once over all of them after the loop
    # (with M' = 400 a chunk is one query, and per-chunk small ops cost more than the work).
    f_all = torch.empty(nq, M, dtype=torch.float32, device=Y.device)
    if adaptive:
        best_all = torch.empty(nq, Kp, dtype=torch.int64, device=Y.device)
        member_all = torch.empty(nq, Kp, dtype=torch.bool, device=Y.device)
    for a in range(0, nq, step):
        qb, Yb = q[a:a + step], Y[a:a + step]
        b = Yb.shape[0]
        Yt = Yb.transpose(1, 2)
        G = _gram(Yb, G_buf[:b], blocks)  # [b, M, M]: the only O(M^2 D) pass
        v, n = torch.topk(G, Kp, dim=2, largest=True, sorted=True)  # [b, M, K']
        # First-stage dots of every candidate; s1 from them, no refined rows needed. The
        # [b, 1, D] x [b, D, M] form runs as a GEMM; [b, M, D] x [b, D, 1] took ~10x longer.
        d = torch.bmm(qb[:, None, :], Yt).view(b, M)
        if adaptive:
            likely = d >= v[..., min(ADAPTIVE_RANK, Kp - 1)]  # [b, M]: may join the expansion
            weak = v < d[:, :, None]  # neighbours less similar to the row than the query is
        w = v.mul_(beta)
        if adaptive:
            w.masked_fill_(weak, 0.0)
        w[..., 0] = 1.0  # slot 0 weight forced to 1 (SPEC quirk, even for a duplicate)
        wsum = w.sum(dim=2)  # [b, M]
        n_flat = n.view(b, M * Kp)
        s1 = (w * torch.gather(d, 1, n_flat).view(b, M, Kp)).sum(dim=2).div_(wsum)
        # Expansion: refined rows of the K' best by s1 only (elementwise max, q excluded,
        # no renormalization: SPEC quirks). embedding_bag sums each best row's K' weighted
        # neighbour rows in one pass (repeated neighbours add up) without gathering them:
        # ~0.02 ms at M' = 400, D = 2048 against ~0.3 ms for a [K', M'] x [M', D] GEMM of the
        # scattered weights.
        best = torch.topk(s1, Kp, dim=1, largest=True, sorted=False).indices  # [b, K']
        nb = torch.gather(n, 1, best[:, :, None].expand(b, Kp, Kp))
        wb = torch.gather(w, 1, best[:, :, None].expand(b, Kp, Kp))
        rows = (nb + torch.arange(b, device=Y.device)[:, None, None] * M).view(b * Kp, Kp)
        refined = torch.nn.functional.embedding_bag(rows, Yb.reshape(b * M, D), per_sample_weights=wb.reshape(b * Kp, Kp),
                                                    mode="sum").view(b, Kp, D)
        refined = refined.div_(torch.gather(wsum, 1, best)[:, :, None])
        if adaptive:
            member = torch.gather(likely, 1, best)  # [b, K']
            has = member.any(dim=1, keepdim=True)  # none: s2 = s1
            qe = refined.masked_fill_(~member[:, :, None], float("-inf")).amax(dim=1).masked_fill_(~has, 0.0)
        else:
            qe = refined.amax(dim=1)  # [b, D]
        e = torch.bmm(qe[:, None, :], Yt).view(b, M)
        s2 = (w * torch.gather(e, 1, n_flat).view(b, M, Kp)).sum(dim=2).div_(wsum)
        if adaptive:
            s2 = torch.where(has, s2, s1)
        torch.add(s1, s2, out=f_all[a:a + b]).mul_(0.5)
        if adaptive:
            best_all[a:a + b], member_all[a:a + b] = best, member
    if adaptive:
        f_all = keep_expansion_order(f_all, best_all, member_all)
    torch.sort(f_all, dim=1, descending=True, out=(scores, order))
    return order, scores


# ----------------------------------------------------------------------------- cpu_bf16
def _cap(Kp: int, M: int) -> int:
    return max(Kp, int(M * CAP_FRACTION))


@torch.no_grad()
def certified_rerank(q: torch.Tensor, Y: torch.Tensor, K: int = 9, beta: float = 0.15, adaptive: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """cpu_bf16 with what it did: (order, scores, stats) with stats {"rows", "exact_dots" (dots
    taken after sharing symmetric pairs), "dense_rows" (rows past the cap, dotted whole),
    "exact_queries" (queries with a row that is not finite or too large, run by rerank_cpu_fp32,
    which reproduces the reference's NaN/inf handling)}. Needs `certified_available()`; CPU
    tensors."""
    from ..rerank import ADAPTIVE_RANK
    nq, M, _ = Y.shape
    Kp = min(K + 1, M)
    order, scores, status, (rows, dots, dense) = _native.certified_rerank(
        Y.detach().numpy(), q.detach().numpy(), Kp, float(beta), SAFETY, OUT_REL * SAFETY, _cap(Kp, M),
        torch.get_num_threads(), ISA, min(ADAPTIVE_RANK, Kp - 1) if adaptive else -1)
    order, scores = torch.from_numpy(order), torch.from_numpy(scores)
    left = torch.from_numpy(status).nonzero().flatten()
    if len(left):
        order[left], scores[left] = rerank_cpu_fp32(q[left], Y[left], K, beta, adaptive)
    return order, scores, {"rows": rows, "exact_dots": dots, "dense_rows": dense, "exact_queries": len(left)}


def rerank_cpu_bf16(q: torch.Tensor, Y: torch.Tensor, K: int = 9, beta: float = 0.15, adaptive: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 6 steps 2-8 through the certified bfloat16 selection (one C++ call for the batch):
    q [nq, D], Y [nq, M', D] float32 contiguous CPU tensors -> (order [nq, M'] int64, scores [nq, M']
    float32), the float32 selection's result. rerank_cpu_fp32 where `certified_available()` is false."""
    if not certified_available():
        return rerank_cpu_fp32(q, Y, K, beta, adaptive)
    order, scores, _ = certified_rerank(q, Y, K, beta, adaptive)
    return order, scores


# ----------------------------------------------------------------------------- test helpers
def gram_topk(Y: torch.Tensor, Kp: int, q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """SPEC 6.3 alone through the certified path: the K' largest values of each Gram row,
    descending, with their columns, and what it did: (v [nq, M', K'] float32, n [nq, M', K'] int64,
    {"rows", "exact_dots", "dense_rows"}). Y [nq, M', D] float32 on the CPU; q [nq, D] sets the shift
    as the rerank does (None: c = 0). For tests and benchmarks; ValueError for a non-finite row."""
    Y = Y.detach().to(torch.float32).contiguous()
    M = Y.shape[1]
    qa = None if q is None else q.detach().to(torch.float32).contiguous().numpy()
    v, n, (rows, dots, dense) = _native.certified_neighbours(
        Y.numpy(), qa, Kp, SAFETY, OUT_REL * SAFETY, _cap(Kp, M), torch.get_num_threads(), ISA)
    return torch.from_numpy(v), torch.from_numpy(n), {"rows": rows, "exact_dots": dots, "dense_rows": dense}


def approx_gram_with_bound(Y: torch.Tensor, c: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cpu_bf16's approximate Gram and its bound, for tests: (x, e), both [nq, M', M'] float64,
    with |x - Y Y^T| <= e entrywise (exact Gram) if the bound is right. c: the shift, per query or
    one value (rounded to bfloat16 by the kernel). ValueError for a non-finite row."""
    Y = Y.detach().to(torch.float32).contiguous()
    c = torch.as_tensor(c, dtype=torch.float32).expand(Y.shape[0]).contiguous()
    x, e = _native.approx_gram_bound(Y.numpy(), c.numpy(), SAFETY, OUT_REL * SAFETY, torch.get_num_threads(), ISA)
    return torch.from_numpy(x), torch.from_numpy(e)
