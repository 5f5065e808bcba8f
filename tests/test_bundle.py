"""The bundle on disk: manifest contents, hashes, and what Bundle.load refuses."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil

import pytest
import torch

from sgengine.bundle import MANIFEST, Bundle
from sgengine.errors import BundleError
from sgengine.export import export_bundle
from sgengine.model.factory import load_checkpoint
from sgengine.model.head import HeadConfig
from sgengine.preprocess import CVNET_MEAN_BGR, CVNET_STD_BGR, min_input_side
from sgengine.testing import save_cvnet_checkpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle_r50")
    ckpt = save_cvnet_checkpoint(d / "cvnet_r50.pth", depth=50, seed=1)
    model, _ = load_checkpoint(ckpt)
    bundle = export_bundle(model, d / "bundle", parity_max_side=128, progress=lambda s: None)
    return {"ckpt": ckpt, "model": model, "bundle": bundle, "dir": d / "bundle"}


def _linked_copy(src, dst, copy: tuple[str, ...] = ()):
    """Hard-link the bundle's big files (fast), really copy the ones a test will modify."""
    dst.mkdir()
    for f in os.listdir(src):
        (shutil.copy2 if f in copy or f == MANIFEST else os.link)(src / f, dst / f)
    return dst


def test_manifest_contents(exported):
    m = json.loads((exported["dir"] / MANIFEST).read_text())
    assert m["format"] == "sgengine-bundle" and m["format_version"] == 1
    assert m["model"] == {"family": "resnet", "depth": 50, "name": m["model"]["name"], "relu_plus": True,
                          "channels": 2048, "stride": 32, "dim": 2048}
    assert m["head"] == {**HeadConfig().to_dict(), "whitening": True}
    p = m["preprocess"]
    assert p["channel_order"] == "BGR" and tuple(p["mean"]) == CVNET_MEAN_BGR and tuple(p["std"]) == CVNET_STD_BGR
    assert p["max_side"] == 2048 and p["min_side"] == min_input_side(32, HeadConfig().scales)
    assert m["rerank"] == {"M": 400, "K": 9, "beta": 0.15}
    assert {"sgengine", "torch", "onnx", "onnxruntime", "opset"} <= set(m["versions"])
    assert m["parity"]["passed"] and m["parity"]["min_cosine"] >= 0.99999
    assert dt.datetime.fromisoformat(m["created"]).tzinfo is not None
    assert set(m["files"]) == {"backbone.onnx", "head.safetensors", "backbone.safetensors"}
    for name, entry in m["files"].items():
        data = (exported["dir"] / name).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert len(m["fingerprint"]) == 64 and exported["bundle"].fingerprint == m["fingerprint"]


def test_bundle_views_and_weights_match_the_checkpoint(exported):
    b = exported["bundle"]
    assert (b.family, b.depth, b.dim, b.channels, b.stride) == ("resnet", 50, 2048, 2048, 32)
    assert b.head_config == HeadConfig() and b.rerank_defaults["M"] == 400 and b.max_side == 2048
    raw = torch.load(exported["ckpt"], weights_only=True)["model_state"]
    W, bias = b.whitening()
    assert torch.equal(W, raw["encoder_q.head.fc.weight"]) and torch.equal(bias, raw["encoder_q.head.fc.bias"])
    rebuilt = b.build_torch_model()
    ref = exported["model"].state_dict()
    got = rebuilt.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert rebuilt.normalization == b.normalization
    head = b.build_head()
    assert torch.equal(head.fc.weight, W)


def test_fingerprint_tracks_content(exported, tmp_path):
    """Same weights -> same fingerprint; different weights -> different one."""
    d = tmp_path / "again"
    again = export_bundle(exported["model"], d, check=False, exporter="legacy", progress=lambda s: None)
    assert again.manifest["files"]["head.safetensors"]["sha256"] == exported["bundle"].manifest["files"]["head.safetensors"]["sha256"]
    with torch.no_grad():
        exported["model"].head.fc.bias.add_(1e-3)
    try:
        other = export_bundle(exported["model"], tmp_path / "other", check=False, exporter="legacy", progress=lambda s: None)
    finally:
        with torch.no_grad():
            exported["model"].head.fc.bias.sub_(1e-3)
    assert other.fingerprint != exported["bundle"].fingerprint


def test_tampered_file_is_detected(exported, tmp_path):
    d = _linked_copy(exported["dir"], tmp_path / "tampered", copy=("head.safetensors",))
    with open(d / "head.safetensors", "r+b") as f:
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    expected = exported["bundle"].manifest["files"]["head.safetensors"]["sha256"]
    with pytest.raises(BundleError) as e:
        Bundle.load(d)
    msg = str(e.value)
    assert "head.safetensors" in msg and expected in msg and "actual" in msg
    Bundle.load(d, verify=False)  # the caller may skip hashing on purpose


def test_truncated_and_missing_files(exported, tmp_path):
    d = _linked_copy(exported["dir"], tmp_path / "trunc", copy=("head.safetensors",))
    with open(d / "head.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(BundleError, match="head.safetensors is 100 bytes"):
        Bundle.load(d)
    unverified = Bundle.load(d, verify=False)  # hashes skipped: reading the weights still names the file
    with pytest.raises(BundleError, match="head.safetensors: cannot be read as safetensors"):
        unverified.whitening()
    (d / "head.safetensors").unlink()
    with pytest.raises(BundleError, match="head.safetensors listed in the manifest is missing"):
        Bundle.load(d)


@pytest.mark.parametrize("field,value,match", [
    ("format_version", 2, "format_version 2 is not supported.*newer"),
    ("format_version", 0, "format_version 0 is not supported"),
    ("format", "something-else", "format is 'something-else'"),
])
def test_wrong_format_is_refused(exported, tmp_path, field, value, match):
    d = _linked_copy(exported["dir"], tmp_path / "fmt")
    m = json.loads((d / MANIFEST).read_text())
    m[field] = value
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match):
        Bundle.load(d)


def test_edited_manifest_block_changes_fingerprint_check(exported, tmp_path):
    d = _linked_copy(exported["dir"], tmp_path / "edited")
    m = json.loads((d / MANIFEST).read_text())
    m["preprocess"]["channel_order"] = "RGB"
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="fingerprint mismatch"):
        Bundle.load(d)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(tmp_path)
    with pytest.raises(BundleError, match="not a directory"):
        Bundle.load(tmp_path / "nope")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_bundle_files_follow_the_umask(tmp_path, umask, mode):
    """Bundle files get the mode a plain open() gives (a service user can load a bundle exported
    under umask 022), not the 0600 of the temporary files they are renamed from."""
    from sgengine.model.factory import from_trunk
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU())
    old = os.umask(umask)
    try:
        export_bundle(from_trunk(trunk), tmp_path / "b", check=False, exporter="legacy", progress=lambda s: None)
    finally:
        os.umask(old)
    files = sorted(os.listdir(tmp_path / "b"))
    assert MANIFEST in files and "head.safetensors" in files
    assert {f: oct(os.stat(tmp_path / "b" / f).st_mode & 0o777) for f in files} == {f: oct(mode) for f in files}
