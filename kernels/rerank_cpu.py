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

Plain torch, so it also runs on CUDA (used there when Triton is missing), but it is tuned for
the CPU: see `_QUERY_CHUNK_BYTES`.
"""
from __future__ import annotations

import torch

__all__ = ["rerank_candidates_cpu"]

# Queries per chunk are sized so one chunk's Gram ([b, M', M'] float32) stays near 32 MiB:
# batching amortizes the per-call overhead of the small ops at M' = 100 (hundreds of queries
# per bmm), while at M' = 1600 a chunk is 3 queries and the Gram stays cache-friendly.
_QUERY_CHUNK_BYTES = 32 << 20


@torch.no_grad()
def rerank_candidates_cpu(q: torch.Tensor, Y: torch.Tensor, K: int = 9, beta: float = 0.15
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [nq, D] f32, Y [nq, M', D] f32 contiguous -> (order [nq, M'] int64, scores [nq, M'] f32).

    Inputs are assumed validated (`sgengine.rerank.rerank_candidates` does it once).
    """
    nq, M, D = Y.shape
    Kp = min(K + 1, M)
    order = torch.empty(nq, M, dtype=torch.int64, device=Y.device)
    scores = torch.empty(nq, M, dtype=torch.float32, device=Y.device)
    step = max(1, _QUERY_CHUNK_BYTES // (4 * M * M))
    for a in range(0, nq, step):
        qb, Yb = q[a:a + step], Y[a:a + step]
        b = Yb.shape[0]
        Yt = Yb.transpose(1, 2)
        G = torch.bmm(Yb, Yt)  # [b, M, M]: the only O(M^2 D) pass
        v, n = torch.topk(G, Kp, dim=2, largest=True, sorted=True)  # [b, M, K']
        del G
        w = v.mul_(beta)
        w[..., 0] = 1.0  # slot 0 weight forced to 1 (SPEC quirk, even for a duplicate)
        wsum = w.sum(dim=2)  # [b, M]
        n_flat = n.view(b, M * Kp)
        # First-stage dots of every candidate; s1 from them, no refined rows needed. The
        # [b, 1, D] x [b, D, M] form runs as a GEMM; [b, M, D] x [b, D, 1] took ~10x longer.
        d = torch.bmm(qb[:, None, :], Yt).view(b, M)
        s1 = (w * torch.gather(d, 1, n_flat).view(b, M, Kp)).sum(dim=2).div_(wsum)
        # Expansion: refined rows of the K' best by s1 only (elementwise max, q excluded,
        # no renormalization: SPEC quirks). Their weights are scattered into a [b, K', M]
        # matrix (repeated neighbours add up) and applied in one small GEMM, which measured
        # faster than gathering K'^2 rows of Y.
        best = torch.topk(s1, Kp, dim=1, largest=True, sorted=False).indices  # [b, K']
        nb = torch.gather(n, 1, best[:, :, None].expand(b, Kp, Kp))
        wb = torch.gather(w, 1, best[:, :, None].expand(b, Kp, Kp))
        Wb = torch.zeros(b, Kp, M, dtype=Y.dtype, device=Y.device).scatter_add_(2, nb, wb)
        refined = torch.bmm(Wb, Yb).div_(torch.gather(wsum, 1, best)[:, :, None])  # [b, K', D]
        qe = refined.amax(dim=1)  # [b, D]
        e = torch.bmm(qe[:, None, :], Yt).view(b, M)
        s2 = (w * torch.gather(e, 1, n_flat).view(b, M, Kp)).sum(dim=2).div_(wsum)
        f = (s1 + s2).mul_(0.5)
        fs, idx = torch.sort(f, dim=1, descending=True)
        order[a:a + b], scores[a:a + b] = idx, fs
    return order, scores
