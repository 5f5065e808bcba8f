"""Run bench/bench_query.py (or read its JSON) and report the per-stage latency: a table and a PNG chart.

    python bench/query_report.py                                  # run, write bench/results/<date>-<machine>/
    python bench/query_report.py --out-dir /tmp/r -k "5k"         # extra options go to pytest
    python bench/query_report.py --from-json query_latency.json   # render only

The table has one row per stage and one column per configuration (model, database size,
device), each cell the median over the timed rounds in ms; the chart stacks the same medians
into one bar per configuration. Both name the machine and the load average (as `uptime` shows
it) before and after the run: on a shared CPU, load from other processes moves every number.
The chart is drawn with Pillow, so matplotlib is not needed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGE_ORDER = ("decode", "preprocess", "backbone@0.7071", "backbone@1", "backbone@1.4142", "head", "search",
               "gather", "rerank", "other")
COLOURS = {"decode": (141, 160, 203), "preprocess": (102, 194, 165), "backbone@0.7071": (252, 141, 98),
           "backbone@1": (231, 111, 81), "backbone@1.4142": (190, 74, 56), "head": (166, 216, 84),
           "search": (255, 217, 47), "gather": (229, 196, 148), "rerank": (231, 138, 195), "other": (179, 179, 179)}


def _configs(data: dict) -> list[dict]:
    out = []
    for b in data["benchmarks"]:
        ex = b.get("extra_info", {})
        if ex.get("op") != "query" or "stages_ms" not in ex:
            continue
        out.append({"label": f"{ex['impl']} {ex['size']} {ex['device']}", "stages": ex["stages_ms"],
                    "rounds": ex.get("rounds"), "median_s": b["stats"]["median"], "ex": ex})
    return out


def _stages(configs: list[dict]) -> list[str]:
    seen = {s for c in configs for s in c["stages"] if s != "total"}
    return [s for s in STAGE_ORDER if s in seen] + sorted(seen - set(STAGE_ORDER))


def _machine(data: dict) -> str:
    mi = data.get("machine_info", {})
    return mi.get("sgengine_machine") or mi.get("cpu", {}).get("brand_raw", "?")


def _load_line(data: dict) -> str:
    load = data.get("sgengine_loadavg")
    if not load:
        first = next((c["ex"] for c in _configs(data)), {})
        load = {"before": first.get("loadavg_before"), "after": first.get("loadavg_after")}
    fmt = lambda v: "?" if not v else ", ".join(f"{x:.2f}" for x in v)  # noqa: E731
    return f"load average (1, 5, 15 min) before: {fmt(load.get('before'))}; after: {fmt(load.get('after'))}"


def render_table(data: dict) -> str:
    configs = _configs(data)
    if not configs:
        return "no query benchmarks in this JSON"
    stages = _stages(configs)
    w = max(16, *(len(c["label"]) + 1 for c in configs))
    rows = [f"{'stage (median ms)':<18}" + "".join(f"{c['label']:>{w}}" for c in configs),
            "-" * (18 + w * len(configs))]
    for s in stages:
        rows.append(f"{s:<18}" + "".join(f"{c['stages'].get(s, 0.0):>{w}.1f}" for c in configs))
    rows.append("-" * (18 + w * len(configs)))
    rows.append(f"{'total':<18}" + "".join(f"{c['stages']['total']:>{w}.1f}" for c in configs))
    rows.append(f"{'end to end':<18}" + "".join(f"{c['median_s'] * 1e3:>{w}.1f}" for c in configs))
    rows.append(f"{'rounds':<18}" + "".join(f"{c['rounds']:>{w}}" for c in configs))
    ex = configs[0]["ex"]
    rows.append("")
    rows.append(f"query: one {ex['shape'].split()[0]} JPEG, 3 scales, top {ex['k']} after rerank M={ex['M']} "
                f"K={ex['K']} beta={ex['beta']}; databases: synthetic unit descriptors, float16, memory-mapped")
    rows.append("models: " + "; ".join(sorted({f"{c['ex']['impl']} = {c['ex']['model']} (D={c['ex']['dim']}, "
                                                f"{c['ex']['backend']}, head {c['ex']['head_impl']}, rerank "
                                                f"{c['ex']['rerank_impl']})" for c in configs})))
    rows.append("total: median of the engine's own total per round; end to end: pytest-benchmark's median "
                "of the whole search call; a stage column is its own median, so stages need not add up exactly")
    rows.append(f"machine: {_machine(data)}")
    rows.append(_load_line(data))
    rows.append(f"date: {data.get('datetime', '?')}")
    return "\n".join(rows)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def draw_chart(data: dict, path: Path) -> Path:
    """Horizontal stacked bars (one per configuration) of the stage medians, with a legend."""
    from PIL import Image, ImageDraw
    configs = _configs(data)
    stages = _stages(configs)
    f, fs, ft = _font(15), _font(13), _font(18)
    left, right, top, bar_h, gap = 190, 150, 70, 34, 16
    width = 1280
    legend_rows = (len(stages) + 4) // 5
    height = top + len(configs) * (bar_h + gap) + 60 + legend_rows * 24 + 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 16), "sgengine: one 1024x768 query, median ms per stage", font=ft, fill="black")
    d.text((20, 42), _machine(data), font=fs, fill=(60, 60, 60))
    span = width - left - right
    tmax = max(c["stages"]["total"] for c in configs)
    # Ticks every 1, 2 or 5 x 10^k ms, about 8 of them, so the grid falls on readable numbers.
    raw = tmax / 8
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    ticks = math.ceil(tmax / step)
    scale = span / (ticks * step)
    y0 = top
    for c in configs:
        d.text((20, y0 + 8), c["label"], font=f, fill="black")
        x = left
        for s in stages:
            v = c["stages"].get(s, 0.0)
            if v <= 0:
                continue
            x1 = x + v * scale
            d.rectangle([x, y0, max(x1, x + 1), y0 + bar_h], fill=COLOURS.get(s, (120, 120, 120)),
                        outline=(255, 255, 255))
            x = x1
        d.text((x + 8, y0 + 8), f"{c['stages']['total']:,.0f} ms", font=f, fill="black")
        y0 += bar_h + gap
    # Axis with ticks.
    d.line([left, y0, left + span, y0], fill="black")
    for i in range(ticks + 1):
        xv = left + span * i / ticks
        d.line([xv, y0, xv, y0 + 5], fill="black")
        label = f"{step * i:,g}"
        d.text((xv - d.textlength(label, font=fs) / 2, y0 + 8), label, font=fs, fill="black")
    d.text((left + span + 26, y0 + 8), "ms", font=fs, fill="black")
    y0 += 40
    for i, s in enumerate(stages):
        lx, ly = 20 + (i % 5) * 240, y0 + (i // 5) * 24
        d.rectangle([lx, ly, lx + 16, ly + 16], fill=COLOURS.get(s, (120, 120, 120)))
        d.text((lx + 22, ly), s, font=fs, fill="black")
    y0 += legend_rows * 24 + 12
    d.text((20, y0), _load_line(data) + f"; {data.get('datetime', '?')[:16]}", font=fs, fill=(60, 60, 60))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def machine_slug() -> str:
    """'cpu-AMD_EPYC-2cores' or 'NVIDIA_H200': what results directories are named after."""
    import torch
    if torch.cuda.is_available():
        return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_")
    sys.path.insert(0, str(HERE))
    from conftest import machine_name  # bench/conftest.py
    cpu = machine_name().split(" (")[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{re.sub(r'[^A-Za-z0-9]+', '_', cpu).strip('_')}-{cores}cores"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-json", type=Path, help="render this pytest-benchmark JSON instead of running")
    p.add_argument("--out-dir", type=Path, help="where query_latency.{json,txt,png} go "
                                                "(default bench/results/<date>-<machine>/)")
    args, rest = p.parse_known_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        out_dir = args.out_dir or args.from_json.parent
        rc = 0
    else:
        out_dir = args.out_dir or HERE / "results" / f"{time.strftime('%Y-%m-%d')}-{machine_slug()}"
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = out_dir / "query_latency.json"
        before = os.getloadavg()
        cmd = [sys.executable, "-m", "pytest", str(HERE / "bench_query.py"), *rest, "--benchmark-only",
               f"--benchmark-json={raw}", "-q", "-p", "no:cacheprovider"]
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        wall = time.perf_counter() - t0
        if not raw.exists():
            print("no benchmark results were written", file=sys.stderr)
            return rc or 1
        data = json.loads(raw.read_text())
        data["sgengine_loadavg"] = {"before": list(before), "after": list(os.getloadavg())}
        data["sgengine_wall_s"] = wall
        raw.write_text(json.dumps(data, indent=2))
    table = render_table(data)
    if data.get("sgengine_wall_s"):
        table += f"\nsuite wall time: {data['sgengine_wall_s']:.0f} s (exports and index builds included)"
    print()
    print(table)
    if _configs(data):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "query_latency.txt").write_text(table + "\n")
        png = draw_chart(data, out_dir / "query_latency.png")
        print(f"\nwritten: {out_dir / 'query_latency.txt'}, {png}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
