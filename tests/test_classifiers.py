"""Classifiers of the predicted network: the closed-form ridge solve, and config compatibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pudnet_jax.hypernet.ridge import ridge_classifier
from pudnet_jax.models import get_target
from pudnet_jax.predict import init_hyper_params, make_predict_fn


def _features(n=60, dim=8, k=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n).astype(np.int32)
    centres = rng.normal(size=(k, dim)) * 3.0
    features = (centres[labels] + rng.normal(size=(n, dim)) + 5.0).astype(np.float32)
    return features, labels


def test_matches_the_normal_equations_solved_in_float64():
    features, labels = _features()
    k, lam = 4, 0.05
    kernel, bias = ridge_classifier(jnp.asarray(features), jnp.asarray(labels),
                                    jnp.ones(len(labels), bool), k, lam)
    # Reference: the same objective written out directly in NumPy float64.
    x = features.astype(np.float64)
    centred = x - x.mean(0)
    scale = np.sqrt((centred**2).mean())
    xs = centred / scale
    y = np.eye(k)[labels]
    yc = y - y.mean(0)
    w = np.linalg.solve(xs.T @ xs / len(x) + lam * np.eye(x.shape[1]), xs.T @ yc / len(x))
    expected_logits = xs @ w + y.mean(0)
    logits = features @ np.asarray(kernel) + np.asarray(bias)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)
    # And it is a minimiser: the gradient of the ridge objective vanishes there.
    grad = xs.T @ (xs @ w - yc) / len(x) + lam * w
    assert np.abs(grad).max() < 1e-10


def test_separates_training_classes_and_ignores_masked_rows():
    features, labels = _features(n=80, k=4, seed=1)
    mask = np.ones(len(labels), bool)
    kernel, bias = ridge_classifier(features, labels, mask, 4, 1e-3)
    train_acc = np.mean(np.argmax(features @ kernel + bias, -1) == labels)
    assert train_acc > 0.95
    garbage, garbage_labels = _features(n=30, k=4, seed=2)
    padded_f = np.concatenate([features, garbage * 50.0])
    padded_y = np.concatenate([labels, garbage_labels])
    padded_m = np.concatenate([mask, np.zeros(30, bool)])
    kernel2, bias2 = ridge_classifier(padded_f, padded_y, padded_m, 4, 1e-3)
    np.testing.assert_allclose(kernel2, kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias2, bias, rtol=1e-4, atol=1e-5)


def test_relabelling_permutes_columns_and_absent_classes_get_zero_columns():
    features, labels = _features(k=3)
    kernel, bias = ridge_classifier(features, labels, np.ones(len(labels), bool), 5, 0.01)
    # Classes 3 and 4 have no example: zero column, zero intercept (PudNet then masks them).
    np.testing.assert_allclose(np.asarray(kernel)[:, 3:], 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bias)[3:], 0.0, atol=1e-6)
    perm = np.array([2, 0, 1, 4, 3])
    kernel_p, bias_p = ridge_classifier(features, perm[labels], np.ones(len(labels), bool), 5, 0.01)
    np.testing.assert_allclose(np.asarray(kernel_p)[:, perm], kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bias_p)[perm], bias, rtol=1e-4, atol=1e-5)


def test_non_positive_lambda_is_refused():
    features, labels = _features()
    with pytest.raises(ValueError, match="ridge_lambda"):
        ridge_classifier(features, labels, np.ones(len(labels), bool), 4, 0.0)


def test_ridge_and_prototype_hypernetworks_share_one_parameter_tree(tiny_config):
    """So a prototype-trained predictor warm-starts (or is evaluated as) a ridge one."""
    proto = init_hyper_params(tiny_config, jax.random.key(0))
    tiny_config.hyper.classifier = "ridge"
    ridge = init_hyper_params(tiny_config, jax.random.key(0))
    assert jax.tree.structure(proto) == jax.tree.structure(ridge)
    rng = np.random.default_rng(0)
    labels = np.arange(20, dtype=np.int32) % 5
    images = rng.normal(size=(20, 32, 32, 3)).astype(np.float32) + labels[:, None, None, None]
    batch = {"image": images, "label": labels}
    predict = jax.jit(make_predict_fn(tiny_config, 5))
    variables = predict(ridge, batch)
    assert np.isfinite(np.asarray(variables["params"]["Dense_0"]["kernel"])).all()
    # Inside PudNet too, masked padding rows change nothing (up to the float32 solve's
    # conditioning: 20 rows, 64 features, held up by lambda) and the ridge fits its own batch.
    padded = {"image": np.concatenate([images, 100 * images[:7]]),
              "label": np.concatenate([labels, labels[:7]]),
              "mask": np.arange(27) < 20}
    target = get_target("resnet8", 5)
    logits = np.asarray(target.apply(variables, images, train=False))
    logits_padded = np.asarray(target.apply(predict(ridge, padded), images, train=False))
    np.testing.assert_allclose(logits_padded, logits, rtol=1e-3, atol=3e-3)
    assert np.mean(logits.argmax(-1) == labels) == 1.0
    # Unknown classifier names fail at once with the allowed values.
    tiny_config.hyper.classifier = "svm"
    with pytest.raises(ValueError, match="prototype"):
        make_predict_fn(tiny_config, 5)(ridge, batch)


@pytest.mark.parametrize("classifier", ["ridge", "prototype"])
def test_solved_readout_of_a_predicted_backbone_is_predicts_own_readout(tiny_config, classifier):
    """The random-init baseline's read-out is predict's: applied to a predicted network, it
    gives the same BatchNorm statistics and the same Dense layer up to the learned positive
    temperature (so the same decisions), padding rows included."""
    from pudnet_jax import baselines

    tiny_config.hyper.classifier = classifier
    hyper_params = init_hyper_params(tiny_config, jax.random.key(1))
    rng = np.random.default_rng(2)
    labels = np.arange(24, dtype=np.int32) % 5
    images = rng.normal(size=(24, 32, 32, 3)).astype(np.float32) + labels[:, None, None, None]
    batch = {"image": np.concatenate([images, images[:6]]), "label": np.concatenate([labels, labels[:6]]),
             "mask": np.arange(30) < 24}
    predicted = jax.jit(make_predict_fn(tiny_config, 5))(hyper_params, batch)
    scrambled = jax.tree.map(lambda a: a + 1.0, predicted)  # stats and head must be recomputed
    scrambled["params"] = {**predicted["params"], "Dense_0": scrambled["params"]["Dense_0"]}
    readout = baselines.solved_readout("resnet8", scrambled, batch, classifier,
                                       tiny_config.hyper.ridge_lambda)
    for got, want in zip(jax.tree.leaves(readout["batch_stats"]), jax.tree.leaves(predicted["batch_stats"])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    k_pred = np.asarray(predicted["params"]["Dense_0"]["kernel"])
    k_read = np.asarray(readout["params"]["Dense_0"]["kernel"])
    ratio = np.sum(k_pred * k_read) / np.sum(k_read * k_read)
    assert ratio > 0
    np.testing.assert_allclose(k_pred, ratio * k_read, rtol=1e-3, atol=1e-4 * np.abs(k_pred).max())
    target = get_target("resnet8", 5)
    np.testing.assert_array_equal(np.asarray(target.apply(readout, images, train=False)).argmax(-1),
                                  np.asarray(target.apply(predicted, images, train=False)).argmax(-1))
    with pytest.raises(ValueError, match="ridge"):
        baselines.solved_readout("resnet8", predicted, batch, "generated", 0.01)


def test_configs_saved_before_the_classifier_field_still_load(tmp_path, tiny_config):
    """Exports and workdirs written with ``hyper.prototype_classifier`` (the committed predictors
    of sessions 1-2) load, resume and compare as the equivalent ``hyper.classifier``."""
    import json

    from pudnet_jax import checkpoints

    for legacy_value, expected in ((True, "prototype"), (False, "generated")):
        saved = json.loads(tiny_config.to_json())
        del saved["hyper"]["classifier"], saved["hyper"]["ridge_lambda"]
        del saved["hyper"]["encoder_downsample"]  # added in session 11: absent means 1
        del saved["hyper"]["stem_pca_components"]  # added in session 19: absent means 0
        del saved["hyper"]["data_layers"]  # added in session 20: absent means 'none'
        del saved["hyper"]["data_layers_patch_stride"]  # session 21: absent means 1
        del saved["hyper"]["data_layers_residual_scale"]  # session 21: absent means 0.25
        del saved["hyper"]["data_layers_normalized_residual"]  # session 24: absent means False
        del saved["hyper"]["batchnorm_residual_scale"]  # session 28: absent means 1
        del saved["hyper"]["data_layers_discriminant_eps"]  # session 32: absent means 0.1
        del saved["data"]["validation_dataset"]  # session 21: absent means ''
        saved["hyper"]["prototype_classifier"] = legacy_value
        (tmp_path / "config.json").write_text(json.dumps(saved))
        config = checkpoints.read_config(str(tmp_path))
        assert config.hyper.classifier == expected and "prototype_classifier" not in config.hyper
        assert config.hyper.encoder_downsample == 1 and config.hyper.stem_pca_components == 0
        assert config.hyper.data_layers == "none" and config.hyper.data_layers_patch_stride == 1
        assert config.data.validation_dataset == "" and config.hyper.data_layers_residual_scale == 0.25
        assert config.hyper.data_layers_normalized_residual is False
        assert config.hyper.batchnorm_residual_scale == 1.0
        assert config.hyper.data_layers_discriminant_eps == 0.1
        live = tiny_config.copy_and_resolve_references()
        live.hyper.classifier = expected
        checkpoints.check_same_architecture(saved, live, "legacy")  # no mismatch
        live.hyper.classifier = "ridge"
        with pytest.raises(checkpoints.ArchitectureMismatchError, match="hyper.classifier"):
            checkpoints.check_same_architecture(saved, live, "legacy")


def test_presets_use_ridge_where_predict_sees_many_images_per_class():
    from configs import inter, intra

    assert intra.get_config("omniglot").hyper.classifier == "prototype"  # 15 shots
    assert intra.get_config("gtsrb").hyper.classifier == "ridge"  # 100 per class
    assert intra.get_config("cifar100").hyper.classifier == "ridge"
    assert inter.get_config("cifar10").hyper.classifier == "ridge"
    # Rotated classes: the GTSRB preset only (the inter sampler refuses them).
    assert intra.get_config("gtsrb").data.class_rotations == 4
    assert intra.get_config("omniglot").data.class_rotations == 1
    assert inter.get_config("cifar10").data.class_rotations == 1


@pytest.mark.parametrize("classifier", ["prototype", "ridge", "generated"])
def test_classes_without_examples_are_never_predicted(tiny_config, classifier):
    """A 5-class head predicted from a batch that holds examples of classes 0, 1 and 3 only
    (class 2's rows are all masked, class 4 has none: as the inter preset's 5-way tasks in a
    10-class head): the absent classes' bias is ABSENT_CLASS_BIAS, so no image, however far
    from the batch, is assigned to them, while a solved classifier still tells the present
    classes apart."""
    from pudnet_jax.hypernet.pudnet import ABSENT_CLASS_BIAS

    tiny_config.hyper.classifier = classifier
    hyper_params = init_hyper_params(tiny_config, jax.random.key(0))
    rng = np.random.default_rng(4)
    labels = np.array([0, 1, 3, 2] * 6, np.int32)
    images = rng.normal(size=(24, 32, 32, 3)).astype(np.float32) + labels[:, None, None, None]
    batch = {"image": images, "label": labels, "mask": labels != 2}
    variables = jax.jit(make_predict_fn(tiny_config, 5))(hyper_params, batch)
    bias = np.asarray(variables["params"]["Dense_0"]["bias"])
    np.testing.assert_array_equal(bias[[2, 4]], ABSENT_CLASS_BIAS)
    assert np.all(np.abs(bias[[0, 1, 3]]) < 1e3), bias
    far = np.concatenate([images, 10.0 * rng.normal(size=(24, 32, 32, 3)).astype(np.float32)])
    predictions = np.asarray(get_target("resnet8", 5).apply(variables, far, train=False)).argmax(-1)
    assert set(predictions.tolist()) <= {0, 1, 3}
    if classifier != "generated":  # solved from the batch; the untrained generated one is not
        assert len(set(predictions[:24].tolist())) > 1
