"""What calling sgengine from C++ costs over calling it from Python: Engine::search_descriptor vs engine.search.

    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build
    python bench/bench_cpp_overhead.py --build build [-n 2000] [--repeats 3] [-k 10] [--no-rerank]

Both sides search the same index with the same precomputed descriptor (so no backbone runs and
the fixed per-call cost is visible), N times after a warm-up, in separate processes with the
same thread settings. Reported per side: the median wall time of one call, and the median of
(wall time - the engine's own "total" timing), i.e. the cost of getting into and out of
Engine.search. The difference of the two sides is the embedding overhead: GIL acquire, argument
and result conversion (pybind11). The fixture (bundle, index, descriptor) is tests/cpp/make_fixture.py's,
made on first use under the build folder.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def python_side(fixture: Path, n: int, k: int, warmup: int, rerank: bool) -> dict:
    import numpy as np
    from sgengine.engine import Engine
    engine = Engine.load(fixture / "bundle", index=fixture / "index")
    d = np.frombuffer((fixture / "query.f32").read_bytes(), np.float32).copy()
    for _ in range(warmup):
        engine.search(d, k=k, rerank=rerank)
    wall, outside = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        r = engine.search(d, k=k, rerank=rerank)
        us = (time.perf_counter() - t0) * 1e6
        wall.append(us)
        outside.append(us - r.timings["total"] * 1e3)
    return {"calls": n, "median_us": statistics.median(wall), "median_outside_engine_us": statistics.median(outside)}


def cpp_side(exe: Path, fixture: Path, n: int, k: int, warmup: int, rerank: bool) -> dict:
    cmd = [str(exe), str(fixture / "bundle"), str(fixture / "index"), str(fixture / "query.f32"),
           "-n", str(n), "-k", str(k), "--warmup", str(warmup)] + ([] if rerank else ["--no-rerank"])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", type=Path, default=Path("build"), help="plain CMake build folder (default: build)")
    p.add_argument("--fixture", type=Path, help="fixture folder (default: BUILD/cpp_fixture, made if missing)")
    p.add_argument("-n", type=int, default=2000, help="timed calls per side (default 2000)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--no-rerank", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds per side (default 3)")
    a = p.parse_args(argv)
    exe = a.build / "sgengine_bench_overhead"
    if not exe.exists():
        print(f"{exe} not found: build it first (cmake -S . -B {a.build} && cmake --build {a.build})", file=sys.stderr)
        return 1
    fixture = a.fixture or a.build / "cpp_fixture"
    if not (fixture / "query.f32").exists():
        subprocess.run([sys.executable, str(HERE.parent / "tests" / "cpp" / "make_fixture.py"), str(fixture)], check=True)
    rerank = not a.no_rerank
    # Each side in its own process, alternating for --repeats rounds so that load from other
    # processes on a shared machine drifts over both sides alike; the median of the rounds' medians
    # is reported.
    cpps, pys = [], []
    for _ in range(a.repeats):
        cpps.append(cpp_side(exe, fixture, a.n, a.k, a.warmup, rerank))
        out = subprocess.run([sys.executable, __file__, "--python-side", str(fixture), str(a.n), str(a.k),
                              str(a.warmup), str(int(rerank))], check=True, capture_output=True, text=True).stdout
        pys.append(json.loads(out.strip().splitlines()[-1]))
    cpp = {key: statistics.median(r[key] for r in cpps) for key in ("median_us", "median_outside_engine_us")}
    py = {key: statistics.median(r[key] for r in pys) for key in ("median_us", "median_outside_engine_us")}
    sys.path.insert(0, str(HERE))
    from conftest import machine_name  # bench/conftest.py: one way of naming the machine everywhere
    print(f"search_descriptor, k={a.k}, rerank={rerank}, {a.repeats} x {a.n} calls per side, index of "
          f"{len(list((fixture / 'photos').iterdir()))} photos")
    print(f"{'side':<8} {'median call':>12} {'median outside engine':>22}")
    print(f"{'python':<8} {py['median_us']:>10.1f}us {py['median_outside_engine_us']:>20.1f}us")
    print(f"{'c++':<8} {cpp['median_us']:>10.1f}us {cpp['median_outside_engine_us']:>20.1f}us")
    print(f"{'c++ - py':<8} {cpp['median_us'] - py['median_us']:>10.1f}us "
          f"{cpp['median_outside_engine_us'] - py['median_outside_engine_us']:>20.1f}us")
    print("rounds (median call / outside engine, us): python " +
          ", ".join(f"{r['median_us']:.0f}/{r['median_outside_engine_us']:.1f}" for r in pys) +
          "; c++ " + ", ".join(f"{r['median_us']:.0f}/{r['median_outside_engine_us']:.1f}" for r in cpps))
    print(f"machine: {machine_name()}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--python-side":
        fx, n, k, w, rr = sys.argv[2:7]
        print(json.dumps(python_side(Path(fx), int(n), int(k), int(w), bool(int(rr)))))
        sys.exit(0)
    sys.exit(main())
