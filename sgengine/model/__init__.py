"""Reference PyTorch model: pycls ResNet with ReLU+, EfficientNet-Lite0, the SuperGlobal head."""
from .head import HeadConfig, SuperGlobalHead, gem_plus, gem_pool_reference, l2n, regional_gem, scale_gem_max
from .resnet import ResNet
from .superglobal import SuperGlobalModel

__all__ = [
    "HeadConfig", "SuperGlobalHead", "SuperGlobalModel", "ResNet",
    "gem_plus", "gem_pool_reference", "l2n", "regional_gem", "scale_gem_max",
]
