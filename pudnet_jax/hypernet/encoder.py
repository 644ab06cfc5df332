"""Set encoder: a dataset batch -> per-image features, class prototypes and a dataset sketch.

Every operation is either per-image (convs, GroupNorm: no batch statistics) or a masked mean / max
over rows, so the outputs do not depend on the order of the examples, and padded rows
(``mask=False``) have no effect at all. Prototypes are indexed by label, so relabelling the
dataset permutes them the same way; the sketch pools over classes symmetrically and is invariant.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ImageEncoder(nn.Module):
    """Small ConvNet embedding one image (NHWC float) to a ``feature_dim`` vector."""

    widths: Sequence[int] = (32, 64, 128, 128)
    feature_dim: int = 128

    @nn.compact
    def __call__(self, images):
        x = images
        for width in self.widths:
            x = nn.Conv(width, (3, 3), padding="SAME")(x)
            # GroupNorm normalises within one image: no cross-example statistics, so masking and
            # shuffling the batch cannot change any image's features.
            x = nn.relu(nn.GroupNorm(num_groups=min(8, width))(x))
            if x.shape[1] > 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.feature_dim)(x)


def class_prototypes(features, labels, mask, num_classes):
    """Masked per-class means.

    Returns:
      prototypes ``[K, D]`` (zeros for classes without examples) and counts ``[K]``.
    """
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=features.dtype) * mask[:, None]
    counts = one_hot.sum(axis=0)
    sums = one_hot.T @ features
    return sums / jnp.maximum(counts, 1.0)[:, None], counts


class SetEncoder(nn.Module):
    """Encodes a labelled image set into prototypes and a permutation-invariant sketch."""

    widths: Sequence[int] = (32, 64, 128, 128)
    feature_dim: int = 128
    sketch_dim: int = 128

    @nn.compact
    def __call__(self, images, labels, mask, num_classes: int):
        features = ImageEncoder(self.widths, self.feature_dim)(images)
        prototypes, counts = class_prototypes(features, labels, mask, num_classes)
        present = (counts > 0).astype(features.dtype)
        num_present = jnp.maximum(present.sum(), 1.0)
        mean_proto = (prototypes * present[:, None]).sum(0) / num_present
        spread = jnp.sqrt(((prototypes - mean_proto) ** 2 * present[:, None]).sum(0) / num_present + 1e-6)
        max_proto = jnp.max(jnp.where(present[:, None] > 0, prototypes, -1e9), axis=0)
        # Within-class spread: how hard the dataset is, not only where its classes sit.
        one_hot = jax.nn.one_hot(labels, num_classes, dtype=features.dtype) * mask[:, None]
        residual = features - one_hot @ prototypes
        within = jnp.sqrt((residual**2 * mask[:, None]).sum(0) / jnp.maximum(mask.sum(), 1.0) + 1e-6)
        pooled = jnp.concatenate([mean_proto, spread, max_proto, within, jnp.log(num_present)[None]])
        sketch = nn.Dense(self.sketch_dim)(nn.gelu(nn.Dense(2 * self.sketch_dim)(pooled)))
        return features, prototypes, counts, nn.LayerNorm()(sketch)
