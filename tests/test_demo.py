"""`sgengine demo`, the README's first command, end to end: the real CLI in a subprocess, the real
photos and views written to disk, a real index, the three modes' mAP and the HTML report.

The export step is the one part skipped: the session's exported default bundle is copied where the
demo looks for it (the demo reuses a valid bundle, as on a second run), so this file costs the
indexing of 152 full-size views, not a second export (tests/test_export.py covers that).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def demo_run(default_bundle, tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    shutil.copytree(default_bundle, work / "bundle")
    proc = subprocess.run([sys.executable, "-m", "sgengine", "demo", "--workdir", str(work), "--show", "2"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def _maps(out: str) -> dict[str, float]:
    found = dict(re.findall(r"^  (global only|reranked|adaptive)\s*:\s+([\d.]+)", out, re.M))
    return {k: float(v) for k, v in found.items()}


def test_demo_reports_three_modes_and_writes_the_report(demo_run):
    work, out = demo_run
    assert "[1/4] reusing bundle" in out, out[:2000]
    m = re.search(r"mAP over (\d+) queries, (\d+) database views \((\d+) per photo\)", out)
    assert m, out
    nq, n_db, per = map(int, m.groups())
    assert nq >= 15 and n_db == nq * per, m.group(0)
    maps = _maps(out)
    assert set(maps) == {"global only", "reranked", "adaptive"}, out
    # Real photos and real ImageNet weights: views of the same photo are easy positives for every
    # mode (the README's demo reports 98-99); a broken path lands far below (chance is ~5).
    for mode, v in maps.items():
        assert 90.0 <= v <= 100.0, (mode, v, out)
    assert re.search(r"^  rerank\s+[\d.]+$", out, re.M), out  # the per-stage latency table has the rerank stage
    report = (work / "report.html").read_text()
    assert "adaptive-reranked mAP" in report and report.count("<tr>") == nq
    # Every image the report shows is a file the demo wrote.
    srcs = re.findall(r"src='([^']+)'", report)
    assert len(srcs) == nq * 9 and all((work / s).is_file() for s in srcs), srcs[:3]
