"""Checkpoint loading: every layout CVNet / SuperGlobal / DataParallel produce, and every way it can fail.

Real files on disk throughout (torch.save / torch.jit.save into tmp_path); nothing is mocked.
"""
from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from PIL import Image
from torch import nn

from sgengine.errors import CheckpointError
from sgengine.model import from_trunk, load_checkpoint

EXTRA_TOP = ("conv2ds.", "cv_learner.")


def keyed(sd, prefix):
    """The unprefixed fixture state dict as a checkpoint with `prefix` (extras stay top-level, behind module.)."""
    outer = "module." if prefix.startswith("module.") else ""
    return {(outer + k if k.startswith(EXTRA_TOP) else prefix + k): v for k, v in sd.items()}


def assert_loaded(model, sd):
    state = model.state_dict()
    for k, v in sd.items():
        if k.startswith(EXTRA_TOP) or k == "head.pool.p":
            continue
        mk = k if k.startswith("head.") else "trunk." + k
        assert torch.equal(state[mk], v), mk


@pytest.mark.parametrize("prefix", ["", "encoder_q.", "globalmodel.", "module.", "module.encoder_q.",
                                    "module.globalmodel.", "globalmodel.encoder_q."])
def test_prefix_forms(tmp_path, cvnet_state_dict, prefix):
    sd = cvnet_state_dict(50)
    ckpt = keyed(sd, prefix)
    path = tmp_path / "m.pth"
    torch.save({"model_state": ckpt, "optimizer_state": {"lr": torch.tensor(0.1)}, "epoch": 3}, path)
    model, report = load_checkpoint(path)
    assert report.depth == 50 and model.depth == 50
    assert report.prefixes == ((prefix,) if prefix else ())
    assert report.container == "model_state"
    outer = "module." if prefix.startswith("module.") else ""
    assert set(report.ignored) == {prefix + "head.pool.p"} | {outer + k for k in sd if k.startswith(EXTRA_TOP)}
    assert report.whitening and model.whitening and model.dim == 2048
    assert report.unexpected == ()
    assert not model.training
    assert all(t.device.type == "cpu" for t in model.state_dict().values())  # nothing left on the meta device
    assert report.loaded == len(model.state_dict())
    assert_loaded(model, sd)
    text = report.summary()
    assert str(path) in text and "ResNet-50" in text and "conv2ds.*" in text and "head.pool.p" in text


def test_bare_state_dict_and_momentum_encoder(tmp_path, cvnet_state_dict):
    sd = cvnet_state_dict(50)
    ckpt = keyed(sd, "module.encoder_q.")
    # CVNet training checkpoints also hold the momentum encoder: same architecture, other weights
    ckpt["module.encoder_k.s3.b1.f.a.weight"] = torch.zeros(256, 512, 1, 1)
    ckpt["module.encoder_k.s3.b9.f.a.weight"] = torch.zeros(256, 1024, 1, 1)
    path = tmp_path / "bare.pth"
    torch.save(ckpt, path)
    model, report = load_checkpoint(path)
    assert report.container == "bare" and report.depth == 50
    assert {"module.encoder_k.s3.b1.f.a.weight", "module.encoder_k.s3.b9.f.a.weight"} <= set(report.ignored)
    assert "encoder_k.*" in report.summary()
    assert_loaded(model, sd)


def test_state_dict_container_without_counters(tmp_path, cvnet_state_dict):
    """{"state_dict": ...} is read too; BN num_batches_tracked counters are optional."""
    sd = {k: v for k, v in cvnet_state_dict(50).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "sd.pth"
    torch.save({"state_dict": sd}, path)
    model, report = load_checkpoint(path)
    assert report.container == "state_dict"
    assert_loaded(model, sd)


def test_resnet101_depth_inferred(tmp_path, cvnet_state_dict):
    sd = cvnet_state_dict(101)
    path = tmp_path / "r101.pth"
    torch.save({"model_state": keyed(sd, "encoder_q.")}, path)
    model, report = load_checkpoint(path, relu_plus=False)
    assert report.depth == 101 and model.depth == 101 and model.trunk.depth == 101
    assert not model.relu_plus and "ReLU+ off" in report.summary()
    assert_loaded(model, sd)


def test_unknown_depth(tmp_path, cvnet_state_dict):
    sd = {k: v for k, v in cvnet_state_dict(50).items() if not k.startswith("s3.b6.")}
    path = tmp_path / "r44.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"r44\.pth: stage s3 has 5 blocks; expected 6 \(ResNet-50\) or 23"):
        load_checkpoint(path)


def test_not_a_pycls_resnet(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, path)
    with pytest.raises(CheckpointError, match=r"tv\.pth: no pycls ResNet tensors.*conv1\.weight"):
        load_checkpoint(path)


def test_missing_and_misshaped_tensors_all_listed(tmp_path, cvnet_state_dict):
    sd = dict(cvnet_state_dict(50))
    del sd["s2.b1.f.b.weight"]
    del sd["head.fc.bias"]
    sd["s4.b3.f.c_bn.weight"] = torch.ones(1024)
    sd["stem.conv.weight"] = torch.zeros(64, 3, 3, 3)
    sd["s1.b2.f.a_bn.running_var"] = sd["s1.b2.f.a_bn.running_var"].clone()
    sd["s1.b2.f.a_bn.running_var"][[3, 7]] = float("nan")
    path = tmp_path / "broken.pth"
    torch.save({"model_state": keyed(sd, "encoder_q.")}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: 5 backbone/head tensors missing, mis-shaped or non-finite")
    assert "  s2.b1.f.b.weight: missing (expected [128, 128, 3, 3])" in msg
    assert "  head.fc.bias: missing (expected [2048])" in msg
    assert "  s4.b3.f.c_bn.weight: expected [2048], got [1024]" in msg
    assert "  stem.conv.weight: expected [64, 3, 7, 7], got [64, 3, 3, 3]" in msg
    assert "  s1.b2.f.a_bn.running_var: 2 NaN/inf values" in msg


def test_without_whitening(tmp_path, cvnet_state_dict):
    sd = {k: v for k, v in cvnet_state_dict(50).items() if not k.startswith("head.fc.")}
    path = tmp_path / "nowhite.pth"
    torch.save({"model_state": keyed(sd, "globalmodel.")}, path)
    model, report = load_checkpoint(path)
    assert not report.whitening and not model.whitening and model.head.fc is None and model.dim == 2048
    assert "whitening: absent" in report.summary()
    with torch.no_grad():
        d = model.head(torch.rand(1, 2048, 3, 4))
    assert d.shape == (1, 2048) and (d >= 0).all()  # unwhitened: the normalized GeM of a >= 0 map
    torch.testing.assert_close(d.norm(dim=1), torch.ones(1))


def test_pickle_needing_more_than_tensors(tmp_path, r50_checkpoint):
    ckpt = torch.load(r50_checkpoint, weights_only=True)
    ckpt["args"] = argparse.Namespace(arch="ResNet50", lr=0.005)  # training scripts save their args like this
    path = tmp_path / "with_args.pth"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"with_args\.pth: .*argparse\.Namespace.*trust_pickle=True"):
        load_checkpoint(path)
    model, report = load_checkpoint(path, trust_pickle=True)
    assert report.depth == 50 and report.whitening
    assert torch.equal(model.state_dict()["head.fc.weight"], ckpt["model_state"]["encoder_q.head.fc.weight"])


def test_legacy_torch_format_refused_then_trusted(tmp_path):
    """torch's pre-1.6 (non-zip) format with a Python object: refused safely, loadable when trusted."""
    path = tmp_path / "legacy.pth"
    sd = {"s3.b1.f.a.weight": torch.zeros(1)}
    torch.save({"model_state": sd, "args": argparse.Namespace(a=1)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pth: .*argparse\.Namespace.*trust_pickle=True"):
        load_checkpoint(path)
    # trusted, it unpickles and fails further on, on its contents
    with pytest.raises(CheckpointError, match=r"legacy\.pth: stage s3 has 1 blocks"):
        load_checkpoint(path, trust_pickle=True)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_is_not_a_checkpoint(tmp_path):
    """A pickle that torch.save did not write is no checkpoint: not blamed on the safe loader."""
    path = tmp_path / "plain.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model_state": {"x": argparse.Namespace(a=1)}}, f, protocol=4)
    for trust in (False, True):
        with pytest.raises(CheckpointError, match=rf"^{path}: not a readable PyTorch checkpoint") as info:
            load_checkpoint(path, trust_pickle=trust)
        assert "trust_pickle" not in str(info.value)


def _jpeg(path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path, format="JPEG")
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["jpeg", "text", "empty", "missing", "directory", "tensor", "list", "no_tensors"])
def test_not_a_checkpoint(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "jpeg":
        _jpeg(path)
    elif kind == "text":
        path.write_text("model_state: not really\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "list":
        torch.save([torch.zeros(3)], path)
    elif kind == "no_tensors":
        torch.save({"epoch": 3, "model_state": {}}, path)
    for trust in (False, True):
        with pytest.raises(CheckpointError, match=rf"^{path}: ") as info:
            load_checkpoint(path, trust_pickle=trust)
        assert "trust_pickle" not in str(info.value), "a non-pickle must not be blamed on the safe loader"


class SmallTrunk(nn.Module):
    """stride 4, 16 channels, last layer without ReLU so its map goes negative."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_torchscript_trunk(tmp_path):
    torch.manual_seed(0)
    trunk = SmallTrunk().eval()
    path = tmp_path / "trunk.pt"
    torch.jit.script(trunk).save(str(path))
    from_file = from_trunk(path, name="small")
    in_memory = from_trunk(trunk, name="small")
    assert (from_file.channels, from_file.stride, from_file.dim, from_file.name) == (16, 4, 16, "small")
    x = torch.randn(2, 3, 40, 52)
    with torch.no_grad():
        raw = trunk(x)
        d_file, d_mem = from_file(x), in_memory(x)
    assert raw.min() < 0  # the clamp matters: without it the power means would give NaN
    assert torch.isfinite(d_file).all()
    torch.testing.assert_close(d_file, d_mem, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_file.trunk(x), raw.clamp(min=0), atol=1e-6, rtol=0)


def test_from_trunk_whitening_and_errors(tmp_path, r50_checkpoint):
    w, b = torch.randn(5, 16), torch.randn(5)
    model = from_trunk(SmallTrunk(), whitening=(w, b))
    assert model.dim == 5 and model.whitening
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)
    with pytest.raises(CheckpointError, match=r"W \[D, 16\]"):
        from_trunk(SmallTrunk(), whitening=(torch.randn(5, 8), torch.randn(5)))
    with pytest.raises(CheckpointError, match=r"probe gave \[1, 10\]"):
        from_trunk(nn.Sequential(nn.Flatten(), nn.LazyLinear(10)))
    # a state dict is not a TorchScript trunk: the error says so and names the file
    with pytest.raises(CheckpointError, match=rf"^{r50_checkpoint}: not a TorchScript module.*load_checkpoint"):
        from_trunk(r50_checkpoint)
    with pytest.raises(CheckpointError, match="no such TorchScript file"):
        from_trunk(tmp_path / "absent.pt")
