"""The closed-form PCA backbone (pudnet_jax/pca_backbone.py), a no-meta-training reference."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pudnet_jax.evaluate import init_target
from pudnet_jax.hypernet.stem import principal_patch_directions
from pudnet_jax.models import get_target
from pudnet_jax.hypernet import target_specs
from pudnet_jax.pca_backbone import pca_backbone


def _conv_input(target, variables, images, mask, path):
    """The input of the conv at ``path`` on the batch (train-mode BatchNorm: batch statistics),
    captured independently of the construction under test."""
    captured = {}

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and tuple(context.module.path) == path:
            captured["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        target.apply(variables, images, train=True, mask=mask, features_only=True,
                     mutable=["batch_stats"])
    return captured["x"]


def _images(n, seed=0, size=16):
    rng = np.random.default_rng(seed)
    smooth = rng.normal(size=(n, size, size, 1)).cumsum(axis=1).cumsum(axis=2) / size
    return (smooth * np.array([1.0, 0.7, 0.4]) + 0.3 * rng.normal(size=(n, size, size, 3))).astype(np.float32)


@pytest.mark.parametrize("target_name", ["resnet8", "convnet4"])
def test_every_conv_is_its_own_inputs_principal_directions(target_name):
    images = _images(12, size=16)
    mask = np.ones(12, bool)
    backbone = init_target(target_name, 3, (16, 16, 3), seed=0)
    before = jax.tree.map(np.array, backbone)
    out = pca_backbone(target_name, backbone, images, mask)
    chex.assert_trees_all_equal(backbone, before)  # pure
    chex.assert_trees_all_equal_shapes(out, backbone)
    chex.assert_trees_all_equal(out["batch_stats"], backbone["batch_stats"])

    target = get_target(target_name, 3, bn_momentum=0.0)
    convs = [s for s in target_specs(target_name, 3, (16, 16, 3)) if s.kind == "conv"]
    assert len(convs) == (9 if target_name == "resnet8" else 4)  # resnet8: stem, 3 x 2 convs, 2 projections
    for spec in convs:
        path, k = spec.path[:-1], spec.kernel_size
        # Later layers never change an earlier layer's input, so the final network's activations
        # are the ones each layer was computed from.
        x = _conv_input(target, out, jnp.asarray(images), jnp.asarray(mask), path)
        kernel = out["params"]
        for key in path + ("kernel",):
            kernel = kernel[key]
        c_in, c_out = kernel.shape[2:]
        m = min(c_out // 2, k * k * c_in)
        d = principal_patch_directions(x, jnp.asarray(mask), k, m)
        want = jnp.concatenate([d, -d], 1).reshape(c_in, k, k, 2 * m).transpose(1, 2, 0, 3)
        np.testing.assert_allclose(kernel[..., :2 * m], want, atol=2e-3, err_msg=str(path))
    norms = [v for p, v in jax.tree_util.tree_leaves_with_path(out["params"]) if p[-1].key == "scale"]
    assert norms and all(np.all(np.asarray(v) == 1.0) for v in norms)


def test_masked_rows_do_not_change_the_backbone():
    images = _images(10)
    backbone = init_target("resnet8", 3, (16, 16, 3), seed=1)
    reference = pca_backbone("resnet8", backbone, images, np.ones(10, bool))
    padded = np.concatenate([images, 30.0 * _images(4, seed=5)])
    got = pca_backbone("resnet8", backbone, padded, np.r_[np.ones(10, bool), np.zeros(4, bool)])
    # The stem's directions (well-separated eigenvalues) agree to float precision; deeper layers'
    # eigenvectors of nearby eigenvalues move with the summation order (14 rows vs 10), so the
    # whole tree is compared loosely: 30x garbage rows that leaked in would change it entirely.
    np.testing.assert_allclose(got["params"]["conv_init"]["kernel"],
                               reference["params"]["conv_init"]["kernel"], atol=1e-4)
    chex.assert_trees_all_close(got, reference, atol=3e-2)
