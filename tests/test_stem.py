"""The data-derived first layer (hyper.stem_pca_components, pudnet_jax/hypernet/stem.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pudnet_jax.hypernet import stem
from pudnet_jax.models import get_target
from pudnet_jax.predict import make_predict_fn


def _images(n, seed=0, size=12, channels=3):
    rng = np.random.default_rng(seed)
    # Correlated channels and smooth structure, so the principal directions are well separated.
    base = rng.normal(size=(n, size, size, 1)).cumsum(axis=1).cumsum(axis=2) / size
    colour = rng.normal(size=(n, size, size, channels)) * 0.3
    return (base * np.array([1.0, 0.8, 0.5][:channels]) + colour).astype(np.float32)


def _numpy_directions(images, k, m):
    """Reference: explicit loops over every k x k patch, float64 covariance, numpy eigh."""
    n, h, w, c = images.shape
    rows = [images[i, y:y + k, x:x + k, :].transpose(2, 0, 1).reshape(-1)  # (C, kh, kw) order
            for i in range(n) for y in range(h - k + 1) for x in range(w - k + 1)]
    p = np.asarray(rows, np.float64)
    cov = np.cov(p, rowvar=False, bias=True)
    values, vectors = np.linalg.eigh(cov)
    return values[::-1][:m], vectors[:, ::-1][:, :m]


def test_directions_are_the_patch_covariances_top_eigenvectors_with_a_fixed_sign():
    images = _images(6)
    values, want = _numpy_directions(images, 3, 5)
    assert np.all(np.diff(values) < 0) and values[-1] > 1.01 * _numpy_directions(images, 3, 6)[0][-1]
    got = np.asarray(stem.principal_patch_directions(jnp.asarray(images), jnp.ones(6, bool), 3, 5))
    # Same directions up to sign, and the sign rule: the largest-magnitude entry is positive.
    np.testing.assert_allclose(np.abs(np.sum(got * want, axis=0)), 1.0, atol=1e-4)
    pivots = got[np.argmax(np.abs(got), axis=0), np.arange(5)]
    assert np.all(pivots > 0)
    # The sign rule makes the result independent of the sign eigh happens to return.
    np.testing.assert_allclose(got, want * np.sign(want[np.argmax(np.abs(want), 0), np.arange(5)]), atol=1e-4)


def test_masked_rows_and_the_chunked_accumulation_change_nothing(monkeypatch):
    images = _images(7)
    reference = stem.patch_moments(jnp.asarray(images), jnp.ones(7, bool), 3)
    garbage = np.concatenate([images, 50.0 * _images(5, seed=4)])
    mask = np.r_[np.ones(7, bool), np.zeros(5, bool)]
    monkeypatch.setattr(stem, "_MOMENT_CHUNK", 3)  # 12 rows -> 4 chunks, padding in none
    chex.assert_trees_all_close(stem.patch_moments(jnp.asarray(garbage), jnp.asarray(mask), 3),
                                reference, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(stem, "_MOMENT_CHUNK", 5)  # 12 rows -> 3 chunks, the last one padded
    chex.assert_trees_all_close(stem.patch_moments(jnp.asarray(garbage), jnp.asarray(mask), 3),
                                reference, rtol=1e-5, atol=1e-4)
    count = reference[0]
    assert count == 7 * 10 * 10


def test_stem_kernel_convolves_each_patch_with_a_direction_and_keeps_the_rest():
    """The HWIO kernel applies direction j to every patch (channel j) and its negative (channel
    m + j); the channels after 2 m are the predicted kernel's, untouched."""
    images = jnp.asarray(_images(4))
    predicted = jax.random.normal(jax.random.key(0), (3, 3, 3, 16))
    kernel = stem.pca_stem_kernel(images, jnp.ones(4, bool), predicted, 5)
    directions = stem.principal_patch_directions(images, jnp.ones(4, bool), 3, 5)
    out = jax.lax.conv_general_dilated(images, kernel, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=jax.lax.Precision.HIGHEST)
    patches = stem._patches(images, 3).reshape(4, 10, 10, 27)
    projections = jnp.einsum("nhwd,dm->nhwm", patches, directions, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(out[..., :5], projections, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[..., 5:10], -projections, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(kernel[..., 10:], predicted[..., 10:])


@pytest.mark.parametrize("m", [0, 14, 28])
def test_component_counts_the_layer_cannot_hold_are_refused(m):
    # 3x3x3 patches have 27 dimensions; 16 output channels hold at most 8 +- pairs.
    with pytest.raises(ValueError, match="stem_pca_components"):
        stem.pca_stem_kernel(jnp.asarray(_images(2)), jnp.ones(2, bool), jnp.zeros((3, 3, 3, 16)), m)


def test_predict_with_the_pca_stem(tiny_config, predict_against_plain, check_padding_and_relabelling):
    """Same tree and parameters as without it; the first conv's first 2 m filters are the
    batch's +- principal directions (the rest the head's); padding and relabelling behave as
    everywhere in predict; gradients reach the hypernetwork."""
    config = tiny_config.copy_and_resolve_references()
    config.hyper.stem_pca_components = 4
    params, batch, got, head_only, predict = predict_against_plain(config)
    images, labels = batch["image"], batch["label"]
    kernel = got["params"]["conv_init"]["kernel"]
    directions = stem.principal_patch_directions(jnp.asarray(images), jnp.ones(20, bool), 3, 4)
    want = jnp.concatenate([directions, -directions], 1).reshape(3, 3, 3, 8).transpose(1, 2, 0, 3)
    np.testing.assert_allclose(kernel[..., :8], want, atol=1e-4)  # eigh in and out of jit
    np.testing.assert_array_equal(kernel[..., 8:], head_only["params"]["conv_init"]["kernel"][..., 8:])

    check_padding_and_relabelling(predict, params, batch, got, 1e-4)
    target = get_target("resnet8", 5)

    def loss(p):
        variables = make_predict_fn(config)(p, batch)
        logits = target.apply(variables, images, train=False)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(20), labels])

    grads = jax.jit(jax.grad(loss))(params)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0



@pytest.mark.parametrize("target,stem_path", [("resnet8", ("conv_init", "kernel")), ("convnet4", ("Conv_0", "kernel"))])
def test_a_backbone_read_out_like_predict_gets_the_same_stem(target, stem_path):
    """baselines.with_pca_stem finds the target's first conv, replaces its first 2 m filters as
    predict does and leaves the given variables untouched; random_backbone_accuracy applies it
    when the config asks predict for the stem."""
    from pudnet_jax import baselines
    from pudnet_jax.evaluate import init_target

    images = _images(6, size=32)
    batch = {"image": images, "label": (np.arange(6) % 3).astype(np.int32), "mask": np.ones(6, bool)}
    backbone = init_target(target, 3, (32, 32, 3), seed=0)
    before = jax.tree.map(np.array, backbone)
    out = baselines.with_pca_stem(target, backbone, batch, 3)
    chex.assert_trees_all_equal(backbone, before)
    original = backbone["params"][stem_path[0]][stem_path[1]]
    want = stem.pca_stem_kernel(jnp.asarray(images), jnp.ones(6, bool), original, 3)
    np.testing.assert_array_equal(out["params"][stem_path[0]][stem_path[1]], want)
    chex.assert_trees_all_equal_shapes(out, backbone)


def test_random_backbone_baseline_uses_the_stem_when_predict_does(tiny_config, monkeypatch):
    from pudnet_jax import baselines

    calls = []
    monkeypatch.setattr(baselines, "with_pca_stem", lambda *a: calls.append(a[-1]) or a[1])

    class Task:
        num_classes = 3
        test_images = _images(9, size=32)
        test_labels = (np.arange(9) % 3).astype(np.int32)

        def dataset_batch(self):
            return {"image": _images(9, seed=1, size=32), "label": self.test_labels, "mask": np.ones(9, bool)}

    tiny_config.hyper.classifier = "ridge"
    baselines.random_backbone_accuracy(tiny_config, Task(), seed=0)
    assert calls == []
    tiny_config.hyper.stem_pca_components = 4
    baselines.random_backbone_accuracy(tiny_config, Task(), seed=0)
    assert calls == [4]
