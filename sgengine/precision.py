"""What a reduced-precision backbone costs in fidelity: descriptor error and top-k agreement
against the fp32 engine (DESIGN.md "Precision policy": fp32 is the fidelity mode; fp16/bf16 are
opt-in and must report their agreement).

    ref = Engine.load(bundle, index, device="cuda")                     # fp32
    fast = Engine.load(bundle, index, device="cuda", precision="fp16")
    precision_report(ref, fast, photos)   # {"max_abs_err": ..., "topk_agreement": ...}
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["precision_report", "topk_agreement"]


def topk_agreement(ids_a: Sequence[Sequence], ids_b: Sequence[Sequence], k: int) -> float:
    """Mean over queries of |top-k(a) & top-k(b)| / k: 1.0 when both return the same k items."""
    if len(ids_a) != len(ids_b):
        raise ValueError(f"{len(ids_a)} rankings against {len(ids_b)}")
    if not len(ids_a):
        return float("nan")
    fr = [len(set(list(a)[:k]) & set(list(b)[:k])) / min(k, max(len(a), 1)) for a, b in zip(ids_a, ids_b)]
    return float(np.mean(fr))


def precision_report(reference, candidate, images: Sequence[Any], *, k: int = 100, rerank: bool = True,
                     also_k: Sequence[int] = (10,)) -> dict:
    """Embed `images` with both engines (same bundle; `reference` normally fp32) and compare.

    Returns max_abs_err (largest |difference| of any descriptor element; descriptors are unit
    vectors), min_cosine / mean_cosine between the two descriptors of each image and, when both
    engines have an index, topk_agreement of their `search(..., k)` results, and top{j}_agreement
    for each j in also_k (j < k) from the same searches. Each engine embeds the images once.
    """
    if reference.bundle.fingerprint != candidate.bundle.fingerprint:
        raise ValueError("precision_report compares two engines over the same bundle")
    a = reference.embed(list(images))
    b = candidate.embed(list(images))
    cos = np.sum(a.astype(np.float64) * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    out = {"images": len(a), "reference": reference.describe()["precision"],
           "candidate": candidate.describe()["precision"],
           "max_abs_err": float(np.abs(a - b).max()) if len(a) else 0.0,
           "min_cosine": float(cos.min()) if len(a) else 1.0, "mean_cosine": float(cos.mean()) if len(a) else 1.0}
    if reference.index is not None and candidate.index is not None and len(a):
        kk = min(k, len(reference.index))
        ra = reference.search(a, k=kk, rerank=rerank)
        rb = candidate.search(b, k=kk, rerank=rerank)
        ids_a, ids_b = ra.ids, rb.ids
        out["k"] = kk
        out["topk_agreement"] = topk_agreement(ids_a, ids_b, kk)
        for j in also_k:
            if j < kk:
                out[f"top{j}_agreement"] = topk_agreement(ids_a, ids_b, j)
    return out
