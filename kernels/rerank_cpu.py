"""CPU fast path of the SuperGlobal rerank (SPEC 6), same contract as
`sgengine.rerank.rerank_candidates_reference`.

The only O(M'^2 D) work is the Gram product; everything else is rearranged so that no
[M', D] refined matrix is ever built:

    Y'_i = sum_j w_ij Y[n_ij] / W_i              (W_i = sum_j w_ij)
    s1_i = q . Y'_i  = sum_j w_ij (q . Y[n_ij]) / W_i
    s2_i = q'. Y'_i  = sum_j w_ij (q'. Y[n_ij]) / W_i

so s1 needs only d = Y q (one [M', D] matrix-vector product) gathered at the neighbour
indices, and s2 only e = Y q'. The expansion q' needs the refined rows of the K' best
candidates alone: K' x K' gathered rows. Per query that is one Gram product, one top-K' over
its rows, two matrix-vector products and O(M' K' + K'^2 D) gathers. The results equal the
reference up to float reassociation; where that reorders near-equal scores, compare tie-aware.

Two ways to get the neighbours (step 3), picked by `select`:

- "exact": the float32 Gram (upper block triangle from M' >= 256, mirrored) and torch.topk.
- "certified": a bfloat16 Gram, about 2x faster than float32 on CPUs with bfloat16 dot-product
  instructions, used only to *exclude* columns: a rigorous bound on its error says which
  columns cannot be among a row's exact top K', and the rest (the candidates, ~2 K' per row on
  clustered data, ~1.4 K' dots once pairs both rows hold are shared) get exact float32 dots in
  the C++ kernel `kernels/cpu/rerank_select.cpp`, which selects the top K' among them. Where
  float32 dots cannot order two candidates at the cut (within their own rounding bound), the
  kernel recomputes those in float64, so the set is the exact top K' of the true Gram, which
  the float32 reference itself only matches up to such near-ties. `certified_path(device, M)`
  says when "auto" takes it. Its bfloat16 Gram is the C++ triangle kernel `gram_bf16`
  (AVX512_BF16) where the CPU has it, else torch; the steps after the neighbours (weights, s1,
  expansion, s2, order) run in C++ too (`finish`), with the same arithmetic as the torch steps
  below, which the exact path keeps.

The bound (certified path). Per query, y_i (float32 rows), h_i = bf16(y_i) rounded to nearest
even, d_i = y_i - h_i (exact in float32: y and h are within a factor 2, Sterbenz),
n_i = ||y_i||, r_i = ||d_i|| (summed in float64). The GEMM gets L_i = [h_i, 1] and
R_j = [h_j, -c] (c: a bfloat16 constant near the rows' K'-th values, see below) and returns
a_ij = bf16(s_ij), s_ij the float32-accumulated sum of the D + 1 terms. Then, with
G_ij = y_i . y_j and x_ij = a_ij + c (evaluated in float64, exactly):

1. input rounding: h_i . h_j - G_ij = -y_i . d_j - d_i . y_j + d_i . d_j, so by Cauchy-Schwarz
   |h_i . h_j - G_ij| <= n_i r_j + r_i n_j + r_i r_j. (Elementwise, |d_ik| <= 2^-8 |y_ik|, so
   r_i <= 2^-8 n_i; measured r_i / n_i ~ 1/600 on Gaussian-like rows.)
2. accumulation: products of two bfloat16 values have <= 16 significant bits, so they are
   exact in float32, and 1 * (-c) is exact; any order of D additions in float32 (blocked,
   vectorized, AVX512_BF16 pair dot products, AMX tiles) errs by at most
   gamma_{D+1} * sum_k |terms| with gamma_n = n u / (1 - n u), u = 2^-24, and
   sum_k |h_ik h_jk| <= ||h_i|| ||h_j|| <= (n_i + r_i)(n_j + r_j) (Cauchy-Schwarz again).
3. output rounding to bfloat16, nearest even: |a_ij - s_ij| <= 2^-8 |a_ij| (half an ulp of a
   value in [2^e, 2^(e+1)) is 2^(e-8)). The shift c makes a_ij small near the cut, where the
   bound matters; far from it (the diagonal) the larger error is harmless.
4. subnormal products and sums may be flushed to zero (DAZ/FTZ in the bfloat16 instructions):
   at most (D + 1) 2^-126 per entry, an absolute term.

So |x_ij - G_ij| <= e_ij = base_i + 2^-8 |a_ij| with, over the query's rows,
base_i = n_i rmax + r_i nmax + r_i rmax + gamma_{D+1} ((n_i + r_i)(nmax + rmax) + |c|)
(+ the absolute term). Both terms get the factor `_SAFETY` = 1.0625: the bound is evaluated in
float64 (relative error ~1e-13) and nothing else is estimated, so the factor is spare room,
not a fudge. What it relies on (fp32 accumulation of exact products, nearest-even output) is
what oneDNN documents for bfloat16 matmul; tests/test_rerank_cpu.py checks max |x - G| <= e on
random data, and a truncating output would break that check.

Certification of row i: let t be the K'-th largest a_ij. x - e(x) and x + e(x) grow with x,
so the K' columns with the largest a_ij all have G_ij >= lo = (t + c) - e(t): the exact
K'-th largest value is >= lo. Any column with x_ij + e_ij < lo has G_ij < lo, so it is in no
exact top K', whatever the tie-breaking. The rest are the candidates: exact dots, top K' by
exact value (ties: lower column), values used for the weights as SPEC 6.3 says. A row with
more than `cap` candidates (near-duplicate rows, values packed within the bound) takes its
whole exact row instead, streamed in order: the same result, dense.

Choice of c: the K'-th largest first-stage similarity among the query's candidates, q . Y, is
a guess at the rows' K'-th Gram values (query and database rows are descriptors of the same
kind). A poor guess costs candidates, never correctness: e_ij uses the stored a_ij. The C++
pass that rounds Y to bfloat16 computes d = Y q on the way, so s1 reuses it.

Plain torch apart from that kernel, so the exact path also runs on CUDA (used there when
Triton is missing), but it is tuned for the CPU: see `_GRAM_CHUNK_BYTES`.
"""
from __future__ import annotations

import math
import threading

import torch

try:
    from . import _rerank_cpu as _native
    _native_error: str | None = None
except ImportError as e:  # not built, or built for another Python: the exact path stays
    _native = None
    _native_error = f"{type(e).__name__}: {e}"

__all__ = ["rerank_candidates_cpu", "gram_topk", "certified_path", "certified_info", "approx_gram_with_bound",
           "SELECTS"]

SELECTS = ("auto", "exact", "certified")

# Queries per chunk: one chunk's Gram ([b, M', M'] float32) is kept near 1 MiB so that the
# top-K' pass reads it from cache right after the product wrote it (measured: torch.topk on
# a 400 x 400 Gram costs ~1.5 ms per query from cache, 2.5-3 ms once the chunk is 4+ queries).
# At M' = 100 a chunk still holds ~26 queries, which amortizes the per-op overhead.
_GRAM_CHUNK_BYTES = 1 << 20

# The Gram is symmetric: from M' >= 256 it is built from the upper block triangle of a 4 x 4
# block split (10 of 16 blocks, 62.5% of the flops) and mirrored. Measured on the 2-core AMD
# EPYC dev box, one thread: 25-30% faster than one full product at M' = 400 and 1600 (the
# smaller output blocks also stay in cache); no gain below ~256. The bfloat16 Gram gains the
# same way (2.2 vs 3.05 ms at M' = 400, one thread), as long as each block is a plain 2-D mm:
# a bmm over sliced bfloat16 operands left oneDNN's fast path (4-5x slower).
_SYM_MIN_M = 256
_SYM_BLOCKS = 4
GRAMS = ("auto", "full", "sym", "native")

# The certified path's bfloat16 Gram, where the CPU has AVX512_BF16: the C++ kernel
# `_rerank_cpu.gram_bf16` multiplies only the upper triangle (56% of the entries at M' = 400) at
# about a full product's speed, where torch's block split above ran at ~60% of it over two
# threads. Measured on the 2-core EPYC VM at M' = 400: 0.93 ms against 1.45 ms for the 4-block
# torch split and 1.6 ms for one full product (2 threads). `blocks` == _NATIVE_GRAM selects it.
_NATIVE_GRAM = -1


def _native_gram_ok() -> bool:
    return _native is not None and bool(_native.gram_bf16_available())


def _cert_blocks(gram: str, M: int) -> int:
    """The certified path's Gram: _NATIVE_GRAM or a torch block count (see _gram_2d)."""
    if gram == "native":
        if not _native_gram_ok():
            raise RuntimeError("gram='native' needs the C++ kernel and AVX512_BF16 on this CPU "
                               f"({_native_error or 'no AVX512_BF16'}); use gram='auto'")
        return _NATIVE_GRAM
    if gram == "auto" and _native_gram_ok():
        return _NATIVE_GRAM
    return 1 if gram == "full" or (gram == "auto" and M < _SYM_MIN_M) else min(_SYM_BLOCKS, M)

# Certified path: the bound's spare factor (see the module docstring), where "auto" starts
# taking it, and the share of a row beyond which a row's candidates are dotted as a whole row.
# With the triangle Gram kernel and the C++ finish (2-core EPYC, 2 threads, clustered unit rows,
# D = 2048): one query is faster certified from M' = 64 (1.4x; 1.7x at 160), but 70 queries at
# M' = 64-100 are not (0.85-0.98x: the selection runs query by query, with too little work per
# query to split over the threads). At M' = 128 it wins at both (1.6x and 1.1x), at 200 by
# 1.9x and 1.4x.
_SAFETY = 1.0625
_OUT_REL = 2.0 ** -8
_CERT_MIN_M = 128
_CAP_FRACTION = 0.5
# Working set per chunk of the certified path (two bfloat16 operands and the bfloat16 Gram): 32
# MiB holds 9 queries at M' = 400, and cut the per-chunk torch overhead enough to take 70
# queries from ~245 to ~210 ms against 8 MiB (2 threads, the 2-core EPYC VM).
_CERT_CHUNK_BYTES = 32 << 20
# The C++ variant ("auto": the best this CPU runs; tests pin "baseline" to check the scalar one).
_ISA = "auto"

# Scratch buffers (Gram, bfloat16 operands) are kept per thread between calls: a fresh large
# allocation is mmapped, and faulting its pages in on first write cost ~2 ms of a 7 ms rerank
# at M' = 400 (one thread, the 2-core EPYC VM). Buffers above this size are not kept.
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


def certified_info() -> dict:
    """{"available": bool, "bf16_hardware": bool, "isa": str | None, "gram": "avx512_bf16 triangle" |
    "torch" | None, "error": str | None}; "gram" is what computes the certified path's bfloat16 Gram."""
    if _native is None:
        return {"available": False, "bf16_hardware": False, "isa": None, "gram": None, "error": _native_error}
    return {"available": True, "bf16_hardware": bool(_native.bf16_hardware()), "isa": _native.isas()[0],
            "gram": "avx512_bf16 triangle" if _native_gram_ok() else "torch", "error": None}


def certified_path(device: torch.device | str = "cpu", M: int = 400) -> bool:
    """Whether select="auto" takes the certified bfloat16 path for M' candidates on `device`:
    a CPU tensor, the C++ kernel built, bfloat16 dot-product instructions (AVX512_BF16 or AMX;
    without them oneDNN emulates bfloat16 and the product is no faster than float32), and
    M' >= _CERT_MIN_M (below it the Gram is too small for the halved product to pay for the
    extra passes)."""
    if torch.device(device).type != "cpu" or _native is None or M < _CERT_MIN_M:
        return False
    return bool(_native.bf16_hardware())


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


def _gram_2d(L: torch.Tensor, R: torch.Tensor, out: torch.Tensor, blocks: int) -> None:
    """out[:] = L R^T for one query ([M, ld] bfloat16 each, L R^T symmetric); blocks as in _gram."""
    if blocks <= 1:
        torch.mm(L, R.T, out=out)
        return
    M = L.shape[0]
    edges = [round(i * M / blocks) for i in range(blocks + 1)]
    for r0, r1 in zip(edges[:-1], edges[1:]):
        blk = torch.mm(L[r0:r1], R[r0:].T)
        out[r0:r1, r0:] = blk
        out[r1:, r0:r1] = blk[:, r1 - r0:].T


def _exact_neighbours(Yb: torch.Tensor, G_buf: torch.Tensor, Kp: int, blocks: int):
    G = _gram(Yb, G_buf[:Yb.shape[0]], blocks)  # [b, M, M]: the only O(M^2 D) pass
    return torch.topk(G, Kp, dim=2, largest=True, sorted=True)  # [b, M, K']


def _approx_gram(Yb: torch.Tensor, q: torch.Tensor | None, c: torch.Tensor | None, Kp: int, blocks: int,
                 threads: int):
    """(A [b, M, M] bfloat16 = bf16(Y) bf16(Y)^T - c, base [b, M] float64 (the bound's row terms,
    spare factor included), c [b], d [b, M] = Y q or None, row norms [b, M] float64), all from
    one C++ pass over Y and the product; None when a row is not finite or too large for the
    bound's model. With q, c is the K'-th largest of d (rounded to bfloat16); without, c is given."""
    b, M, D = Yb.shape
    cpu = Yb.device
    ld = (D + 1 + 15) // 16 * 16  # one column for the shift, rows padded to 32 bytes
    L = _scratch("L", (b, M, ld), torch.bfloat16, cpu)
    # The C++ Gram packs R from L (they differ in the shift column only): one array less to write.
    R = None if blocks == _NATIVE_GRAM else _scratch("R", (b, M, ld), torch.bfloat16, cpu)
    base = torch.empty(b, M, dtype=torch.float64)
    norm = torch.empty(b, M, dtype=torch.float64)
    if q is not None:
        c = torch.empty(b, dtype=torch.float32)
        d = torch.empty(b, M, dtype=torch.float32)
    else:
        c, d = c.contiguous(), None
    bad = _native.prepare_bf16(Yb.data_ptr(), 0 if q is None else q.data_ptr(), b, M, D, ld, Kp, L.data_ptr(),
                               0 if R is None else R.data_ptr(), c.data_ptr(), 0 if d is None else d.data_ptr(), base.data_ptr(),
                               norm.data_ptr(), _SAFETY, threads, _ISA)
    if bad:
        return None
    A = _scratch("A", (b, M, M), torch.bfloat16, cpu)
    if blocks == _NATIVE_GRAM:
        _native.gram_bf16(L.data_ptr(), 0, A.data_ptr(), b, M, ld, threads, D, c.data_ptr())
    else:
        for i in range(b):
            _gram_2d(L[i], R[i], A[i], blocks)
    return A, base, c, d, norm


def approx_gram_with_bound(Y: torch.Tensor, c: torch.Tensor | float = 0.0, *, gram: str = "auto"):
    """The certified path's approximate Gram and its bound, for tests: (x, e), both [nq, M', M']
    float64, with |x - Y Y^T| <= e entrywise (exact Gram) if the bound is right. c: the shift,
    per query or one value (rounded to bfloat16). None when a row is not finite."""
    if _native is None:
        raise RuntimeError(f"the C++ kernel sgengine.kernels._rerank_cpu does not import here ({_native_error})")
    Y = Y.to(torch.float32).contiguous()
    nq, M, _ = Y.shape
    c = torch.as_tensor(c, dtype=torch.float32).expand(nq).to(torch.bfloat16).float().contiguous()
    if gram not in GRAMS:
        raise ValueError(f"gram must be one of {GRAMS}, got {gram!r}")
    out = _approx_gram(Y, None, c, 1, _cert_blocks(gram, M), torch.get_num_threads())
    if out is None:
        return None
    A, base, _, _, _ = out
    a = A.double()
    return a + c.double()[:, None, None], base[:, :, None] + _OUT_REL * _SAFETY * a.abs()


def _certified_neighbours(Yb: torch.Tensor, q: torch.Tensor | None, Kp: int, blocks: int, cap: int, threads: int,
                          stats: dict | None, bound_scale: float = 1.0):
    """(v, n) [b, M, K'] from the bfloat16 Gram and exact dots, and d = Y q (None without q:
    then c = 0); None when a row is not finite (the exact path then reproduces the reference's
    NaN/inf handling)."""
    b, M, D = Yb.shape
    out = _approx_gram(Yb, q, None if q is not None else torch.zeros(b), Kp, blocks, threads)
    if out is None:
        return None
    A, base, c, d, norm = out
    if bound_scale != 1.0:
        base = base * bound_scale
    v = torch.empty(b, M, Kp, dtype=torch.float32)
    n = torch.empty(b, M, Kp, dtype=torch.int64)
    dots, dense = _native.certified_topk(A.data_ptr(), Yb.data_ptr(), b, M, D, Kp, c.data_ptr(), base.data_ptr(),
                                         norm.data_ptr(), _OUT_REL * _SAFETY * bound_scale, cap, v.data_ptr(),
                                         n.data_ptr(), threads, _ISA)
    if stats is not None:
        stats["rows"] = stats.get("rows", 0) + b * M
        stats["exact_dots"] = stats.get("exact_dots", 0) + int(dots)
        stats["dense_rows"] = stats.get("dense_rows", 0) + int(dense)
    return v, n, d


@torch.no_grad()
def gram_topk(Y: torch.Tensor, Kp: int, q: torch.Tensor | None = None, *, select: str = "certified",
              cap: int | None = None, stats: dict | None = None, bound_scale: float = 1.0):
    """SPEC 6.3 alone: the K' largest values of each Gram row, descending, with their columns:
    (v [nq, M', K'] float32, n [nq, M', K'] int64). Y [nq, M', D] float32 on the CPU. q [nq, D]
    sets the certified path's shift as the rerank does (None: c = 0). For tests and benchmarks."""
    Y = Y.to(torch.float32).contiguous()
    nq, M, D = Y.shape
    if select == "exact":
        G_buf = _scratch("G", (nq, M, M), Y.dtype, Y.device)
        v, n = _exact_neighbours(Y, G_buf, Kp, 1 if M < _SYM_MIN_M else _SYM_BLOCKS)
        return v, n
    if _native is None:
        raise RuntimeError(f"select='certified' needs sgengine.kernels._rerank_cpu ({_native_error})")
    q = None if q is None else q.to(torch.float32).contiguous()
    blocks = _cert_blocks("auto", M)
    cap = max(Kp, int(M * _CAP_FRACTION) if cap is None else int(cap))
    vn = _certified_neighbours(Y, q, Kp, blocks, cap, torch.get_num_threads(), stats, bound_scale)
    if vn is None:
        raise ValueError("Y holds NaN or inf (or rows too large for the bound): use select='exact'")
    return vn[0], vn[1]


def _certified_one(q1: torch.Tensor, Y1: torch.Tensor, Kp: int, beta: float, cap: int, threads: int,
                   stats: dict | None, bound_scale: float, order1: torch.Tensor, scores1: torch.Tensor) -> bool:
    """One query ([1, D], [1, M', D]) through the C++ certified path into order1 / scores1 ([1, M']
    views); False (nothing written) when a row is not finite."""
    _, M, D = Y1.shape
    vnd = _certified_neighbours(Y1, q1, Kp, _NATIVE_GRAM, cap, threads, stats, bound_scale)
    if vnd is None:
        return False
    v, n, d = vnd
    _native.finish(v.data_ptr(), n.data_ptr(), d.data_ptr(), Y1.data_ptr(), 1, M, D, Kp, beta, order1.data_ptr(),
                   scores1.data_ptr(), threads, _ISA)
    return True


# Several queries on the certified path: split over threads, each running the C++ kernels single-
# threaded on its own queries (`_rerank_cpu.certified_batch`, one call for the batch), rather than
# every query split over all threads. On the 2-core EPYC VM (70 queries, M' = 400) the two ways tie
# when the VM is at its best (~130 ms), but it goes through phases, minutes long, in which writes
# to cache lines that the other core has just read are slow; the per-query split, which hands its
# operands, Gram and lists between cores several times per query, then took ~185 ms, and the query
# split, which shares nothing, still ~130 ms.
def _certified_batch(q, Y, Kp, beta, cap, threads, stats, bound_scale, order, scores) -> list[int]:
    """Every query through the C++ certified path (see above); returns the ones left for the exact
    path (a non-finite row), ascending."""
    nq, M, D = Y.shape
    if min(threads, nq) <= 1:
        left = [a for a in range(nq) if not _certified_one(q[a:a + 1], Y[a:a + 1], Kp, beta, cap, threads, stats,
                                                          bound_scale, order[a:a + 1], scores[a:a + 1])]
    else:
        status = torch.empty(nq, dtype=torch.uint8)
        counts = _native.certified_batch(
            Y.data_ptr(), q.data_ptr(), nq, M, D, Kp, beta, _SAFETY, _OUT_REL * _SAFETY * bound_scale, bound_scale,
            cap, order.data_ptr(), scores.data_ptr(), status.data_ptr(), threads, _ISA)
        left = status.nonzero().flatten().tolist()
        for k, x in zip(("rows", "exact_dots", "dense_rows"), counts) if stats is not None else ():
            stats[k] = stats.get(k, 0) + int(x)
    if stats is not None and left:
        stats["exact_queries"] = stats.get("exact_queries", 0) + len(left)
    return left


@torch.no_grad()
def rerank_candidates_cpu(q: torch.Tensor, Y: torch.Tensor, K: int = 9, beta: float = 0.15, *,
                          gram: str = "auto", select: str = "auto", cap: int | None = None,
                          stats: dict | None = None, bound_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """q [nq, D] f32, Y [nq, M', D] f32 contiguous -> (order [nq, M'] int64, scores [nq, M'] f32).

    Inputs are assumed validated (`sgengine.rerank.rerank_candidates` does it once).
    gram: "auto" (block-symmetric from M' >= 256), "full" (one product) or "sym" (always
    blocked); the choice changes rounding only (G[j, i] is then an exact copy of G[i, j]).
    select: "auto" (certified where `certified_path(Y.device, M')`), "exact" (float32 Gram and
    torch.topk) or "certified" (bfloat16 Gram, bound, exact dots; CPU and the C++ kernel only).
    cap: candidates per row beyond which the certified path dots the whole row (default M'/2).
    stats: a dict that receives what the certified path did: rows, exact_dots (dots taken after
    sharing symmetric pairs), dense_rows (rows past `cap`, dotted whole) and exact_queries
    (queries sent to the exact path because a row was not finite).
    bound_scale: tests only. Multiplies the error bound; below 1 the selection is no longer
    guaranteed (tests use it to show that a too-small bound is caught).
    """
    nq, M, D = Y.shape
    Kp = min(K + 1, M)
    order = torch.empty(nq, M, dtype=torch.int64, device=Y.device)
    scores = torch.empty(nq, M, dtype=torch.float32, device=Y.device)
    if gram not in GRAMS:
        raise ValueError(f"gram must be one of {GRAMS}, got {gram!r}")
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    if select == "certified":
        if _native is None:
            raise RuntimeError(f"select='certified' needs the C++ kernel sgengine.kernels._rerank_cpu, "
                               f"which does not import here ({_native_error}); use select='exact'")
        if Y.device.type != "cpu":
            raise RuntimeError(f"select='certified' runs on CPU tensors, got {Y.device}; use select='exact'")
    certified = select == "certified" or (select == "auto" and certified_path(Y.device, M))
    # On CUDA (a fallback there) one cuBLAS product beats a loop of small ones.
    auto_full = M < _SYM_MIN_M or Y.device.type != "cpu"
    blocks = 1 if gram == "full" or (gram == "auto" and auto_full) else min(_SYM_BLOCKS, M)
    if gram == "native" and not certified:
        raise ValueError("gram='native' is the certified path's bfloat16 product; the float32 path takes "
                         "'auto', 'full' or 'sym'")
    if certified:
        blocks = _cert_blocks(gram, M)
        ld = (D + 1 + 15) // 16 * 16
        step = max(1, _CERT_CHUNK_BYTES // (2 * M * (M + 2 * ld)))  # torch Gram only: see _certified_batch
        cap = max(Kp, int(M * _CAP_FRACTION) if cap is None else int(cap))
        threads = torch.get_num_threads()
    else:
        step = max(1, _GRAM_CHUNK_BYTES // (4 * M * M))
        G_buf = _scratch("G", (min(step, nq), M, M), Y.dtype, Y.device)
    todo = range(0, nq, step)
    if certified and blocks == _NATIVE_GRAM:
        # All in C++, a query at a time: its working set (operands, Gram, rows) stays in cache
        # (70 queries at M' = 400: 133 ms against 152 ms in chunks of 9; 2-core EPYC VM). What is
        # left are the queries with a non-finite row.
        todo, step = _certified_batch(q, Y, Kp, beta, cap, threads, stats, bound_scale, order, scores), 1
    for a in todo:
        qb, Yb = q[a:a + step], Y[a:a + step]
        b = Yb.shape[0]
        Yt = Yb.transpose(1, 2)
        vnd = None
        if certified and blocks != _NATIVE_GRAM:  # d = Y q comes from the C++ pass that rounds Y to bfloat16
            vnd = _certified_neighbours(Yb, qb, Kp, blocks, cap, threads, stats, bound_scale)
            if vnd is None and stats is not None:
                stats["exact_queries"] = stats.get("exact_queries", 0) + b
        if vnd is None:
            if certified:  # a non-finite chunk: the exact path's buffer, made on demand
                G_buf = _scratch("G", (b, M, M), Y.dtype, Y.device)
            v, n = _exact_neighbours(Yb, G_buf, Kp, blocks)
            # First-stage dots of every candidate; s1 from them, no refined rows needed. The
            # [b, 1, D] x [b, D, M] form runs as a GEMM; [b, M, D] x [b, D, 1] took ~10x longer.
            d = torch.bmm(qb[:, None, :], Yt).view(b, M)
        else:
            v, n, d = vnd
        w = v.mul_(beta)
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
        qe = refined.div_(torch.gather(wsum, 1, best)[:, :, None]).amax(dim=1)  # [b, D]
        e = torch.bmm(qe[:, None, :], Yt).view(b, M)
        s2 = (w * torch.gather(e, 1, n_flat).view(b, M, Kp)).sum(dim=2).div_(wsum)
        f = (s1 + s2).mul_(0.5)
        fs, idx = torch.sort(f, dim=1, descending=True)
        order[a:a + b], scores[a:a + b] = idx, fs
    return order, scores
