"""Tie-aware comparison of two rankings (SPEC 6, "Ties").

Sort orders among exactly equal scores are unspecified, and two correct implementations that
round differently can also swap items whose scores differ only by rounding. Two rankings of the
same queries therefore agree when:

1. their score arrays match position by position within `atol + rtol * |score|`, and
2. at every position, the ids agree up to reordering inside a group of tied scores.

A tie group is a maximal run of consecutive positions whose adjacent scores are within the
tolerance in either ranking (so a pair that one side rounds apart and the other rounds together
still counts as tied). Ids are compared as multisets per group, so a repeated id is caught.

The group that reaches the last position of a truncated ranking (the top k of a longer list) is
cut: the tied items beyond k were dropped arbitrarily, so its ids say nothing and are not
compared (as FAISS's `check_ref_knn_with_draws` skips its last group). Pass `truncated=False`
for a complete ranking (every candidate present) to compare that group too.
"""
from __future__ import annotations

import numpy as np

__all__ = ["rankings_agree", "assert_rankings_agree"]


def _as_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be 1-D [k] or 2-D [nq, k], got shape {list(a.shape)}")
    return a


def _tie_groups(sa: np.ndarray, sb: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """Group number per position: a new group starts where neither side's adjacent scores are tied."""
    def close(s: np.ndarray) -> np.ndarray:
        x, y = s[:-1], s[1:]
        return np.abs(x - y) <= atol + rtol * np.maximum(np.abs(x), np.abs(y))

    tied = close(sa) | close(sb)
    return np.concatenate([[0], np.cumsum(~tied)])


def rankings_agree(ids_a, scores_a, ids_b, scores_b, *, rtol: float = 1e-6, atol: float = 1e-6,
                   truncated: bool = True) -> tuple[bool, str]:
    """Whether two rankings agree up to ties; returns (ok, message naming the first difference).

    ids_*: [nq, k] or [k] integer ids, best first; scores_*: the matching scores (numpy or torch).
    rtol/atol: scores closer than `atol + rtol * |score|` are equal. The atol default suits
    cosine-like scores of unit-norm float32 descriptors (O(1) values, D up to a few thousand,
    where float32 reassociation moves a score by up to a few 1e-7).
    truncated: the rankings are the top k of longer lists, so the tie group at the cut is
    not compared; False for complete rankings.
    """
    ia, sa = _as_numpy(ids_a, "ids_a"), _as_numpy(scores_a, "scores_a").astype(np.float64)
    ib, sb = _as_numpy(ids_b, "ids_b"), _as_numpy(scores_b, "scores_b").astype(np.float64)
    shapes = {"ids_a": ia.shape, "scores_a": sa.shape, "ids_b": ib.shape, "scores_b": sb.shape}
    if len(set(shapes.values())) != 1:
        return False, "shapes differ: " + ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
    for name, s in (("scores_a", sa), ("scores_b", sb)):
        bad = ~np.isfinite(s)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            return False, f"query {i}, position {j}: {name} is {s[i, j]} (not finite)"
    tol = atol + rtol * np.maximum(np.abs(sa), np.abs(sb))
    off = np.abs(sa - sb) > tol
    if off.any():
        i, j = np.argwhere(off)[0]
        return False, (f"query {i}, position {j}: scores differ: {sa[i, j]:.9g} vs {sb[i, j]:.9g} "
                       f"(|diff| {abs(sa[i, j] - sb[i, j]):.3g} > tol {tol[i, j]:.3g}; "
                       f"{int(off.sum())} positions off in all)")
    k = ia.shape[1]
    for i in np.flatnonzero((ia != ib).any(axis=1)):
        g = _tie_groups(sa[i], sb[i], rtol, atol)
        last = g[-1] if k else -1
        # Sort by (group, id) on both sides: equal multisets per group give equal arrays.
        pa = np.lexsort((ia[i], g))
        pb = np.lexsort((ib[i], g))
        diff = (ia[i][pa] != ib[i][pb]) & ~(truncated & (g == last))
        if diff.any():
            grp = g[np.flatnonzero(diff)[0]]
            pos = np.flatnonzero(g == grp)
            j = pos[np.flatnonzero(ia[i][pos] != ib[i][pos])[0]]
            where = (f"position {j}" if len(pos) == 1 else
                     f"position {j} (tie group at positions {pos[0]}..{pos[-1]})")
            return False, (f"query {i}, {where}: ids differ beyond ties: "
                           f"a has {sorted(ia[i][pos].tolist())}, b has {sorted(ib[i][pos].tolist())} "
                           f"at scores {sa[i, pos[0]]:.9g}..{sa[i, pos[-1]]:.9g}")
    return True, "rankings agree (up to ties)"


def assert_rankings_agree(ids_a, scores_a, ids_b, scores_b, *, rtol: float = 1e-6, atol: float = 1e-6,
                          truncated: bool = True, context: str = "") -> None:
    """`rankings_agree`, raising AssertionError with its message (prefixed by `context`) on a difference."""
    ok, msg = rankings_agree(ids_a, scores_a, ids_b, scores_b, rtol=rtol, atol=atol, truncated=truncated)
    if not ok:
        raise AssertionError(f"{context}: {msg}" if context else msg)
