"""Target networks whose parameters the hypernetwork predicts.

Parameter names follow the Flax ImageNet example (``conv_init``, ``bn_init``, ``ResNetBlock_i`` with
``Conv_0/1``, ``BatchNorm_0/1``, ``conv_proj``, ``norm_proj``, a ``Dense_0`` head), kernels are HWIO,
BatchNorm scale/bias live in ``params`` and mean/var in ``batch_stats``. Convolutions have no bias,
as every one of them is followed by BatchNorm.

Two extras matter to the hypernetwork, and neither changes the parameter tree:
- ``mask`` (``[N]`` bool): rows with ``mask=False`` do not enter the BatchNorm statistics, so a
  padded dataset batch gives the same statistics as the unpadded one;
- ``features_only=True`` returns the pooled penultimate features, which the prototype classifier
  is built from.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any


def _norm_layer(train: bool, momentum: float, mask):
    """Returns ``norm(name=..., scale_init=...)(x)`` closed over the batch mask."""

    def make(name=None, scale_init=nn.initializers.ones):
        bn = nn.BatchNorm(
            use_running_average=not train, momentum=momentum, epsilon=1e-5,
            scale_init=scale_init, name=name)
        if mask is None or not train:
            return bn
        return lambda x: bn(x, mask=jnp.broadcast_to(mask[:, None, None, None], x.shape))

    return make


class ResNetBlock(nn.Module):
    """Basic two-conv residual block (ResNet-18 style)."""

    filters: int
    conv: ModuleDef
    norm: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        # Zero-init the last BN scale (as in the Flax example): each block starts as identity.
        y = self.norm(scale_init=nn.initializers.zeros)(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """ResNet with a CIFAR stem (3x3 stride-1 conv, no max-pool) for 32x32 inputs.

    Attributes:
      stage_sizes: blocks per stage; each stage after the first halves the resolution.
      num_filters: width of the first stage; stage ``i`` has ``num_filters * 2**i``.
      num_classes: outputs of the Dense head.
      bn_momentum: running-average momentum; the hypernetwork uses 0.0 so one forward pass
        over the dataset batch writes its exact statistics into ``batch_stats``.
    """

    stage_sizes: Sequence[int]
    num_filters: int
    num_classes: int
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = True, mask=None, features_only: bool = False):
        conv = functools.partial(nn.Conv, use_bias=False, padding="SAME")
        norm = _norm_layer(train, self.bn_momentum, mask)
        x = conv(self.num_filters, (3, 3), name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, conv=conv, norm=norm, strides=strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        if features_only:
            return x
        return nn.Dense(self.num_classes)(x)


class ConvNet4(nn.Module):
    """The few-shot standard: 4 x (3x3 conv, BatchNorm, ReLU, 2x2 max-pool), pooled, Dense head."""

    num_classes: int
    num_filters: int = 64
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = True, mask=None, features_only: bool = False):
        norm = _norm_layer(train, self.bn_momentum, mask)
        for _ in range(4):
            x = nn.Conv(self.num_filters, (3, 3), use_bias=False, padding="SAME")(x)
            x = nn.relu(norm()(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        if features_only:
            return x
        return nn.Dense(self.num_classes)(x)


PRESETS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": functools.partial(ResNet, stage_sizes=(1, 1, 1), num_filters=16),
    "resnet10": functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), num_filters=64),
    "resnet14": functools.partial(ResNet, stage_sizes=(2, 2, 2), num_filters=16),
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), num_filters=64),
    "convnet4": ConvNet4,
}


def get_target(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds a target network by preset name (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown target architecture {name!r}; expected one of {sorted(PRESETS)}.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    return PRESETS[name](num_classes=num_classes, **kwargs)
