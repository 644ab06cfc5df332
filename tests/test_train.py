"""Meta-training: a real run end to end, multi-device equivalence, exact resume, no retracing,
task widths and validation, and learning that actually happens on real data. (The auxiliary
objectives, the source loss and the cross-source lookahead, are in test_train_objectives.)"""

import copy
import json
import os

import chex
import jax
import numpy as np
import pytest

from _run_config import small_run_config
from pudnet_jax import parallel
from pudnet_jax.train import make_sampler, train_and_evaluate
from pudnet_jax.train_step import create_train_state, jit_train_step, make_grad_fn, make_train_step


def test_train_and_evaluate_writes_checkpoint_metrics_plot_and_results(tiny_config, tmp_path):
    config = small_run_config(tiny_config)
    results = train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    assert os.listdir(tmp_path / "best")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["tasks_per_second"] > 0 for r in records if "loss" in r)
    assert [r["step"] for r in records if "val_accuracy" in r] == [2, 4]
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["evaluation"]["predicted"]["n"] == 3
    assert len(on_disk["task_manifest"]["tasks"]) == 3
    assert 0.0 <= results["evaluation"]["predicted"]["mean"] <= 1.0
    assert on_disk["machine"]["cpu"]


def test_sharded_step_on_4_devices_equals_1_device(tiny_config):
    config = small_run_config(tiny_config)
    assert len(jax.devices()) == 4
    batch = make_sampler(config).batch(0)
    params = create_train_state(config, jax.random.key(0)).params
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        grad_fn = jax.jit(make_grad_fn(config, mesh))
        results.append(jax.device_get(grad_fn(jax.device_put(params, parallel.replicated(mesh)),
                                              parallel.shard_batch(batch, mesh))))
    (loss_1, aux_1), grads_1 = results[0]
    (loss_4, aux_4), grads_4 = results[1]
    np.testing.assert_allclose(loss_1, loss_4, rtol=1e-5)
    np.testing.assert_allclose(aux_1["accuracy"], aux_4["accuracy"])
    # Same gradients up to float rounding (4 partial sums + all-reduce vs one sum), compared in
    # norm over the whole tree and leaf by leaf against that norm. Elementwise tolerances trip on
    # leaves whose true gradient is zero (the encoder's conv bias before GroupNorm: ~1e-9 of
    # noise) and on near-cancelling sums, which round differently on other CPU models (seen on
    # an Intel Xeon: 4e-4 globally, cosine 0.9999997); a real bug (a missing all-reduce, a mean
    # over shards instead of over tasks) is off by O(1).
    flat_1, flat_4 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
                      for g in (grads_1, grads_4))
    scale = np.linalg.norm(flat_4)
    assert np.linalg.norm(flat_1 - flat_4) < 2e-3 * scale
    leaf_gaps = jax.tree.map(lambda a, b: float(np.linalg.norm(a - b)) / scale, grads_1, grads_4)
    assert max(jax.tree.leaves(leaf_gaps)) < 1e-3, leaf_gaps


def test_train_way_widens_meta_training_tasks_only(tiny_config):
    """data.train_way: 8-way meta-training tasks; meta-val and test tasks stay data.way."""
    from pudnet_jax.train import Validator, make_test_tasks
    from pudnet_jax.evaluate import TaskEvaluator

    config = small_run_config(tiny_config)
    config.data.train_way, config.data.num_eval_tasks = 8, 1
    with pytest.raises(ValueError, match="model.num_classes is 5"):
        make_sampler(config)
    config.model.num_classes = 8
    batch, info = make_sampler(config).batch(0, return_info=True)
    assert batch["support"]["label"].shape[-1] == 8 * config.data.shots
    assert all(len(task["classes"]) == 8 for task in info)
    assert make_test_tasks(config)[0].num_classes == 5
    assert all(t.num_classes == 5 for t in Validator(config, TaskEvaluator(config)).tasks)


def test_inter_meta_val_scores_exactly_num_val_tasks_tasks(tiny_config):
    """inter: data.num_val_tasks need not divide by tasks_per_batch (3 tasks in batches of 2: all
    3 are scored, not 2); a longer list extends a shorter one (the same fixed tasks), and the
    score is the mean of the per-task accuracies."""
    from configs.inter import get_config
    from pudnet_jax.evaluate import TaskEvaluator
    from pudnet_jax.train import Validator

    config = get_config()
    for field in ("encoder_widths", "feature_dim", "sketch_dim", "hidden_dim", "code_rank"):
        config.hyper[field] = tiny_config.hyper[field]
    config.data.way = config.data.min_way = config.model.num_classes = 5
    config.data.shots, config.data.queries, config.data.tasks_per_batch = 2, 2, 2
    validators = []
    for count in (3, 4):
        config.data.num_val_tasks = count
        validators.append(Validator(config, TaskEvaluator(config)))
    three, four = validators
    assert len(three.batches) == 3 and len(four.batches) == 4
    assert all(b["support"]["label"].shape[0] == 1 for b in four.batches)
    for a, b in zip(three.batches, four.batches):
        np.testing.assert_array_equal(a["query"]["image"], b["query"]["image"])
    assert not np.array_equal(four.batches[2]["query"]["image"], four.batches[3]["query"]["image"])
    params = create_train_state(config, jax.random.key(0)).params
    per_task = [float(three._loss(params, b)[1]["accuracy"]) for b in three.batches]
    np.testing.assert_allclose(three(params), np.mean(per_task), rtol=1e-6)


def test_leave_one_source_out_validation(tiny_config):
    """data.validation_dataset: that source leaves the meta-training pools, and validation scores
    whole-dataset tasks of it (one predict sample each), as the held-out dataset is scored; the
    held-out dataset, an unknown name and the intra setting are refused."""
    from configs.inter import get_config
    from pudnet_jax.evaluate import TaskEvaluator
    from pudnet_jax.train import Validator

    config = get_config()
    for field in ("encoder_widths", "feature_dim", "sketch_dim", "hidden_dim", "code_rank"):
        config.hyper[field] = tiny_config.hyper[field]
    config.hyper.classifier = "ridge"
    config.data.way = config.data.min_way = 5
    config.model.num_classes = 10
    config.data.shots, config.data.queries, config.data.tasks_per_batch = 2, 2, 2
    config.data.num_val_tasks, config.data.predict_shots = 2, 5
    assert {pool.name for pool in make_sampler(config).pools} == {"omniglot", "gtsrb", "fashion_mnist"}
    config.data.validation_dataset = "fashion_mnist"
    assert {pool.name for pool in make_sampler(config).pools} == {"omniglot", "gtsrb"}

    validator = Validator(config, TaskEvaluator(config))
    assert not validator.batches and len(validator.tasks) == 2
    first, second = validator.tasks
    assert first.dataset == second.dataset == "fashion_mnist" and first.num_classes == 10
    assert len(first.predict_indices) == 10 * 5  # predict_shots per class of the whole dataset
    assert not np.array_equal(first.predict_indices, second.predict_indices)
    # Scored as the held-out dataset is: predict from the train split, test on the whole test split.
    assert first.support_data.split == "train" and first.test_data.split == "test"
    assert len(first.test_indices) == len(first.test_data.labels)
    params = create_train_state(config, jax.random.key(0)).params
    accuracy = validator(params)
    assert 0.0 <= accuracy <= 1.0

    for name, message in (("cifar10", "must be one of the sources"), ("svhn", "must be one of the sources")):
        config.data.validation_dataset = name
        with pytest.raises(ValueError, match=message):
            make_sampler(config)
    intra = small_run_config(tiny_config)
    intra.data.validation_dataset = "gtsrb"
    with pytest.raises(ValueError, match="inter setting"):
        Validator(intra, TaskEvaluator(intra))


def test_interrupted_run_resumes_to_identical_parameters(tiny_config, tmp_path):
    """Killed at step 2 and resumed: the same parameters bit for bit, the source head and every
    optimiser state included (the run trains with the auxiliary source loss, so all of the
    train state is exercised)."""
    config = small_run_config(tiny_config, num_steps=4)
    config.train.eval_every = 0
    config.train.checkpoint_every = 1
    config.train.source_loss_weight = 0.5
    uninterrupted = tmp_path / "a"
    train_and_evaluate(config, str(uninterrupted), stop_after=4)
    interrupted = tmp_path / "b"
    stopped = train_and_evaluate(config, str(interrupted), stop_after=2)
    assert stopped["stopped_at"] == 2
    # --mode=evaluate on the stopped run (no best/: eval_every=0) records the step it scored.
    from pudnet_jax.run_modes import evaluate_workdir

    evaluated = evaluate_workdir(config, str(interrupted))
    assert evaluated["hyper_params_from"] == {"step": 2, "source": "latest"}
    os.remove(interrupted / "results.json")
    train_and_evaluate(config, str(interrupted), stop_after=4)

    from pudnet_jax.checkpoints import restore_hyper_params

    a, info_a = restore_hyper_params(str(uninterrupted), config)
    b, info_b = restore_hyper_params(str(interrupted), config)
    assert info_a["step"] == info_b["step"] == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise
    from pudnet_jax.checkpoints import RunCheckpoints, read_config
    from pudnet_jax.train import initial_train_state

    saved = read_config(str(uninterrupted))  # the run recorded its source head's size
    assert saved.train.num_source_classes > 100  # Omniglot's meta-train characters
    states = [jax.device_get(initial_train_state(saved, parallel.make_mesh(), RunCheckpoints(str(d)))[0])
              for d in (uninterrupted, interrupted)]
    assert states[0].source_head["kernel"].shape[-1] == saved.train.num_source_classes
    chex.assert_trees_all_equal(states[0], states[1])
    log_a = [json.loads(l)["loss"] for l in open(uninterrupted / "metrics.jsonl")]
    log_b = [json.loads(l)["loss"] for l in open(interrupted / "metrics.jsonl")]
    assert log_a == log_b  # the resumed log has no duplicated or missing steps


def test_train_step_compiles_once_and_skips_a_non_finite_step(tiny_config):
    config = small_run_config(tiny_config)
    mesh = parallel.make_mesh()
    step_fn = chex.assert_max_traces(make_train_step(config, mesh), n=1)
    replicated = parallel.replicated(mesh)
    step = jax.jit(step_fn, in_shardings=(replicated, parallel.data_sharded(mesh)),
                   out_shardings=(replicated, replicated))
    state = jax.device_put(create_train_state(config, jax.random.key(0)), replicated)
    sampler = make_sampler(config)
    for i in range(3):  # different tasks, same shapes: no retrace
        state, _ = step(state, parallel.shard_batch(sampler.batch(i), mesh))
    # A non-finite loss or gradient (NaN pixels in one task's support) leaves the whole state as it was,
    # optimiser moments and step included, and says so; still the same compiled step.
    bad = jax.tree.map(np.array, sampler.batch(3))
    bad["support"]["image"][1, 0] = np.nan
    after, metrics = step(state, parallel.shard_batch(bad, mesh))
    assert float(metrics["finite"]) == 0.0
    chex.assert_trees_all_equal(jax.device_get(after), jax.device_get(state))


def test_meta_training_learns_on_real_data(tiny_config):
    """A few dozen steps on Omniglot: query accuracy on *held-out* (meta-val) classes rises well
    above its value at initialisation and far above chance, so gradients reach the hypernetwork
    through the predicted parameters."""
    from pudnet_jax.evaluate import TaskEvaluator
    from pudnet_jax import data
    from pudnet_jax.train import prepare_kwargs

    config = small_run_config(tiny_config, num_steps=40)
    config.data.shots = 3
    config.data.queries = 3
    config.train.learning_rate = 3e-3
    mesh = parallel.make_mesh()
    state = jax.device_put(create_train_state(config, jax.random.key(0)), parallel.replicated(mesh))
    tasks = data.make_eval_tasks("intra", "omniglot", classes="meta_val", num_tasks=12, way=5,
                                 predict_shots=5, seed=7, **prepare_kwargs(config))
    evaluator = TaskEvaluator(config)
    before = evaluator.evaluate(state.params, tasks)["predicted"]["mean"]
    step = jit_train_step(config, mesh)
    sampler = make_sampler(config)
    for i in range(config.train.num_steps):
        state, metrics = step(state, parallel.shard_batch(sampler.batch(i), mesh))
    after = evaluator.evaluate(state.params, tasks)["predicted"]["mean"]
    chance = 1 / 5
    assert after > before + 0.1, (before, after)
    assert after > 2.5 * chance, after


def test_warm_start_from_a_checkpoint_then_resume_wins(tiny_config, tmp_path):
    """``train.init_from``: a fresh run starts from another run's params (fresh optimiser, step 0);
    once the new run has its own checkpoint, resuming from it takes precedence."""
    from pudnet_jax.checkpoints import RunCheckpoints, restore_hyper_params
    from pudnet_jax.train import initial_train_state

    # stop_after < num_steps: no final eval. num_steps=4 as in the other runs of this file: the
    # learning-rate schedule is compiled into the step, so equal configs share one compiled step.
    config = small_run_config(tiny_config, num_steps=4)
    config.train.eval_every = 0
    train_and_evaluate(config, str(tmp_path / "source"), stop_after=2)
    source, _ = restore_hyper_params(str(tmp_path / "source"), config)

    config.train.init_from = str(tmp_path / "source")
    mesh = parallel.make_mesh()
    state, meta = initial_train_state(config, mesh, RunCheckpoints(str(tmp_path / "warm")))
    assert int(state.step) == 0 and meta["init_from"]["step"] == 2
    chex.assert_trees_all_equal(jax.device_get(state.params), jax.device_get(source))
    fresh = create_train_state(config, jax.random.key(config.seed))
    chex.assert_trees_all_equal(jax.device_get(state.opt_state), jax.device_get(fresh.opt_state))

    train_and_evaluate(config, str(tmp_path / "warm"), stop_after=2)  # step 1 has lr 0 (warm-up)
    resumed, _ = initial_train_state(config, mesh, RunCheckpoints(str(tmp_path / "warm")))
    assert int(resumed.step) == 2
    assert not np.array_equal(np.asarray(jax.tree.leaves(resumed.params)[0]),
                              np.asarray(jax.tree.leaves(source)[0]))


def test_warm_start_from_another_architecture_is_refused(tiny_config, tmp_path):
    from pudnet_jax.checkpoints import ArchitectureMismatchError, RunCheckpoints, export_predictor
    from pudnet_jax.predict import init_hyper_params
    from pudnet_jax.train import initial_train_state

    config = small_run_config(tiny_config, num_steps=2)
    # The source is an export (what init_from usually names; restore_hyper_params reads exports
    # and workdirs alike): no training run needed to have one.
    export_predictor(init_hyper_params(config, jax.random.key(0)), config, str(tmp_path / "source"),
                     {"step": 0, "source": "init"})
    config.hyper.hidden_dim = 48
    config.train.init_from = str(tmp_path / "source")
    with pytest.raises(ArchitectureMismatchError):
        initial_train_state(config, parallel.make_mesh(), RunCheckpoints(str(tmp_path / "new")))


def test_evaluate_export_and_benchmark_refuse_a_config_for_another_hypernetwork(tiny_config, tmp_path):
    """--config on a checkpoint whose config.json differs in a field that leaves the shapes alone
    (the encoder's input resolution) would score or export another function: refused, naming
    the field; the checkpoint's own config passes the check."""
    from pudnet_jax import benchmark, checkpoints, run_modes
    from pudnet_jax.predict import init_hyper_params

    config = small_run_config(tiny_config, num_steps=2)
    export = str(tmp_path / "export")
    checkpoints.export_predictor(init_hyper_params(config, jax.random.key(0)), config, export,
                                 {"step": 0, "source": "init"})
    checkpoints.check_config_matches_checkpoint(checkpoints.read_config(export), export)
    other = copy.deepcopy(config)
    other.hyper.encoder_downsample = 2
    calls = {"evaluate": lambda: run_modes.evaluate_workdir(other, export),
             "export": lambda: run_modes.export_workdir(other, export, str(tmp_path / "re_export")),
             "benchmark": lambda: benchmark.run_benchmark(other, export, str(tmp_path / "bench"))}
    for name, call in calls.items():
        with pytest.raises(checkpoints.ArchitectureMismatchError,
                           match=r"(?s)hyper\.encoder_downsample: checkpoint 1 vs config 2.*Omit --config"):
            call()
    assert not os.path.exists(tmp_path / "re_export") and not os.path.exists(tmp_path / "bench")


def test_resume_after_a_kill_between_a_best_save_and_the_next_checkpoint(tiny_config, tmp_path,
                                                                          monkeypatch):
    """The run saved best params at step 3 and died before the step-3 checkpoint: it resumes
    from step 2, validates step 3 again, and must be able to save that step's best again (Orbax
    refuses to overwrite a step) instead of failing at every restart."""
    import shutil

    from pudnet_jax import train as train_module
    from pudnet_jax.checkpoints import RunCheckpoints

    calls = []

    class EverImprovingValidator:  # each validation beats the last: a best save at every eval
        def __init__(self, config, evaluator):
            pass

        def __call__(self, params):
            calls.append(1)
            return 0.1 * len(calls)

    monkeypatch.setattr(train_module, "Validator", EverImprovingValidator)
    config = small_run_config(tiny_config, num_steps=4)
    config.train.eval_every = 1
    config.train.checkpoint_every = 2
    workdir = tmp_path / "run"
    train_and_evaluate(config, str(workdir), stop_after=3)
    ckpt = RunCheckpoints(str(workdir), read_only=True)
    assert ckpt.best.all_steps() == [3] and ckpt.latest.all_steps() == [2, 3]
    ckpt.close()
    shutil.rmtree(workdir / "checkpoints" / "3")  # killed after the best save at step 3

    train_and_evaluate(config, str(workdir), stop_after=3)  # failed with StepAlreadyExistsError
    ckpt = RunCheckpoints(str(workdir), read_only=True)
    assert ckpt.best.all_steps() == [3] and ckpt.latest.all_steps() == [2, 3]
    ckpt.close()
    results = train_and_evaluate(config, str(workdir))
    assert results["hyper_params_from"]["step"] == 4
    assert results["hyper_params_from"]["best_val_accuracy"] == pytest.approx(0.5)  # 5th validation


def test_the_final_evaluation_scores_the_best_meta_val_step(tiny_config, tmp_path, monkeypatch):
    """Meta-val scores 0.3, 0.9, 0.5, 0.4 at steps 1-4: the best params are step 2's train
    state (not the last one's, nor a later step's written under the best's name), and
    results.json scores those params on the fixed unseen tasks."""
    from pudnet_jax import train as train_module
    from pudnet_jax.checkpoints import restore_hyper_params
    from pudnet_jax.evaluate import TaskEvaluator
    from pudnet_jax.train import make_test_tasks

    scores = iter([0.3, 0.9, 0.5, 0.4])

    class ScriptedValidator:
        def __init__(self, config, evaluator):
            pass

        def __call__(self, params):
            return next(scores)

    monkeypatch.setattr(train_module, "Validator", ScriptedValidator)
    config = small_run_config(tiny_config, num_steps=4)
    config.train.eval_every = config.train.checkpoint_every = 1
    config.train.keep_checkpoints = 4
    config.train.learning_rate = 1e-2  # the four steps' params must differ
    results = train_and_evaluate(config, str(tmp_path))
    assert results["hyper_params_from"]["step"] == 2
    assert results["hyper_params_from"]["best_val_accuracy"] == pytest.approx(0.9)
    best, _ = restore_hyper_params(str(tmp_path), config)
    chex.assert_trees_all_equal(best, restore_hyper_params(str(tmp_path), config, step=2)[0])
    last, _ = restore_hyper_params(str(tmp_path), config, step=4)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(last)))
    rescored = TaskEvaluator(config).evaluate(best, make_test_tasks(config))
    assert results["evaluation"]["per_task_predicted"] == rescored["per_task_predicted"]
