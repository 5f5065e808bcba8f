"""Serving latency of one query on a GPU, per backend and precision, in one run.

    python bench/serving_gpu.py --out DIR                         # on the GPU machine (gpu_check.sh runs it)
    python bench/serving_gpu.py --device cpu --rows 5000 --seconds 2 --out /tmp/s   # smoke test anywhere

One 1024x768 JPEG (scikit-image's astronaut) goes through `Engine.search`: decode, one upload,
3 scales of a random-weight CVNet ResNet-50 (the weights do not change the cost), pooling head,
whitening, Scale-GeM, first stage over an index of --rows float16 descriptors resident on the
device, rerank of the top M = 400 (K = 9), top 100 ids out. Every mode shares one Index object,
so the rows are uploaded once. Modes:
- "eager fp32": the baseline. torch backend without CUDA graphs, plain-PyTorch reference head
  and rerank, float32-upcast first stage: the PyTorch pipeline as SPEC.md writes it.
- "torch fp32/fp16/bf16 +graphs": torch backend with per-shape CUDA graphs, Triton head and rerank.
- "onnxruntime fp32", "tensorrt fp32/fp16": when this machine has onnxruntime-gpu / TensorRT,
  otherwise listed as skipped with the reason.
Each mode: load, 3 untimed warm-up searches (graphs are captured on the 2nd), then searches for
--seconds (at least 5, at most 200); medians per stage come from result.timings (CUDA events on
the GPU) and the end-to-end median from the wall clock around `search`.

Precision (DESIGN.md "Precision policy"): each reduced-precision mode is compared with torch
fp32 on real photos (sgengine.photoset: 19 query photos, 152 database views) by
sgengine.precision.precision_report: max descriptor error, min cosine, top-10 and top-100
agreement of the reranked results.

Writes DIR/serving.json and DIR/serving.txt; the table ends with the device name.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ("decode", "preprocess", "backbone", "head", "search", "gather", "rerank")


def modes(device: str) -> list[tuple[str, dict]]:
    gpu = device.startswith("cuda")
    out = [("eager fp32", dict(backend="torch", precision="fp32", cuda_graphs=False, head_impl="reference",
                               rerank_impl="reference", search_impl="upcast"))]
    if gpu:
        out += [("torch fp32 +graphs", dict(backend="torch", precision="fp32", cuda_graphs=True)),
                ("torch fp16 +graphs", dict(backend="torch", precision="fp16", cuda_graphs=True)),
                ("torch bf16 +graphs", dict(backend="torch", precision="bf16", cuda_graphs=True)),
                ("onnxruntime fp32", dict(backend="onnxruntime")),
                ("tensorrt fp32", dict(backend="tensorrt", precision="fp32")),
                ("tensorrt fp16", dict(backend="tensorrt", precision="fp16"))]
    else:
        out += [("torch fp32 fast kernels", dict(backend="torch", precision="fp32")),
                ("torch bf16 fast kernels", dict(backend="torch", precision="bf16")),
                ("onnxruntime fp32", dict(backend="onnxruntime"))]
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def time_mode(engine, query: Path, seconds: float, k: int, M: int) -> dict:
    for _ in range(3):
        engine.search(query, k=k, M=M)
    per_call, walls = [], []
    t_end = time.perf_counter() + seconds
    while (len(walls) < 5 or time.perf_counter() < t_end) and len(walls) < 200:
        t0 = time.perf_counter()
        r = engine.search(query, k=k, M=M)
        walls.append((time.perf_counter() - t0) * 1e3)
        t = dict(r.timings)
        t["backbone"] = sum(v for s, v in r.timings.items() if s.startswith("backbone@"))
        per_call.append(t)
    stages = {s: statistics.median(c.get(s, 0.0) for c in per_call) for s in STAGES}
    for s in sorted({s for c in per_call for s in c if s.startswith("backbone@")}):
        stages[s] = statistics.median(c.get(s, 0.0) for c in per_call)
    return {"rounds": len(walls), "total_ms": statistics.median(walls), "p90_ms": float(np.percentile(walls, 90)),
            "stages_ms": stages, "ids": list(r.ids[0])}


def synthetic_index(path: Path, bundle, n: int, device: str, chunk: int = 1 << 17):
    """n random unit rows (seeded, drawn on `device`) stored as float16 in ONE segment: one add, no
    compaction, so the 1M-row index costs one 4 GiB write instead of a write, a merge and a rewrite."""
    from sgengine import Index
    dim = int(bundle.dim)
    rows = np.empty((n, dim), np.float16)
    g = torch.Generator(device=device).manual_seed(0)
    for s in range(0, n, chunk):
        x = torch.randn(min(chunk, n - s), dim, device=device, generator=g)
        rows[s:s + len(x)] = torch.nn.functional.normalize(x, dim=1).half().cpu().numpy()
    idx = Index.create(path, dim=dim, bundle_fingerprint=bundle.fingerprint, dtype="float16")
    idx.add(rows, [f"syn{i:07d}" for i in range(n)])
    return idx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=6.0, help="timed searches per mode (default 6 s)")
    ap.add_argument("--modes", default="", help="comma-separated subset of mode labels")
    ap.add_argument("--no-precision", action="store_true", help="skip the real-photo precision comparison")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    from bench_query import QUERY_PHOTO, QUERY_SIZE
    from sgengine import Engine, Index
    from sgengine.errors import BackendUnavailableError
    from sgengine.export import export_bundle
    from sgengine.model import load_checkpoint
    from sgengine.photos import sample_photos
    from sgengine.testing import save_cvnet_checkpoint

    def say(msg: str) -> None:
        print(msg, flush=True)

    dev = a.device
    name = device_name(dev)
    say(f"== serving benchmark on {name} (torch {torch.__version__}), {a.rows:,} float16 rows, M=400")
    work = Path(tempfile.mkdtemp(prefix="sgengine-serving-"))
    t0 = time.perf_counter()
    model, _ = load_checkpoint(save_cvnet_checkpoint(work / "cvnet_r50.pth", 50, seed=0))
    bundle = export_bundle(model, work / "bundle", check=False, progress=lambda s: None)
    say(f"  exported random-weight CVNet R50 in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    synthetic_index(work / "index", bundle, a.rows, dev)
    index = Index.open(work / "index", bundle_fingerprint=bundle.fingerprint)
    say(f"  built the index in {time.perf_counter() - t0:.0f} s")
    query = work / f"{QUERY_PHOTO}-{QUERY_SIZE[0]}x{QUERY_SIZE[1]}.jpg"
    Image.fromarray(sample_photos()[QUERY_PHOTO]).resize(QUERY_SIZE, Image.Resampling.LANCZOS).save(query, quality=92)

    wanted = {m.strip() for m in a.modes.split(",") if m.strip()}
    results: dict[str, dict] = {}
    precision: dict = {}

    def write() -> str:
        # After every mode and at the end: a run cut short by its time limit keeps what it measured.
        text = table(results, precision, name, a.rows)
        (out / "serving.txt").write_text(text + "\n")
        (out / "serving.json").write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": a.rows,
                                                      "modes": results, "precision": precision}, indent=1,
                                                     default=str))
        return text

    for label, kw in modes(dev):
        if wanted and label not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            engine = Engine.load(bundle, index=index, device=dev, **kw)
        except BackendUnavailableError as e:
            results[label] = {"skipped": str(e)}
            say(f"  {label}: skipped: {e}")
            continue
        except Exception as e:  # a load that fails for another reason must not cost the other modes
            results[label] = {"error": f"load: {type(e).__name__}: {e}"}
            say(f"  {label}: ERROR at load {type(e).__name__}: {e}")
            write()
            continue
        load_s = time.perf_counter() - t0
        try:
            r = time_mode(engine, query, a.seconds, k=100, M=400)
        except Exception as e:  # one mode failing must not cost the others their numbers
            results[label] = {"error": f"{type(e).__name__}: {e}"}
            say(f"  {label}: ERROR {type(e).__name__}: {e}")
            continue
        finally:
            d = engine.describe()
            del engine
            gc.collect()
        r.update(load_s=load_s, describe={k_: d[k_] for k_ in ("backend", "head_impl", "rerank_impl", "search_impl",
                                                               "precision", "index")})
        results[label] = r
        say(f"  {label}: {r['total_ms']:.2f} ms median over {r['rounds']} searches "
            f"(backbone {r['stages_ms']['backbone']:.2f}, load {load_s:.1f} s)")
        write()

    write()
    if not a.no_precision:
        try:
            precision_section(bundle, dev, results, work, say, precision, write)
        except Exception as e:  # the timing table is already written; say why the comparison is missing
            precision["error"] = f"{type(e).__name__}: {e}"
            say(f"  precision: ERROR {type(e).__name__}: {e}")
    print(write())
    return 0


def precision_section(bundle, dev: str, results: dict, work: Path, say, out: dict, save=lambda: None) -> dict:
    """Reduced-precision modes against torch fp32 on real photos (a small fp32 index of photo views).
    Fills `out` as it goes and calls `save()` after each mode."""
    from sgengine import Engine, Index
    from sgengine.errors import BackendUnavailableError
    from sgengine.photoset import make_photo_set
    from sgengine.precision import precision_report
    queries, ddir = make_photo_set(work / "photos")
    views = sorted(ddir.rglob("*.jpg"))
    t0 = time.perf_counter()
    ref = Engine.load(bundle, device=dev, backend="torch", cuda_graphs=False if dev.startswith("cuda") else None)
    d = ref.embed(views)
    idx = Index.create(work / "photo-index", dim=d.shape[1], bundle_fingerprint=bundle.fingerprint)
    idx.add(d, [str(p.relative_to(ddir)) for p in views])
    ref = Engine.load(bundle, index=idx, device=dev, backend="torch", cuda_graphs=False if dev.startswith("cuda") else None)
    qs = [queries[n] for n in sorted(queries)]
    out.update({"queries": len(qs), "database_views": len(views)})
    say(f"  precision: embedded {len(views)} photo views with torch fp32 in {time.perf_counter() - t0:.0f} s")
    for label, r in results.items():
        if "total_ms" not in r or r["describe"]["precision"] == "fp32":
            continue
        kw = dict(backend=r["describe"]["backend"]["name"], precision=r["describe"]["precision"])
        if kw["backend"] == "torch":
            kw["cuda_graphs"] = False  # photos of ~60 sizes, each seen once or twice: graphs would only cost captures
        try:
            low = Engine.load(bundle, index=idx, device=dev, **kw)
        except BackendUnavailableError as e:
            out[label] = {"skipped": str(e)}
            continue
        try:
            rep = precision_report(ref, low, qs, k=100, also_k=(10,))
        except Exception as e:  # one mode failing must not cost the others their comparison
            out[label] = {"error": f"{type(e).__name__}: {e}"}
            say(f"  precision {label}: ERROR {type(e).__name__}: {e}")
            save()
            continue
        out[label] = rep
        say(f"  precision {label}: max|err| {rep['max_abs_err']:.2e}, min cos {rep['min_cosine']:.6f}, "
            f"top-10 {rep['top10_agreement']:.4f}, top-{rep['k']} {rep['topk_agreement']:.4f}")
        save()
    return out


def table(results: dict, precision: dict, device: str, rows: int) -> str:
    base = results.get("eager fp32", {})
    lines = [f"Serving latency of one 1024x768 query: 3 scales, random-weight CVNet R50, {rows:,} float16 rows, "
             "M=400, K=9, top 100. Medians in ms.",
             f"{'mode':<22}{'backbone':>10}{'head':>8}{'search':>8}{'gather':>8}{'rerank':>8}{'prep':>7}"
             f"{'total':>10}{'p90':>10}  vs eager fp32 (total, backbone)"]
    for label, r in results.items():
        if "total_ms" not in r:
            lines.append(f"{label:<22}{'skipped' if 'skipped' in r else 'error'}: {r.get('skipped') or r.get('error')}")
            continue
        s = r["stages_ms"]
        ratio = ""
        if "total_ms" in base:
            ratio = (f"  {base['total_ms'] / r['total_ms']:.2f}x, "
                     f"{base['stages_ms']['backbone'] / max(s['backbone'], 1e-9):.2f}x")
        lines.append(f"{label:<22}{s['backbone']:>10.2f}{s['head']:>8.2f}{s['search']:>8.2f}{s['gather']:>8.2f}"
                     f"{s['rerank']:>8.2f}{s['preprocess']:>7.2f}{r['total_ms']:>10.2f}{r['p90_ms']:>10.2f}{ratio}")
    timed = {k: v for k, v in results.items() if "total_ms" in v and k != "eager fp32"}
    if timed and "total_ms" in base:
        best = min(timed, key=lambda k: timed[k]["total_ms"])
        b = timed[best]["total_ms"]
        lines.append(f"fastest: {best}, {b:.2f} ms (target <= 10 ms on an H100/H200: {'met' if b <= 10 else 'NOT met'}); "
                     f"{base['total_ms'] / b:.2f}x eager fp32 (target >= 4x: "
                     f"{'met' if base['total_ms'] / b >= 4 else 'NOT met'})")
        for label in timed:
            if "fp16" in label:
                bb = base["stages_ms"]["backbone"] / max(timed[label]["stages_ms"]["backbone"], 1e-9)
                agree = precision.get(label, {}).get("topk_agreement")
                lines.append(f"{label} backbone: {bb:.2f}x the eager fp32 backbone (target >= 3x: "
                             f"{'met' if bb >= 3 else 'NOT met'}); top-100 agreement on real photos: "
                             + ("n/a" if agree is None else f"{agree:.4f} (target >= 0.99: {'met' if agree >= 0.99 else 'NOT met'})"))
    if precision:
        lines.append(f"precision vs torch fp32 on real photos ({precision.get('queries')} queries, "
                     f"{precision.get('database_views')} views):")
        for label, rep in precision.items():
            if isinstance(rep, dict) and "max_abs_err" in rep:
                lines.append(f"  {label:<20} max|err| {rep['max_abs_err']:.2e}  min cos {rep['min_cosine']:.6f}  "
                             f"top-10 {rep['top10_agreement']:.4f}  top-100 {rep['topk_agreement']:.4f}")
            elif isinstance(rep, dict) and ("error" in rep or "skipped" in rep):
                lines.append(f"  {label:<20} {'error' if 'error' in rep else 'skipped'}: {rep.get('error') or rep.get('skipped')}")
            elif label == "error":
                lines.append(f"  not completed: {rep}")
    lines.append(f"device: {device}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
