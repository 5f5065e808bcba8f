"""Indexing throughput: the one-process build against Ray Data with 1 and 2 workers, same folder.

    python bench/bench_ray_indexing.py [--images 64] [--side 512] [--repeats 3] [--workdir DIR] [--out FILE]

The folder: --images real photos (scikit-image / scikit-learn's, cropped differently on each pass
over them), long side --side px, JPEG. The bundle: the built-in default model (EfficientNet-Lite0),
exported into --workdir on first use. Every run builds a fresh index of the whole folder with
commit_every 8 and batch_size 8.

Modes: "one process" (`build_index`, backbone threads 2 and 1) and "ray N worker(s)"
(`build_index_ray` on a local Ray cluster started once with 2 CPUs, one backbone thread per
worker). Two rates per mode, from the median wall time of --repeats builds of the folder (N
images) and of its first N/4 images (the same files):
- end to end: N / wall time of the whole call (engine load, or Ray's actor start-up and dataset
  job, included): what a user of a small folder sees;
- marginal: (N - N/4) / (time(N) - time(N/4)): start-up cancels, so this is the rate a large
  folder approaches.
The table ends with the machine; the load average is printed because the machine may be shared.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_folder(root: Path, n: int, side: int) -> Path:
    """n JPEGs: the packaged photos, each pass over them cropped to another part of the photo."""
    import numpy as np
    from PIL import Image
    from sgengine.photos import sample_photos
    folder = root / f"photos-{n}-{side}"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    photos = list(sample_photos().values())
    for i in range(n):
        rgb = photos[i % len(photos)]
        k = i // len(photos)
        h, w = rgb.shape[:2]
        f = 1.0 - 0.1 * (k % 4)
        ch, cw = int(h * f), int(w * f)
        y0, x0 = (h - ch) * (k % 2), (w - cw) * ((k // 2) % 2)
        img = Image.fromarray(np.ascontiguousarray(rgb[y0:y0 + ch, x0:x0 + cw]))
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        img.save(folder / f"{i:04d}.jpg", quality=90)
    return folder


def bundle_dir(root: Path) -> Path:
    out = root / "bundle-default"
    if not (out / "manifest.json").exists():
        from sgengine.export import export_bundle
        from sgengine.model import default_model
        export_bundle(default_model(), out, parity_max_side=160, progress=lambda *_: None)
    return out


def timed_build(build, folder: Path, index_dir: Path) -> float:
    """Seconds of one whole build of `folder` into a fresh index."""
    shutil.rmtree(index_dir, ignore_errors=True)
    t0 = time.perf_counter()
    rep = build(folder, index_dir)
    seconds = time.perf_counter() - t0
    assert not rep.failed and rep.added == rep.total, rep
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--side", type=int, default=512, help="long side of the photos on disk (px)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sgengine-bench-ray")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    a = ap.parse_args(argv)

    import ray
    from sgengine import Engine
    from sgengine.indexing import build_index
    from sgengine.indexing_ray import build_index_ray
    sys.path.insert(0, str(HERE))
    from conftest import machine_name  # bench/conftest.py

    machine = machine_name()  # before any Engine.load changes this process's torch threads
    a.workdir.mkdir(parents=True, exist_ok=True)
    small = max(1, a.images // 4)
    folders = {a.images: make_folder(a.workdir, a.images, a.side), small: make_folder(a.workdir, small, a.side)}
    bundle = bundle_dir(a.workdir)
    load_before = os.getloadavg()

    def one_process(threads):
        return lambda folder, out: build_index(Engine.load(bundle, threads=threads), folder, out, commit_every=8,
                                               batch_size=8, progress=False)

    def on_ray(workers):
        return lambda folder, out: build_index_ray(bundle, folder, out, workers=workers, threads=1, commit_every=8,
                                                   batch_size=8, progress=False)

    modes = [("one process, 2 threads", one_process(2)), ("one process, 1 thread", one_process(1)),
             ("ray 1 worker x 1 thread", on_ray(1)), ("ray 2 workers x 1 thread", on_ray(2))]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        for name, build in modes:
            t = {n: [timed_build(build, f, a.workdir / "index") for _ in range(a.repeats)] for n, f in folders.items()}
            big, little = statistics.median(t[a.images]), statistics.median(t[small])
            rows.append((name, big, little, a.images / big, (a.images - small) / (big - little)))
            print(f"  {name}: {a.images} images {[round(x, 2) for x in t[a.images]]} s, "
                  f"{small} images {[round(x, 2) for x in t[small]]} s", flush=True)
    finally:
        ray.shutdown()

    base = {r[0]: r for r in rows}["ray 1 worker x 1 thread"]
    lines = [f"Indexing {a.images} photos (long side {a.side} px, EfficientNet-Lite0 default bundle, 3 scales), "
             f"median of {a.repeats} builds each of {a.images} and {small} images",
             f"{'mode':<26} {f'wall s ({a.images})':>12} {f'wall s ({small})':>11} {'img/s end to end':>17} "
             f"{'img/s marginal':>15} {'marginal vs ray 1 worker':>25}"]
    for name, big, little, e2e, marginal in rows:
        lines.append(f"{name:<26} {big:12.2f} {little:11.2f} {e2e:17.2f} {marginal:15.2f} {marginal / base[4]:24.2f}x")
    lines.append(f"load average before/after: {' '.join(f'{x:.1f}' for x in load_before)} / "
                 f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    lines.append(f"machine: {machine}")
    text = "\n".join(lines)
    print(text)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
