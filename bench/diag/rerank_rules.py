"""Candidate variants of the adaptive rerank (docs/adaptive_rerank.md), compared on pooled seeds.

    python bench/diag/rerank_rules.py --bundle BUNDLE --workdir DIR --seeds 0,1,2 adaptive,keepE,r3+keepE
    python bench/diag/rerank_rules.py --bundle BUNDLE --workdir DIR --seeds 3,4 r3+keepE   # check on other seeds

A plain PyTorch transcription of SPEC 6 with the adaptive mode's tests and switches for the
variants tried in session 4 (not the engine's code: for choosing a rule, not for serving one):
  adaptive       the session-3 mode (r = 2, no step F); "r3+keepE" is the mode shipped since session 4
  rN             the likely-relevant test against the N-th nearest other candidate (r3, r1 ...)
  keepE          the expansion's members keep their first-stage order among themselves: their
                 final scores are redistributed among them in first-stage order (the expansion
                 decides where they stand among the other candidates, not their order)
  eminN          the expansion only with >= N likely relevant members among the K' best
  +q             q inside the expansion's elementwise max
  dmix           f = (d + s1 + s2) / 3
  anc            (session 5) the expansion keeps only its anchor a (the member with the largest d) and
                 the members t at least as similar to a as to the query, G[t, a] >= d_t: one of two
                 lookalike groups
  ancv           (session 5) the same with "a is among t's K' nearest candidates" as the test
  noA            (session 5) step A as SPEC 6 (every neighbour takes part): only the expansion adapts
  Alr            (session 5) step A's test only for likely relevant candidates (C); the others take
                 every neighbour, as SPEC 6
  A2             (session 5) a neighbour takes part in a candidate's refinement only when it is also at
                 least as similar to the candidate as to the query (v_ij >= d_i and v_ij >= d_n)
Names combine: r3+keepE, emin4+keepE, r3+keepE+anc. Sets: sgengine.eval.photo_groups at full size and at 224 px
(seed n: new augmented views and positive draws of the same scenes, files under DIR/photos[224]_sn,
descriptors cached in DIR), plus bench/datagen.py landmark-like sets; per set the mAP over all
seeds' queries. Prints the table and, per variant, the issue's three checks.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rerank(q, Y, var: str, K: int = 9, beta: float = 0.15, r: int = 2):
    if var.startswith("r") and var[1].isdigit():
        r = int(var[1])
    nq, M, D = Y.shape
    Kp = min(K + 1, M)
    b = torch.arange(nq)[:, None]
    G = torch.bmm(Y, Y.transpose(1, 2))
    v, n = torch.topk(G, Kp, dim=2)
    d = torch.bmm(Y, q[:, :, None]).squeeze(2)
    w = beta * v
    w[..., 0] = 1.0
    if var != "faithful" and "noA" not in var.split("+"):
        admit = v[..., 1:] >= d[:, :, None]
        if "Alr" in var.split("+"):  # step A only for likely relevant candidates; the others as SPEC 6
            admit |= ~(d >= v[..., min(r, Kp - 1)])[:, :, None]
        if "A2" in var.split("+"):
            admit &= v[..., 1:] >= torch.gather(d, 1, n[..., 1:].reshape(nq, -1)).view(nq, M, Kp - 1)
        w[..., 1:] = torch.where(admit, w[..., 1:], 0.0)
    Yr = torch.zeros_like(Y)
    for j in range(Kp):
        Yr += w[..., j:j + 1] * Y[b, n[..., j]]
    Yr /= w.sum(2, keepdim=True)
    s1 = torch.bmm(Yr, q[:, :, None]).squeeze(2)
    o = torch.argsort(s1, dim=1, descending=True)[:, :Kp]
    member = (torch.ones(nq, Kp, dtype=torch.bool) if var == "faithful"
              else torch.gather(d >= v[..., min(r, Kp - 1)], 1, o))
    if {"anc", "ancv"} & set(var.split("+")):
        a = torch.where(member, o, M).min(1).values.clamp(max=M - 1)  # the member with the largest d
        if "anc" in var.split("+"):
            near = torch.gather(G[b.squeeze(1), a], 1, o) >= torch.gather(d, 1, o)
        else:
            near = (torch.gather(n, 1, o[:, :, None].expand(-1, -1, Kp)) == a[:, None, None]).any(2)
        member = member & (near | (o == a[:, None]))
    sel = Yr[b, o].masked_fill(~member[:, :, None], float("-inf"))
    if "+q" in var:
        sel = torch.cat([sel, q[:, None, :]], 1)
    has = member.any(1)
    if var.startswith("emin"):
        has = member.sum(1) >= int(var[4:].split("+")[0])
    qe = torch.where(has[:, None], sel.amax(1), 0.0)
    s2 = torch.where(has[:, None], torch.bmm(Yr, qe[:, :, None]).squeeze(2), s1)
    f = (d + s1 + s2) / 3 if var.startswith("dmix") else (s1 + s2) / 2
    if "keepE" in var:
        f = f.clone()
        for i in range(nq):
            idx = o[i][member[i]]
            if len(idx) > 1:
                f[i, torch.sort(idx).values] = torch.sort(f[i, idx], descending=True).values
    return torch.sort(f, 1, descending=True)


def aps(q, X, gnd, var: str, M: int = 400) -> np.ndarray:
    from sgengine.eval.metrics import compute_map
    _, rows = torch.sort(q @ X.T, dim=1, descending=True)
    if var == "global":
        ranks = rows
    else:
        Mp = min(M, X.shape[0])
        Y = X[rows[:, :Mp]]
        order = torch.cat([rerank(q[a:a + 16], Y[a:a + 16], var)[1] for a in range(0, len(q), 16)])
        ranks = torch.cat([torch.gather(rows[:, :Mp], 1, order), rows[:, Mp:]], 1)
    return np.asarray(compute_map(ranks.numpy().T, gnd)[1]) * 100


def photo_sets(bundle: str, workdir: Path, seed: int, max_side: int | None) -> dict:
    from sgengine import Engine
    from sgengine.eval.photo_groups import GROUPINGS, QUERY_VARIANTS, make_group_set
    root = workdir / (f"photos{max_side or ''}" + (f"_s{seed}" if seed else ""))
    sets = {(g + ("H" if r else ""), v): make_group_set(root, g, v, max_side=max_side, seed=seed, region_distractors=r)
            for r in (0, 3) for g in GROUPINGS for v in QUERY_VARIANTS}
    cache = workdir / f"desc{max_side or ''}_s{seed}.npz"
    if cache.exists():
        z = np.load(cache)
        desc = dict(zip(z["paths"].tolist(), z["desc"]))
    else:
        paths = sorted({str(p) for s in sets.values() for p in [*s.queries.values(), *(p for _, p in s.database)]})
        desc = dict(zip(paths, np.asarray(Engine.load(bundle).embed(paths))))
        np.savez(cache, paths=np.array(paths), desc=np.stack([desc[p] for p in paths]))
    return {k: (torch.from_numpy(np.stack([desc[str(p)] for p in s.queries.values()])).float(),
                torch.from_numpy(np.stack([desc[str(p)] for _, p in s.database])).float(), s.gnd())
            for k, s in sets.items()}


def landmark(views: float, seed: int, n: int = 20000, d: int = 1280, nq: int = 100):
    from datagen import DEFAULT, generate
    rows, scene = generate(n, d, replace(DEFAULT, views=views), seed=seed)
    rng = np.random.default_rng(seed)
    sizes = np.bincount(scene)
    pick = rng.choice(np.flatnonzero(sizes[:scene.max()] >= 10), nq, replace=False)
    qrow = np.array([np.flatnonzero(scene == s)[0] for s in pick])
    keep = np.ones(n, bool)
    keep[qrow] = False
    sc = scene[keep]
    return (torch.from_numpy(rows[qrow]), torch.from_numpy(rows[keep]),
            [{"ok": np.flatnonzero(sc == s), "junk": []} for s in pick])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", help="comma-separated variant names (module docstring)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--seeds", default="0")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = a.variants.split(",")
    modes = ["global", "faithful"] + variants
    a.workdir.mkdir(parents=True, exist_ok=True)
    pooled: dict[tuple, dict[str, list]] = {}
    for seed in seeds:
        for size in (None, 224):
            for key, (q, X, gnd) in photo_sets(a.bundle, a.workdir, seed, size).items():
                row = pooled.setdefault(("full" if size is None else "224",) + key, {})
                for m in modes:
                    row.setdefault(m, []).append(aps(q, X, gnd, m))
        for views in (20.0, 40.0):
            q, X, gnd = landmark(views, seed)
            row = pooled.setdefault(("syn", f"v{int(views)}", ""), {})
            for m in modes:
                row.setdefault(m, []).append(aps(q, X, gnd, m))
    res = {(k, m): float(np.concatenate(v[m]).mean()) for k, v in pooled.items() for m in modes}
    print(f"seeds {seeds}; mAP over every seed's queries")
    print(f"{'set':24}" + "".join(f"{m:>13}" for m in modes))
    for k in pooled:
        print(f"{'/'.join(k):24}" + "".join(f"{res[(k, m)]:13.2f}" for m in modes))
    photo = [k for k in pooled if k[0] != "syn"]
    for m in variants:
        worst = min(photo, key=lambda k: res[(k, m)] - res[(k, "global")])
        large = [k for k in photo if k[1] == "large"]
        wl = min(large, key=lambda k: res[(k, m)] - res[(k, "faithful")])
        gain = [(res[(k, m)] - res[(k, "global")]) / (res[(k, "faithful")] - res[(k, "global")])
                for k in pooled if k[0] == "syn"]
        print(f"{m}: worst vs global {res[(worst, m)] - res[(worst, 'global')]:+.2f} ({'/'.join(worst)}); "
              f"larger-group sets vs faithful, worst {res[(wl, m)] - res[(wl, 'faithful')]:+.2f} ({'/'.join(wl)}); "
              f"synthetic share of the faithful gain {[round(g, 2) for g in gain]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
