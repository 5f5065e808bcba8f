"""Shared fixtures: real photos and synthetic CVNet weights, each built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def photos():
    """Names -> RGB uint8 HWC arrays of the photos shipped by scikit-image / scikit-learn."""
    from sgengine.photos import sample_photos
    return sample_photos()


@pytest.fixture(scope="session")
def cvnet_state_dict():
    """depth -> unprefixed random CVNet state dict (whitening, extras), cached: R101 takes seconds to make.

    Treat the result as read-only: it is shared by every test.
    """
    from sgengine.testing import make_cvnet_state_dict
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def get(depth: int = 50) -> dict[str, torch.Tensor]:
        if depth not in cache:
            cache[depth] = make_cvnet_state_dict(depth, seed=depth, prefix="", whitening=True, extras=True)
        return cache[depth]

    return get


@pytest.fixture(scope="session")
def r50_checkpoint(tmp_path_factory, cvnet_state_dict) -> Path:
    """A CVNet-format ResNet-50 checkpoint on disk: {"model_state": encoder_q.-prefixed state dict}."""
    sd = cvnet_state_dict(50)
    keyed = {(k if k.startswith(("conv2ds.", "cv_learner.")) else "encoder_q." + k): v for k, v in sd.items()}
    path = tmp_path_factory.mktemp("ckpt") / "cvnet_r50.pth"
    torch.save({"model_state": keyed, "epoch": 7}, path)
    return path


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory) -> Path:
    """The built-in default model (EfficientNet-Lite0, real ImageNet weights) exported once per session.

    Parity is checked on shrunk photos to keep the session short; tests/test_export.py checks it at
    full size.
    """
    from sgengine.export import export_bundle
    from sgengine.model import default_model
    out = tmp_path_factory.mktemp("bundles") / "default"
    export_bundle(default_model(), out, parity_max_side=160, progress=lambda *_: None)
    return out
