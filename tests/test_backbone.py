"""Backbone runners: selection, errors that say why, and torch == onnxruntime on a real photo."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sgengine.backbone import load_backbone
from sgengine.errors import BackendUnavailableError, InputError
from sgengine.export import export_bundle
from sgengine.model.factory import load_checkpoint
from sgengine.photos import sample_photos
from sgengine.preprocess import to_tensor
from sgengine.testing import save_cvnet_checkpoint

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("backends_r50")
    model, _ = load_checkpoint(save_cvnet_checkpoint(d / "cvnet_r50.pth", depth=50, seed=2))
    # Parity is covered by test_export.py; here only the runners matter.
    return export_bundle(model, d / "bundle", check=False, progress=lambda s: None)


def test_auto_on_cpu_is_onnxruntime(bundle):
    bb = load_backbone(bundle)
    d = bb.describe()
    assert bb.name == "onnxruntime" and d["chosen_by"] == "auto"
    assert bb.providers == ["CPUExecutionProvider"] and d["providers"] == ["CPUExecutionProvider"]
    assert d["threads"] == len(os.sched_getaffinity(0)) and bb.precision == "fp32"
    assert load_backbone(bundle, backend="onnxruntime", threads=1).describe()["threads"] == 1


@no_cuda
def test_onnxruntime_cuda_request_fails_loudly(bundle):
    with pytest.raises(BackendUnavailableError, match="CUDA provider did not load"):
        load_backbone(bundle, device="cuda", backend="onnxruntime")


@no_cuda
def test_torch_cuda_request_fails_loudly(bundle):
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        load_backbone(bundle, device="cuda", backend="torch")


@no_cuda
def test_tensorrt_reports_why_not(bundle):
    try:
        import tensorrt  # noqa: F401
        why = "no CUDA GPU"
    except ImportError:
        why = "tensorrt Python package is not installed"
    with pytest.raises(BackendUnavailableError, match=why):
        load_backbone(bundle, device="cuda", backend="tensorrt")
    with pytest.raises(BackendUnavailableError, match="CUDA GPU"):
        load_backbone(bundle, device="cpu", backend="tensorrt")


@no_cuda
def test_auto_on_cuda_without_gpu_lists_every_reason(bundle):
    with pytest.raises(BackendUnavailableError) as e:
        load_backbone(bundle, device="cuda")
    msg = str(e.value)
    assert "tensorrt:" in msg and "onnxruntime:" in msg and "torch:" in msg


def test_unknown_backend_and_device(bundle):
    with pytest.raises(InputError, match="backend must be one of"):
        load_backbone(bundle, backend="openvino")
    with pytest.raises(BackendUnavailableError, match="device must be"):
        load_backbone(bundle, device="mps")


def test_torch_backend_equals_onnxruntime_on_a_real_photo(bundle):
    rgb = sample_photos(color_only=True)["chelsea"]  # 300 x 451: odd width
    x = to_tensor(np.ascontiguousarray(rgb[::2, ::2, ::-1]), bundle.normalization)
    ort = load_backbone(bundle, backend="onnxruntime")
    ref = load_backbone(bundle, backend="torch")
    assert ref.describe()["name"] == "torch"
    a, t = ort(x), ref(x)
    assert a.shape == t.shape == (1, 2048, -(-x.shape[2] // 32), -(-x.shape[3] // 32))
    assert a.dtype == t.dtype == torch.float32
    assert (a - t).abs().max().item() <= 1e-4 * t.abs().max().item() + 1e-6
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        ort(x[:, :2])


def test_auto_skips_onnxruntime_that_does_not_import(bundle, monkeypatch):
    # An environment without onnxruntime (a GPU image whose onnxruntime-gpu install failed):
    # the onnxruntime runner says so, and backend="auto" moves on to torch instead of crashing.
    import sys
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # "import onnxruntime" now raises ImportError
    with pytest.raises(BackendUnavailableError, match="onnxruntime does not import"):
        load_backbone(bundle, backend="onnxruntime")
    bb = load_backbone(bundle)
    assert bb.name == "torch" and any("onnxruntime" in s for s in bb.describe()["skipped"]), bb.describe()
