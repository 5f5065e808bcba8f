"""Fused SuperGlobal rerank on the GPU (SPEC 6 steps 2-8), Triton.

Same contract as `sgengine.rerank.rerank_reference`, which is the line-by-line
reference; this file only rearranges its arithmetic. Per query, with W_i = sum_j w_ij:

    Y'_i = sum_j w_ij Y[n_ij] / W_i
    s1_i = q  . Y'_i = sum_j w_ij (q  . Y[n_ij]) / W_i
    s2_i = q' . Y'_i = sum_j w_ij (q' . Y[n_ij]) / W_i

so the [M', D] refined matrix is never built: s1 needs a = Y q, s2 needs b = Y q', and only the
K' refined rows that form q' are materialized (K' x K' gathered rows). The launches, all batched
over queries:

    1. Gram G = Y Y^T                 cuBLAS bmm (fp32, tf32) or `_rerank_gram_kernel` (any)
    2. a = Y q                        `_rerank_rowdot_kernel`
    3. per-row top-K', weights, s1    `_rerank_neighbors_kernel`
    4. top-K' of s1, q' (elementwise max of those refined rows)   `_rerank_expand_kernel`
    5. b = Y q'                       `_rerank_rowdot_kernel`
    6. s2 and f = (s1 + s2) / 2       `_rerank_final_kernel`
    7. final descending order         torch.sort (stable)

Only the Gram (O(M'^2 D)) depends on `precision`; the O(M' D) and O(M' K') steps always run
in float32 with plain FMAs. Ties inside the kernels go to the lowest column index, so the output
is deterministic; the reference leaves tie order unspecified (SPEC 6, "Ties").

The adaptive mode (docs/adaptive_rerank.md; ADAPTIVE=True) changes steps 3, 4 and 6 only: the
neighbour kernel zeroes the weight of a neighbour less similar to its row than the query is
(G[i, n] < a_i) and flags the rows the query ranks among the nearest of (a_j >= G[j, n_jr], r =
LIKELY_SLOT); the expansion takes only flagged rows of the K' best, and with none the final
kernel uses s2 = s1.

Triton APIs used exist in Triton 3.0 through 3.9 (no tl.sort / tl.topk: the K' <= 33 largest of
a row are taken by K' masked max passes over the row held in registers).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..cublas import cublas_fp32 as _cublas_fp32
from ..errors import InputError
from ..rerank import ADAPTIVE_RANK, keep_expansion_order

__all__ = ["rerank_triton", "interpreting", "PRECISIONS", "GRAMS", "MAX_CANDIDATES"]

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
GRAMS = ("auto", "bmm", "triton")

# Largest M' whose Gram row fits the neighbour kernel's register tile (one row of BLOCK_M
# columns per program row). 8192 columns is 32 KiB of fp32 per row: beyond it spills.
MAX_CANDIDATES = 8192


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _rerank_gram_kernel(Y, G, M, D, stride_yb, stride_ym, stride_gb, stride_gm,
                        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # G is symmetric: tiles below the diagonal are written by their mirror tile (no early
    # `return`: a plain `if` body is the form every Triton version compiles).
    tm = tl.program_id(0)
    tn = tl.program_id(1)
    if tn >= tm:
        b = tl.program_id(2).to(tl.int64)
        offs_m = tm * BLOCK + tl.arange(0, BLOCK)
        offs_n = tn * BLOCK + tl.arange(0, BLOCK)
        m_ok = offs_m < M
        n_ok = offs_n < M
        base = Y + b * stride_yb
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            lhs = tl.load(base + offs_m[:, None] * stride_ym + offs_d[None, :],
                          mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            rhs = tl.load(base + offs_n[None, :] * stride_ym + offs_d[:, None],
                          mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            # Casting in the kernel (fp16/bf16) saves a separate conversion pass over Y; the
            # accumulator and G stay float32, so G is not rounded to the input dtype.
            acc = tl.dot(lhs.to(DOT_DTYPE), rhs.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        gbase = G + b * stride_gb
        tl.store(gbase + offs_m[:, None] * stride_gm + offs_n[None, :], acc,
                 mask=m_ok[:, None] & n_ok[None, :])
        # Not on the diagonal tile: there acc[i, j] and acc[j, i] may round differently, and
        # two writers to one address would make G nondeterministic.
        if tn != tm:
            tl.store(gbase + offs_n[None, :] * stride_gm + offs_m[:, None], acc,
                     mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _rerank_rowdot_kernel(Y, V, OUT, M, D, stride_yb, stride_ym,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # OUT[b, i] = Y[b, i, :] . V[b, :] in float32 FMAs, whatever the matmul flags say.
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < M
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        y = tl.load(Y + b * stride_yb + rows[:, None] * stride_ym + offs_d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * D + offs_d, mask=d_ok, other=0.0)
        acc += y * v[None, :]
    tl.store(OUT + b * M + rows, tl.sum(acc, axis=1), mask=r_ok)


@triton.jit
def _rerank_neighbors_kernel(G, A, NBR, W, WSUM, S1, LIKELY, M, stride_gb, stride_gm, beta,
                             KP: tl.constexpr, KP_PAD: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                             ADAPTIVE: tl.constexpr, LIKELY_SLOT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_M)
    slots = tl.arange(0, KP_PAD)
    r_ok = rows < M
    g = tl.load(G + b * stride_gb + rows[:, None] * stride_gm + cols[None, :],
                mask=r_ok[:, None] & (cols < M)[None, :], other=float("-inf"))
    nbr = tl.zeros((BLOCK_R, KP_PAD), dtype=tl.int32)
    val = tl.zeros((BLOCK_R, KP_PAD), dtype=tl.float32)
    # SPEC 6.3: the K' largest of each row, descending; among equal values the lowest column
    # first. K' <= M', so a padded (-inf) column is never taken.
    for j in range(KP):
        v = tl.max(g, axis=1)
        n = tl.min(tl.where(g == v[:, None], cols[None, :], BLOCK_M), axis=1)
        # A NaN row matches nothing; clamp so the gathers below stay in bounds (the NaN still
        # reaches s1, and the caller's finiteness check reports it).
        n = tl.minimum(n, M - 1)
        g = tl.where(cols[None, :] == n[:, None], float("-inf"), g)
        nbr = tl.where(slots[None, :] == j, n[:, None], nbr)
        val = tl.where(slots[None, :] == j, v[:, None], val)
    # Padding rows (beyond M') hold -inf; zero them so no inf * 0 NaN is ever formed.
    val = tl.where(r_ok[:, None], val, 0.0)
    # Slot 0 is assumed to be the row itself and weighs 1 even when an exact duplicate took it
    # (SPEC quirk, kept); the others weigh beta * v.
    w = tl.where(slots[None, :] == 0, 1.0, beta * val)
    w = tl.where(slots[None, :] < KP, w, 0.0)
    if ADAPTIVE:
        a_row = tl.load(A + b * M + rows, mask=r_ok, other=0.0)
        w = tl.where((slots[None, :] > 0) & (val < a_row[:, None]), 0.0, w)
        kth = tl.sum(tl.where(slots[None, :] == LIKELY_SLOT, val, 0.0), axis=1)
        tl.store(LIKELY + b * M + rows, (a_row >= kth).to(tl.int8), mask=r_ok)
    wsum = tl.sum(w, axis=1)
    s_ok = r_ok[:, None] & (slots < KP)[None, :]
    a = tl.load(A + b * M + nbr, mask=s_ok, other=0.0)
    s1 = tl.sum(w * a, axis=1) / wsum
    out = (b * M + rows)[:, None] * KP + slots[None, :]
    tl.store(NBR + out, nbr, mask=s_ok)
    tl.store(W + out, w, mask=s_ok)
    tl.store(WSUM + b * M + rows, wsum, mask=r_ok)
    tl.store(S1 + b * M + rows, s1, mask=r_ok)


@triton.jit
def _rerank_expand_kernel(Y, S1, NBR, W, WSUM, QE, LIKELY, HAS, M, D, stride_yb, stride_ym,
                          KP: tl.constexpr, KP_PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ADAPTIVE: tl.constexpr):
    # One D-slice of q' per program; every program of a query re-derives the same top-K' of s1
    # (M' values, cheap) instead of waiting on another launch.
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    cols = tl.arange(0, BLOCK_M)
    slots = tl.arange(0, KP_PAD)
    s_ok = slots < KP
    s = tl.load(S1 + b * M + cols, mask=cols < M, other=float("-inf"))
    qe = tl.full((BLOCK_D,), float("-inf"), dtype=tl.float32)
    members = 0
    for t in range(KP):
        best = tl.max(s, axis=0)
        i = tl.min(tl.where(s == best, cols, BLOCK_M), axis=0)
        i = tl.minimum(i, M - 1)
        s = tl.where(cols == i, float("-inf"), s)
        row = (b * M + i) * KP
        n = tl.load(NBR + row + slots, mask=s_ok, other=0)
        w = tl.load(W + row + slots, mask=s_ok, other=0.0)
        y = tl.load(Y + b * stride_yb + n[:, None] * stride_ym + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        # Refined row, not re-normalized (SPEC quirk, kept).
        yr = tl.sum(w[:, None] * y, axis=0) / tl.load(WSUM + b * M + i)
        if ADAPTIVE:  # only the flagged rows join q'
            flag = tl.load(LIKELY + b * M + i).to(tl.int32)
            yr = tl.where(flag != 0, yr, float("-inf"))
            members += flag
        # Elementwise max over the K' best refined rows; q is not part of q' (SPEC quirk, kept).
        qe = tl.maximum(qe, yr)
    if ADAPTIVE:  # no row: q' = 0 (never -inf into Y q'), and the final kernel takes s2 = s1
        qe = tl.where(members > 0, qe, 0.0)
        tl.store(HAS + b, (members > 0).to(tl.int8), mask=tl.program_id(1) == 0)
    tl.store(QE + b * D + offs_d, qe, mask=d_ok)


@triton.jit
def _rerank_final_kernel(S1, BV, NBR, W, WSUM, F, HAS, M,
                         KP: tl.constexpr, KP_PAD: tl.constexpr, BLOCK_R: tl.constexpr, ADAPTIVE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slots = tl.arange(0, KP_PAD)
    r_ok = rows < M
    s_ok = r_ok[:, None] & (slots < KP)[None, :]
    at = (b * M + rows)[:, None] * KP + slots[None, :]
    n = tl.load(NBR + at, mask=s_ok, other=0)
    w = tl.load(W + at, mask=s_ok, other=0.0)
    bv = tl.load(BV + b * M + n, mask=s_ok, other=0.0)
    s2 = tl.sum(w * bv, axis=1) / tl.load(WSUM + b * M + rows, mask=r_ok, other=1.0)
    s1 = tl.load(S1 + b * M + rows, mask=r_ok, other=0.0)
    if ADAPTIVE:
        s2 = tl.where(tl.load(HAS + b) != 0, s2, s1)
    tl.store(F + b * M + rows, (s1 + s2) / 2, mask=r_ok)


# ----------------------------------------------------------------------------- settings
def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_settings(M: int, D: int, Kp: int, precision: str) -> dict:
    """Every block size and warp count, in one place."""
    block_m = triton.next_power_of_2(M)
    kp_pad = max(2, triton.next_power_of_2(Kp))
    # Neighbour kernel: about 4096 fp32 of G per program (32 registers a thread at 4 warps).
    nb_rows = max(1, min(16, 4096 // block_m))
    nb_warps = 4 if nb_rows * block_m <= 4096 else 8
    # Expansion: [KP_PAD, BLOCK_D] gathered tile of at most 4096 elements.
    ex_d = max(32, min(256, 4096 // kp_pad, triton.next_power_of_2(D)))
    # Gram tiles: 64 fits small M' without idle lanes; 128 for the tensor-core precisions at
    # large M'. IEEE fp32 dots are FMA loops, which prefer the smaller tile.
    if interpreting():
        gram = dict(BLOCK=16, BLOCK_D=16, num_warps=4, num_stages=1)
    elif precision in ("fp16", "bf16", "tf32") and M > 256:
        gram = dict(BLOCK=128, BLOCK_D=32, num_warps=8, num_stages=3)
    else:
        gram = dict(BLOCK=64, BLOCK_D=32, num_warps=4, num_stages=3)
    return dict(block_m=block_m, kp_pad=kp_pad, nb_rows=nb_rows, nb_warps=nb_warps,
                ex_d=ex_d, rd_rows=16, rd_d=min(256, triton.next_power_of_2(D)),
                fin_rows=max(16, min(128, 4096 // kp_pad)), gram=gram)


_DOT_DTYPES = {"fp32": tl.float32, "tf32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
_DOT_PRECISION = {"fp32": "ieee", "tf32": "tf32", "fp16": "ieee", "bf16": "ieee"}


def _gram(Y: torch.Tensor, precision: str, gram: str, cfg: dict) -> torch.Tensor:
    nq, M, D = Y.shape
    if gram == "bmm":
        with _cublas_fp32(tf32=precision == "tf32"):
            return torch.bmm(Y, Y.transpose(1, 2))
    G = torch.empty(nq, M, M, device=Y.device, dtype=torch.float32)
    g = cfg["gram"]
    t = triton.cdiv(M, g["BLOCK"])
    _rerank_gram_kernel[(t, t, nq)](
        Y, G, M, D, Y.stride(0), Y.stride(1), G.stride(0), G.stride(1),
        BLOCK=g["BLOCK"], BLOCK_D=g["BLOCK_D"], DOT_DTYPE=_DOT_DTYPES[precision],
        INPUT_PRECISION=_DOT_PRECISION[precision], num_warps=g["num_warps"], num_stages=g["num_stages"])
    return G


# ----------------------------------------------------------------------------- entry point
# Which Gram the launcher uses: "auto" (cuBLAS bmm for fp32/tf32, the Triton kernel for fp16/bf16),
# "bmm" or "triton". Tests pin it to run the Triton Gram in fp32 as well.
GRAM = "auto"


@torch.no_grad()
def rerank_triton(q: torch.Tensor, Y: torch.Tensor, K: int = 9, beta: float = 0.15, precision: str = "fp32",
                  adaptive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SuperGlobal rerank of given candidates on the GPU (SPEC 6 steps 2-8).

    q: [nq, D] float32; Y: [nq, M', D] float32, each query's candidates in first-stage order,
    on one CUDA device (CPU under TRITON_INTERPRET=1). K >= 0 (K' = min(K + 1, M')), beta finite.
    precision: arithmetic of the Gram only. "fp32" (default, the fidelity mode: IEEE products,
    TF32 off whatever the process flags say), or opt-in "tf32", "fp16", "bf16" (inputs rounded,
    float32 accumulation and float32 G). Everything after the Gram is float32. adaptive: the adaptive mode (docs/adaptive_rerank.md).
    The Gram is cuBLAS bmm for fp32/tf32 and `_rerank_gram_kernel` (half the FLOPs via symmetry)
    for fp16/bf16 (module constant GRAM overrides it).
    Returns (order [nq, M'] int64 into Y's candidate axis, best first; scores [nq, M'] float32,
    the final f in that order). Among equal f, lower candidate index first (stable sort).
    Does not check for NaN/inf (that would cost a device sync); a non-finite candidate makes
    its own score non-finite, which `sgengine.rerank.rerank_candidates` checks.
    Trusts q, Y, K and beta (`sgengine.rerank.rerank_candidates` checks them, and that M' <=
    MAX_CANDIDATES); checks only `precision`, which no stage entry passes.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    gram = GRAM
    if gram == "bmm" and precision in ("fp16", "bf16"):
        raise InputError(f"GRAM='bmm' computes fp32/tf32 only; precision={precision!r} needs the Triton Gram")
    nq, M, D = Y.shape
    dev = Y.device
    if nq == 0 or M == 0:
        return (torch.empty(nq, M, dtype=torch.int64, device=dev),
                torch.empty(nq, M, dtype=torch.float32, device=dev))
    if gram == "auto":
        # Measured on an H200 (nq=70, M'=400, D=2048, whole rerank): fp32 with the cuBLAS Gram
        # 1.93 ms vs 2.86 ms with the Triton IEEE Gram; the Triton fp16/bf16 Gram 0.70 ms, level
        # with cuBLAS tf32 at 0.74 ms.
        gram = "bmm" if precision in ("fp32", "tf32") else "triton"
    q = q.contiguous()
    Y = Y.contiguous()
    Kp = min(K + 1, M)
    cfg = _launch_settings(M, D, Kp, precision)

    G = _gram(Y, precision, gram, cfg)
    a = torch.empty(nq, M, device=dev, dtype=torch.float32)
    rd_grid = (nq, triton.cdiv(M, cfg["rd_rows"]))
    _rerank_rowdot_kernel[rd_grid](Y, q, a, M, D, Y.stride(0), Y.stride(1),
                                   BLOCK_R=cfg["rd_rows"], BLOCK_D=cfg["rd_d"])

    nbr = torch.empty(nq, M, Kp, device=dev, dtype=torch.int32)
    w = torch.empty(nq, M, Kp, device=dev, dtype=torch.float32)
    wsum = torch.empty(nq, M, device=dev, dtype=torch.float32)
    s1 = torch.empty(nq, M, device=dev, dtype=torch.float32)
    # Adaptive mode: per row, whether it may join q'; per query, whether any did.
    likely = torch.empty(nq, M if adaptive else 1, device=dev, dtype=torch.int8)
    has = torch.empty(nq, device=dev, dtype=torch.int8)
    _rerank_neighbors_kernel[(nq, triton.cdiv(M, cfg["nb_rows"]))](
        G, a, nbr, w, wsum, s1, likely, M, G.stride(0), G.stride(1), beta,
        KP=Kp, KP_PAD=cfg["kp_pad"], BLOCK_R=cfg["nb_rows"], BLOCK_M=cfg["block_m"],
        ADAPTIVE=adaptive, LIKELY_SLOT=min(ADAPTIVE_RANK, Kp - 1), num_warps=cfg["nb_warps"])
    del G

    qe = torch.empty(nq, D, device=dev, dtype=torch.float32)
    _rerank_expand_kernel[(nq, triton.cdiv(D, cfg["ex_d"]))](
        Y, s1, nbr, w, wsum, qe, likely, has, M, D, Y.stride(0), Y.stride(1),
        KP=Kp, KP_PAD=cfg["kp_pad"], BLOCK_M=cfg["block_m"], BLOCK_D=cfg["ex_d"], ADAPTIVE=adaptive)

    bv = torch.empty(nq, M, device=dev, dtype=torch.float32)
    _rerank_rowdot_kernel[rd_grid](Y, qe, bv, M, D, Y.stride(0), Y.stride(1),
                                   BLOCK_R=cfg["rd_rows"], BLOCK_D=cfg["rd_d"])

    f = torch.empty(nq, M, device=dev, dtype=torch.float32)
    _rerank_final_kernel[(nq, triton.cdiv(M, cfg["fin_rows"]))](
        s1, bv, nbr, w, wsum, f, has, M, KP=Kp, KP_PAD=cfg["kp_pad"], BLOCK_R=cfg["fin_rows"], ADAPTIVE=adaptive)
    if adaptive:
        # Step F: the expansion's members (the likely rows among the K' best by s1, ties to the
        # lower column as in the expand kernel) keep their first-stage order among themselves.
        best = torch.sort(s1, dim=1, descending=True, stable=True).indices[:, :Kp]
        f = keep_expansion_order(f, best, torch.gather(likely, 1, best).bool())

    scores, order = torch.sort(f, dim=1, descending=True, stable=True)
    return order, scores
