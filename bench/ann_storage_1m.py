"""Two ANN storages over the same rows, side by side: one query at a time, interleaved, three passes,
efSearch 800 and 1600, M' = 800; recall@400 from measure_recall. Made for HNSW32 (float32 copy of
the rows) against HNSW32,SQ8 (8-bit codes) on bench_ann.py's 1M calibrated rows:

    python bench/ann_storage_1m.py WORK_HNSW32/index-1000000 WORK_SQ8/index-1000000 WORK/queries-1000000.npy

(each index folder a copy of the same rows with `sgengine index ann DIR --factory ...` built on it).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

from sgengine import Index
from sgengine.search import ann


def main(argv: list[str]) -> int:
    *paths, qpath = argv
    q = np.load(qpath).astype(np.float32)
    ixs = {Index.open(p).ann_meta()["factory"]: Index.open(p) for p in paths}
    anns = {k: ann.Ann.load(ix) for k, ix in ixs.items()}
    print("load average before:", os.getloadavg())
    for ef in (800, 1600):
        t: dict[str, list[float]] = {k: [] for k in anns}
        for a in anns.values():
            a.set_params({"efSearch": ef})
            a.search(q[:1], 800)
        for _ in range(3):
            for i in range(len(q)):
                for k, a in anns.items():
                    t0 = time.perf_counter()
                    a.search(q[i:i + 1], 800)
                    t[k].append(time.perf_counter() - t0)
        for k, a in anns.items():
            r = ann.measure_recall(ixs[k], a, q, M=400, candidates=800)
            print(f"{k:<11} efSearch={ef}: recall@400 {r.recall:.4f} (min {r.min_recall:.3f}), one query median "
                  f"{statistics.median(t[k]) * 1e3:.2f} ms over {len(t[k])}, "
                  f"{ixs[k].ann['bytes'] / len(ixs[k]):,.0f} B/row, built in {ixs[k].ann_meta()['build_seconds']:.0f} s")
    print("load average after:", os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
