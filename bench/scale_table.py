"""One table for the first stage at scale, from the runs that measured it:

    python bench/scale_table.py --search S100K.json S1M.json --ann A100K.json A1M.json > scale.md

--search: pytest-benchmark JSON of bench/bench_search.py (bench/report.py --json): the exact
float16 scan and FAISS over one query and batches, ratios against FAISS IndexFlatIP (float32)
measured in that same run. --ann: bench/bench_ann.py --json: the ANN settings against the exact
scan through the whole Engine.search with the rerank, measured in that same run. Each row says
which run it comes from; a ratio never mixes runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _search_rows(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    out = []
    for items in groups.values():
        by = {b["extra_info"]["impl"]: b for b in items}
        base = by.get("faiss_flat_f32")
        for impl, b in by.items():
            ex = b["extra_info"]
            ms = ex["ms_per_query"]
            ratio = f"{ms / base['extra_info']['ms_per_query']:.3f}x" if base else "-"
            out.append(f"| {ex['rows']:,} | exact first stage, nq={ex['nq']} | {impl} | {ms:.2f} | {ratio} | "
                       f"{ex['bytes_per_row']:,} | - | - | - | {path.name} |")
    return out


def _ann_rows(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    out = []

    def query_set(name: str) -> str | None:  # "... [ann, held-out]" -> "held-out" (older runs: one set)
        return name.rsplit("[", 1)[1].rstrip("]").split(", ")[-1] if "[" in name else None

    exacts = {query_set(r["name"]): r for r in d["results"] if r["name"].startswith("exact")}
    for r in d["results"]:
        exact = exacts.get(query_set(r["name"]), d["results"][0])
        is_exact = r is exact
        bpr = f"{d['dim'] * (2 if d['dtype'] == 'float16' else 4):,} (rows)" if is_exact else f"{d['bytes_per_row']:,.0f} + rows"
        build = "-" if is_exact else f"{d['build_seconds']:.0f}"
        out.append(f"| {d['rows']:,} | engine.search, k={d['k']} M={d['M']} K={d['K']}, nq=1 | {r['name']} | "
                   f"{r['total_ms']:.2f} (first stage {r['first_ms']:.2f}) | "
                   f"{r['total_ms'] / exact['total_ms']:.3f}x exact | {bpr} | {build} | "
                   f"{r['recall']:.4f} | {r['overlap']:.4f} | {path.name} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--search", nargs="*", default=[], type=Path)
    p.add_argument("--ann", nargs="*", default=[], type=Path)
    a = p.parse_args(argv)
    lines = ["| rows | what | implementation | ms per query (median) | ratio (same run) | bytes per row | "
             "build s | recall@400 | top-100 overlap with exact | run |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for f in a.search:
        lines += _search_rows(f)
    for f in a.ann:
        lines += _ann_rows(f)
    machines = set()
    for f in a.search:
        mi = json.loads(f.read_text())["machine_info"]
        machines.add(f"{mi.get('cpu', {}).get('brand_raw', mi.get('processor'))} ({mi.get('cpu', {}).get('count')} cores)")
    for f in a.ann:
        machines.add(json.loads(f.read_text())["machine"])
    lines.append("")
    lines.append("Ratios: exact-stage rows against FAISS IndexFlatIP over float32 rows (faiss_flat_f32) in the same "
                 "run; engine rows against the exact engine in the same run. machine(s): " + "; ".join(sorted(machines)))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
