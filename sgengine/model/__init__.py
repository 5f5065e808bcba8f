"""Reference PyTorch model: pycls ResNet with ReLU+, EfficientNet-Lite0, the SuperGlobal head."""
from .checkpoint import CheckpointReport
from .efficientnet import EFFICIENTNET_LITE0_NORMALIZATION, EfficientNetLite0, efficientnet_lite0
from .factory import (
    CVNET_NORMALIZATION, IMAGENET_RGB_NORMALIZATION, NonNegativeTrunk, build_resnet_model, build_trunk,
    default_model, from_trunk, load_checkpoint,
)
from .head import HeadConfig, SuperGlobalHead, gem_plus, gem_pool_reference, l2n, regional_gem, scale_gem_max
from .resnet import ResNet
from .superglobal import SuperGlobalModel

__all__ = [
    "HeadConfig", "SuperGlobalHead", "SuperGlobalModel", "ResNet", "EfficientNetLite0",
    "gem_plus", "gem_pool_reference", "l2n", "regional_gem", "scale_gem_max",
    "CheckpointReport", "build_trunk", "build_resnet_model", "load_checkpoint", "default_model", "from_trunk",
    "efficientnet_lite0", "NonNegativeTrunk",
    "CVNET_NORMALIZATION", "IMAGENET_RGB_NORMALIZATION", "EFFICIENTNET_LITE0_NORMALIZATION",
]
