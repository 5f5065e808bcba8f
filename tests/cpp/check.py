"""ctest driver: what the C++ programs print must equal what sgengine's Python API returns for the same calls.

    python tests/cpp/check.py example  --exe sgengine-search --fixture DIR [-k 5]
    python tests/cpp/check.py api      --exe embed_check     --fixture DIR --python PY [-k 5]
    python tests/cpp/check.py consumer --mode install|subdir --build-dir B --source SRC --fixture DIR [-k 5]

The fixture is tests/cpp/make_fixture.py's. The C++ side runs with PYTHONHOME and PYTHONPATH
removed from its environment: the library must find the environment on its own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ATOL = 1e-5
Ranked = list  # [(id, score)]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "SGENGINE_PYTHON")}
    env.update(extra)
    return env


def run_cpp(cmd: list[str], **extra_env: str) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=clean_env(**extra_env), timeout=300)
    if p.returncode != 0:
        raise SystemExit(f"FAIL: {' '.join(map(str, cmd))} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    sys.stderr.write(p.stderr)
    return p.stdout


def compare_ranked(got: Ranked, want: Ranked, what: str, *, complete: bool = False) -> list[str]:
    """sgengine.compare's tie-aware check (scores within ATOL, ids per tie group) on (id, score) lists.

    complete: every index entry is listed, so the last tie group is compared too.
    """
    from sgengine.compare import rankings_agree
    if len(got) != len(want):
        return [f"{what}: {len(got)} results from C++, {len(want)} from Python\n  C++ {got}\n  Py  {want}"]
    if not got:
        return [f"{what}: no results on either side"]
    codes: dict[str, int] = {}
    ids = [[codes.setdefault(i, len(codes)) for i, _ in side] for side in (got, want)]
    ok, msg = rankings_agree(np.array(ids[0]), np.array([s for _, s in got]), np.array(ids[1]),
                             np.array([s for _, s in want]), rtol=0.0, atol=ATOL, truncated=not complete)
    return [] if ok else [f"{what}: {msg}\n  C++ {got}\n  Py  {want}"]


def python_ranked(engine, query, k: int, **kw) -> Ranked:
    r = engine.search(query, k=k, **kw)
    return [(str(i), float(s)) for i, s in zip(r.ids[0], r.scores[0])]


def parse_rank_lines(out: str) -> Ranked:
    """'rank id score' lines (ids may hold spaces)."""
    rows = []
    for n, line in enumerate(out.splitlines(), 1):
        rank, rest = line.split(" ", 1)
        ident, score = rest.rsplit(" ", 1)
        assert int(rank) == n, f"rank {rank} on line {n}"
        rows.append((ident, float(score)))
    return rows


def load_engine(fixture: Path, index: bool = True):
    from sgengine.engine import Engine
    return Engine.load(fixture / "bundle", index=fixture / "index" if index else None)


def report(errs: list[str], ok: str) -> int:
    if errs:
        print("FAIL\n" + "\n".join(errs))
        return 1
    print(ok)
    return 0


# ------------------------------------------------------------------------------------------ example
def check_example(exe: Path, fixture: Path, k: int, label: str = "example", want: Ranked | None = None) -> list[str]:
    query = fixture / "query.jpg"
    got = parse_rank_lines(run_cpp([exe, fixture / "bundle", fixture / "index", query, "-k", str(k)]))
    if want is not None:
        return compare_ranked(got, want, label)
    engine = load_engine(fixture)
    errs = compare_ranked(got, python_ranked(engine, str(query), k), label)
    # The example's --adaptive flag reaches the engine's adaptive mode.
    got = parse_rank_lines(run_cpp([exe, fixture / "bundle", fixture / "index", query, "-k", str(k), "--adaptive"]))
    return errs + compare_ranked(got, python_ranked(engine, str(query), k, rerank="adaptive"), f"{label} --adaptive")


# ------------------------------------------------------------------------------------------ api
def share_packages(python: str, venv: Path) -> None:
    """A new virtual environment at `venv` that imports what `python` imports.

    `--system-site-packages` alone shares the *base* interpreter's packages: when `python` is
    itself a virtual environment's (sgengine installed there, as `pip install -e` users have it),
    the new one would not see sgengine. So its site-packages also gets a .pth file that adds
    each of `python`'s site directories with site.addsitedir, which runs their .pth files too
    (an editable install is one).
    """
    subprocess.run([python, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    probe = ("import json, site, sys; dirs = site.getsitepackages() + "
             "([site.getusersitepackages()] if site.ENABLE_USER_SITE else []); print(json.dumps(dirs))")
    outer = json.loads(subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True,
                                      env=clean_env()).stdout)
    inner = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                                      check=True, env=clean_env()).stdout)
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in outer if os.path.isdir(d))
    (Path(inner[0]) / "_outer_environment.pth").write_text(lines)


def python_error(f) -> str:
    try:
        f()
    except Exception as e:  # the type name is what is compared
        return type(e).__name__
    return "none"


def check_api(exe: Path, fixture: Path, k: int, python: str) -> list[str]:
    out = run_cpp([exe, fixture, str(k)])
    results: dict[str, Ranked] = {}
    errors: dict[str, str] = {}
    described = None
    threads = None
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "result":
            mode, rank, score, row, ident = rest.split(" ", 4)
            results.setdefault(mode, []).append((ident, float(score)))
            assert int(rank) == len(results[mode])
        elif kind == "error":
            case, typ = rest.split(" ")
            errors[case] = typ
        elif kind == "describe":
            described = json.loads(rest)
        elif kind == "threads":
            threads = rest
    errs: list[str] = []
    if threads is None:
        errs.append("the two-thread check printed nothing")

    engine = load_engine(fixture)
    query = fixture / "query.jpg"
    meta = json.loads((fixture / "query.json").read_text())
    rgb = np.frombuffer((fixture / "query.rgb").read_bytes(), np.uint8).reshape(meta["height"], meta["width"], 3)
    desc = np.frombuffer((fixture / "query.f32").read_bytes(), np.float32).copy()
    n = len(engine.index)
    expected = {
        "path": python_ranked(engine, str(query), k),
        "encoded": python_ranked(engine, query.read_bytes(), k),
        "pixels_rgb": python_ranked(engine, rgb.copy(), k),
        "pixels_bgr": python_ranked(engine, np.ascontiguousarray(rgb[..., ::-1]), k, color_order="BGR"),
        "descriptor": python_ranked(engine, desc, k),
        "no_rerank": python_ranked(engine, str(query), k, rerank=False),
        "adaptive": python_ranked(engine, str(query), k, rerank="adaptive"),
        "custom": python_ranked(engine, str(query), k, M=4, K=1, beta=0.3),
        "k_large": python_ranked(engine, desc, 100000),
    }
    expected["no_rerank_adaptive"] = expected["no_rerank"]  # no rerank wins over SearchOptions::adaptive
    if expected["adaptive"] == expected["path"]:
        errs.append("the fixture gives the same ranking in the adaptive and faithful modes: it cannot tell whether "
                    "SearchOptions::adaptive reaches the engine")
    for mode, want in expected.items():
        if mode not in results:
            errs.append(f"{mode}: no C++ results")
            continue
        errs += compare_ranked(results[mode], want, mode, complete=mode == "k_large")
    if results.get("k_large") is not None and len(results["k_large"]) != n:
        errs.append(f"k_large: {len(results['k_large'])} results, the index holds {n}")

    from sgengine.engine import Engine
    want_err = {
        "missing_file": python_error(lambda: engine.search(str(fixture / "no-such-image.jpg"), k=k)),
        "k_zero": python_error(lambda: engine.search(desc, k=0)),
        "wrong_dim": python_error(lambda: engine.search(desc[:-1].copy(), k=k)),
        "junk_bytes": python_error(lambda: engine.search(b"this is not an image", k=k)),
        "two_channels": python_error(lambda: engine.search(np.zeros((meta["height"], meta["width"], 2), np.uint8), k=k)),
        "missing_bundle": python_error(lambda: Engine.load(fixture / "no-such-bundle", index=fixture / "index")),
        "missing_index": python_error(lambda: Engine.load(fixture / "bundle", index=fixture / "no-such-index")),
        "no_index": python_error(lambda: Engine.load(fixture / "bundle").search(str(query), k=k)),
    }
    for case, typ in want_err.items():
        if typ == "none":
            errs.append(f"{case}: Python raised nothing; the case no longer tests an error")
        elif errors.get(case) != typ:
            errs.append(f"{case}: C++ got sgengine::Error of Python type {errors.get(case)!r}, Python raises {typ}")

    if described is None:
        errs.append("describe() printed nothing")
    else:
        py_desc = json.loads(json.dumps(engine.describe(), default=str))
        for key in ("model", "dim", "device", "backend", "head_impl", "rerank_impl", "index"):
            if described.get(key) != py_desc.get(key):
                errs.append(f"describe()[{key!r}]: {described.get(key)!r} from C++, {py_desc.get(key)!r} from Python")
        emb = described.get("embedding", {})
        if emb.get("python") != python:
            errs.append(f"describe() embedding.python {emb.get('python')!r}, expected the configured {python!r}")

    # A virtual environment (sharing this one's packages) named by SGENGINE_PYTHON: the embedded
    # interpreter must take it as sys.prefix with no PYTHONHOME, and still import sgengine.
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        share_packages(python, venv)
        out = run_cpp([exe, fixture, str(k), "--describe"], SGENGINE_PYTHON=str(venv / "bin" / "python"))
        emb = json.loads(out.split(" ", 1)[1]).get("embedding", {})
        if os.path.realpath(emb.get("prefix", "")) != os.path.realpath(venv):
            errs.append(f"with SGENGINE_PYTHON={venv}/bin/python, sys.prefix was {emb.get('prefix')!r}, not the venv")
    return errs


# ------------------------------------------------------------------------------------------ consumer
def check_consumer(mode: str, build_dir: Path, source: Path, fixture: Path, k: int, generator: str | None) -> list[str]:
    """A separate CMake project uses sgengine::embed via find_package (after install) or add_subdirectory."""
    here = Path(__file__).resolve().parent
    want = python_ranked(load_engine(fixture), str(fixture / "query.jpg"), k)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Debug: the subdir build compiles engine.cpp (pybind11) again, about twice as fast unoptimized.
        cfg = ["cmake", "-S", str(here / "consumer"), "-B", str(tmp / "build"), "-DCMAKE_BUILD_TYPE=Debug"]
        if generator:
            cfg += ["-G", generator]
        errs: list[str] = []
        if mode == "install":
            prefix = tmp / "prefix"
            subprocess.run(["cmake", "--install", str(build_dir), "--prefix", str(prefix)], check=True,
                           stdout=subprocess.DEVNULL)
            cfg.append(f"-DCMAKE_PREFIX_PATH={prefix}")
            # The installed example must run from the prefix alone (RPATH to its library and to libpython).
            installed = prefix / "bin" / "sgengine-search"
            errs += check_example(installed, fixture, k, "installed sgengine-search", want)
        else:
            cfg.append(f"-DSGENGINE_SOURCE_DIR={source}")
        subprocess.run(cfg, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(tmp / "build"), "--target", "consumer_search"], check=True,
                       stdout=subprocess.DEVNULL)
        errs += check_example(tmp / "build" / "consumer_search", fixture, k, f"consumer ({mode})", want)
        return errs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("example", "api", "consumer"))
    p.add_argument("--exe", type=Path)
    p.add_argument("--fixture", type=Path, required=True)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--mode", choices=("install", "subdir"), default="install")
    p.add_argument("--build-dir", type=Path)
    p.add_argument("--source", type=Path)
    p.add_argument("--generator")
    a = p.parse_args(argv)
    if not (a.fixture / "index").is_dir():
        print(f"FAIL: no fixture at {a.fixture} (the sgengine_fixture test makes it)")
        return 1
    if a.what == "example":
        return report(check_example(a.exe, a.fixture, a.k), f"ok: C++ top-{a.k} equals Python's")
    if a.what == "api":
        return report(check_api(a.exe, a.fixture, a.k, a.python), "ok: every C++ entry point equals Python's")
    return report(check_consumer(a.mode, a.build_dir, a.source, a.fixture, a.k, a.generator),
                  f"ok: a consumer project ({a.mode}) builds and equals Python's")


if __name__ == "__main__":
    sys.exit(main())
