"""Convs built on their own input's patch statistics (hyper.data_layers, hypernet/data_layers.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pudnet_jax.evaluate import init_target
from pudnet_jax.hypernet import data_layers, discriminant, stem
from pudnet_jax.models import get_target
from pudnet_jax.pca_backbone import pca_backbone
from pudnet_jax.predict import init_hyper_params, make_predict_fn


def _images(n, seed=0, size=16, channels=3):
    rng = np.random.default_rng(seed)
    smooth = rng.normal(size=(n, size, size, 1)).cumsum(axis=1).cumsum(axis=2) / size
    colour = np.array([1.0, 0.7, 0.4][:channels])
    return (smooth * colour + 0.3 * rng.normal(size=(n, size, size, channels))).astype(np.float32)


def _unit_norms_zero_kernels(params):
    def leaf(path, x):
        name = path[-1].key
        return jnp.ones_like(x) if name == "scale" else jnp.zeros_like(x)
    return jax.tree_util.tree_map_with_path(leaf, params)


def test_whitening_matrix_whitens_the_patches():
    images = jnp.asarray(_images(8, size=12))
    mask = jnp.ones(8, bool)
    cov = stem.patch_covariance(images, mask, 3)
    whiten = data_layers.whitening_matrix(images, mask, 3, eps=1e-6)
    np.testing.assert_allclose(whiten, whiten.T, atol=1e-4)
    np.testing.assert_allclose(whiten @ cov @ whiten, np.eye(27), atol=2e-2)
    # The regulariser caps the gain of the weakest directions: with a large eps, W C W < I.
    damped = data_layers.whitening_matrix(images, mask, 3, eps=1.0)
    assert np.max(np.linalg.eigvalsh(np.asarray(damped @ cov @ damped))) < 0.99


def test_whitened_kernel_sees_whitened_patches():
    """conv(x, W H) = (W p) . H for every patch p: the head's filters act on whitened patches."""
    images = jnp.asarray(_images(6, size=10))
    mask = jnp.ones(6, bool)
    head = jax.random.normal(jax.random.key(1), (3, 3, 3, 8))
    kernel = data_layers.data_derived_kernel("whitened", images, mask, head)
    out = jax.lax.conv_general_dilated(images, kernel, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=jax.lax.Precision.HIGHEST)
    patches = stem._patches(images, 3)  # [N, P, 27], rows ordered (C, kh, kw)
    whiten = data_layers.whitening_matrix(images, mask, 3)
    want = jnp.einsum("npd,ed,eo->npo", patches, whiten, data_layers._as_rows(head),
                      precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(out.reshape(6, -1, 8), want, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(data_layers._from_rows(data_layers._as_rows(head), head.shape), head)


def test_pca_residual_with_a_zero_head_is_the_pca_network():
    """H = 0 and BatchNorm at (1, 0): the pca_residual pass gives pca_backbone's kernels (the
    construction test_pca_backbone checks against each conv's independently captured input)."""
    images = _images(12)
    mask = np.ones(12, bool)
    variables = init_target("resnet8", 3, (16, 16, 3), seed=0)
    zero_head = _unit_norms_zero_kernels(variables["params"])
    target = get_target("resnet8", 3, bn_momentum=0.0)
    params, features, stats = data_layers.forward_with_data_layers(
        data_layers.kernel_builder("pca_residual"), target, {"params": zero_head, "batch_stats": variables["batch_stats"]},
        jnp.asarray(images), jnp.asarray(mask))
    reference = pca_backbone("resnet8", variables, images, mask)
    chex.assert_trees_all_equal_shapes(params, reference["params"])
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(reference["params"])):
        if path[-1].key == "kernel" and got.ndim == 4:
            np.testing.assert_allclose(got, want, atol=3e-3, err_msg=jax.tree_util.keystr(path))
    # The features and statistics are those of the network the pass built.
    again, updates = target.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  jnp.asarray(images), train=True, mask=jnp.asarray(mask),
                                  features_only=True, mutable=["batch_stats"])
    np.testing.assert_allclose(features, again, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(stats, updates["batch_stats"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode, patch_stride, residual_scale, normalized",
                         [("pca_residual", 1, 0.25, False), ("whitened", 1, 0.25, False),
                          ("pca_residual", 2, 1.0, False), ("discriminant_residual", 2, 0.25, False),
                          ("pca_residual", 1, 0.5, True)])
def test_predict_with_data_layers(tiny_config, mode, patch_stride, residual_scale, normalized,
                                  predict_against_plain, check_padding_and_relabelling):
    """Same tree and hypernetwork parameters as without; the first conv is the data-derived
    kernel of the head's (from every patch_stride-th patch position) and the deepest conv is
    not the head's; padding rows change nothing; relabelling permutes the classifier (the
    gradient: test_meta_training_through_data_layers_learns)."""
    config = tiny_config.copy_and_resolve_references()
    config.hyper.data_layers = mode
    config.hyper.data_layers_patch_stride = patch_stride
    config.hyper.data_layers_residual_scale = residual_scale
    config.hyper.data_layers_normalized_residual = normalized
    params, batch, got, head_only, predict = predict_against_plain(config)
    images = batch["image"]
    head_kernel = head_only["params"]["conv_init"]["kernel"]
    labelled = {"labels": jnp.asarray(batch["label"]), "num_classes": config.model.num_classes,
                "normalized_residual": normalized}
    want = data_layers.data_derived_kernel(mode, jnp.asarray(images), jnp.ones(20, bool),
                                           head_kernel, patch_stride=patch_stride,
                                           residual_scale=residual_scale, **labelled)
    np.testing.assert_allclose(got["params"]["conv_init"]["kernel"], want, rtol=1e-3, atol=1e-4)
    if patch_stride > 1:  # the stride reaches the statistics: all positions give another kernel
        every = data_layers.data_derived_kernel(mode, jnp.asarray(images), jnp.ones(20, bool),
                                                head_kernel, residual_scale=residual_scale, **labelled)
        assert not np.allclose(want, every, atol=1e-3)
    if mode.endswith("_residual"):  # the scale weighs the head's kernel on top of the same filters
        pca = data_layers.data_derived_kernel(mode, jnp.asarray(images), jnp.ones(20, bool),
                                              head_kernel, patch_stride=patch_stride, residual_scale=0.0,
                                              **labelled)
        head = data_layers.unit_filters(head_kernel) if normalized else head_kernel
        np.testing.assert_allclose(want - pca, residual_scale * head, atol=1e-5)
    assert not np.allclose(got["params"]["ResNetBlock_2"]["Conv_1"]["kernel"],
                           head_only["params"]["ResNetBlock_2"]["Conv_1"]["kernel"], atol=1e-3)

    # Padding and relabelling on images with spatial structure: on predict_against_plain's noise
    # images the deepest convs' top patch eigenvalues are nearly equal, so their eigenvectors
    # turn with the summation order (20 rows vs 26) by more than any tolerance that would still
    # catch a leak; structured images' spectra are better separated (up to ~3e-3 remains in
    # the deepest BatchNorm means with 20 images: float32 reduction order).
    # For the labelled mode these two properties are asserted where its kernels are decided
    # (test_discriminant_directions_ignore_padding_and_class_names): with 20 images of 5
    # classes the deepest convs' between-class spectra are near-degenerate whatever the images,
    # and float32 reduction order differences then turn whole directions.
    # normalized_residual only rescales the head's filters (never reads the batch), so it keeps
    # whatever its mode has; with the head's share bounded, the data-derived directions dominate
    # and the deepest convs' near-degenerate spectra on 20 images show, as for the labelled mode.
    if mode in data_layers.LABELLED_MODES or normalized:
        return
    structured = {**batch, "image": _images(20, seed=6, size=32)}
    check_padding_and_relabelling(predict, params, structured, predict(params, structured), 1e-2)


@pytest.mark.parametrize("mode", ["whitened", "pca_residual", "discriminant_residual"])
def test_chunked_predict_builds_the_same_data_layers(tiny_config, mode, chunked_apply_calls):
    """make_predict_fn(chunk_size=...) with data layers: every conv is built from its input's
    statistics over the whole batch, read chunk by chunk (60 images in chunks of 16, the last
    one padded, 3 rows masked), so the kernels, BatchNorm statistics and classifier are the
    one-pass predict's up to float summation order; statistics of a chunk alone, a sweep that
    skipped an earlier layer's kernel or statistics, or a leaking pad row are off by O(1).
    60 structured images keep the deepest convs' spectra apart: with 20, float order alone turns
    the labelled mode's deepest directions (see test_predict_with_data_layers)."""
    config = tiny_config.copy_and_resolve_references()
    config.hyper.data_layers = mode
    params = init_hyper_params(config, jax.random.key(0))
    labels = (np.arange(60) % 5).astype(np.int32)
    images = _images(60, seed=6, size=32) + 0.1 * labels[:, None, None, None]
    batch = {"image": images, "label": labels, "mask": np.arange(60) < 57}
    calls = chunked_apply_calls
    plain = jax.jit(make_predict_fn(config))(params, batch)
    assert not calls
    chunked = jax.jit(make_predict_fn(config, chunk_size=16))(params, batch)
    assert calls == [16]
    chex.assert_trees_all_equal_shapes(chunked, plain)
    gaps = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-6)),
                        plain, chunked)
    # Measured (largest leaf gap relative to the leaf's size): whitened 2e-5, pca_residual 3e-3,
    # discriminant_residual 7e-3 (eigenvectors of the deepest convs amplify the float order);
    # statistics of the first chunk alone: 0.7-1.7.
    assert max(jax.tree.leaves(gaps)) < 5e-2, gaps
    # The data layers did act: the deepest conv is not the head's kernel.
    head_only = jax.jit(make_predict_fn(tiny_config))(params, batch)
    assert not np.allclose(chunked["params"]["ResNetBlock_2"]["Conv_1"]["kernel"],
                           head_only["params"]["ResNetBlock_2"]["Conv_1"]["kernel"], atol=1e-3)


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_row_order_changes_nothing_even_where_float_order_would(tiny_config, chunk_size):
    """The discriminant data layers amplify float summation order (near-degenerate spectra in
    the deepest convs; RESULTS.md section 4), so predict sorts the batch's rows before summing:
    a shuffled batch gives the same network to the last bit, one pass or chunked. Without the
    sort (``canonical_row_order=False``) the same shuffle moves the output: the sort is what
    this test sees, not an order-free computation."""
    config = tiny_config.copy_and_resolve_references()
    config.hyper.data_layers = "discriminant_residual"
    params = init_hyper_params(config, jax.random.key(0))
    labels = (np.arange(40) % 5).astype(np.int32)
    images = _images(40, seed=6, size=32) + 0.1 * labels[:, None, None, None]
    batch = {"image": images, "label": labels, "mask": np.arange(40) < 37}
    shuffled = {k: v[np.random.default_rng(1).permutation(40)] for k, v in batch.items()}
    predict = jax.jit(make_predict_fn(config, chunk_size=chunk_size))
    chex.assert_trees_all_equal(predict(params, shuffled), predict(params, batch))
    unsorted = jax.jit(make_predict_fn(config, chunk_size=chunk_size, canonical_row_order=False))
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         unsorted(params, shuffled), unsorted(params, batch))
    assert any(jax.tree.leaves(moved))


def test_meta_training_through_data_layers_learns(tiny_config):
    """A few Adam steps on the hypernetwork lower a held-out query loss of the predicted
    network: the gradient reaches the head through the data-derived kernels."""
    config = tiny_config.copy_and_resolve_references()
    config.hyper.data_layers = "whitened"
    config.hyper.classifier = "ridge"
    rng = np.random.default_rng(3)
    prototypes = rng.normal(size=(5, 1, 1, 3)).astype(np.float32)

    def draw(n):
        labels = (np.arange(n) % 5).astype(np.int32)
        noise = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
        return noise + 0.4 * prototypes[labels] * np.linspace(-1, 1, 32)[None, :, None, None], labels

    support, support_labels = draw(40)
    queries, query_labels = draw(40)
    batch = {"image": support, "label": support_labels, "mask": np.ones(40, bool)}
    target = get_target("resnet8", 5)
    predict = make_predict_fn(config)

    def loss(p):
        logits = target.apply(predict(p, batch), queries, train=False)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(40), query_labels])

    params = init_hyper_params(config, jax.random.key(0))
    optimizer = optax.adam(3e-3)
    state = optimizer.init(params)
    step = jax.jit(lambda p, s: (lambda l, g: (l, *optimizer.update(g, s, p)))(*jax.value_and_grad(loss)(p)))
    losses = []
    for _ in range(12):
        value, updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        losses.append(float(value))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses


def test_strided_patch_moments_are_those_of_the_strided_windows():
    """stride s: the moments of the k x k windows at every s-th position per axis (an odd map
    size keeps the last position), masked rows excluded; stride 1 is every window."""
    images = _images(5, seed=4, size=11)
    mask = np.array([True, True, False, True, True])
    for stride in (1, 2, 3):
        starts = range(0, 11 - 3 + 1, stride)
        windows = np.stack([images[n, i:i + 3, j:j + 3, :].transpose(2, 0, 1).reshape(-1)
                            for n in np.flatnonzero(mask) for i in starts for j in starts])
        count, total, outer = stem.patch_moments(jnp.asarray(images), jnp.asarray(mask), 3, stride)
        assert float(count) == len(windows) == 4 * len(starts) ** 2
        np.testing.assert_allclose(total, windows.sum(0), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(outer, windows.T @ windows, rtol=1e-4, atol=1e-2)


def test_an_unknown_mode_is_refused(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.hyper.data_layers = "zca"
    with pytest.raises(ValueError, match="hyper.data_layers"):
        init_hyper_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="hyper.data_layers"):
        data_layers.data_derived_kernel("zca", jnp.zeros((2, 8, 8, 3)), jnp.ones(2, bool),
                                        jnp.zeros((3, 3, 3, 4)))
    with pytest.raises(ValueError, match="hyper.data_layers"):
        data_layers.kernel_builder("none")
    config.hyper.data_layers = "whitened"
    config.hyper.data_layers_patch_stride = 0
    with pytest.raises(ValueError, match="hyper.data_layers_patch_stride"):
        init_hyper_params(config, jax.random.key(0))
    config.hyper.data_layers_patch_stride = 1
    for eps in (0.0, -0.1, float("inf")):
        config.hyper.data_layers_discriminant_eps = eps
        with pytest.raises(ValueError, match="hyper.data_layers_discriminant_eps"):
            init_hyper_params(config, jax.random.key(0))


def test_random_backbone_baseline_goes_through_the_same_data_layers(tiny_config):
    """The benchmark's 'random init read out as predict' row applies the predictor's data
    layers to the random kernels (baselines.with_data_layers), so it measures what the
    meta-trained head adds; the given variables are not modified."""
    from pudnet_jax import baselines

    images = _images(9, size=32)
    batch = {"image": images, "label": (np.arange(9) % 3).astype(np.int32), "mask": np.ones(9, bool)}
    backbone = init_target("resnet8", 3, (32, 32, 3), seed=0)
    before = jax.tree.map(np.array, backbone)
    out = baselines.with_data_layers("resnet8", backbone, batch, "whitened")
    chex.assert_trees_all_equal(backbone, before)
    chex.assert_trees_all_equal_shapes(out, backbone)
    want = data_layers.data_derived_kernel("whitened", jnp.asarray(images), jnp.ones(9, bool),
                                           backbone["params"]["conv_init"]["kernel"])
    np.testing.assert_allclose(out["params"]["conv_init"]["kernel"], want, rtol=1e-3, atol=1e-4)
    chex.assert_trees_all_equal(out["params"]["Dense_0"], backbone["params"]["Dense_0"])

    class Task:
        num_classes = 3
        test_images = _images(9, seed=2, size=32)
        test_labels = batch["label"]

        def dataset_batch(self):
            return batch

    config = tiny_config.copy_and_resolve_references()
    config.hyper.classifier = "ridge"
    plain = baselines.random_backbone_accuracy(config, Task(), seed=0)
    config.hyper.data_layers = "whitened"
    whitened = baselines.random_backbone_accuracy(config, Task(), seed=0)
    variables = baselines.solved_readout("resnet8", out, batch, "ridge", config.hyper.ridge_lambda)
    from pudnet_jax.evaluate import accuracy
    assert whitened == pytest.approx(accuracy("resnet8", variables, Task.test_images, Task.test_labels))
    assert 0.0 <= plain <= 1.0


def _planted_classes(n=60, seed=0):
    """Images whose class is a faint pattern along one patch direction, under a strong
    class-free pattern along another: PCA keeps the strong one, a discriminant the faint one."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3).astype(np.int32)
    strong, faint = np.zeros(27, np.float32), np.zeros(27, np.float32)
    strong[13], faint[4] = 1.0, 1.0  # rows ordered (C, kh, kw): centre of channel 1, channel 0
    noise = 0.1 * rng.normal(size=(n, 10, 10, 3))
    nuisance = 3.0 * rng.normal(size=(n, 1, 1, 1)) * np.array([0.0, 1.0, 0.0])  # strong, class-free
    signal = 0.3 * (labels - 1.0)[:, None, None, None] * np.array([1.0, 0.0, 0.0])  # faint, by class
    return (noise + nuisance + signal).astype(np.float32), labels, strong, faint


def test_discriminant_directions_keep_what_separates_the_classes():
    images, labels, strong, faint = _planted_classes()
    mask = jnp.ones(len(labels), bool)
    top_pca = stem.principal_patch_directions(jnp.asarray(images), mask, 3, 1)[:, 0]
    top_disc = discriminant.discriminant_patch_directions(
        jnp.asarray(images), jnp.asarray(labels), mask, 3, 3, 1)[:, 0]
    # PCA: the class-free channel dominates; the discriminant: all weight on the class channel.
    assert np.abs(np.asarray(top_pca).reshape(3, 9)[1]).sum() > 2.5
    rows = np.abs(np.asarray(top_disc)).reshape(3, 9).sum(1)
    assert rows[0] > 0.9 * rows.sum(), rows
    np.testing.assert_allclose(np.linalg.norm(top_disc), 1.0, rtol=1e-5)
    # S_b of the planted direction: the classes' share-weighted mean offsets, (2/3) * 0.3**2.
    scatter = discriminant.between_class_patch_scatter(jnp.asarray(images), jnp.asarray(labels), mask, 3, 3)
    np.testing.assert_allclose(faint @ scatter @ faint, (2 / 3) * 0.09, rtol=0.05)
    # The class-free channel's class means differ only by sampling: a far smaller share of its variance.
    total = stem.patch_covariance(jnp.asarray(images), mask, 3)
    ratio = lambda v: float(v @ scatter @ v) / float(v @ total @ v)  # noqa: E731
    assert ratio(faint) > 0.5 and ratio(strong) < 0.1, (ratio(faint), ratio(strong))


def test_discriminant_directions_ignore_padding_and_class_names():
    """Masked rows (100x garbage, any label) change nothing; relabelling the classes changes
    nothing (S_b sums over classes); both up to float32 rounding."""
    images, labels, _, _ = _planted_classes(seed=1)
    want = discriminant.discriminant_patch_directions(
        jnp.asarray(images), jnp.asarray(labels), jnp.ones(60, bool), 3, 3, 6, stride=2)
    padded = discriminant.discriminant_patch_directions(
        jnp.asarray(np.concatenate([images, 100.0 * images[:7]])), jnp.asarray(np.r_[labels, [2] * 7]),
        jnp.asarray(np.r_[np.ones(60, bool), np.zeros(7, bool)]), 3, 3, 6, stride=2)
    np.testing.assert_allclose(padded, want, atol=2e-3)
    renamed = discriminant.discriminant_patch_directions(
        jnp.asarray(images), jnp.asarray(np.array([2, 0, 1])[labels]), jnp.ones(60, bool), 3, 3, 6, stride=2)
    np.testing.assert_allclose(renamed, want, atol=2e-3)


def test_discriminant_network_is_the_discriminant_mode_with_a_zero_head():
    """pca_backbone(construction='discriminant') = the discriminant_residual pass with H = 0
    (compared on the first two convs: deeper ones, on 24 images of 3 classes, have near-equal
    eigenvalues that turn with float32 summation order); the labels reach the kernels (other
    labels, other kernels); a missing label is refused."""
    images, labels, _, _ = _planted_classes(n=24)
    mask = np.ones(24, bool)
    variables = init_target("resnet8", 3, images.shape[1:], seed=0)
    target = get_target("resnet8", 3, bn_momentum=0.0)
    zero_head = _unit_norms_zero_kernels(variables["params"])
    params, _, _ = data_layers.forward_with_data_layers(
        data_layers.kernel_builder("discriminant_residual", labels=jnp.asarray(labels), num_classes=3),
        target, {"params": zero_head, "batch_stats": variables["batch_stats"]}, jnp.asarray(images), jnp.asarray(mask))
    network = pca_backbone("resnet8", variables, images, mask, labels, construction="discriminant")
    for path in (("conv_init",), ("ResNetBlock_0", "Conv_0")):
        got, want = network["params"], params
        for key in path:
            got, want = got[key], want[key]
        np.testing.assert_allclose(got["kernel"], want["kernel"], atol=3e-3, err_msg=str(path))
    shuffled = np.random.default_rng(0).permutation(labels)
    other = pca_backbone("resnet8", variables, images, mask, shuffled, construction="discriminant")
    assert not np.allclose(other["params"]["conv_init"]["kernel"], network["params"]["conv_init"]["kernel"],
                           atol=1e-2)
    with pytest.raises(ValueError, match="labels"):
        pca_backbone("resnet8", variables, images, mask, construction="discriminant")
    with pytest.raises(ValueError, match="labels"):
        data_layers.kernel_builder("discriminant_residual")
    with pytest.raises(ValueError, match="construction"):
        pca_backbone("resnet8", variables, images, mask, labels, construction="lda")


def test_discriminant_eps_reaches_every_path_that_builds_discriminant_kernels(tiny_config):
    """hyper.data_layers_discriminant_eps is the whitening regulariser of the discriminant
    directions wherever they are built: predict's first conv is the data-derived kernel at that
    eps (and not at the default), the closed-form network takes it as ``discriminant_eps``, and
    the chunked pass uses it too."""
    config = tiny_config.copy_and_resolve_references()
    config.hyper.data_layers = "discriminant_residual"
    config.hyper.data_layers_residual_scale = 0.0
    params = init_hyper_params(config, jax.random.key(0))
    labels = (np.arange(40) % 5).astype(np.int32)
    images = _images(40, seed=6, size=32) + 0.1 * labels[:, None, None, None]
    batch = {"image": images, "label": labels, "mask": np.ones(40, bool)}
    default = jax.jit(make_predict_fn(config))(params, batch)["params"]["conv_init"]["kernel"]
    config.hyper.data_layers_discriminant_eps = 1.0
    wide = jax.jit(make_predict_fn(config))(params, batch)["params"]["conv_init"]["kernel"]
    chunked = jax.jit(make_predict_fn(config, chunk_size=16))(params, batch)["params"]["conv_init"]["kernel"]
    x, y, m = jnp.asarray(images), jnp.asarray(labels), jnp.ones(40, bool)
    want = data_layers.data_derived_kernel("discriminant_residual", x, m, jnp.zeros((3, 3, 3, 16)),
                                           residual_scale=0.0, labels=y, num_classes=5, discriminant_eps=1.0)
    # Rows are sorted inside predict, so compare up to summation order.
    np.testing.assert_allclose(wide, want, atol=1e-4)
    np.testing.assert_allclose(chunked, want, atol=1e-4)
    assert not np.allclose(wide, default, atol=1e-2)
    variables = init_target("resnet8", 5, images.shape[1:], seed=0)
    network = pca_backbone("resnet8", variables, images, np.ones(40, bool), labels, construction="discriminant",
                           discriminant_eps=1.0)
    np.testing.assert_allclose(network["params"]["conv_init"]["kernel"], want, atol=1e-4)


@pytest.mark.parametrize("mode", ["pca_residual", "discriminant_residual"])
def test_normalized_residual_bounds_the_head_and_ignores_its_gain(mode):
    """With normalized_residual the head's filters enter at unit norm: scaling any head filter
    by a positive factor changes no kernel, and each filter's correction has norm exactly the
    residual scale (a free head's is its own norm times the scale: it can drown the directions)."""
    images = jnp.asarray(_images(24, seed=3, size=8))
    labels = jnp.asarray(np.arange(24) % 3)
    mask = jnp.ones(24, bool)
    rng = np.random.default_rng(0)
    head = jnp.asarray(rng.normal(size=(3, 3, 3, 8)).astype(np.float32))
    gains = jnp.asarray(np.array([1e-3, 0.5, 2.0, 40.0, 300.0, 1.0, 7.0, 0.1], np.float32))

    def kernel(h, scale, normalized):
        return data_layers.data_derived_kernel(mode, images, mask, h, residual_scale=scale, labels=labels,
                                               num_classes=3, normalized_residual=normalized)

    base = kernel(head, 0.0, True)
    np.testing.assert_allclose(kernel(head, 0.3, True), kernel(head * gains, 0.3, True), atol=1e-5)
    correction = np.asarray(kernel(head * gains, 0.3, True) - base).reshape(-1, 8)
    np.testing.assert_allclose(np.linalg.norm(correction, axis=0), 0.3, rtol=1e-4)
    free = np.asarray(kernel(head * gains, 0.3, False) - base).reshape(-1, 8)
    np.testing.assert_allclose(np.linalg.norm(free, axis=0),
                               0.3 * np.linalg.norm(np.asarray(head * gains).reshape(-1, 8), axis=0), rtol=1e-4)
    with pytest.raises(ValueError, match="normalized_residual"):
        data_layers.kernel_builder("whitened", normalized_residual=True)
    # A dead head filter stays (near) zero instead of dividing by zero.
    dead = head.at[..., 0].set(0.0)
    assert np.all(np.isfinite(np.asarray(kernel(dead, 0.3, True))))
    np.testing.assert_allclose(np.asarray(kernel(dead, 0.3, True) - base)[..., 0], 0.0, atol=1e-6)
