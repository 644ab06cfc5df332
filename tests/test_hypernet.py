"""Core behaviour of the hypernetwork and the public predict function."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pudnet_jax.hypernet import abstract_target_variables, build_hypernet
from pudnet_jax.models import get_target
from pudnet_jax.predict import canonical_order, content_keys, init_hyper_params, make_predict_fn


def _batch(n, k, seed=0, size=32):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    rng.shuffle(labels)
    # Class-dependent images, so prototypes differ between classes.
    images = rng.normal(size=(n, size, size, 3)).astype(np.float32) + labels[:, None, None, None] * 0.3
    return {"image": images, "label": labels.astype(np.int32), "mask": np.ones(n, bool)}


@pytest.mark.parametrize("target", ["resnet8", "resnet18", "convnet4"])
@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_predicted_tree_matches_target_init(tiny_config, target, num_classes):
    tiny_config.model.target = target
    hyper_params = init_hyper_params(tiny_config, jax.random.key(0), num_classes)
    predict = make_predict_fn(tiny_config, num_classes)
    batch = _batch(num_classes * 2, num_classes, size=32)
    predicted = jax.eval_shape(predict, hyper_params, batch)
    expected = abstract_target_variables(target, num_classes, (32, 32, 3))
    assert jax.tree.structure(predicted) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(predicted), jax.tree.leaves(expected)):
        assert got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("target", ["resnet8", "convnet4"])
def test_predicted_variables_run_and_give_finite_logits(tiny_config, target):
    tiny_config.model.target = target
    hyper_params = init_hyper_params(tiny_config, jax.random.key(0))
    batch = _batch(20, 5)
    variables = jax.jit(make_predict_fn(tiny_config))(hyper_params, batch)
    logits = get_target(target, 5).apply(variables, batch["image"], train=False)
    assert logits.shape == (20, 5)
    assert np.isfinite(np.asarray(logits)).all()
    # BatchNorm statistics are the batch's own, not the initial zeros/ones.
    stats = variables["batch_stats"]["bn_init" if target == "resnet8" else "BatchNorm_0"]
    assert np.abs(np.asarray(stats["mean"])).max() > 0


def test_relabelling_permutes_logit_columns(tiny_config):
    # Prototype classifier here; the ridge solve's own equivariance and masking are tested on
    # the function in test_classifiers.py (the plumbing around it is the same).
    hyper_params = init_hyper_params(tiny_config, jax.random.key(1))
    predict = jax.jit(make_predict_fn(tiny_config))
    batch = _batch(25, 5)
    perm = np.array([3, 0, 4, 1, 2])  # class c becomes perm[c]
    relabelled = {**batch, "label": perm[batch["label"]].astype(np.int32)}
    target = get_target("resnet8", 5)
    logits = target.apply(predict(hyper_params, batch), batch["image"], train=False)
    logits_relabelled = target.apply(predict(hyper_params, relabelled), batch["image"], train=False)
    np.testing.assert_allclose(np.asarray(logits_relabelled)[:, perm], np.asarray(logits), rtol=1e-4, atol=1e-4)


def test_shuffling_and_masked_padding_leave_output_unchanged(tiny_config):
    hyper_params = init_hyper_params(tiny_config, jax.random.key(2))
    predict = jax.jit(make_predict_fn(tiny_config))
    batch = _batch(20, 5)
    reference = predict(hyper_params, batch)

    order = np.random.default_rng(3).permutation(20)
    shuffled = {k: v[order] for k, v in batch.items()}
    # Rows are sorted before any sum over the batch (predict.canonical_order): bit for bit.
    chex.assert_trees_all_equal(predict(hyper_params, shuffled), reference)

    padding = _batch(7, 5, seed=9)  # garbage rows with real-looking values, masked out
    padded = {k: np.concatenate([batch[k], padding[k]]) for k in batch}
    padded["mask"][20:] = False
    padded["image"][20:] *= 100.0
    chex.assert_trees_all_close(predict(hyper_params, padded), reference, rtol=1e-4, atol=1e-5)


def test_canonical_order_sorts_valid_rows_by_label_then_content():
    batch = _batch(12, 3, seed=4)
    batch["image"] = batch["image"].astype(np.float32)  # compared bit for bit below
    mask = np.arange(12) % 4 != 1  # rows 1, 5, 9 are padding
    images, labels, sorted_mask = canonical_order(jnp.asarray(batch["image"]), jnp.asarray(batch["label"]),
                                                  jnp.asarray(mask))
    assert list(np.asarray(sorted_mask)) == [True] * 9 + [False] * 3
    valid_labels = np.asarray(labels)[:9]
    assert list(valid_labels) == sorted(batch["label"][mask])
    # The rows are the same rows (each image keeps its label), only reordered.
    order = [int(np.flatnonzero((batch["image"] == np.asarray(images)[i]).all(axis=(1, 2, 3)))[0]) for i in range(12)]
    assert sorted(order) == list(range(12))
    np.testing.assert_array_equal(batch["label"][order], np.asarray(labels))
    # Within a label, by content key; a key depends on the row's pixels, not on where it sits.
    keys = np.asarray(content_keys(images))
    for c in range(3):
        rows = keys[:9][valid_labels == c]
        assert np.all(np.diff(rows) > 0)
    flipped = np.asarray(content_keys(jnp.asarray(batch["image"][::-1])))
    np.testing.assert_array_equal(flipped[::-1], np.asarray(content_keys(jnp.asarray(batch["image"]))))


def test_cell_parameters_are_shared_across_depth(tiny_config):
    counts = {}
    for target in ["resnet8", "resnet14"]:  # same widths, 1 vs 2 blocks per stage
        tiny_config.model.target = target
        params = init_hyper_params(tiny_config, jax.random.key(0))
        counts[target] = sum(x.size for x in jax.tree.leaves(params))
        cell = params["params"]["layers"]["cell"]
        # nn.scan broadcast: the cell's kernels have no layer axis.
        assert cell["gru"]["ir"]["kernel"].ndim == 2
    assert counts["resnet8"] == counts["resnet14"]


def test_hypernetwork_size_for_resnet18_is_under_budget():
    from configs.common import base_config

    config = base_config()
    config.model.target = "resnet18"
    hypernet = build_hypernet(config, 10)
    batch = _batch(20, 10)
    shapes = jax.eval_shape(hypernet.init, jax.random.key(0), batch["image"], batch["label"], batch["mask"])
    num_params = sum(x.size for x in jax.tree.leaves(shapes))
    target_params = sum(x.size for x in jax.tree.leaves(abstract_target_variables("resnet18", 10, (32, 32, 3))["params"]))
    assert num_params <= 5_000_000 < target_params


def test_jitted_predict_does_not_retrace(tiny_config):
    # The production default PRNG (the other tests run on rbg keys: tests/conftest.py).
    hyper_params = init_hyper_params(tiny_config, jax.random.key(0, impl="threefry2x32"))
    predict = make_predict_fn(tiny_config)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def traced_predict(params, batch):
        return predict(params, batch)

    traced_predict(hyper_params, _batch(20, 5, seed=0))
    traced_predict(hyper_params, _batch(20, 5, seed=1))


def test_predict_is_vmappable_over_tasks(tiny_config):
    hyper_params = init_hyper_params(tiny_config, jax.random.key(0))
    predict = make_predict_fn(tiny_config)
    tasks = [_batch(10, 5, seed=s) for s in range(3)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *tasks)
    batched = jax.jit(jax.vmap(predict, in_axes=(None, 0)))(hyper_params, stacked)
    single = jax.jit(predict)(hyper_params, tasks[1])
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], batched), single, rtol=1e-4, atol=1e-5)


def test_ablations_build_and_predict(tiny_config):
    """Each ablation predicts finite parameters, and does what its name says: without sketch
    conditioning the generated kernels and BatchNorm affines do not depend on the dataset (only
    the statistics and the solved classifier do); with it they do."""
    first, second = _batch(10, 5, seed=0), _batch(10, 5, seed=1)
    for field, value in [("recurrent", False), ("sketch_conditioning", False),
                         ("classifier", "generated"), ("sketch_conditioning", True)]:
        config = tiny_config.copy_and_resolve_references()
        config.hyper[field] = value
        params = init_hyper_params(config, jax.random.key(0))
        predict = jax.jit(make_predict_fn(config))
        variables, other = predict(params, first), predict(params, second)
        assert np.isfinite(np.asarray(variables["params"]["Dense_0"]["kernel"])).all()
        if field == "sketch_conditioning":
            body = [(a, b) for path, a, b in zip(*_paths_and_leaves(variables["params"]),
                                                 jax.tree.leaves(other["params"]))
                    if "Dense_0" not in path]
            same = all(np.array_equal(a, b) for a, b in body)
            assert same == (not value), field


def _paths_and_leaves(tree):
    pairs = jax.tree_util.tree_leaves_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in pairs], [leaf for _, leaf in pairs]


def test_the_recurrent_cell_carries_earlier_layers_forward_and_the_ablation_does_not():
    """LayerRecurrence: changing layer j's descriptor changes the embeddings of layers j and
    after, never those before (a scan in forward order); IndependentLayers (recurrent=False):
    only layer j's."""
    from pudnet_jax.hypernet.cell import IndependentLayers, LayerRecurrence

    rng = np.random.default_rng(0)
    descriptors = jnp.asarray(rng.normal(size=(6, 7)), jnp.float32)
    sketch = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
    changed = descriptors.at[2].add(1.0)
    for module, later_rows_move in ((LayerRecurrence(16), True), (IndependentLayers(16), False)):
        variables = module.init(jax.random.key(0), descriptors, sketch)
        a = np.asarray(module.apply(variables, descriptors, sketch))
        b = np.asarray(module.apply(variables, changed, sketch))
        moved = np.abs(a - b).max(axis=1) > 1e-6
        assert list(moved[:2]) == [False, False] and moved[2], moved
        assert all(moved[3:]) == later_rows_move and any(moved[3:]) == later_rows_move, moved


@pytest.mark.parametrize("size", [1, 2])
def test_small_map_conv_is_the_convolution(size):
    """The matmul form used for 3x3 'SAME' convs on maps of 2x2 or less equals lax's conv; any
    other case is delegated to lax unchanged (bitwise)."""
    from pudnet_jax.hypernet.encoder import _conv_small_maps_as_matmul

    rng = np.random.default_rng(size)
    x = jnp.asarray(rng.normal(size=(4, size, size, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 6, 5)), jnp.float32)
    dims = ("NHWC", "HWIO", "NHWC")
    reference = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dims,
                                             precision=jax.lax.Precision.HIGHEST)
    ours = _conv_small_maps_as_matmul(x, kernel, (1, 1), "SAME", dimension_numbers=dims,
                                      precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    big = jnp.asarray(rng.normal(size=(2, 5, 5, 6)), jnp.float32)
    for strides in [(1, 1), (2, 2)]:  # 5x5 maps, or strided: lax's own conv
        np.testing.assert_array_equal(
            _conv_small_maps_as_matmul(big, kernel, strides, "SAME", dimension_numbers=dims),
            jax.lax.conv_general_dilated(big, kernel, strides, "SAME", dimension_numbers=dims))


def test_encoder_downsample_reads_pooled_images_with_the_same_parameters(tiny_config):
    """hyper.encoder_downsample=2: the parameter tree is unchanged (a full-resolution predictor
    runs at 2 as is), and the encoder's outputs are exactly those of the full-resolution encoder
    on 2x2-average-pooled images; a factor that does not divide the image size is refused."""
    from pudnet_jax.hypernet.encoder import SetEncoder

    config = tiny_config.copy_and_resolve_references()
    config.hyper.encoder_downsample = 2
    params = init_hyper_params(tiny_config, jax.random.key(0))
    chex.assert_trees_all_equal_shapes(init_hyper_params(config, jax.random.key(0)), params)
    batch = _batch(20, 5)
    full = jax.jit(make_predict_fn(tiny_config))(params, batch)
    pooled = jax.jit(make_predict_fn(config))(params, batch)
    chex.assert_trees_all_equal_shapes(pooled, full)
    assert not np.allclose(pooled["params"]["conv_init"]["kernel"], full["params"]["conv_init"]["kernel"])

    widths, dims = tuple(config.hyper.encoder_widths), (config.hyper.feature_dim, config.hyper.sketch_dim)
    enc_params = {"params": params["params"]["encoder"]}
    images = jnp.asarray(batch["image"])
    small = images.reshape(20, 16, 2, 16, 2, 3).mean(axis=(2, 4))
    args = (batch["label"], batch["mask"], 5)
    chex.assert_trees_all_close(SetEncoder(widths, *dims, downsample=2).apply(enc_params, images, *args),
                                SetEncoder(widths, *dims, downsample=1).apply(enc_params, small, *args),
                                rtol=1e-5, atol=1e-5)
    config.hyper.encoder_downsample = 3
    with pytest.raises(ValueError, match="encoder_downsample"):
        make_predict_fn(config)(params, batch)


def test_mirror_support_predicts_from_the_batch_plus_its_mirror_images(tiny_config):
    """hyper.mirror_support=True is exactly predict on the batch extended by its horizontally
    flipped images (same labels and mask), with the ridge classifier too; it differs from the
    plain prediction, changes nothing for a batch of mirror-symmetric images, and a non-bool
    value is refused."""
    config = tiny_config.copy_and_resolve_references()
    config.hyper.classifier = "ridge"
    plain = jax.jit(make_predict_fn(config))
    config.hyper.mirror_support = True
    mirrored = jax.jit(make_predict_fn(config))
    params = init_hyper_params(config, jax.random.key(0))
    batch = _batch(20, 5)
    doubled = {"image": np.concatenate([batch["image"], batch["image"][:, :, ::-1]]),
               "label": np.concatenate([batch["label"]] * 2), "mask": np.ones(40, bool)}
    chex.assert_trees_all_close(mirrored(params, batch), plain(params, doubled), rtol=1e-5, atol=1e-5)
    change = np.abs(mirrored(params, batch)["params"]["Dense_0"]["kernel"]
                    - plain(params, batch)["params"]["Dense_0"]["kernel"]).max()
    assert change > 1e-2, change

    symmetric = dict(batch, image=(batch["image"] + batch["image"][:, :, ::-1]) / 2)
    # Duplicating every row changes no mean, variance or ridge solution (all are per-example
    # averages), so a mirror-symmetric batch predicts what it predicts without mirroring, up to
    # float32 summation order over twice the rows. The ridge solve spreads that noise over the
    # whole classifier, so it is bounded by each leaf's scale, not elementwise (measured: 1.0e-4
    # of the scale; another codegen, LLVM -O0, gives 1.8e-4 and breaks an elementwise 1e-3 bound).
    def within_leaf_scale(path, got, want):
        gap, scale = np.abs(got - want).max(), max(np.abs(want).max(), 1e-3)
        assert gap <= 1e-3 * scale, (jax.tree_util.keystr(path), gap, scale)

    jax.tree_util.tree_map_with_path(within_leaf_scale, mirrored(params, symmetric), plain(params, symmetric))

    # ConfigDict refuses a str for a bool field; a config rebuilt from JSON does not.
    loose = config.to_dict()
    loose["hyper"]["mirror_support"] = "yes"
    with pytest.raises(ValueError, match="mirror_support"):
        make_predict_fn(ml_collections.ConfigDict(loose))


def _bn_nodes(tree):
    """Every BatchNorm node (a dict holding exactly ``scale`` and ``bias``) of a params tree."""
    if set(tree) == {"scale", "bias"}:
        return [tree]
    return [node for value in tree.values() if isinstance(value, dict) for node in _bn_nodes(value)]


def test_batchnorm_residual_scale_weighs_the_predicted_offsets(tiny_config):
    """hyper.batchnorm_residual_scale = w: every predicted BatchNorm is (1 + w a, w b) for the
    offsets (a, b) predicted at w = 1, conv kernels untouched; w = 0 is the standard (1, 0) in
    every layer; a negative or non-finite weight is refused. (Trained-looking offsets: the
    decoders are zero at init, so they are drawn at random here.)"""
    hyper_params = init_hyper_params(tiny_config, jax.random.key(0))
    head = dict(hyper_params["params"]["head"])
    for i, name in enumerate(("bn_scale_decoder", "bn_bias_decoder")):
        kernel = head[name]["kernel"]
        head[name] = {**head[name], "kernel": jax.random.normal(jax.random.key(10 + i), kernel.shape)}
    hyper_params = {**hyper_params, "params": {**hyper_params["params"], "head": head}}
    batch = _batch(20, 5)

    def predicted(weight):
        tiny_config.hyper.batchnorm_residual_scale = weight
        return jax.jit(make_predict_fn(tiny_config))(hyper_params, batch)["params"]

    full, half, none = predicted(1.0), predicted(0.5), predicted(0.0)
    offsets = [(np.asarray(n["scale"]) - 1.0, np.asarray(n["bias"])) for n in _bn_nodes(full)]
    # resnet8: the stem's BatchNorm, two per block (three blocks), two projection shortcuts.
    assert len(offsets) == 9 and min(np.abs(a).max() for a, _ in offsets) > 1e-2
    for (a, b), h, z in zip(offsets, _bn_nodes(half), _bn_nodes(none)):
        np.testing.assert_allclose(h["scale"], 1.0 + 0.5 * a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h["bias"], 0.5 * b, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(z["scale"], np.ones_like(a))
        np.testing.assert_array_equal(z["bias"], np.zeros_like(b))
    for path, kernel in jax.tree_util.tree_leaves_with_path(full):
        if path[-1].key == "kernel" and kernel.ndim == 4:
            got = half
            for key in path:
                got = got[key.key]
            np.testing.assert_array_equal(got, kernel, err_msg=jax.tree_util.keystr(path))
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="batchnorm_residual_scale"):
            predicted(bad)
