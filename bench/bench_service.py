"""The search service under load: latency and throughput over loopback against the in-process engine.

    python bench/bench_service.py --out bench/results/DIR/service.md     # the full table (~10 min on 2 cores)
    python bench/bench_service.py --smoke                                 # a short check of the script

What runs: the demo's bundle and index (`sgengine demo --workdir W`; built first when missing).
`sgengine serve` starts as a subprocess on a free loopback port, once with batching on
(--max-batch 16, --max-delay-ms 5) and once with it off (--max-batch 1); a load generator in this
process (one thread and one keep-alive HTTP connection per client) sends queries with 1, 4 and 16
concurrent clients, each run bounded by --requests and by --duration seconds, after a warm-up of
one request per client. Two kinds of query, measured apart:
- descriptor: {"descriptor": [...], "k": 10} as JSON (the demo's query photos, embedded once);
- image: the demo's query photos as JPEG bodies, all resized to --side x 3/4 --side (images of one
  size share one backbone call in a batch; the engine batches equal sizes only).
Reference rows: the in-process `engine.search` on the same queries, one call per query on one
thread, and one call for 16 queries at once (the most batching can give).
Overload: batching on, --queue 8, 48 clients of image queries for --duration seconds: how many are
refused (503), the latency of the rest, and the server's resident memory before, at most and after.

Latency is per request as the client sees it (send to full response); p50/p99 over the run;
throughput is answered requests per second of wall time. The client shares the CPUs with the
server (loopback only), so on a small machine the service rows pay for their client too.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU used"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Load:
    """One bounded run: `clients` threads, each with a keep-alive connection, until `requests`
    answers or `duration` seconds. Latencies (ms) of 200s, counts by status."""

    def __init__(self, port: int, bodies: list[tuple[str, bytes, str]], clients: int, requests: int,
                 duration: float) -> None:
        self.port, self.bodies, self.clients = port, bodies, clients
        self.requests, self.duration = requests, duration
        self.lat: list[float] = []
        self.status: dict[int, int] = {}
        self._lock = threading.Lock()
        self._issued = 0

    def _client(self, stop_at: float, seed: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        i = seed
        try:
            while time.perf_counter() < stop_at:
                with self._lock:
                    if self._issued >= self.requests:
                        return
                    self._issued += 1
                path, body, ctype = self.bodies[i % len(self.bodies)]
                i += 1
                t = time.perf_counter()
                try:
                    conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                    r = conn.getresponse()
                    r.read()
                    code = r.status
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
                    code = -1
                ms = (time.perf_counter() - t) * 1e3
                with self._lock:
                    self.status[code] = self.status.get(code, 0) + 1
                    if code == 200:
                        self.lat.append(ms)
        finally:
            conn.close()

    def run(self) -> dict:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(self.clients) as pool:
            for f in [pool.submit(self._client, t0 + self.duration, c) for c in range(self.clients)]:
                f.result()
        wall = time.perf_counter() - t0
        ok = self.status.get(200, 0)
        return {"n": sum(self.status.values()), "ok": ok, "p50": pct(self.lat, 50), "p99": pct(self.lat, 99),
                "rps": ok / wall, "shed": self.status.get(503, 0),
                "errors": sum(v for k, v in self.status.items() if k not in (200, 503))}


class Server:
    """`sgengine serve` in a subprocess on a free loopback port."""

    def __init__(self, bundle: Path, index: Path, *extra: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "sgengine", "serve", str(bundle), str(index),
                                      "--port", str(self.port), "--log-level", "warning", *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sgengine serve exited: {self.proc.stderr.read()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("sgengine serve did not get ready in 180 s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def demo_files(workdir: Path) -> tuple[Path, Path, dict[str, Path]]:
    bundle, index = workdir / "bundle", workdir / "index"
    if not (bundle / "manifest.json").exists() or not (index / "manifest.json").exists():
        from sgengine.demo import run_demo
        run_demo(workdir=workdir)
    from sgengine.photoset import make_photo_set
    queries, _ = make_photo_set(workdir)  # reuses the files the demo wrote
    return bundle, index, queries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="sgengine-demo", help="the demo's folder (built when missing)")
    ap.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=400, help="descriptor queries per run (image: a quarter)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per run at most")
    ap.add_argument("--side", type=int, default=512, help="image queries: long side in px (default 512)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="a short check: 1 and 4 clients, few requests, 3 s runs")
    a = ap.parse_args(argv)
    if a.smoke:
        a.clients, a.requests, a.duration = "1,4", 24, 3.0
    clients = [int(c) for c in a.clients.split(",")]

    from PIL import Image
    from sgengine import Engine
    bundle, index, qfiles = demo_files(Path(a.workdir))
    engine = Engine.load(bundle, index=index)
    names = sorted(qfiles)
    jpegs = []
    for n in names:
        img = Image.open(qfiles[n]).convert("RGB").resize((a.side, a.side * 3 // 4))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    descs = engine.embed(jpegs)
    kinds = {
        "descriptor": ([("/search", json.dumps({"descriptor": d.tolist(), "k": a.k}).encode(), "application/json")
                        for d in descs], list(descs), a.requests),
        "image": ([(f"/search?k={a.k}", j, "image/jpeg") for j in jpegs], jpegs, max(a.requests // 4, 8)),
    }
    rows: list[tuple] = []

    def row(kind, mode, n_clients, r):
        rows.append((kind, mode, n_clients, r))
        print(f"{kind:<10} {mode:<28} {n_clients:>3} clients: n={r['n']:>4} p50 {r['p50']:8.2f} ms  "
              f"p99 {r['p99']:8.2f} ms  {r['rps']:7.1f} req/s  503: {r['shed']}  errors: {r['errors']}", flush=True)

    # In-process references: one query per call, then 16 queries in one call.
    for kind, (_, items, count) in kinds.items():
        for q in items[:2]:
            engine.search(q, k=a.k)
        lat, t0 = [], time.perf_counter()
        for i in range(count):
            if time.perf_counter() - t0 > a.duration:
                break
            t = time.perf_counter()
            engine.search(items[i % len(items)], k=a.k)
            lat.append((time.perf_counter() - t) * 1e3)
        wall = time.perf_counter() - t0
        row(kind, "in-process engine.search", 1, {"n": len(lat), "ok": len(lat), "p50": pct(lat, 50),
                                                  "p99": pct(lat, 99), "rps": len(lat) / wall, "shed": 0, "errors": 0})
        batch = [items[i % len(items)] for i in range(16)]
        batch = np.stack(batch) if kind == "descriptor" else batch
        engine.search(batch, k=a.k)
        lat, t0 = [], time.perf_counter()
        for _ in range(max(3, count // 64)):
            t = time.perf_counter()
            engine.search(batch, k=a.k)
            lat.append((time.perf_counter() - t) * 1e3)
        wall = time.perf_counter() - t0
        row(kind, "in-process, 16 per call", 16, {"n": 16 * len(lat), "ok": 16 * len(lat), "p50": pct(lat, 50),
                                                 "p99": pct(lat, 99), "rps": 16 * len(lat) / wall, "shed": 0,
                                                 "errors": 0})
    n_index, dim, m = len(engine.index), engine.dim, engine.bundle.rerank_defaults["M"]
    del engine

    for mode, extra in (("service, batching on", ("--max-batch", "16", "--max-delay-ms", "5")),
                        ("service, batching off", ("--max-batch", "1"))):
        srv = Server(bundle, index, "--queue", "256", "--timeout", "300", *extra)
        try:
            for kind, (bodies, _, count) in kinds.items():
                for c in clients:
                    Load(srv.port, bodies, c, c, 60).run()  # warm-up: one request per client
                    row(kind, mode, c, Load(srv.port, bodies, c, count, a.duration).run())
        finally:
            srv.stop()

    srv = Server(bundle, index, "--queue", "8", "--max-batch", "16", "--timeout", "300")
    try:
        rss0, peak, done = srv.rss_mb(), [0.0], threading.Event()

        def watch():
            while not done.wait(0.05):
                peak[0] = max(peak[0], srv.rss_mb())

        w = threading.Thread(target=watch)
        w.start()
        r = Load(srv.port, kinds["image"][0], 48, 10**9, a.duration).run()
        done.set()
        w.join()
        rss1 = srv.rss_mb()
        row("image", "overload: queue 8", 48, r)
    finally:
        srv.stop()

    # The table.
    def get(kind, mode, c):
        return next((r for k, mo, cc, r in rows if (k, mo, cc) == (kind, mode, c)), None)

    lines = [f"# sgengine serve under load ({datetime.date.today().isoformat()})", "",
             f"Machine: {machine()}. Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}.",
             f"Index: the demo's, {n_index} images, D = {dim}; k = {a.k}, rerank M = min({m}, {n_index}); "
             f"image queries {a.side}x{a.side * 3 // 4} JPEG. Runs: at most {a.requests} descriptor / "
             f"{kinds['image'][2]} image requests or {a.duration:g} s each. Command: `python bench/bench_service.py"
             f"{' ' + ' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
             "| query | mode | clients | answered | p50 ms | p99 ms | req/s | 503 | other errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, mode, c, r in rows:
        lines.append(f"| {kind} | {mode} | {c} | {r['ok']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.1f} | "
                     f"{r['shed']} | {r['errors']} |")
    lines.append("")
    ref, one = get("descriptor", "in-process engine.search", 1), get("descriptor", "service, batching on", 1)
    if ref and one:
        lines.append(f"- Service overhead at one client, descriptor queries: p50 {one['p50']:.2f} ms against "
                     f"{ref['p50']:.2f} ms in process: {one['p50'] - ref['p50']:+.2f} ms (target <= 2 ms).")
    c_max = max(clients)
    on, off = get("image", "service, batching on", c_max), get("image", "service, batching off", c_max)
    if on and off:
        lines.append(f"- Image queries, {c_max} clients: {on['rps']:.2f} req/s with batching, {off['rps']:.2f} "
                     f"without: {on['rps'] / off['rps']:.2f}x (target >= 1.5x); p99 {on['p99']:.0f} ms with, "
                     f"{off['p99']:.0f} ms without.")
    lines.append(f"- Overload (48 image clients, queue 8): {r['ok']} answered, {r['shed']} refused with 503, "
                 f"{r['errors']} other errors; p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms of the answered; "
                 f"server RSS {rss0:.0f} MB before, {peak[0]:.0f} MB at most, {rss1:.0f} MB after.")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
