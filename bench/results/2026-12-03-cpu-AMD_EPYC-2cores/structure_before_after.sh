#!/usr/bin/env bash
# Issue 11 before/after: the previous commit (b7c7190, installed in /tmp/before_site) and the
# refactored tree, interleaved, three runs each, same selection.
set -u
K='test_head_cpu or (test_rerank_cpu_device and 400)'
for i in 1 2 3; do
  echo "before run $i load $(cat /proc/loadavg)"
  (cd /tmp/before_bench && PYTHONPATH=/tmp/before_site python bench/report.py bench/bench_head.py bench/bench_rerank.py -k "$K" --json /tmp/bench11/before_$i.json > /tmp/bench11/before_$i.txt 2>&1)
  echo "after run $i load $(cat /proc/loadavg)"
  (cd /work/main && python bench/report.py bench/bench_head.py bench/bench_rerank.py -k "$K" --json /tmp/bench11/after_$i.json > /tmp/bench11/after_$i.txt 2>&1)
done
echo "end load $(cat /proc/loadavg)"
