"""Export to a bundle and its parity check: real ONNX Runtime, real photos, real files on disk.

The ResNet-50 here has random (BatchNorm-calibrated) CVNet weights; photos are shrunk to a
long side of SIDE px to keep the module fast on two cores.
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sgengine.backbone import load_backbone
from sgengine.bundle import MANIFEST, Bundle
from sgengine.errors import BundleError
from sgengine.export import main
from sgengine.model.factory import load_checkpoint
from sgengine.model.head import gem_plus, l2n, regional_gem, scale_gem_max
from sgengine.photos import sample_photos
from sgengine.preprocess import ensure_min_size, resize_for_scale, to_tensor
from sgengine.testing import save_cvnet_checkpoint

SIDE = 256


def _run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_r50")
    ckpt = save_cvnet_checkpoint(d / "cvnet_r50.pth", depth=50, seed=0)
    out = d / "bundle"
    rc, log, err = _run_main([str(ckpt), "-o", str(out), "--parity-max-side", str(SIDE)])
    print(log, err)
    assert rc == 0, log + err
    model, _ = load_checkpoint(ckpt)
    return {"ckpt": ckpt, "bundle": Bundle.load(out), "log": log, "model": model}


def _photo_inputs(norm, min_side):
    """Three real photos at different sizes (one odd, non-square), long side <= SIDE."""
    photos = sample_photos(color_only=True)
    picks = [("astronaut", (SIDE, SIDE)), ("coffee", (SIDE * 2 // 3, SIDE)), ("china", (181, 247))]
    out = []
    for name, (h, w) in picks:
        rgb = np.asarray(Image.fromarray(photos[name]).resize((w, h), Image.Resampling.BILINEAR))
        x = to_tensor(np.ascontiguousarray(rgb[..., ::-1]), norm)
        out.append((name, ensure_min_size(x, min_side)[0]))
    return out


def test_onnxruntime_descriptors_match_pytorch_spec(r50):
    """The export's contract: ORT descriptors within cosine 0.99999 of the PyTorch SPEC computation,
    max diff <= 1e-3 of the smallest distance between descriptors of different photos."""
    b, model = r50["bundle"], r50["model"]
    backbone = load_backbone(b, device="cpu", backend="onnxruntime")
    W, bias = b.whitening()
    cfg = b.head_config
    inputs = _photo_inputs(b.normalization, b.min_side)
    ref, got = [], []
    with torch.inference_mode():
        for _, x in inputs:
            ref.append(model(x)[0].double())
            per_scale = []
            for s in cfg.scales:  # SPEC 3-4 written out here, with the bundle's whitening file
                fmap = backbone(resize_for_scale(x, s))
                g = gem_plus(regional_gem(fmap, cfg.rgem_p, cfg.rgem_size, cfg.rgem_mix), cfg.gemp_p, cfg.gemp_eps)
                per_scale.append(l2n(g) @ W.t() + bias)
            got.append(scale_gem_max(per_scale)[0].double())
    R, G = torch.stack(ref), torch.stack(got)
    dist = torch.cdist(R, R)
    min_dist = dist[~torch.eye(len(R), dtype=torch.bool)].min().item()
    assert min_dist > 0.01, "photos must give distinguishable descriptors for the ratio to mean anything"
    for (name, x), r, g in zip(inputs, R, G):
        cos = (r @ g / (r.norm() * g.norm())).item()
        diff = (r - g).abs().max().item()
        print(f"{name} {tuple(x.shape[-2:])}: max|diff| {diff:.3e} cosine {cos:.9f} ratio {diff / min_dist:.3e}")
        assert cos >= 0.99999, name
        assert diff <= 1e-3 * min_dist, name


def test_export_prints_parity_table_and_checkpoint_report(r50):
    log = r50["log"]
    assert "ignored:" in log  # CVNet extras (head.pool.p, conv2ds, cv_learner) reported as ignored
    assert "PASS" in log and "max|diff|" in log and "cosine" in log
    for name in ("backbone.onnx", "head.safetensors", "backbone.safetensors"):
        assert name in log
    parity = r50["bundle"].manifest["parity"]
    assert parity["checked"] and parity["passed"] and len(parity["photos"]) == 4
    sizes = {tuple(p["size"]) for p in parity["photos"]}
    assert len(sizes) >= 2 and any(h % 2 and w % 2 and h != w for h, w in sizes)
    assert parity["min_cosine"] >= 0.99999 and parity["max_ratio"] <= 1e-3


def test_onnx_graph_has_dynamic_batch_and_size(r50):
    b, model = r50["bundle"], r50["model"]
    onnx_info = b.manifest["onnx"]
    assert onnx_info["input"]["dims"][0] == "batch" and all(isinstance(d, str) for d in onnx_info["input"]["dims"][2:])
    backbone = load_backbone(b, device="cpu", backend="onnxruntime")
    g = torch.Generator().manual_seed(3)
    for shape in [(2, 3, 96, 128), (1, 3, 75, 131)]:
        x = torch.randn(*shape, generator=g)
        y = backbone(x)
        with torch.inference_mode():
            r = model.trunk(x)
        assert tuple(y.shape) == (shape[0], 2048, -(-shape[2] // 32), -(-shape[3] // 32))
        assert (y - r).abs().max().item() <= 1e-4 * r.abs().max().item() + 1e-6


def test_parity_failure_exits_nonzero_and_writes_no_manifest(r50, tmp_path):
    out = tmp_path / "failed"
    # A tolerance of 0 demands bit-identical descriptors; ORT's and PyTorch's convolutions differ
    # in rounding, so this must fail. The tracer keeps this second export fast.
    rc, log, err = _run_main([str(r50["ckpt"]), "-o", str(out), "--tolerance", "0", "--parity-max-side", "128",
                              "--exporter", "legacy"])
    assert rc == 1, log + err
    assert "parity check failed" in err and "FAIL" in err
    assert (out / "backbone.onnx").exists() and not (out / MANIFEST).exists()
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(out)


def test_export_over_an_old_bundle_removes_its_manifest_first(r50, tmp_path):
    out = tmp_path / "reexport"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": "sgengine-bundle", "format_version": 1}))
    rc, _, err = _run_main([str(r50["ckpt"]), "-o", str(out), "--tolerance", "0", "--parity-max-side", "128",
                            "--exporter", "legacy"])
    assert rc == 1 and not (out / MANIFEST).exists(), err


def test_bad_inputs_exit_with_a_message(tmp_path):
    rc, _, err = _run_main([str(tmp_path / "missing.pth"), "-o", str(tmp_path / "b")])
    assert rc == 2 and "missing.pth" in err
    rc, _, err = _run_main([str(tmp_path / "x.pth"), "--default", "-o", str(tmp_path / "b")])
    assert rc == 2 and "not both" in err


def test_generic_torchscript_trunk_exports_with_torch_backend(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU()).eval()
    path = tmp_path / "trunk.pt"
    torch.jit.script(net).save(str(path))
    out = tmp_path / "generic"
    rc, log, err = _run_main(["--trunk", str(path), "-o", str(out), "--parity-max-side", "96"])
    assert rc == 0, log + err
    b = Bundle.load(out)
    assert b.family == "generic" and b.dim == 32 and b.stride == 4
    assert b.manifest["torch_trunk"]["kind"] == "torchscript"
    x = torch.randn(2, 3, 37, 53)
    a = load_backbone(b, backend="onnxruntime")(x)
    t = load_backbone(b, backend="torch")(x)
    assert torch.allclose(a, t, rtol=1e-4, atol=1e-5)


def test_default_model_cli_end_to_end(tmp_path):
    out = tmp_path / "default"
    proc = subprocess.run([sys.executable, "-m", "sgengine.export", "--default", "-o", str(out),
                           "--parity-max-side", "256"],
                          capture_output=True, text=True, timeout=300)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "EfficientNet-Lite0" in proc.stdout
    b = Bundle.load(out)
    m = b.manifest["model"]
    assert (m["family"], m["dim"], m["channels"], m["stride"]) == ("efficientnet-lite0", 1280, 1280, 32)
    assert b.whitening() is None and b.normalization.channel_order == "RGB"
    assert b.manifest["parity"]["passed"]
    # the torch backend rebuilds the EfficientNet trunk from backbone.safetensors
    rgb = sample_photos(color_only=True)["coffee"]
    x = to_tensor(np.ascontiguousarray(rgb[::2, ::2, ::-1]), b.normalization)
    a = load_backbone(b, backend="onnxruntime")(x)
    t = load_backbone(b, backend="torch")(x)
    assert (a - t).abs().max().item() <= 1e-4 * t.abs().max().item() + 1e-6
