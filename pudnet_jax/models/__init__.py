"""Target networks (Flax linen) whose variables the hypernetwork predicts."""

from pudnet_jax.models.resnet import PRESETS, ConvNet4, ResNet, ResNetBlock, get_target

__all__ = ["PRESETS", "ConvNet4", "ResNet", "ResNetBlock", "get_target"]
