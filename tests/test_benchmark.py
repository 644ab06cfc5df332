"""Tests of the training baselines and the benchmark entry point (CPU, well under a minute).

Shapes are shared between tests on purpose (resnet8, 4 classes, 16x16 images, batch 16), so the
train step and the target's init compile once per session.
"""

import json
import os
import types

import jax
import numpy as np
import pytest

from pudnet_jax import baselines, benchmark, checkpoints, data, metrics
from pudnet_jax.evaluate import accuracy, init_target
from pudnet_jax.predict import init_hyper_params

# Omniglot-task shapes: 20 classes, 300 support (15/class), 100 test (5/class), batch 64.
K, SIZE, BATCH = 20, 16, 64
_HAVE_OMNIGLOT = os.path.isfile(os.path.join(data.default_data_dir(), "omniglot.npz"))


def _separable(per_class, seed, noise=0.3):
    """Class c = a fixed random pattern + noise: trivially separable."""
    patterns = np.random.default_rng(123).normal(size=(K, SIZE, SIZE, 3)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(K, dtype=np.int32), per_class)
    images = patterns[labels] + noise * rng.normal(size=(len(labels), SIZE, SIZE, 3)).astype(np.float32)
    return images, labels


def _config():
    """The tiny_config of conftest.py at 16x16 (module-scoped fixtures cannot use it)."""
    from configs.common import base_config

    c = base_config()
    c.model.num_classes, c.model.image_size = 5, SIZE
    c.hyper.encoder_widths, c.hyper.feature_dim, c.hyper.sketch_dim = (8, 16), 32, 32
    c.hyper.hidden_dim, c.hyper.code_rank = 32, 8
    return c


@pytest.fixture(scope="module")
def hyper():
    # An rbg key: the hypernetwork's init compiles ~3x faster than with threefry.
    c = _config()
    return c, init_hyper_params(c, jax.random.key(0, impl="rbg"))


def _small_export(hyper, tmp_path, **hyper_fields):
    """The ``hyper`` fixture's random predictor exported with 2 unseen tasks and 5 images per
    class given to predict (``hyper_fields`` override ``config.hyper``): ``(config, params, path)``."""
    c, hyper_params = hyper
    c = c.copy_and_resolve_references()
    c.cache_dir = str(tmp_path / "cache")
    c.data.num_eval_tasks, c.data.predict_shots = 2, 5
    for field, value in hyper_fields.items():
        c.hyper[field] = value
    export = str(tmp_path / "export")
    checkpoints.export_predictor(hyper_params, c, export, {"note": "random init"})
    return c, hyper_params, export


@pytest.fixture(scope="module")
def scratch_run():
    x, y = _separable(15, seed=0)  # 300 images = 4 full batches of 64 + a padded batch of 44
    tx, ty = _separable(5, seed=1)
    run = baselines.train_from_scratch("resnet8", K, x, y, tx, ty, lr=3e-3, epochs=3,
                                       batch_size=BATCH, seed=0)
    return run, (x, y, tx, ty)


def test_train_from_scratch_learns_and_clock_increases(scratch_run):
    run, _ = scratch_run
    acc, sec = run["epoch_accuracy"], run["epoch_seconds_cumulative"]
    assert len(acc) == len(sec) == 4 and sec[0] == 0.0  # entry 0 = before training
    assert all(b > a for a, b in zip(sec, sec[1:]))
    assert acc[0] < 0.2 and acc[-1] >= 0.9, acc
    assert run["steps_per_epoch"] == 5 and run["padding"] == "pad+mask"
    assert run["compile_seconds"] > 0 and run["eval_seconds"] > 0
    assert np.isnan(run["epoch_train_loss"][0])
    assert run["epoch_train_loss"][-1] < run["epoch_train_loss"][1]


def test_finetune_starts_from_given_variables_and_does_not_modify_them(scratch_run):
    run, (x, y, tx, ty) = scratch_run
    given = run["variables"]
    before = jax.tree.map(np.array, given)
    expected = accuracy("resnet8", given, tx, ty)
    # Same shapes as scratch_run: reuses its compiled step.
    ft = baselines.train_from_scratch("resnet8", K, x, y, tx, ty, lr=1e-3, epochs=1,
                                      batch_size=BATCH, seed=1, init_variables=given)
    assert ft["epoch_accuracy"][0] == expected
    assert ft["compile_seconds"] == 0.0
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, given))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before["params"],
                           jax.tree.map(np.array, ft["variables"]["params"]))
    assert any(jax.tree.leaves(changed))


def test_refit_classifier_solves_ridge_on_the_networks_own_features(scratch_run):
    """The re-solved Dense layer is the ridge solution on the eval-mode penultimate features
    (chunking and padding change nothing), only the Dense layer changes, and on separable
    data it classifies a randomly initialised backbone's features well."""
    from pudnet_jax.hypernet.ridge import ridge_classifier
    from pudnet_jax.models import get_target

    _, (x, y, tx, ty) = scratch_run
    variables = init_target("resnet8", K, x.shape[1:], seed=3)
    refit = baselines.refit_classifier("resnet8", variables, x, y, 1e-2, chunk=128)  # 300 = 128+128+44
    features = get_target("resnet8", K).apply(variables, x, train=False, features_only=True)
    kernel, bias = ridge_classifier(features, y, np.ones(len(y), bool), K, 1e-2)
    np.testing.assert_allclose(refit["params"]["Dense_0"]["kernel"], kernel, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(refit["params"]["Dense_0"]["bias"], bias, rtol=1e-3, atol=1e-3)
    for name in variables["params"]:
        if name != "Dense_0":
            jax.tree.map(np.testing.assert_array_equal, refit["params"][name], variables["params"][name])
    assert accuracy("resnet8", variables, tx, ty) < 0.2
    assert accuracy("resnet8", refit, tx, ty) >= 0.9


def test_refit_during_finetuning_leaves_the_trajectory_unchanged(scratch_run):
    run, (x, y, tx, ty) = scratch_run
    kwargs = dict(lr=1e-3, epochs=1, batch_size=BATCH, seed=1, init_variables=run["variables"])
    plain = baselines.train_from_scratch("resnet8", K, x, y, tx, ty, **kwargs)
    refit = baselines.train_from_scratch("resnet8", K, x, y, tx, ty, refit_ridge_lambda=1e-2, **kwargs)
    assert refit["epoch_accuracy"] == plain["epoch_accuracy"]
    assert len(refit["epoch_accuracy_refit"]) == len(refit["epoch_refit_seconds"]) == 2
    assert all(s > 0 for s in refit["epoch_refit_seconds"])
    assert "epoch_accuracy_refit" not in plain


def test_masked_rows_do_not_change_the_step():
    """Padding rows (mask False) have no effect on the update or the BatchNorm statistics."""
    x, y = _separable(4, seed=2)
    x, y = x[:BATCH], y[:BATCH]
    variables = init_target("resnet8", K, x.shape[1:], seed=0)
    params = variables["params"]
    state = lambda: jax.tree.map(np.array, (params, variables["batch_stats"],
                                            baselines._init_opt_state(params, 1e-3)))
    step, _ = baselines.compiled_train_step("resnet8", K, state(), x.shape)
    mask = np.arange(BATCH) < 40
    garbage = x.copy()
    garbage[40:] = 100.0
    a, _ = step(state(), x, y, mask)
    b, _ = step(state(), garbage, y, mask)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a[:2], b[:2])


def test_nearest_prototype_is_perfect_on_separable_data(hyper):
    config, hyper_params = hyper
    sx, sy = _separable(15, seed=3, noise=0.01)
    tx, ty = _separable(5, seed=4, noise=0.01)
    task = types.SimpleNamespace(num_classes=K, test_images=tx, test_labels=ty,
                                 dataset_batch=lambda: data.as_dataset_batch(sx, sy))
    assert baselines.nearest_prototype_accuracy(config, hyper_params, task, chunk=100) == 1.0


def test_baseline_encoder_is_the_hypernetworks_encoder(hyper):
    """The standalone SetEncoder has exactly the tree of the hypernetwork's 'encoder' subtree,
    so applying it on that subtree computes the hypernetwork's own features (names cannot drift)."""
    from pudnet_jax.hypernet.encoder import SetEncoder

    config, hyper_params = hyper
    h = config.hyper
    x, y = _separable(1, seed=5)
    encoder = SetEncoder(tuple(h.encoder_widths), h.feature_dim, h.sketch_dim)
    abstract = jax.eval_shape(lambda: encoder.init(jax.random.key(0), x, y, np.ones(len(y), bool), K))
    got = jax.tree.map(lambda a: (a.shape, a.dtype), abstract["params"])
    want = jax.tree.map(lambda a: (a.shape, a.dtype), hyper_params["params"]["encoder"])
    assert got == want


def test_speedup_and_time_to_reach():
    acc, sec = [0.1, 0.4, 0.6, 0.8], [0.0, 2.0, 4.0, 6.0]
    assert benchmark.time_to_reach(acc, sec, 0.6) == 4.0
    assert benchmark.time_to_reach(acc, sec, 0.05) == 0.0
    assert benchmark.time_to_reach(acc, sec, 0.9) is None
    s = benchmark.speedup(acc, sec, 0.5, predict_seconds=0.01)
    assert s["reached"] and s["scratch_seconds"] == 4.0 and s["ratio"] == pytest.approx(400.0)
    assert s["text"] == "400x"
    s = benchmark.speedup(acc, sec, 0.95, predict_seconds=0.02)
    assert not s["reached"] and s["ratio"] == pytest.approx(300.0) and s["text"] == ">300x"


@pytest.mark.parametrize("argument", ["num_baseline_tasks", "lr_tune_epochs", "lr_tune_tasks",
                                      "scratch_seeds"])
def test_benchmark_refuses_zero_counts_instead_of_reading_them_as_unset(tmp_path, argument):
    with pytest.raises(ValueError, match=f"{argument} must be at least 1, got 0"):
        benchmark.run_benchmark(_config(), str(tmp_path / "no_checkpoint"), str(tmp_path / "out"),
                                **{argument: 0})
    assert not os.path.exists(tmp_path / "out")  # refused before any work


@pytest.mark.skipif(not _HAVE_OMNIGLOT, reason="no omniglot.npz in the data dir")
def test_evaluation_config_replaces_the_meta_training_seed():
    """The benchmark measures every predictor against the same from-scratch runs: the seed is
    the evaluation's, not the one the predictor was meta-trained with; the input is not modified."""
    config = _config()
    config.seed = 7
    got = benchmark.evaluation_config(config, seed=0, scratch_epochs=3)
    assert got.seed == 0 and got.eval.scratch_epochs == 3 and config.seed == 7
    assert got.eval.finetune_epochs == config.eval.finetune_epochs


@pytest.mark.skipif(not _HAVE_OMNIGLOT, reason="no omniglot.npz in the data dir")
def test_benchmark_smoke_run_writes_outputs(hyper, tmp_path):
    """2 intra-Omniglot tasks (20-way; 16x16 so it is quick), 1 with training baselines."""
    c, hyper_params = hyper
    c = c.copy_and_resolve_references()
    c.cache_dir = str(tmp_path / "cache")
    c.data.num_eval_tasks = 2
    c.eval.scratch_epochs, c.eval.finetune_epochs, c.eval.num_baseline_tasks = 2, 1, 1
    c.eval.scratch_lrs = (1e-3, 3e-3)
    c.hyper.classifier = "ridge"  # also runs fine-tuning with the classifier re-solved
    export = str(tmp_path / "export")
    checkpoints.export_predictor(hyper_params, c, export, {"note": "random init"})
    out = str(tmp_path / "bench")
    r = benchmark.run_benchmark(checkpoints.read_config(export), export, out, lr_tune_tasks=1,
                                lr_tune_epochs=1, finetune_lrs=[0.0, 1e-4], predict_repeats=1,
                                command="pytest", frontier_shots=[5, 15], frontier_val_tasks=1,
                                scratch_seeds=2)
    for name in ("benchmark.json", "benchmark.md", "accuracy_vs_time.png", "per_task_scatter.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    saved = json.load(open(os.path.join(out, "benchmark.json")))
    assert saved["predicted"]["n"] == 2 and saved["protocol"]["num_baseline_tasks"] == 1
    assert len(saved["task_manifest"]["tasks"]) == 2 and saved["class_split"]["dataset"] == "omniglot"
    assert saved["lr_tuning"]["best_lr"] in (1e-3, 3e-3)
    assert saved["finetune_lr_tuning"]["lrs"] == [0.0, 1e-4]
    assert saved["protocol"]["finetune_lr"] == saved["finetune_lr_tuning"]["best_lr"]
    assert all(t.startswith("omniglot/meta_val") for t in saved["lr_tuning"]["tasks"])
    assert len(saved["baseline_tasks"]["scratch"]["epoch_accuracy_mean"]) == 3
    # Two from-scratch seeds on the baseline task: two different runs, and the reported curve is
    # their mean (the bar of a single-task setting is no longer one run).
    row = saved["per_baseline_task"][0]
    runs = [row["scratch"], *row["scratch_other_seeds"]]
    assert len(runs) == 2 and saved["protocol"]["scratch_seeds"] == 2
    assert runs[0]["epoch_train_loss"][1:] != runs[1]["epoch_train_loss"][1:]
    np.testing.assert_allclose(saved["baseline_tasks"]["scratch"]["epoch_accuracy_mean"],
                               np.mean([run["epoch_accuracy"] for run in runs], axis=0))
    for key in ("machine", "seed", "command", "total_wall_seconds", "config", "load_average"):
        assert key in saved
    # The speedup's predict time is the mean of the timings before and after the baselines.
    first = saved["per_task"][0]
    assert saved["speedup"]["predict_seconds"] == pytest.approx(
        (first["predict_seconds"] + first["predict_seconds_after_scratch"]) / 2)
    assert "predict_seconds_after_scratch" not in saved["per_task"][1]  # no baselines there
    assert 0.0 <= r["nearest_prototype"]["mean"] <= 1.0 and r["speedup"]["text"].endswith("x")
    # Random init read out like a prediction (ridge from the predict sample) is far above random
    # init with its random Dense layer (near the 5% chance of these 20-way tasks).
    assert saved["random_init_solved"]["n"] == 2
    assert saved["random_init_solved"]["mean"] > saved["random_init"]["mean"] + 0.2
    assert saved["predicted_minus_random_init_solved"]["mean"] == pytest.approx(
        saved["predicted"]["mean"] - saved["random_init_solved"]["mean"])
    md = open(os.path.join(out, "benchmark.md")).read()
    assert "Speedup" in md and "first 1 tasks only" in md and "ridge classifier from the predict sample" in md
    assert "| 1 x 2 seeds |" in md and "epoch 1 per seed: " in md
    assert "what the predicted backbone adds" in md and "Adam from scratch, epoch 2" in md
    refit = saved["baseline_tasks"]["finetune_refit"]
    assert len(refit["epoch_accuracy_mean"]) == 2 and "classifier re-solved, epoch 1" in md
    assert saved["protocol"]["finetune_refit_lr"] == saved["finetune_lr_tuning"]["best_lr_refit"]
    # Predict-sample frontier: the configured size (15) rebuilds exactly the main row's tasks and
    # sample, so it reproduces its accuracies; 5 images per class is another sample of them.
    small, same = saved["predict_sample_frontier"]
    assert (small["predict_shots"], same["predict_shots"]) == (5, 15)
    assert same["predicted"]["mean"] == pytest.approx(saved["predicted"]["mean"])
    assert same["baseline_tasks_predicted"] == pytest.approx(saved["baseline_tasks"]["predicted"]["mean"])
    assert small["predicted"]["n"] == 2 and 0.0 <= small["meta_val_predicted"] <= 1.0
    assert small["speedup"]["text"].endswith("x") and small["predict_seconds_median"] > 0
    # The frontier's random backbone at the configured size is the main row's, draw for draw.
    assert same["random_init_solved"]["mean"] == pytest.approx(saved["random_init_solved"]["mean"])
    assert small["random_init_solved"]["n"] == 2
    assert "| 5 |" in md and "Predict sample size" in md


@pytest.mark.skipif(not _HAVE_OMNIGLOT, reason="no omniglot.npz in the data dir")
def test_classifier_swap_chooses_settings_on_meta_val_only(hyper, tmp_path):
    """launch/classifier_swap.py: the chosen (predict sample, ridge strength) is the meta-val
    argmax, and the unseen scores it reports are those of that setting."""
    from launch.classifier_swap import markdown, run_swap
    from pudnet_jax.evaluate import TaskEvaluator
    from pudnet_jax.train import make_test_tasks

    c, hyper_params, export = _small_export(hyper, tmp_path)
    r = run_swap(export, shots_grid=[5, 15], ridge_lambdas=[1e-2], num_val_tasks=2)

    sweep = r["ridge_sweep_meta_val"]
    assert set(sweep) == {"shots=5,lambda=0.01", "shots=15,lambda=0.01"}
    ridge = r["classifiers"]["ridge"]
    assert sweep[f"shots={ridge['predict_shots']},lambda=0.01"] == max(sweep.values())
    assert len(r["val_tasks"]) == 2 and all(t.startswith("omniglot/meta_val") for t in r["val_tasks"])
    # The reported unseen accuracy of the chosen ridge setting is reproducible on its own.
    chosen = c.copy_and_resolve_references()
    chosen.hyper.classifier, chosen.data.predict_shots = "ridge", ridge["predict_shots"]
    again = TaskEvaluator(chosen).evaluate(hyper_params, make_test_tasks(chosen))
    assert again["per_task_predicted"] == pytest.approx(ridge["per_task_unseen"])
    # "as trained" is the export's own setting: prototype classifier, 5 images per class.
    as_trained = r["classifiers"]["as_trained"]
    assert (as_trained["classifier"], as_trained["predict_shots"]) == ("prototype", 5)
    assert r["num_unseen_tasks"] == 2 and r["ridge_minus_as_trained_unseen"]["n"] == 2
    assert "| ridge (chosen) |" in markdown(r)


@pytest.mark.skipif(not _HAVE_OMNIGLOT, reason="no omniglot.npz in the data dir")
def test_task_evaluator_never_times_compilation(hyper, tmp_path):
    """TaskEvaluator.predict runs the first task of each batch shape once untimed: with a single
    task (inter: the whole held-out dataset) the reported predict time was the compile time."""
    from pudnet_jax.evaluate import TaskEvaluator
    from pudnet_jax.train import make_test_tasks

    c, hyper_params = hyper
    c = c.copy_and_resolve_references()
    c.cache_dir = str(tmp_path / "cache")
    c.data.num_eval_tasks, c.data.predict_shots = 3, 5
    tasks = make_test_tasks(c)
    evaluator = TaskEvaluator(c)
    jitted = evaluator.predict_fn(tasks[0].num_classes)
    calls = []

    def counting_predict(*args):
        calls.append(1)
        return jitted(*args)

    evaluator._predict[tasks[0].num_classes] = counting_predict
    one = evaluator.evaluate(hyper_params, tasks[:1])
    assert len(calls) == 2  # one untimed warm-up, then the timed call
    every = evaluator.evaluate(hyper_params, tasks)
    assert len(calls) == 2 + len(tasks)  # same batch shape: no second warm-up
    assert one["per_task_predicted"] == every["per_task_predicted"][:1]
    assert one["predict_seconds_median"] > 0


@pytest.mark.skipif(not _HAVE_OMNIGLOT, reason="no omniglot.npz in the data dir")
def test_compare_predictors_is_paired_on_meta_val_tasks(hyper, tmp_path):
    """launch/compare_predictors.py scores each export on the same meta-val tasks (never the
    unseen ones); differences are paired against the first; another dataset is refused."""
    from launch.compare_predictors import apply_overrides, compare, markdown, parse_variants
    from pudnet_jax.evaluate import TaskEvaluator

    c, hyper_params = hyper
    c = c.copy_and_resolve_references()
    c.cache_dir = str(tmp_path / "cache")
    c.data.predict_shots = 5
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    checkpoints.export_predictor(hyper_params, c, first, {"note": "random init"})
    other = init_hyper_params(c, jax.random.key(1, impl="rbg"))
    checkpoints.export_predictor(other, c, second, {"note": "another random init"})
    r = compare([first, second], num_val_tasks=2)
    assert r["num_val_tasks"] == 2 and all(t.startswith("omniglot/meta_val") for t in r["val_tasks"])
    a, b = r["rows"]
    assert a["minus_first"]["mean"] == 0.0
    assert b["minus_first"]["mean"] == pytest.approx(np.mean(b["per_task"]) - np.mean(a["per_task"]))
    assert "minus the first" in markdown(r)
    # One predictor at two encoder factors: two rows on the same tasks; factor 1 is the export.
    factors = compare([first], num_val_tasks=2, encoder_downsample=[1, 2])
    one, two = factors["rows"]
    assert (one["encoder_downsample"], two["encoder_downsample"]) == (1, 2)
    assert two["checkpoint"].endswith("@ encoder_downsample=2") and two["predict_seconds_median"] > 0
    assert one["per_task"] == a["per_task"]
    assert "predict s (median)" in markdown(factors)
    with pytest.raises(ValueError, match="at least two"):
        compare([first], num_val_tasks=2)
    # --variants: inference-time hyper overrides, each a row on the same tasks; "none" is the export.
    variants = parse_variants("none;classifier=ridge,ridge_lambda=0.5")
    assert variants == [{}, {"classifier": "ridge", "ridge_lambda": "0.5"}]
    assert apply_overrides(c, variants[1]).hyper.ridge_lambda == 0.5
    assert apply_overrides(c, {"batchnorm_residual_scale": "0"}).hyper.batchnorm_residual_scale == 0.0
    rows = compare([first], num_val_tasks=2, variants=variants)["rows"]
    assert rows[0]["per_task"] == a["per_task"] and rows[0]["overrides"] == {}
    assert rows[1]["checkpoint"].endswith("@ classifier=ridge @ ridge_lambda=0.5")
    # The row is what the evaluator gives with the override set in the config directly.
    direct = c.copy_and_resolve_references()
    direct.hyper.classifier, direct.hyper.ridge_lambda = "ridge", 0.5
    tasks = baselines.lr_tuning_tasks(direct, 2)
    assert rows[1]["per_task"] == TaskEvaluator(direct).evaluate(hyper_params, tasks)["per_task_predicted"]
    with pytest.raises(ValueError, match="cannot vary"):
        parse_variants("none;num_layers=3")
    with pytest.raises(ValueError, match="not key=value"):
        parse_variants("none;classifier")
    with pytest.raises(ValueError, match="not a boolean"):
        apply_overrides(c, {"mirror_support": "maybe"})
    with pytest.raises(ValueError, match="no hyper.data_layers"):
        compare([first], num_val_tasks=2, patch_strides=[1, 2])
    gtsrb = c.copy_and_resolve_references()
    gtsrb.data.dataset = "gtsrb"
    checkpoints.export_predictor(hyper_params, gtsrb, str(tmp_path / "g"), {})
    with pytest.raises(ValueError, match="data.dataset"):
        compare([first, str(tmp_path / "g")], num_val_tasks=2)


def test_ci95_uses_student_t_over_tasks():
    from pudnet_jax.evaluate import mean_and_ci95, t_quantile_975

    # Exact t_{0.975} quantiles (tables): the expansion beyond the table agrees to 1e-3.
    for dof, exact in ((1, 12.706), (2, 4.303), (30, 2.042), (31, 2.0395), (40, 2.0211),
                       (60, 2.0003), (99, 1.9842), (120, 1.9799)):
        assert t_quantile_975(dof) == pytest.approx(exact, abs=1e-3), dof
    stats = mean_and_ci95([0.0, 1.0])  # std 0.7071, se 0.5, t(1) = 12.706
    assert stats["mean"] == 0.5 and stats["ci95"] == pytest.approx(6.353, abs=1e-3)
    values = np.random.default_rng(0).normal(size=100)
    se = values.std(ddof=1) / 10
    assert mean_and_ci95(values)["ci95"] == pytest.approx(1.9842 * se, rel=1e-3)
    assert np.isnan(mean_and_ci95([0.7])["ci95"])
    with pytest.raises(ValueError, match="degree of freedom"):
        t_quantile_975(0)


@pytest.mark.skipif(not _HAVE_OMNIGLOT, reason="no omniglot.npz in the data dir")
def test_stem_probe_reads_every_backbone_out_as_predict_does(hyper, tmp_path):
    """launch/stem_probe.py: its 'predicted' row is predict's own accuracy, its random rows are
    the benchmark's random-init read-out without and with the PCA stem or data layers, draw for draw; the
    report round-trips through metrics.write_report."""
    from launch.stem_probe import markdown, run_probe
    from pudnet_jax.evaluate import TaskEvaluator, random_init_seed
    from pudnet_jax.metrics import write_report
    from pudnet_jax.train import make_test_tasks

    c, hyper_params, export = _small_export(hyper, tmp_path, classifier="ridge")
    r = run_probe(export, num_val_tasks=2, num_components=4)
    unseen = r["splits"]["unseen"]["rows"]
    tasks = make_test_tasks(c)
    assert unseen["predicted"]["per_task"] == pytest.approx(
        TaskEvaluator(c).evaluate(hyper_params, tasks)["per_task_predicted"])
    stem_config = c.copy_and_resolve_references()
    stem_config.hyper.stem_pca_components = 4
    whitened_config = c.copy_and_resolve_references()
    whitened_config.hyper.data_layers = "whitened"
    for row, config in (("random init", c), ("random init, PCA stem", stem_config),
                        ("random init, data layers 'whitened'", whitened_config)):
        want = [baselines.random_backbone_accuracy(config, t, random_init_seed(config, i))
                for i, t in enumerate(tasks)]
        assert unseen[row]["per_task"] == pytest.approx(want), row
    assert all(t.startswith("omniglot/meta_val") for t in r["splits"]["meta_val"]["tasks"])
    pca_net = unseen["PCA network (every conv; no meta-training)"]["per_task"]
    assert len(pca_net) == 2 and all(0.0 <= a <= 1.0 for a in pca_net)

    write_report(str(tmp_path / "out"), "probe", r, markdown(r))
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["stem_pca_components"] == 4
    assert "| random init, PCA stem |" in (tmp_path / "out" / "probe.md").read_text()


def test_selection_signals_ranks_steps_and_picks_what_each_signal_selects():
    """launch/selection_signals.py's summary: Spearman's rank correlation (ties averaged), the
    step each signal selects (the earliest of equal scores, as the Validator keeps the first
    best) and the held-out accuracy there."""
    from launch.selection_signals import spearman, summarise

    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([0.5, 0.5, 2, 3], [0, 1, 2, 3])[0, 1])
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2, 3], [1, 2])
    rows = [{"step": 50, "source_meta_val": 0.80, "loso": 0.70, "held_out": 0.30},
            {"step": 100, "source_meta_val": 0.85, "loso": 0.74, "held_out": 0.33},
            {"step": 150, "source_meta_val": 0.90, "loso": 0.74, "held_out": 0.32}]
    s = summarise(rows)
    assert s["best_held_out"] == 0.33 and s["best_held_out_step"] == 100
    assert s["source_meta_val"]["selected_step"] == 150
    assert s["source_meta_val"]["held_out_at_selected"] == 0.32
    assert s["loso"]["selected_step"] == 100  # tied with 150: the first best
    assert s["loso"]["held_out_at_selected"] == 0.33
    assert s["source_meta_val"]["spearman_with_held_out"] == pytest.approx(0.5)


@pytest.mark.skipif(not _HAVE_OMNIGLOT, reason="no omniglot.npz in the data dir")
def test_selection_signals_scores_each_saved_step_of_a_workdir(hyper, tmp_path):
    """Each step's row is predict's accuracy with that step's saved parameters
    (``restore_hyper_params(step=)``); a step that is not saved, an export and a run without
    leave-one-source-out validation are refused by name."""
    from launch.selection_signals import score_steps, signal_tasks
    from pudnet_jax.evaluate import TaskEvaluator
    from pudnet_jax.train_step import create_train_state

    c, _ = hyper
    c = c.copy_and_resolve_references()
    c.cache_dir = str(tmp_path / "cache")
    c.data.predict_shots = 5
    workdir = str(tmp_path / "run")
    checkpoints.write_config(c, workdir)
    run = checkpoints.RunCheckpoints(workdir, keep=5)
    states = {step: create_train_state(c, jax.random.key(step, impl="rbg")) for step in (1, 2, 3)}
    for step, state in states.items():
        run.save(step, state, {"best": 0.0})
    run.close()
    assert checkpoints.saved_steps(workdir) == [1, 2, 3]
    tasks = baselines.lr_tuning_tasks(c, 2)
    rows = score_steps(workdir, c, [1, 2, 3], {"source_meta_val": tasks, "loso": tasks, "held_out": tasks})
    evaluator = TaskEvaluator(c)
    for row in rows:
        want = evaluator.evaluate(states[row["step"]].params, tasks)["predicted"]["mean"]
        assert row["source_meta_val"] == row["loso"] == row["held_out"] == pytest.approx(want)
    with pytest.raises(FileNotFoundError, match=r"step 7 .* steps \[1, 2, 3\]"):
        checkpoints.restore_hyper_params(workdir, c, step=7)
    with pytest.raises(ValueError, match="at least 3 saved steps"):
        score_steps(workdir, c, [1, 2], {"loso": tasks})
    export = str(tmp_path / "export")
    checkpoints.export_predictor(states[1].params, c, export, {})
    with pytest.raises(ValueError, match="is an export"):
        checkpoints.restore_hyper_params(export, c, step=1)
    with pytest.raises(ValueError, match="leave-one-"):
        signal_tasks(c, 2)


@pytest.mark.skipif(not _HAVE_OMNIGLOT, reason="no omniglot.npz in the data dir")
def test_predict_sample_spread_redraws_only_the_evaluation_tasks(hyper, tmp_path):
    """launch/predict_sample_spread.py: seed 0 reproduces the protocol's own evaluation, another
    seed draws other tasks for the same predictor; the report states the spread."""
    from launch.predict_sample_spread import markdown, spread
    from pudnet_jax.evaluate import TaskEvaluator
    from pudnet_jax.train import make_test_tasks

    c, hyper_params, export = _small_export(hyper, tmp_path)
    r = spread(export, [0, 1])
    first, second = r["rows"]
    assert first["predicted"] == pytest.approx(
        TaskEvaluator(c).evaluate(hyper_params, make_test_tasks(c))["predicted"]["mean"])
    redrawn = c.copy_and_resolve_references()
    redrawn.data.eval_task_seed = 1
    tasks_0, tasks_1 = make_test_tasks(c), make_test_tasks(redrawn)
    assert not np.array_equal(tasks_0[0].predict_indices, tasks_1[0].predict_indices)
    assert second["predicted"] == pytest.approx(
        TaskEvaluator(redrawn).evaluate(hyper_params, tasks_1)["predicted"]["mean"])
    assert r["over_seeds"]["n"] == 2
    assert r["std"] == pytest.approx(abs(first["predicted"] - second["predicted"]) / np.sqrt(2))
    assert "standard deviation" in markdown(r)
    # --variant: the same params scored with a hyper field changed at inference.
    changed = spread(export, [1], overrides={"mirror_support": "true"})
    mirrored = redrawn.copy_and_resolve_references()
    mirrored.hyper.mirror_support = True
    assert changed["rows"][0]["predicted"] == pytest.approx(
        TaskEvaluator(mirrored).evaluate(hyper_params, tasks_1)["predicted"]["mean"])
    assert changed["rows"][0]["predicted"] != second["predicted"]  # predict did read the mirror images
    assert changed["overrides"] == {"mirror_support": "true"}
    assert "hyper.mirror_support=true" in markdown(changed)
    with pytest.raises(ValueError, match="encoder_widths"):
        spread(export, [0], overrides={"encoder_widths": "(8,)"})


@pytest.mark.skipif(not _HAVE_OMNIGLOT, reason="no omniglot.npz in the data dir")
def test_construction_probe_scores_closed_form_networks_read_out_as_predict(hyper, tmp_path):
    """launch/construction_probe.py: each construction's score is the closed-form network's
    accuracy with predict's read-out, the two constructions differ, the report pairs them, and
    a checkpoint of another setting is refused by name (the probe chooses on inter sources)."""
    from launch.construction_probe import markdown, run_probe, score
    from pudnet_jax.evaluate import mean_and_ci95, random_init_seed
    from pudnet_jax.pca_backbone import pca_backbone

    c, _, export = _small_export(hyper, tmp_path)
    tasks = baselines.lr_tuning_tasks(c, 2)
    scores = score(c, tasks, ("pca", "discriminant"))
    task, batch = tasks[1], tasks[1].dataset_batch()
    random = init_target("resnet8", task.num_classes, task.test_images.shape[1:], random_init_seed(c, 1))
    network = pca_backbone("resnet8", random, batch["image"], batch["mask"], batch["label"], "discriminant")
    variables = baselines.solved_readout("resnet8", network, batch, "ridge", c.hyper.ridge_lambda)
    assert scores["discriminant"][1] == pytest.approx(
        accuracy("resnet8", variables, task.test_images, task.test_labels))
    assert len(scores["pca"]) == 2 and scores["pca"] != scores["discriminant"]
    # hyper.data_layers_discriminant_eps (run_probe's discriminant_eps sets it) reaches the network.
    wide = c.copy_and_resolve_references()
    wide.hyper.data_layers_discriminant_eps = 1.0
    network = pca_backbone("resnet8", random, batch["image"], batch["mask"], batch["label"], "discriminant",
                           discriminant_eps=1.0)
    variables = baselines.solved_readout("resnet8", network, batch, "ridge", c.hyper.ridge_lambda)
    assert score(wide, tasks, ("discriminant",))["discriminant"][1] == pytest.approx(
        accuracy("resnet8", variables, task.test_images, task.test_labels))
    with pytest.raises(ValueError, match="inter"):
        run_probe(export, 1, "fashion_mnist", 1, 1)
    fake = {"splits": {"meta_val": {"tasks": ["a", "b"], "rows": {
        name: {"accuracy": mean_and_ci95(v), "minus_pca": mean_and_ci95(np.subtract(v, scores["pca"]))}
        for name, v in scores.items()}}}, "source_dataset": "fashion_mnist", "held_out": "cifar10",
        "ridge_lambda": 0.01, "predict_shots": 5, "patch_stride": 1, "command": "x", "seed": 0,
        "machine": metrics.machine_description(), "wall_seconds": 1.0}
    assert "| discriminant |" in markdown(fake)


def test_head_gain_probe_reports_the_heads_share_of_each_kernel(hyper, tmp_path):
    """launch/head_gain_probe.py: the norms are those of the head's own kernels (predict with the
    data layers off), the ratio is scale x norm for a free head and the scale itself for a
    normalised one; a predictor without residual data layers is refused by name."""
    from launch.head_gain_probe import head_filter_norms, markdown, probe
    from pudnet_jax.predict import make_predict_fn

    c, hyper_params, free = _small_export(hyper, tmp_path, data_layers="pca_residual",
                                          data_layers_residual_scale=0.5)
    task = baselines.lr_tuning_tasks(c, 1)[0]
    plain = c.copy_and_resolve_references()
    plain.hyper.data_layers = "none"
    kernel = make_predict_fn(plain, task.num_classes)(hyper_params, task.dataset_batch())["params"]["conv_init"]["kernel"]
    want = float(np.linalg.norm(np.asarray(kernel).reshape(-1, kernel.shape[-1]), axis=0).mean())
    norms = head_filter_norms(c, hyper_params, task.dataset_batch(), task.num_classes)
    assert norms["conv_init/kernel"] == pytest.approx(want) and len(norms) == 9  # resnet8's convs
    (row,) = probe([free])["rows"]
    assert row["head_to_data_ratio"]["conv_init/kernel"] == pytest.approx(0.5 * want)
    _, _, normalised = _small_export(hyper, tmp_path / "n", data_layers="pca_residual",
                                      data_layers_residual_scale=0.5, data_layers_normalized_residual=True)
    result = probe([normalised])
    assert set(result["rows"][0]["head_to_data_ratio"].values()) == {0.5}
    assert "head-to-data ratio" in markdown(result)
    _, _, plain_export = _small_export(hyper, tmp_path / "p")
    with pytest.raises(ValueError, match="residual"):
        probe([plain_export])


def test_results_files_say_when_the_process_was_pinned_to_fewer_cpus():
    """Scores depend on the CPU thread count at the last-float-bit level (XLA sizes its pool by the
    CPUs the process may use), so every results file's machine line records a taskset pinning;
    files written before the field existed read as unpinned."""
    from pudnet_jax.metrics import machine_description, machine_line

    machine = machine_description()
    assert machine["usable_cpus"] == len(os.sched_getaffinity(0))
    base = {"cpu": "Some CPU", "cpu_count": 2, "jax_version": "0", "jax_backend": "cpu"}
    assert machine_line({**base, "usable_cpus": 1}) == "Some CPU (2 CPUs, pinned to 1), JAX 0 backend `cpu`"
    assert machine_line({**base, "usable_cpus": 2}) == "Some CPU (2 CPUs), JAX 0 backend `cpu`"
    assert machine_line(base) == machine_line({**base, "usable_cpus": 2})
    allowed = os.sched_getaffinity(0)
    if len(allowed) > 1:
        os.sched_setaffinity(0, {min(allowed)})
        try:
            assert machine_description()["usable_cpus"] == 1
        finally:
            os.sched_setaffinity(0, allowed)


def test_filter_comparison_counts_moved_and_flipped_filters():
    """launch/chunked_predict_check.compare: a filter turned by 5% moved, a negated one moved and
    flipped (a data-derived direction whose sign rule went the other way), a 1e-4 change is
    neither; the largest gap names its leaf."""
    from launch.chunked_predict_check import compare

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
    other = kernel.copy()
    other[..., 0] *= -1.0
    noise = rng.normal(size=(3, 3, 4))
    other[..., 1] += 0.05 * np.linalg.norm(kernel[..., 1]) * noise / np.linalg.norm(noise)
    other[..., 2] *= 1.0 + 1e-4
    got = compare({"conv": {"kernel": kernel}, "bn": {"scale": np.ones(6)}},
                  {"conv": {"kernel": other}, "bn": {"scale": np.ones(6)}})
    assert (got["conv_filters_moved"], got["conv_filters_flipped"], got["conv_filters"]) == (2, 1, 6)
    assert "conv" in got["largest_gap_leaf"] and got["largest_leaf_gap"] > 1.0
    (conv,) = got["per_conv"]
    assert conv["largest_unflipped_change"] == pytest.approx(0.05, rel=1e-3)  # filter 1, not the flipped 0


def test_pivot_margin_is_the_distance_to_a_sign_tie():
    from launch.chunked_predict_check import pivot_margins

    filters = np.array([[0.6, 0.8, 0.1], [-0.5, 0.0, -0.7], [0.2, -0.6, 0.7]])
    unit = filters / np.linalg.norm(filters, axis=0)
    # column 0: 0.6 vs opposite -0.5; column 1: 0.8 vs -0.6; column 2: a tie of 0.7 and -0.7
    np.testing.assert_allclose(pivot_margins(filters), [unit[0, 0] + unit[1, 0], unit[0, 1] + unit[2, 1], 0.0], atol=1e-12)


@pytest.mark.skipif(not _HAVE_OMNIGLOT, reason="no omniglot.npz in the data dir")
def test_row_order_check_sees_the_sort(hyper, tmp_path):
    """launch/row_order_check.py: with predict's sort every shuffle of a task's predict sample
    gives bitwise the same variables; without it (the diagnosis mode) the same shuffles do not,
    and the report says both."""
    from launch.row_order_check import check, markdown

    _, _, export = _small_export(hyper, tmp_path)
    r = check(export, num_orders=2, seed=0, num_tasks=1)
    (row,) = r["rows"]
    assert all(x["bitwise_equal"] and x["agreement"] == 1.0 for x in row["orders"]["sorted"]["shuffles"])
    assert not any(x["bitwise_equal"] for x in row["orders"]["caller"]["shuffles"])
    r["command"] = "python launch/row_order_check.py ..."
    assert "| sorted | " in markdown(r) and "2 of 2" in markdown(r) and "0 of 2" in markdown(r)
