"""Metrics of SPEC 7 against cases worked out by hand, an independent loop implementation, and properties."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from sgengine.errors import InputError
from sgengine.eval.metrics import (average_precision, compute_map, compute_map_protocols, gldv2_map_at_100,
                                   protocol_gnd)


def col(*ids):
    """One query's ranking as the [N_db, 1] column compute_map expects."""
    return np.asarray(ids, dtype=np.int64)[:, None]


def ap_by_hand_loop(ranked, ok, junk):
    """SPEC 7 read literally, with exact fractions: walk the ranking, skip junk, add the trapezoid per positive."""
    ok, junk = set(ok), set(junk) - set(ok)
    if not ok:
        return math.nan
    total, j, pos = Fraction(0), 0, 0
    for item in ranked:
        if item in junk:
            continue
        if item in ok:
            p0 = Fraction(1) if pos == 0 else Fraction(j, pos)
            p1 = Fraction(j + 1, pos + 1)
            total += (p0 + p1) / (2 * len(ok))
            j += 1
        pos += 1
    return float(total)


# ----------------------------------------------------------------------------- AP by hand
def test_ap_two_positives_at_0_and_2():
    # ranking [10, 11, 12, 13], positives 10 (position 0) and 12 (position 2), n = 2, no junk:
    #   j=0, p=0: precision_0 = 1 (p = 0), precision_1 = 1/1      -> (1 + 1) / 4   = 1/2
    #   j=1, p=2: precision_0 = 1/2,        precision_1 = 2/3      -> (1/2 + 2/3)/4 = 7/24
    # AP = 12/24 + 7/24 = 19/24 (= ((1+1)/2 + (1/2+2/3)/2) / 2)
    m, aps, mpk, prs = compute_map(col(10, 11, 12, 13), [{"ok": [10, 12], "junk": []}])
    assert m == pytest.approx(19 / 24, abs=1e-12)
    assert isinstance(m, float)
    assert aps.shape == (1,) and aps[0] == pytest.approx(19 / 24, abs=1e-12)
    # mP@k: 1-based positions 1 and 3, so kq = min(3, k):
    #   k=1: kq=1, hits 1 -> 1;  k=5: kq=3, hits 2 -> 2/3;  k=10: kq=3 -> 2/3
    np.testing.assert_allclose(mpk, [1, 2 / 3, 2 / 3], atol=1e-12)
    np.testing.assert_allclose(prs, [[1, 2 / 3, 2 / 3]], atol=1e-12)


def test_ap_three_positives_late():
    # 0-based positions 1, 3, 11 out of 12, n = 3:
    #   j=0, p=1 : 0/1 + 1/2   = 1/2
    #   j=1, p=3 : 1/3 + 2/4   = 5/6
    #   j=2, p=11: 2/11 + 3/12 = 19/44
    # sum = 66/132 + 110/132 + 57/132 = 233/132; AP = sum / (2*3) = 233/792
    ranked = [100, 0, 101, 1, 102, 103, 104, 105, 106, 107, 108, 2]
    m, _, mpk, _ = compute_map(col(*ranked), [{"ok": [0, 1, 2], "junk": []}])
    assert m == pytest.approx(233 / 792, abs=1e-12)
    # mP@k with 1-based positions 2, 4, 12 (last = 12, so kq = k):
    #   k=1: 0/1;  k=5: 2/5;  k=10: 2/10
    np.testing.assert_allclose(mpk, [0, 2 / 5, 2 / 10], atol=1e-12)


def test_junk_before_positive_is_dropped():
    # ranking [j, a, x, b] with j junk: dropping j gives [a, x, b] -> the 19/24 case above.
    m, _, _, _ = compute_map(col(7, 10, 11, 12), [{"ok": [10, 12], "junk": [7]}])
    assert m == pytest.approx(19 / 24, abs=1e-12)
    # Without declaring 7 as junk, positives sit at 1 and 3:
    #   j=0, p=1: (0/1 + 1/2)/4 = 1/8;  j=1, p=3: (1/3 + 2/4)/4 = 5/24  -> AP = 8/24 = 1/3
    m2, _, _, _ = compute_map(col(7, 10, 11, 12), [{"ok": [10, 12], "junk": []}])
    assert m2 == pytest.approx(1 / 3, abs=1e-12)


def test_positive_missing_from_truncated_ranking_counts_as_not_found():
    # ok = {a, b, c}, ranking [a, x]: only a found at p=0 -> (1 + 1) / (2*3) = 1/3
    assert average_precision(np.array([1, 9]), [1, 2, 3]) == pytest.approx(1 / 3, abs=1e-12)


# ----------------------------------------------------------------------------- properties
def test_perfect_ranking_is_one():
    rng = np.random.default_rng(0)
    gnd, cols = [], []
    for _ in range(5):
        n = int(rng.integers(1, 20))
        perm = rng.permutation(50)
        gnd.append({"ok": perm[:n], "junk": []})
        cols.append(perm)
    m, aps, mpk, _ = compute_map(np.stack(cols, axis=1), gnd)
    assert m == 1.0
    np.testing.assert_array_equal(aps, 1.0)
    np.testing.assert_array_equal(mpk, 1.0)


def test_worst_ranking_is_low_but_positive():
    # 1 positive last among 100 (p=99, j=0): precision_0 = 0/99, precision_1 = 1/100 -> (0 + 1/100)/2 = 1/200
    ranked = np.arange(100)
    assert average_precision(ranked, [99]) == pytest.approx(1 / 200, abs=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_matches_literal_loop_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    n_db, nq = 60, 7
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
    gnd = []
    for _ in range(nq):
        ids = rng.permutation(n_db)
        n_ok, n_junk = int(rng.integers(1, 12)), int(rng.integers(0, 8))
        gnd.append({"ok": ids[:n_ok].tolist(), "junk": ids[n_ok:n_ok + n_junk].tolist()})
    m, aps, _, _ = compute_map(ranks, gnd)
    want = [ap_by_hand_loop(ranks[:, i].tolist(), g["ok"], g["junk"]) for i, g in enumerate(gnd)]
    np.testing.assert_allclose(aps, want, rtol=0, atol=1e-12)
    assert m == pytest.approx(np.mean(want), abs=1e-12)
    assert 0.0 <= m <= 1.0


def test_junk_anywhere_never_changes_ap_of_the_rest():
    # Inserting junk items anywhere in a ranking gives the AP of the ranking without them.
    rng = np.random.default_rng(3)
    base = rng.permutation(40)
    ok = base[rng.choice(40, 6, replace=False)]
    ap0 = average_precision(base, ok)
    for _ in range(10):
        junk_ids = np.arange(100, 110)
        ranked = base.tolist()
        for j in junk_ids:
            ranked.insert(int(rng.integers(0, len(ranked) + 1)), int(j))
        assert average_precision(np.array(ranked), ok, junk_ids) == pytest.approx(ap0, abs=1e-12)
        # and the same junk, undeclared, lowers AP (it pushes positives down)
        assert average_precision(np.array(ranked), ok) < ap0


def test_query_without_positives_is_nan_and_skipped():
    ranks = np.stack([np.array([10, 11, 12, 13]), np.array([13, 12, 11, 10])], axis=1)
    gnd = [{"ok": [10, 12], "junk": []}, {"ok": [], "junk": [13]}]
    m, aps, mpk, prs = compute_map(ranks, gnd)
    assert aps[0] == pytest.approx(19 / 24) and math.isnan(aps[1])
    assert m == pytest.approx(19 / 24, abs=1e-12)  # the NaN query is not averaged in as 0
    assert np.isnan(prs[1]).all()
    np.testing.assert_allclose(mpk, prs[0])


def test_no_query_with_positives_gives_nan():
    m, aps, mpk, _ = compute_map(col(1, 2), [{"ok": []}])
    assert math.isnan(m) and np.isnan(aps).all() and np.isnan(mpk).all()


def test_mpk_caps_at_last_positive():
    # 3 positives at the top of 50: kq = min(3, 10) = 3, so mP@10 = 3/3 = 1 (not 3/10).
    _, _, mpk, _ = compute_map(col(*range(50)), [{"ok": [0, 1, 2]}], kappas=(1, 5, 10))
    np.testing.assert_allclose(mpk, [1, 1, 1])
    # positives at 1-based 1 and 7: k=5 -> kq=5, 1 hit -> 1/5; k=10 -> kq=7, 2 hits -> 2/7
    _, _, mpk, _ = compute_map(col(*range(50)), [{"ok": [0, 6]}], kappas=(1, 5, 10))
    np.testing.assert_allclose(mpk, [1, 1 / 5, 2 / 7], atol=1e-12)


def test_mean_over_queries_by_hand():
    # query 0: 19/24 (case above); query 1: single positive at p=1 -> (0/1 + 1/2)/2 = 1/4
    ranks = np.stack([np.array([10, 11, 12, 13]), np.array([11, 10, 12, 13])], axis=1)
    m, aps, _, _ = compute_map(ranks, [{"ok": [10, 12]}, {"ok": [10]}])
    np.testing.assert_allclose(aps, [19 / 24, 1 / 4], atol=1e-12)
    assert m == pytest.approx((19 / 24 + 1 / 4) / 2, abs=1e-12)


def test_bad_shapes_are_named():
    with pytest.raises(InputError, match="transpose"):
        compute_map(np.zeros((2, 5), np.int64), [{"ok": [1]}] * 2)
    with pytest.raises(InputError, match="integer"):
        compute_map(np.zeros((5, 1)), [{"ok": [1]}])
    with pytest.raises(InputError, match="'ok'"):
        compute_map(col(1, 2), [{"easy": [1]}])


# ----------------------------------------------------------------------------- protocols
def test_protocols_by_hand():
    # easy = [0], hard = [1], junk = [2]; ranking of ids [2, 1, 3, 0, 4]
    #   Easy  : ok [0],    junk [2, 1] -> [3, 0, 4]:    0 at p=1 -> (0/1 + 1/2)/2 = 1/4
    #   Medium: ok [0, 1], junk [2]    -> [1, 3, 0, 4]: p=0, 2   -> 19/24
    #   Hard  : ok [1],    junk [2, 0] -> [1, 3, 4]:    p=0      -> 1
    gnd = [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 1, 1]}]
    res = compute_map_protocols(col(2, 1, 3, 0, 4), gnd)
    assert res["easy"]["map"] == pytest.approx(1 / 4, abs=1e-12)
    assert res["medium"]["map"] == pytest.approx(19 / 24, abs=1e-12)
    assert res["hard"]["map"] == pytest.approx(1.0, abs=1e-12)
    # Medium mP@k: 1-based positions 1, 3 -> k=1: 1; k=5, 10: kq=3 -> 2/3
    np.testing.assert_allclose(res["medium"]["mpk"], [1, 2 / 3, 2 / 3], atol=1e-12)
    assert res["easy"]["kappas"] == (1, 5, 10)


def test_protocol_lists():
    g = [{"easy": np.array([1, 2]), "hard": [3], "junk": [4]}]
    e, m, h = (protocol_gnd(g, p)[0] for p in ("easy", "medium", "hard"))
    assert sorted(e["ok"]) == [1, 2] and sorted(e["junk"]) == [3, 4]
    assert sorted(m["ok"]) == [1, 2, 3] and sorted(m["junk"]) == [4]
    assert sorted(h["ok"]) == [3] and sorted(h["junk"]) == [1, 2, 4]
    with pytest.raises(InputError, match="protocol"):
        protocol_gnd(g, "extreme")
    with pytest.raises(InputError, match="hard"):
        protocol_gnd([{"easy": [1], "junk": []}], "easy")


def test_protocol_without_hard_positives_skips_query_in_hard_only():
    gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [1], "hard": [2], "junk": []}]
    ranks = np.stack([np.array([0, 1, 2]), np.array([2, 1, 0])], axis=1)
    res = compute_map_protocols(ranks, gnd)
    assert math.isnan(res["hard"]["aps"][0])
    assert res["hard"]["map"] == pytest.approx(1.0)  # query 1: its hard positive 2 is first
    # Easy, query 1: hard item 2 is junk, so 1 is first -> 1.0; query 0 -> 1.0
    assert res["easy"]["map"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- GLDv2
def test_gldv2_map_at_100_by_hand():
    # query 0: relevant {3, 7}, ranking [3, 5, 7, 9]: hits at 1 (P=1) and 3 (P=2/3)
    #          -> (1 + 2/3) / min(2, 100) = 5/6
    # query 1: relevant {4}, not retrieved -> 0
    # mAP@100 = (5/6 + 0) / 2 = 5/12 (every query counts)
    ranks = np.stack([np.array([3, 5, 7, 9]), np.array([1, 2, 3, 5])], axis=1)
    assert gldv2_map_at_100(ranks, [np.array([3, 7]), np.array([4])]) == pytest.approx(5 / 12, abs=1e-12)


def test_gldv2_cap_and_cutoff_and_duplicates():
    # 150 relevant, first 100 ranked all relevant: sum of P = 100, divided by min(150, 100) = 100 -> 1
    assert gldv2_map_at_100(col(*range(200)), [np.arange(150)]) == pytest.approx(1.0)
    # a relevant item at position 101 is beyond the cut-off: 0
    ranked = list(range(1000, 1100)) + [5]
    assert gldv2_map_at_100(col(*ranked), [[5]]) == 0.0
    # a repeated id counts once: [3, 3, 7], relevant {3, 7} -> P(1)=1, P(3)=2/3 -> (1 + 2/3)/2 = 5/6
    assert gldv2_map_at_100(col(3, 3, 7), [[3, 7]]) == pytest.approx(5 / 6, abs=1e-12)
    with pytest.raises(InputError, match="no relevant"):
        gldv2_map_at_100(col(1, 2), [[]])
