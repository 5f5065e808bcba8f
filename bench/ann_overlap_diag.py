"""Where the ANN pipeline's final top 100 departs from the exact one's, per query: which exact first-stage ranks
the ANN's candidates missed (bench_ann.py's 1M work folder with an HNSW32,SQ8 ANN; efSearch 1600, M' = 800)."""
import numpy as np
from sgengine import Engine, Index
from sgengine.bundle import Bundle
from sgengine.search import ann, search_index
W = __import__('sys').argv[1]  # bench_ann.py's work folder: index-1000000, bundle-r50, queries-1000000.npy
ix = Index.open(f'{W}/index-1000000'); b = Bundle.load(f'{W}/bundle-r50')
q = np.load(f'{W}/queries-1000000.npy').astype(np.float32)
ex = Engine.load(b, index=ix, ann="off")
an = Engine.load(b, index=ix, ann="require", ann_params={"efSearch": 1600})
a = ann.Ann.load(ix, params={"efSearch": 1600})
s_ex, r_ex = search_index(ix, q, 400)
for i in range(20):
    e = ex.search(q[i], k=100, M=400, K=9, beta=0.15); n = an.search(q[i], k=100, M=400, K=9, beta=0.15)
    cand = set(a.search(q[i:i+1], 800)[0].tolist())
    missing = [j for j, r in enumerate(r_ex[i]) if r not in cand]
    ov = len(set(e.ids[0]) & set(n.ids[0]))
    # score gap statistics around rank 100 of the exact reranked list
    sc = np.asarray(e.scores[0])
    print(f"q{i}: overlap {ov}/100, missing exact ranks {missing[:8]}, reranked scores at ranks 95 and 100: {sc[94]:.5f}..{sc[99]:.5f}; first-stage s[0] {s_ex[i,0]:.4f} s[99] {s_ex[i,99]:.4f} s[399] {s_ex[i,399]:.4f}")
