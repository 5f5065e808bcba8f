"""bench/report.py's tables: one run, and the median over runs (used for results on a shared machine)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).parent.parent / "bench" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _run(times: dict[str, float], chain_scale: float = 1.0) -> dict:
    """A pytest-benchmark JSON document with one group: impl -> median seconds."""
    benches = []
    for impl, t in times.items():
        scale = chain_scale if impl == "chain" else 1.0
        extra = {"op": "rerank", "shape": "cpu nq=70 M=400", "impl": impl, "scale": scale, "flops": 1e9}
        if impl == "cpu":
            extra["path"] = "cpu_bf16"
        benches.append({"group": "g", "name": f"test[{impl}]", "extra_info": extra, "stats": {"median": t * scale}})
    return {"benchmarks": benches, "machine_info": {"sgengine_machine": "test box"}, "datetime": "2026-11-27"}


def test_median_of_runs():
    runs = [_run({"chain": 1.4, "cpu": 0.13, "gram_matmul": 0.24}, chain_scale=0.1),
            _run({"chain": 1.6, "cpu": 0.18, "gram_matmul": 0.23}),
            _run({"chain": 1.3, "cpu": 0.12, "gram_matmul": 0.25})]
    text = report.render_runs(runs)
    row = next(line for line in text.splitlines() if "cpu (bf16)" in line)
    # Each run's time is scaled back to the whole batch; the median of 130, 180, 120 ms is 130 ms,
    # the chain's median 1400 ms: 10.8x; the floor's 240 ms: 0.54x.
    assert row.split()[-3:] == ["130.000ms", "10.8x", "0.54x"], row
    assert "median of 3 runs" in text and text.count("test box") == 3


def test_one_run_table():
    text = report.render(_run({"chain": 2.0, "cpu": 0.2}))
    row = next(line for line in text.splitlines() if "cpu (bf16)" in line)
    assert "200.000ms" in row and "10.0x" in row


@pytest.mark.parametrize("n", [2, 4])
def test_even_number_of_runs_takes_the_middle_pair(n):
    runs = [_run({"chain": 1.0, "cpu": 0.1 * (i + 1)}) for i in range(n)]
    row = next(line for line in report.render_runs(runs).splitlines() if "cpu (bf16)" in line)
    expect = sorted(0.1 * (i + 1) for i in range(n))
    assert row.split()[-3] == f"{(expect[n // 2 - 1] + expect[n // 2]) / 2 * 1e3:.3f}ms"
