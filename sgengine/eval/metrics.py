"""Retrieval metrics: revisited Oxford/Paris mAP and mP@k (SPEC 7) and GLDv2 mAP@100.

Written from SPEC.md section 7. Conventions kept from the revisited protocol so published numbers
compare: `ranks` is [N_db, N_q] (one column per query, 0-based database indices, best first),
junk items are removed from a query's ranking before positions are counted, AP uses the
trapezoid of the precision just before and just after each positive, and a query with no
positives gets AP = NaN and is left out of the mean.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError

__all__ = ["average_precision", "compute_map", "protocol_gnd", "compute_map_protocols", "gldv2_map_at_100",
           "PROTOCOLS"]

PROTOCOLS = ("easy", "medium", "hard")


def _ids(x, what: str) -> np.ndarray:
    a = np.asarray([] if x is None else x)
    if a.size == 0:
        return np.empty(0, np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)  # ground truth saved as floats by some tools
        else:
            raise InputError(f"{what} must hold integer database indices, got dtype {a.dtype}")
    return np.unique(a.reshape(-1).astype(np.int64))


def _positive_positions(ranked: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in `ranked` once junk is dropped (SPEC 7).

    An index listed both as positive and as junk counts as a positive: the protocols never
    produce that, and dropping a positive would silently lower recall.
    """
    is_pos = np.isin(ranked, ok)
    is_junk = np.isin(ranked, junk) & ~is_pos
    return np.flatnonzero(is_pos[~is_junk])


def _ap_from_positions(p: np.ndarray, n_pos: int) -> float:
    """SPEC 7: sum over positives of (j / p_j + (j + 1) / (p_j + 1)) / (2 n).

    n_pos is the number of ground-truth positives, so a positive missing from a truncated
    ranking contributes 0 instead of inflating the AP.
    """
    if n_pos == 0:
        return float("nan")
    if p.size == 0:
        return 0.0
    j = np.arange(p.size, dtype=np.float64)
    pf = p.astype(np.float64)
    # precision_0 is 1 when p_j = 0 (then j = 0 too); avoid 0/0.
    prec0 = np.where(pf == 0, 1.0, j / np.maximum(pf, 1.0))
    prec1 = (j + 1.0) / (pf + 1.0)
    return float(np.sum(prec0 + prec1) / (2.0 * n_pos))


def _precision_at(p: np.ndarray, kappas: Sequence[int]) -> np.ndarray:
    """SPEC 7 mP@k for one query: kq = min(last positive's 1-based position, k), then hits/kq.

    The cap at the last positive is the revisited protocol's rule: a query with 3 positives
    all at the top scores 1.0 at k = 10, not 0.3.
    """
    if p.size == 0:
        return np.zeros(len(kappas))
    pos1 = p + 1
    last = int(pos1.max())
    out = np.empty(len(kappas))
    for t, k in enumerate(kappas):
        kq = min(last, int(k))
        out[t] = np.count_nonzero(pos1 <= kq) / kq
    return out


def _check_ranks(ranks, nq: int) -> np.ndarray:
    r = np.asarray(ranks)
    if r.ndim == 1:
        r = r[:, None]
    if r.ndim != 2:
        raise InputError(f"ranks must be 2-D [N_db, N_q] (one column per query), got shape {list(r.shape)}")
    if r.shape[1] != nq:
        hint = " (did you pass [N_q, N_db]? transpose it)" if r.shape[0] == nq else ""
        raise InputError(f"ranks has {r.shape[1]} columns but the ground truth has {nq} queries{hint}")
    if not np.issubdtype(r.dtype, np.integer):
        raise InputError(f"ranks must hold integer database indices, got dtype {r.dtype}")
    return r


def average_precision(ranked: np.ndarray, ok, junk=()) -> float:
    """AP of one query's ranking (1-D array of database indices, best first); NaN without positives."""
    okv = _ids(ok, "ok")
    p = _positive_positions(np.asarray(ranked).reshape(-1), okv, _ids(junk, "junk"))
    return _ap_from_positions(p, okv.size)


def compute_map(ranks, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)
                ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP, per-query AP [nq], mean precision at each kappa [len(kappas)], per-query precisions [nq, len(kappas)].

    ranks: [N_db, N_q] integer array, column i the ranking of query i (a truncated ranking of fewer
    than N_db rows is accepted: positives below it count as not retrieved). gnd: one dict per
    query with 'ok' (positives) and optional 'junk' index lists. Queries without positives get
    NaN in `aps` and `prs` and are left out of mAP and mP@k; with none at all, mAP is NaN.
    """
    gnd = list(gnd)
    r = _check_ranks(ranks, len(gnd))
    kappas = tuple(int(k) for k in kappas)
    if any(k < 1 for k in kappas):
        raise InputError(f"kappas must be >= 1, got {kappas}")
    nq = len(gnd)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for i, g in enumerate(gnd):
        if "ok" not in g:
            raise InputError(f"ground truth of query {i} has no 'ok' list (keys: {sorted(g)})")
        ok = _ids(g["ok"], f"gnd[{i}]['ok']")
        if ok.size == 0:
            continue
        p = _positive_positions(r[:, i], ok, _ids(g.get("junk"), f"gnd[{i}]['junk']"))
        aps[i] = _ap_from_positions(p, ok.size)
        prs[i] = _precision_at(p, kappas)
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def protocol_gnd(gnd: Sequence[Mapping], protocol: str) -> list[dict]:
    """Revisited ground truth ('easy', 'hard', 'junk' per query) -> [{'ok', 'junk'}] for one protocol (SPEC 7)."""
    out = []
    for i, g in enumerate(gnd):
        missing = [k for k in ("easy", "hard", "junk") if k not in g]
        if missing:
            raise InputError(f"ground truth of query {i} lacks {missing}: expected the revisited format "
                             f"('easy', 'hard', 'junk'), got keys {sorted(g)}")
        easy, hard, junk = (_ids(g[k], f"gnd[{i}]['{k}']") for k in ("easy", "hard", "junk"))
        if protocol == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif protocol == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        elif protocol == "hard":
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
        else:
            raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return out


def compute_map_protocols(ranks, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)) -> dict:
    """Easy / Medium / Hard evaluation of revisited ground truth.

    Returns {'easy'|'medium'|'hard': {'map': float, 'mpk': [len(kappas)], 'aps': [nq],
    'prs': [nq, len(kappas)], 'kappas': tuple}}; values are fractions (the tables print x100).
    """
    out = {}
    for proto in PROTOCOLS:
        m, aps, mpk, prs = compute_map(ranks, protocol_gnd(gnd, proto), kappas)
        out[proto] = {"map": m, "mpk": mpk, "aps": aps, "prs": prs, "kappas": tuple(int(k) for k in kappas)}
    return out


def gldv2_map_at_100(ranks, relevant: Sequence, k: int = 100) -> float:
    """GLDv2 retrieval mAP@k (k = 100): mean over all queries of sum_{i<=k} P(i) rel(i) / min(n_rel, k).

    ranks: [N_ranked, N_q] (same orientation as compute_map; only the first k rows are read).
    relevant: one array of relevant database indices per query. Every query counts (SPEC 7):
    a query whose relevant list is empty cannot be scored and is an error, so drop such queries
    first (GLDv2's ground truth marks them as ignored). A repeated index is counted once, at its
    first position.
    """
    relevant = list(relevant)
    r = _check_ranks(ranks, len(relevant))[:k]
    if not relevant:
        raise InputError("no queries to evaluate")
    aps = np.empty(len(relevant))
    for i, rel in enumerate(relevant):
        relv = _ids(rel, f"relevant[{i}]")
        if relv.size == 0:
            raise InputError(f"query {i} has no relevant images: GLDv2 mAP@100 counts every query, so leave "
                             "queries without relevant images out of ranks and relevant")
        col = r[:, i]
        _, first = np.unique(col, return_index=True)
        first_mask = np.zeros(col.size, bool)
        first_mask[first] = True
        hit = np.isin(col, relv) & first_mask
        prec = np.cumsum(hit) / np.arange(1, col.size + 1)
        aps[i] = float(np.sum(prec[hit]) / min(relv.size, k))
    return float(aps.mean())
