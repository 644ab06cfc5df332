"""Parameter-unflattening head: layer embeddings -> the target's conv and BatchNorm tensors.

Why this factorisation. A head with one linear map per layer would grow with the target (ResNet-18
has 11M parameters). Instead every tensor is built from three small pieces:

- learned *channel codes* ``U_in[c_in_max, r]`` and ``U_out[c_out_max, r]``, shared by all layers
  and sliced to each layer's width (the GHN idea of sharing along channels, without tiling copies of
  the same filter);
- a *core* generated from the layer's embedding by a decoder shared by all layers of that kind
  (one decoder per conv kernel size, one each for BatchNorm scale and bias);
- ``W[a, b, i, j] = sum_pq U_in[i, p] core[a, b, p, q] U_out[j, q]``, so the head's size depends on
  ``r`` and the widest layer only, never on depth.

Conv kernels are then fan-in normalised (He scale times a learned per-layer gain), which keeps the
activations of a predicted network in range whatever the decoder outputs.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from pudnet_jax.hypernet.layers import TensorSpec


def get_path(tree: dict, path: Sequence[str]):
    """``tree[path[0]][path[1]]...``."""
    for key in path:
        tree = tree[key]
    return tree


def replaced_path(tree: dict, path: Sequence[str], value) -> dict:
    """A copy of the nested dict ``tree`` with ``tree[path]`` set to ``value`` (``tree`` unchanged)."""
    if not path:
        return value
    return {**tree, path[0]: replaced_path(tree[path[0]], path[1:], value)}


def set_path(tree: dict, path: Sequence[str], value) -> None:
    """Sets ``tree[path[0]][path[1]]... = value``, creating the nested dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


class ParameterHead(nn.Module):
    """Generates every conv kernel and BatchNorm scale/bias listed in ``specs``.

    Attributes:
      specs: all tensors of the target in forward order (Dense entries are skipped here; the
        classifier is built from class prototypes elsewhere).
      code_rank: ``r``, the width of the channel codes.
      max_channels: rows of the channel-code tables (the widest layer the head can generate).
      batchnorm_residual_scale: weight of the generated BatchNorm offsets around (1, 0); an
        inference dial (1: as trained, 0: the standard (1, 0)), the parameters do not depend on it.
    """

    specs: tuple[TensorSpec, ...]
    code_rank: int = 32
    max_channels: int = 512
    batchnorm_residual_scale: float = 1.0

    @nn.compact
    def __call__(self, embeddings):
        """``embeddings[L, H]`` (one row per spec) -> nested params dict without the Dense head."""
        widest = max(max(s.c_in, s.c_out) for s in self.specs if s.kind.startswith(("conv", "bn")))
        if widest > self.max_channels:
            raise ValueError(f"Target has a layer with {widest} channels but the head was built for "
                             f"max_channels={self.max_channels}; raise hyper.max_channels.")
        if not (math.isfinite(self.batchnorm_residual_scale) and self.batchnorm_residual_scale >= 0):
            raise ValueError("hyper.batchnorm_residual_scale weighs the predicted BatchNorm offsets "
                             f"and must be finite and >= 0; got {self.batchnorm_residual_scale!r}.")
        r = self.code_rank
        codes = nn.initializers.normal(stddev=1.0)
        in_codes = self.param("in_codes", codes, (self.max_channels, r))
        out_codes = self.param("out_codes", codes, (self.max_channels, r))
        params: dict = {}

        # Convs: one decoder per kernel size, applied to all layers of that size at once.
        conv_sizes = sorted({s.kernel_size for s in self.specs if s.kind == "conv"})
        gain = nn.Dense(1, kernel_init=nn.initializers.zeros, name="conv_gain")
        for k in conv_sizes:
            rows = [i for i, s in enumerate(self.specs) if s.kind == "conv" and s.kernel_size == k]
            decoder = nn.Dense(k * k * r * r, name=f"conv{k}x{k}_core",
                               kernel_init=nn.initializers.normal(stddev=1.0 / math.sqrt(embeddings.shape[-1])))
            cores = decoder(embeddings[jnp.array(rows)]).reshape(len(rows), k, k, r, r)
            gains = jnp.exp(gain(embeddings[jnp.array(rows)])[:, 0])
            for n, i in enumerate(rows):
                s = self.specs[i]
                kernel = jnp.einsum("ip,abpq,jq->abij", in_codes[: s.c_in], cores[n], out_codes[: s.c_out])
                rms = jnp.sqrt(jnp.mean(kernel**2) + 1e-8)
                he_std = math.sqrt(2.0 / (k * k * s.c_in))
                set_path(params, s.path, kernel * (gains[n] * he_std / rms))

        # BatchNorm: scale = 1 + U_out a(h), bias = U_out b(h); zero-initialised decoders start at
        # the standard (1, 0) and learn dataset-dependent offsets (weighed by the dial, which shrinks
        # them towards (1, 0) without touching the parameters).
        for kind, offset in (("bn_scale", 1.0), ("bn_bias", 0.0)):
            rows = [i for i, s in enumerate(self.specs) if s.kind == kind]
            if not rows:
                continue
            decoder = nn.Dense(r, kernel_init=nn.initializers.zeros, name=f"{kind}_decoder")
            coeffs = decoder(embeddings[jnp.array(rows)]) / math.sqrt(r)
            for n, i in enumerate(rows):
                s = self.specs[i]
                set_path(params, s.path,
                         offset + self.batchnorm_residual_scale * (out_codes[: s.c_out] @ coeffs[n]))
        return params
