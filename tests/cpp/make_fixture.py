"""ctest fixture for the C++ API: a bundle, an index of real photos and one query, made with the Python package.

    python tests/cpp/make_fixture.py OUT_DIR [--bundle EXISTING_BUNDLE]

OUT_DIR/bundle   the default model (`python -m sgengine.export --default`), or a copy of
                 EXISTING_BUNDLE (e.g. one a CI cache keeps; SGENGINE_TEST_BUNDLE does the same)
OUT_DIR/photos/  a handful of the photos scikit-image / scikit-learn ship (files as installed)
OUT_DIR/index    `python -m sgengine index build bundle photos -o index`
OUT_DIR/query.jpg   a crop of one indexed photo, re-encoded (so it is not a copy of any entry)
OUT_DIR/query.rgb   its decoded pixels, raw RGB uint8 HWC; query.json holds height and width
OUT_DIR/query.f32   its descriptor from Engine.embed, raw float32

Everything goes through the public CLIs and the Engine, as a user would make them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Small photos (the export and the index build dominate the ctest run on 2 cores).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "china", "flower")
QUERY_FROM = "china"


def run(cmd: list[str]) -> None:
    t0 = time.perf_counter()
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--bundle", type=Path, default=os.environ.get("SGENGINE_TEST_BUNDLE") or None)
    a = p.parse_args(argv)
    out = a.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    from sgengine.photos import sample_photo_files
    files = sample_photo_files()
    missing = [p for p in PHOTOS if p not in files]
    if missing:
        print(f"sample photos missing: {missing} (install the demo extra: pip install -e '.[demo]')", file=sys.stderr)
        return 1
    photos = out / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copyfile(files[name], photos / files[name].name)

    if a.bundle:
        shutil.copytree(a.bundle, out / "bundle")
    else:
        run([sys.executable, "-m", "sgengine.export", "--default", "-o", str(out / "bundle")])
    run([sys.executable, "-m", "sgengine", "index", "build", str(out / "bundle"), str(photos), "-o",
         str(out / "index"), "--quiet"])

    with Image.open(files[QUERY_FROM]) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    crop = np.ascontiguousarray(rgb[h // 10: h - h // 8, w // 12: w - w // 6])
    Image.fromarray(crop).save(out / "query.jpg", quality=90)
    with Image.open(out / "query.jpg") as im:
        decoded = np.ascontiguousarray(np.asarray(im.convert("RGB")))
    (out / "query.rgb").write_bytes(decoded.tobytes())
    (out / "query.json").write_text(json.dumps({"height": decoded.shape[0], "width": decoded.shape[1]}))

    from sgengine.engine import Engine
    engine = Engine.load(out / "bundle")
    desc = engine.embed(str(out / "query.jpg"))[0].astype(np.float32)
    (out / "query.f32").write_bytes(desc.tobytes())
    print(f"fixture in {out}: {len(PHOTOS)} photos, descriptor dim {desc.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
