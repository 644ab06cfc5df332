"""PudNet: dataset batch -> complete Flax variables of the target network, in one forward pass.

    images, labels, mask
      -> SetEncoder            features, class prototypes, dataset sketch s
      -> LayerRecurrence       one GRU cell scanned over the target's tensors, conditioned on s
      -> ParameterHead         conv kernels + BatchNorm scale/bias in the target's exact tree
                               (optionally the first conv from the batch's patch PCA: stem.py)
      -> BatchNorm pass        one masked forward pass of the target over the same batch fills
                               batch_stats and yields the target's own penultimate features
                               (optionally building every conv on its input's patch statistics
                               on the way: data_layers.py)
      -> classifier            the Dense layer, solved from those features and the labels:
                               'prototype' (ProtoNet as a linear layer: columns = class means) or
                               'ridge' (closed-form ridge regression onto one-hot labels); any class
                               count works and relabelling permutes columns
      -> {'params', 'batch_stats'}
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pudnet_jax.hypernet.cell import IndependentLayers, LayerRecurrence
from pudnet_jax.hypernet.data_layers import MODES as DATA_LAYER_MODES
from pudnet_jax.hypernet.data_layers import RESIDUAL_SCALE as DATA_LAYERS_RESIDUAL_SCALE
from pudnet_jax.hypernet.data_layers import (check_discriminant_eps, check_patch_stride,
                                             forward_with_data_layers, kernel_builder)
from pudnet_jax.hypernet.discriminant import DISCRIMINANT_EPS as DATA_LAYERS_DISCRIMINANT_EPS
from pudnet_jax.hypernet.encoder import SetEncoder, class_prototypes
from pudnet_jax.hypernet.ridge import DEFAULT_RIDGE_LAMBDA, ridge_classifier
from pudnet_jax.hypernet.stem import pca_stem_kernel
from pudnet_jax.hypernet.head import ParameterHead, get_path, set_path
from pudnet_jax.hypernet.layers import descriptor_features, describe_target
from pudnet_jax.models import get_target

# Logit bias for classes with no example in the batch (variable-way meta-training pads classes).
ABSENT_CLASS_BIAS = -1e9
CLASSIFIERS = ("prototype", "ridge", "generated")
# Ridge logits regress one-hot labels (about 0..1); this fixed factor times the learned
# temperature (initially 1) gives the cross-entropy a useful scale from step 0.
RIDGE_LOGIT_SCALE = 10.0


@functools.lru_cache(maxsize=32)
def target_specs(target_name: str, num_classes: int, image_shape: tuple[int, ...]):
    """Cached ``describe_target`` (static: runs once per architecture, at trace time)."""
    return describe_target(get_target(target_name, num_classes), image_shape)


@functools.lru_cache(maxsize=32)
def abstract_target_variables(target_name: str, num_classes: int, image_shape: tuple[int, ...]):
    """``jax.eval_shape(target.init)``: the exact tree every prediction must have."""
    target = get_target(target_name, num_classes)
    return jax.eval_shape(functools.partial(target.init, train=False), jax.random.key(0),
                          jnp.zeros((1, *image_shape), jnp.float32))


class PudNet(nn.Module):
    """The hypernetwork. ``apply(variables, images, labels, mask)`` returns target variables.

    Attributes:
      target_name: preset in ``pudnet_jax.models.PRESETS``.
      num_classes: classes of the target's head (the largest label + 1 the predictor accepts).
      image_shape: ``(H, W, C)`` of the target's input.
      encoder_widths, feature_dim, sketch_dim: set-encoder sizes.
      encoder_downsample: the set encoder reads images average-pooled by this factor (the
        BatchNorm pass and the classifier still see them at full resolution).
      hidden_dim: width of the recurrent cell.
      code_rank, max_channels: parameter-head sizes (see ``ParameterHead``).
      recurrent: ablation switch; False embeds each layer independently.
      sketch_conditioning: ablation switch; False removes the sketch from the cell.
      classifier: how the Dense layer is obtained from the target's own penultimate features
        on the dataset batch: 'prototype' (class means, ProtoNet), 'ridge' (closed-form ridge
        regression, ``pudnet_jax.hypernet.ridge``; uses every example, not only class means), or
        'generated' (ablation: columns generated from the encoder's prototypes by a learned
        map, without the target's features).
      ridge_lambda: L2 strength of the ridge classifier, relative to the features' variance.
      stem_pca_components: ``m > 0`` replaces the first ``2 m`` filters of the target's first
        conv with the top ``m`` principal directions of the batch's patches and their negatives
        (``pudnet_jax.hypernet.stem``); 0 keeps the head's filters. No parameters either way.
      data_layers: ``'none'``, or how every conv kernel is built on its own input's patch
        statistics during the BatchNorm pass (``pudnet_jax.hypernet.data_layers``):
        ``'pca_residual'`` (principal directions plus the head's kernel as a correction),
        ``'discriminant_residual'`` (the same with the directions that separate the batch's
        classes) or ``'whitened'`` (the head's kernel applied to whitened patches). No parameters.
      data_layers_patch_stride: the data layers' patch statistics read every s-th patch
        position per axis (1: all of them).
      data_layers_residual_scale: weight of the head's kernel on top of the data-derived
        directions under the ``*_residual`` modes.
      data_layers_normalized_residual: the head's filters enter the ``*_residual`` modes at unit
        norm, so the scale bounds the correction relative to the data-derived filters.
      data_layers_discriminant_eps: ``'discriminant_residual'``'s whitening regulariser
        (``data_layers.data_derived_kernel``). No parameters.
      batchnorm_residual_scale: weight of the head's predicted BatchNorm offsets around (1, 0)
        (1: as meta-trained; 0: every BatchNorm at (1, 0)). No parameters.
    """

    target_name: str
    num_classes: int
    image_shape: tuple[int, ...] = (32, 32, 3)
    encoder_widths: Sequence[int] = (32, 64, 128, 128)
    feature_dim: int = 128
    sketch_dim: int = 128
    encoder_downsample: int = 1
    hidden_dim: int = 256
    code_rank: int = 32
    max_channels: int = 512
    recurrent: bool = True
    sketch_conditioning: bool = True
    classifier: str = "prototype"
    ridge_lambda: float = DEFAULT_RIDGE_LAMBDA
    stem_pca_components: int = 0
    data_layers: str = "none"
    data_layers_patch_stride: int = 1
    data_layers_residual_scale: float = DATA_LAYERS_RESIDUAL_SCALE
    data_layers_normalized_residual: bool = False
    data_layers_discriminant_eps: float = DATA_LAYERS_DISCRIMINANT_EPS
    batchnorm_residual_scale: float = 1.0

    @nn.compact
    def __call__(self, images, labels, mask):
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"hyper.classifier must be one of {CLASSIFIERS}; got {self.classifier!r}.")
        if self.data_layers not in DATA_LAYER_MODES:
            raise ValueError(f"hyper.data_layers must be one of {DATA_LAYER_MODES}; got {self.data_layers!r}.")
        check_patch_stride(self.data_layers_patch_stride)
        check_discriminant_eps(self.data_layers_discriminant_eps)
        image_shape = tuple(self.image_shape)
        specs = target_specs(self.target_name, self.num_classes, image_shape)
        _, prototypes, _, sketch = SetEncoder(
            self.encoder_widths, self.feature_dim, self.sketch_dim, self.encoder_downsample,
            name="encoder")(images, labels, mask, self.num_classes)

        layer_model = LayerRecurrence if self.recurrent else IndependentLayers
        embeddings = layer_model(self.hidden_dim, self.sketch_conditioning, name="layers")(
            jnp.asarray(descriptor_features(specs)), sketch)
        body_specs = tuple(s for s in specs if not s.kind.startswith("dense"))
        body_rows = jnp.array([i for i, s in enumerate(specs) if not s.kind.startswith("dense")])
        params = ParameterHead(body_specs, self.code_rank, self.max_channels,
                               self.batchnorm_residual_scale, name="head")(embeddings[body_rows])
        if self.stem_pca_components:
            stem = next(s for s in specs if s.kind == "conv")  # first conv in forward order
            set_path(params, stem.path, pca_stem_kernel(
                images, mask, get_path(params, stem.path), self.stem_pca_components))

        params, target_features, batch_stats = self.batch_norm_pass(params, images, labels, mask)

        dense_row = next(i for i, s in enumerate(specs) if s.kind == "dense_kernel")
        kernel, bias = self._classifier(target_features, prototypes, sketch, labels, mask,
                                        embeddings[dense_row])
        dense_path = specs[dense_row].path[:-1]
        set_path(params, dense_path + ("kernel",), kernel)
        set_path(params, dense_path + ("bias",), bias)
        return {"params": params, "batch_stats": batch_stats}

    def batch_norm_pass(self, params, images, labels, mask):
        """One masked forward pass of the target in train mode with momentum 0: writes the
        batch's exact statistics into ``batch_stats`` and yields the target's penultimate
        features; with ``data_layers`` it also builds every conv kernel on the way.

        Returns ``(params, features, batch_stats)`` (``params`` with the built kernels). A method
        of its own so that ``hypernet.chunked`` can replace it by a chunk-by-chunk pass."""
        image_shape = tuple(self.image_shape)
        abstract = abstract_target_variables(self.target_name, self.num_classes, image_shape)
        init_stats = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract["batch_stats"])
        stats_target = get_target(self.target_name, self.num_classes, bn_momentum=0.0, parent=None)
        variables = {"params": params, "batch_stats": init_stats}
        if self.data_layers == "none":
            features, updates = stats_target.apply(variables, images, train=True, mask=mask,
                                                   features_only=True, mutable=["batch_stats"])
            return params, features, updates["batch_stats"]
        build_kernel = kernel_builder(labels=labels, num_classes=self.num_classes,
                                      **self.data_layer_settings())
        return forward_with_data_layers(build_kernel, stats_target, variables, images, mask)

    def data_layer_settings(self) -> dict:
        """This hypernetwork's ``hyper.data_layers*`` fields as ``data_layers.kernel_builder``'s
        keyword arguments (the batch's labels and class count aside)."""
        return {"mode": self.data_layers, "patch_stride": self.data_layers_patch_stride,
                "residual_scale": self.data_layers_residual_scale,
                "normalized_residual": self.data_layers_normalized_residual,
                "discriminant_eps": self.data_layers_discriminant_eps}

    def _classifier(self, target_features, encoder_prototypes, sketch, labels, mask, dense_embedding):
        """Dense kernel ``[D, K]`` and bias ``[K]``, one column per class, equivariant to relabelling."""
        feature_means, counts = class_prototypes(target_features, labels, mask, self.num_classes)
        dim = target_features.shape[-1]
        if self.classifier == "prototype":
            # -tau * ||f - mu_c||^2 = tau * (2 f.mu_c - ||mu_c||^2) - tau ||f||^2: the last term is
            # the same for every class, so a Dense layer computes the ProtoNet decision exactly.
            tau = jnp.exp(self.param("log_temperature", nn.initializers.zeros, ())) * (16.0 / dim)
            kernel = 2.0 * tau * feature_means.T
            bias = -tau * jnp.sum(feature_means**2, axis=-1)
        elif self.classifier == "ridge":
            # Same parameter as the prototype classifier's (a scalar), so a prototype-trained
            # hypernetwork warm-starts a ridge one (train.init_from) without any tree surgery.
            tau = jnp.exp(self.param("log_temperature", nn.initializers.zeros, ())) * RIDGE_LOGIT_SCALE
            kernel, bias = ridge_classifier(target_features, labels, mask, self.num_classes,
                                            self.ridge_lambda)
            kernel, bias = tau * kernel, tau * bias
        else:
            # Ablation: columns generated from the encoder's prototypes (and the Dense layer's
            # embedding from the recurrent cell) through learned maps; no target features used.
            rows = jnp.concatenate([
                encoder_prototypes,
                jnp.broadcast_to(sketch, (self.num_classes, sketch.shape[-1])),
                jnp.broadcast_to(dense_embedding, (self.num_classes, dense_embedding.shape[-1])),
            ], axis=-1)
            hidden = nn.gelu(nn.Dense(256, name="classifier_hidden")(rows))
            kernel = nn.Dense(dim, name="classifier_kernel")(hidden).T / jnp.sqrt(dim)
            bias = nn.Dense(1, name="classifier_bias")(hidden)[:, 0]
        bias = jnp.where(counts > 0, bias, ABSENT_CLASS_BIAS)
        return kernel, bias
