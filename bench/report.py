"""Run the benchmark suites and print one table: shape, implementation, median, ratio, throughput, machine.

    python bench/report.py                 # all suites in bench/
    python bench/report.py bench/bench_head.py -k "cpu or chain"
    python bench/report.py --json out.json # keep pytest-benchmark's raw JSON too
    python bench/report.py --from-json a.json b.json c.json   # medians over runs of one suite

Every ratio is against the "chain" implementation of the same group (the module-by-module
reference as the official code runs it), or against the provider the group's benchmarks name in
extra_info["baseline"] (the search: faiss_flat_f32), measured in the same run; "floor" columns
compare with the group's floor implementation (gram_matmul / gram_bmm for the rerank, copy for
the head).
Absolute times hold only for the machine printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FLOORS = ("gram_matmul", "gram_bmm", "copy")


def _baseline(items: list[dict]) -> str:
    """The provider a group's ratios are against: the one its benchmarks name, else "chain"."""
    named = {b["extra_info"]["baseline"] for b in items if "baseline" in b["extra_info"]}
    return named.pop() if len(named) == 1 else "chain"


def _baseline_note(benchmarks: list[dict]) -> str:
    named = sorted({b["extra_info"]["baseline"] for b in benchmarks if "baseline" in b["extra_info"]})
    return f" (groups naming a baseline: against {', '.join(named)})" if named else ""


def render(data: dict) -> str:
    rows = []
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    header = f"{'op':<7} {'shape':<34} {'impl':<14} {'median':>11} {'vs chain':>9} {'vs floor':>9} {'throughput':>14}"
    rows.append(header)
    rows.append("-" * len(header))
    for group, items in groups.items():
        by_impl = {b["extra_info"].get("impl", b["name"]): b for b in items}
        chain = by_impl.get(_baseline(items))
        floor = next((by_impl[f] for f in FLOORS if f in by_impl), None)
        for impl, b in by_impl.items():
            ex = b["extra_info"]
            med = b["stats"]["median"] / ex.get("scale", 1)  # scale: chain runs on a subset of queries
            cmed = chain["stats"]["median"] / chain["extra_info"].get("scale", 1) if chain else None
            fmed = floor["stats"]["median"] / floor["extra_info"].get("scale", 1) if floor else None
            vs_chain = f"{cmed / med:8.1f}x" if cmed else "-"
            vs_floor = f"{med / fmed:8.2f}x" if fmed and floor is not b else "-"
            thr = "-"
            if "bytes" in ex:
                thr = f"{ex['bytes'] / med / 1e9:9.1f} GB/s"
            elif "flops" in ex:
                thr = f"{ex['flops'] / med / 1e9:7.1f} GFLOP/s"
            label = f"{impl} ({ex['path'].removeprefix('cpu_')})" if "path" in ex else impl  # what "cpu" ran
            rows.append(f"{ex.get('op', '?'):<7} {ex.get('shape', group):<34} {label:<14} "
                        f"{med * 1e3:9.3f}ms {vs_chain:>9} {vs_floor:>9} {thr:>14}")
        rows.append("")
    mi = data.get("machine_info", {})
    rows.append("vs chain: how many times faster than the module-by-module reference chain"
                f"{_baseline_note(data['benchmarks'])}; "
                "vs floor: time / the floor's time (copy for the head, one Gram product for the rerank)")
    rows.append(f"machine: {mi.get('sgengine_machine', mi.get('cpu', {}).get('brand_raw', '?'))}")
    rows.append(f"date: {data.get('datetime', '?')}")
    return "\n".join(rows)


def _medians(data: dict, labels: dict) -> dict[tuple[str, str], float]:
    """{(shape, impl): median seconds, scaled to the whole batch} of one run; labels gets what "cpu" ran."""
    out = {}
    for b in data["benchmarks"]:
        ex = b["extra_info"]
        key = (ex.get("shape", b.get("group") or b["name"]), ex.get("impl", b["name"]))
        out[key] = b["stats"]["median"] / ex.get("scale", 1)
        if "path" in ex:
            labels[key] = f"{key[1]} ({ex['path'].removeprefix('cpu_')})"
    return out


def render_runs(runs: list[dict]) -> str:
    """Several runs of the same suite side by side: each run's median per (shape, impl), the median
    of those, and its ratios to the chain's and the floor's medians of runs. On a shared machine
    whose speed drifts between runs, this is steadier than any one run's ratio."""
    labels: dict = {}
    per_run = [_medians(r, labels) for r in runs]
    baselines = {}  # shape -> the provider its ratios are against
    for r in runs:
        for b in r["benchmarks"]:
            if "baseline" in b["extra_info"]:
                ex = b["extra_info"]
                baselines[ex.get("shape", b.get("group") or b["name"])] = ex["baseline"]
    keys = list(dict.fromkeys(k for m in per_run for k in m))
    med = {}
    for k in keys:
        xs = sorted(m[k] for m in per_run if k in m)
        med[k] = xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
    rows = [f"{'shape':<34} {'impl':<14} {'runs (ms)':<{10 * len(runs)}} {'median':>11} {'vs chain':>9} "
            f"{'vs floor':>9}"]
    rows.append("-" * len(rows[0]))
    last = None
    for shape, impl in keys:
        if last is not None and shape != last:
            rows.append("")
        last = shape
        chain = med.get((shape, baselines.get(shape, "chain")))
        floor = next((med[(shape, f)] for f in FLOORS if (shape, f) in med), None)
        m = med[(shape, impl)]
        cells = "".join(f"{pr[(shape, impl)] * 1e3:>10.3f}" if (shape, impl) in pr else f"{'-':>10}" for pr in per_run)
        vs_chain = f"{chain / m:8.1f}x" if chain else "-"
        vs_floor = f"{m / floor:8.2f}x" if floor and impl not in FLOORS else "-"
        label = labels.get((shape, impl), impl)
        rows.append(f"{shape:<34} {label:<14} {cells} {m * 1e3:9.3f}ms {vs_chain:>9} {vs_floor:>9}")
    rows.append("")
    rows.append(f"median of {len(runs)} runs per row; ratios are of those medians"
                f"{_baseline_note([b for r in runs for b in r['benchmarks']])}")
    for r in runs:
        mi = r.get("machine_info", {})
        rows.append(f"run: {r.get('datetime', '?')}  {mi.get('sgengine_machine', mi.get('cpu', {}).get('brand_raw', '?'))}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also keep the raw pytest-benchmark JSON here")
    p.add_argument("--from-json", nargs="+", metavar="JSON",
                   help="render existing JSON files instead of running; with several, one table of "
                        "their medians (runs of the same suite)")
    args, rest = p.parse_known_args(argv)
    if args.from_json:
        runs = [json.loads(Path(f).read_text()) for f in args.from_json]
        print(render(runs[0]) if len(runs) == 1 else render_runs(runs))
        return 0
    out = args.json or os.path.join(tempfile.mkdtemp(), "bench.json")
    # Paths that exist are suites; everything else goes to pytest untouched (e.g. -k cuda).
    has_target = any(Path(a).exists() for a in rest if not a.startswith("-"))
    targets = [] if has_target else [str(Path(__file__).parent)]
    cmd = [sys.executable, "-m", "pytest", *targets, *rest, "--benchmark-only", f"--benchmark-json={out}",
           "-q", "-p", "no:cacheprovider"]
    rc = subprocess.call(cmd, cwd=Path(__file__).resolve().parent.parent)
    if not Path(out).exists():
        print("no benchmark results were written", file=sys.stderr)
        return rc or 1
    print()
    print(render(json.loads(Path(out).read_text())))
    return rc


if __name__ == "__main__":
    sys.exit(main())
