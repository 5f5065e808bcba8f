"""Where the HNSW32,SQ8 first stage misses (bench_ann.py 1M work folder, efSearch 800, M' = 800): for each
held-out query, the exact ranks of the missed top-400 rows and their ranks in a PCA-whitened 256-d space
(whitening fitted on 65,536 sampled rows). Evidence for the probe (sgengine.search.ann, "The probe")."""
import numpy as np, faiss
from sgengine import Index
W = __import__('sys').argv[1] if len(__import__('sys').argv) > 1 else '/tmp/annbench1m_sq8'
ix = Index.open(f'{W}/index-1000000'); n = len(ix)
q = np.load(f'{W}/queries-1000000.npy').astype(np.float32)
gt = np.load(__import__('os').environ.get('OUT', '/tmp/exp') + '/gt.npy')  # from ivf_top10.py
fx = faiss.read_index(f'{W}/index-1000000/' + ix.ann['file']); fx.hnsw.efSearch = 800  # the main index (a probe's bytes follow it)
_, I = fx.search(q, 800)
rng = np.random.default_rng(0); tr = np.sort(rng.choice(n, 65536, replace=False))
T = np.asarray(ix.gather(tr), np.float32); mu = T.mean(0)
ev, V = np.linalg.eigh(np.cov((T - mu).T)); ev, V = ev[::-1], V[:, ::-1]
P = (V[:, :256] * ev[:256] ** -0.5).astype(np.float32)
Z = np.empty((n, 256), np.float32)
for a in range(0, n, 1 << 17):
    Z[a:a + (1 << 17)] = (np.asarray(ix.gather(np.arange(a, min(n, a + (1 << 17)))), np.float32) - mu) @ P
Z /= np.linalg.norm(Z, axis=1, keepdims=True)
qz = (q - mu) @ P; qz /= np.linalg.norm(qz, axis=1, keepdims=True)
S = qz @ Z.T
for i in range(len(q)):
    miss = [int(r) for r in gt[i, :400] if r not in set(I[i])]
    if not miss: continue
    wr = [int((S[i] > S[i, m]).sum()) for m in miss]
    pos = [int(np.flatnonzero(gt[i] == m)[0]) for m in miss]
    print(f'q{i}: missed exact ranks {pos[:6]} whitened ranks {wr[:6]}')
