"""IVF on the 1M calibrated rows (bench_ann.py work folder): recall of the exact top 10 and top 400 among
the first 800 candidates of IVF1024,SQ8 at several nprobe. Usage: python ivf_top10.py FACTORY TRAIN_ROWS NPROBES"""
import sys, time, numpy as np, faiss, os
OUT = os.environ.get('OUT', '/tmp/exp')  # where the ground truth and the built IVF are cached
from sgengine import Index
from sgengine.search import search_index
W = sys.argv[4] if len(sys.argv) > 4 else '/tmp/annbench1m_sq8'
ix = Index.open(f'{W}/index-1000000'); n = len(ix)
q = np.load(f'{W}/queries-1000000.npy').astype(np.float32)
gt_path = OUT + '/gt.npy'
if os.path.exists(gt_path): gt = np.load(gt_path)
else:
    _, gt = search_index(ix, q, 400); gt = np.asarray(gt); np.save(gt_path, gt)
fac, ntrain = sys.argv[1], int(sys.argv[2])
path = f'{OUT}/{fac.replace(",", "_")}.faiss'
if os.path.exists(path): fx = faiss.read_index(path)
else:
    fx = faiss.index_factory(2048, fac, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0); tr = np.sort(rng.choice(n, ntrain, replace=False))
    t = time.time(); fx.train(np.ascontiguousarray(ix.gather(tr), dtype=np.float32)); print('train', time.time()-t, flush=True)
    t = time.time()
    for a in range(0, n, 1 << 17):
        fx.add(np.ascontiguousarray(ix.gather(np.arange(a, min(n, a + (1 << 17)))), dtype=np.float32))
    print('add', time.time()-t, flush=True)
    faiss.write_index(fx, path)
ivf = faiss.extract_index_ivf(fx)
for npb in [int(v) for v in sys.argv[3].split(',')]:
    for th in (1, 2):
        faiss.omp_set_num_threads(th)
        ivf.nprobe = npb; ivf.parallel_mode = 0 if th == 1 else 1
        ts = []; I = []
        for i in range(len(q)):
            t = time.perf_counter(); _, ii = fx.search(q[i:i+1], 800); ts.append(time.perf_counter() - t); I.append(ii[0])
        r10 = np.mean([len(set(gt[i,:10]) & set(I[i])) / 10 for i in range(len(q))])
        miss10 = sum(len(set(gt[i,:10]) - set(I[i])) > 0 for i in range(len(q)))
        r400 = np.mean([len(set(gt[i]) & set(I[i])) / 400 for i in range(len(q))])
        print(f'{fac} nprobe {npb} threads {th}: recall10 {r10:.4f} queries-missing-top10 {miss10}/50 recall@400 {r400:.4f} median ms {1e3*np.median(ts):.2f}', flush=True)
