"""Meta-training: a real run end to end, multi-device equivalence, exact resume, no retracing,
and learning that actually happens on real data."""

import copy
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pudnet_jax import parallel
from pudnet_jax.train import make_sampler, train_and_evaluate
from pudnet_jax.train_step import create_train_state, jit_train_step, make_grad_fn, make_train_step


def _small_run_config(tiny_config, num_steps=4):
    c = tiny_config
    c.data.dataset = "omniglot"
    c.data.way = 5
    c.model.num_classes = 5
    c.data.shots = 2
    c.data.queries = 2
    c.data.tasks_per_batch = 4  # one task per fake device
    c.data.num_val_tasks = 2
    c.data.num_eval_tasks = 3
    c.data.predict_shots = 5
    c.train.num_steps = num_steps
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.train.progress_bar = False
    return c


def test_train_and_evaluate_writes_checkpoint_metrics_plot_and_results(tiny_config, tmp_path):
    config = _small_run_config(tiny_config)
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
    config = _small_run_config(tiny_config)
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


def test_source_loss_reaches_the_hypernetwork_trains_its_head_and_ramps_in(tiny_config):
    """train.source_loss_weight > 0: the head's cross-entropy on the predicted backbone's query
    features changes the hypernetwork's gradient (it flows through the predicted parameters),
    the head gets a gradient of its own, and without a head the loss is the episodic one.
    train.source_head_warmup_steps: at gradient scale 0 the hypernetwork's gradient is the
    episodic one (the source loss cannot reach it) while the head's gradient is unchanged; the
    train step ramps the scale linearly with the step, and its steps lower the source loss on a
    repeated batch. (One test: the compiles, not the checks, are what cost.)"""
    from pudnet_jax import source_head

    config = _small_run_config(tiny_config)
    config.data.tasks_per_batch = 1  # no mesh here: one task keeps the compiles short
    config.train.source_loss_weight = 1.0
    config.train.source_head_standardize = True
    sampler = make_sampler(config)
    config.train.num_source_classes = sampler.num_source_classes
    batch = jax.tree.map(np.asarray, sampler.batch(0))
    assert batch["query"]["source_label"].max() < sampler.num_source_classes
    state = create_train_state(config, jax.random.key(0))
    grad_fn = jax.jit(make_grad_fn(config))
    (loss, metrics), (hyper1, head1) = grad_fn(state.params, batch, state.source_head, 1.0)
    (loss0, _), (hyper0, head0) = grad_fn(state.params, batch, state.source_head, 0.0)
    (plain_loss, _), plain = grad_fn(state.params, batch)
    np.testing.assert_allclose(metrics["task_loss"], plain_loss, rtol=1e-5)
    np.testing.assert_allclose(loss, plain_loss + metrics["source_loss"], rtol=1e-5)
    np.testing.assert_allclose(loss0, loss, rtol=1e-6)  # the scale leaves the forward pass alone
    assert metrics["source_loss"] > 0.5 * np.log(sampler.num_source_classes)  # untrained head
    assert float(optax.tree.norm(head1)) > 0
    for a, b in zip(jax.tree.leaves(head0), jax.tree.leaves(head1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    norm = float(optax.tree.norm(plain))
    gap0 = float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, hyper0, plain)))
    gap1 = float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, hyper1, plain)))
    assert gap0 < 1e-4 * norm and gap1 > 1e-3 * norm, (gap0, gap1, norm)
    with pytest.raises(ValueError, match="source_label"):
        unlabelled = {**batch, "query": {k: v for k, v in batch["query"].items() if k != "source_label"}}
        grad_fn(state.params, unlabelled, state.source_head)

    assert float(source_head.hypernet_gradient_scale(config, 0)) == 1.0  # no warm-up
    config.train.source_head_warmup_steps = 4
    scales = [float(source_head.hypernet_gradient_scale(config, s)) for s in (0, 2, 4, 9)]
    assert scales == [0.0, 0.5, 1.0, 1.0]
    # Train steps on a repeated batch, the scale ramping 0, 0.25, 0.5, 0.75: the head and the
    # features learn, so the source loss falls.
    config.train.source_head_learning_rate = 1e-2
    step = jax.jit(make_train_step(config))
    losses, grad_scales = [], []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["source_loss"]))
        grad_scales.append(float(metrics["source_grad_scale"]))
    assert grad_scales == [0.0, 0.25, 0.5, 0.75]
    assert losses[-1] < losses[0], losses


def test_source_loss_is_a_mean_over_the_labelled_images_of_the_whole_batch(tiny_config):
    """Tasks with no source-labelled image (an Omniglot task when the head leaves Omniglot out)
    neither dilute the source loss nor move it: a batch of 4 tasks, 2 of them unlabelled, has
    the labelled count of the 2 labelled tasks and the source loss and accuracy of a batch that
    holds those 2 tasks twice, all labelled (the same mean; same shapes, so one compile serves
    both); on a 4-device mesh (one task per device, so two devices hold no labelled image) loss,
    metrics and gradients equal the single-device ones."""
    config = _small_run_config(tiny_config)
    config.train.source_loss_weight = 1.0
    config.train.source_head_standardize = True
    sampler = make_sampler(config)
    config.train.num_source_classes = sampler.num_source_classes
    batch = jax.tree.map(np.asarray, sampler.batch(0))
    labels = batch["query"]["source_label"].copy()
    labels[[1, 3]] = -1
    batch["query"]["source_label"] = labels
    # Tasks 0 and 2 twice, every image labelled: the mean over its labelled images is the mean
    # over tasks 0 and 2 alone (a loss that counted unlabelled images or tasks would halve).
    labelled_twice = jax.tree.map(lambda x: x[[0, 2, 0, 2]], batch)
    state = create_train_state(config, jax.random.key(0))
    params, head = state.params, state.source_head
    grad_fn = jax.jit(make_grad_fn(config))
    (loss, metrics), grads_1 = grad_fn(params, batch, head)
    (_, metrics_2), _ = grad_fn(params, labelled_twice, head)
    expected = int((batch["query"]["mask"] & (labels >= 0)).sum())
    assert int(metrics["source_labelled"]) == expected > 0
    assert int(metrics_2["source_labelled"]) == 2 * expected
    np.testing.assert_allclose(metrics["source_loss"], metrics_2["source_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["source_accuracy"], metrics_2["source_accuracy"])
    np.testing.assert_allclose(loss, metrics["task_loss"] + metrics["source_loss"], rtol=1e-5)

    mesh = parallel.make_mesh(jax.devices())
    sharded = jax.jit(make_grad_fn(config, mesh))
    (loss_4, metrics_4), grads_4 = jax.device_get(sharded(
        jax.device_put(params, parallel.replicated(mesh)), parallel.shard_batch(batch, mesh),
        jax.device_put(head, parallel.replicated(mesh))))
    np.testing.assert_allclose(loss_4, loss, rtol=1e-5)
    np.testing.assert_allclose(metrics_4["source_loss"], metrics["source_loss"], rtol=1e-5)
    assert int(metrics_4["source_labelled"]) == expected
    for part_1, part_4 in zip(grads_1, grads_4):  # hypernetwork, then head
        flat_1, flat_4 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
                          for g in (part_1, part_4))
        assert np.linalg.norm(flat_1 - flat_4) < 2e-3 * np.linalg.norm(flat_1)


def test_source_head_loss_ignores_images_without_a_source_label():
    """Rows labelled -1 (no source label: another pool, or a rotated copy) and masked rows change
    neither the loss nor the accuracy: the result is that of the labelled rows alone."""
    from pudnet_jax import source_head

    rng = np.random.default_rng(0)
    head = {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "bias": jnp.zeros(5)}
    features = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    labels = jnp.array([0, 3, -1, 4, -1, 2, 1, 0])
    mask = jnp.array([True, True, True, True, True, True, False, False])
    loss, accuracy = source_head.source_head_loss(head, features, labels, mask)
    keep = np.array([0, 1, 3, 5])
    ref_loss, ref_accuracy = source_head.source_head_loss(head, features[keep], labels[keep],
                                                          jnp.ones(4, bool))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(accuracy, ref_accuracy)
    assert np.isfinite(float(loss))


def test_standardized_source_head_ignores_the_feature_scale_and_unlabelled_rows():
    """train.source_head_standardize: the head reads features centred and divided by one RMS
    over the labelled rows, so scaling or shifting a task's features changes nothing, while the
    raw head does see the scale; unlabelled rows do not move the statistics."""
    from pudnet_jax import source_head

    rng = np.random.default_rng(1)
    head = {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}
    features = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    labels = jnp.array([0, 3, -1, 4, 2, 2, 1, 0])
    mask = jnp.array([True, True, True, True, True, True, True, False])
    loss = source_head.source_head_loss(head, features, labels, mask, standardize=True)[0]
    moved = source_head.source_head_loss(head, 7.0 * features + 3.0, labels, mask, standardize=True)[0]
    np.testing.assert_allclose(moved, loss, rtol=1e-5)
    raw = source_head.source_head_loss(head, features, labels, mask)[0]
    raw_moved = source_head.source_head_loss(head, 7.0 * features + 3.0, labels, mask)[0]
    assert abs(float(raw_moved) - float(raw)) > 0.1
    # Rows 2 (no source label) and 7 (masked) may hold anything.
    junk = features.at[2].set(1e3).at[7].set(-1e3)
    np.testing.assert_allclose(
        source_head.source_head_loss(head, junk, labels, mask, standardize=True)[0], loss, rtol=1e-5)
    standardized = source_head.standardize_features(features, jnp.ones(8))
    np.testing.assert_allclose(np.asarray(standardized).mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(standardized) ** 2)), 1.0, rtol=1e-4)


def test_train_way_widens_meta_training_tasks_only(tiny_config):
    """data.train_way: 8-way meta-training tasks; meta-val and test tasks stay data.way."""
    from pudnet_jax.train import Validator, make_test_tasks
    from pudnet_jax.evaluate import TaskEvaluator

    config = _small_run_config(tiny_config)
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
    params = create_train_state(config, jax.random.key(0)).params
    accuracy = validator(params)
    assert 0.0 <= accuracy <= 1.0

    for name, message in (("cifar10", "must be one of the sources"), ("svhn", "must be one of the sources")):
        config.data.validation_dataset = name
        with pytest.raises(ValueError, match=message):
            make_sampler(config)
    intra = _small_run_config(tiny_config)
    intra.data.validation_dataset = "gtsrb"
    with pytest.raises(ValueError, match="inter setting"):
        Validator(intra, TaskEvaluator(intra))


def test_cross_source_lookahead_step(tiny_config):
    """train.lookahead_scale: the sampler pairs two sources per batch; the step's gradient is the
    mean of the even tasks' gradient at the parameters and the odd tasks' after `scale` optimiser
    steps along the first. At a vanishing scale it is the plain step on the same batch; at a large
    one the odd tasks are scored away from the parameters, and the step on a 2-device mesh equals
    the one-device step. The scale passed as an argument is traced: both scales share one compile.
    A batch that does not split over the mesh, a scale argument without a lookahead in the config,
    or a run with one source, is refused."""
    from configs.inter import get_config

    config = get_config()
    for field in ("encoder_widths", "feature_dim", "sketch_dim", "hidden_dim", "code_rank"):
        config.hyper[field] = tiny_config.hyper[field]
    config.data.way = config.data.min_way = config.model.num_classes = 5
    config.data.shots, config.data.queries, config.data.tasks_per_batch = 2, 2, 4
    config.train.warmup_steps, config.train.num_steps = 1, 10
    config.train.lookahead_scale = 1e-6
    sampler = make_sampler(config)
    names = [name for name, _ in sampler.task_classes(1)]
    assert names[0] == names[2] != names[1] == names[3]
    batch = jax.tree.map(np.asarray, sampler.batch(1))
    plain_config = copy.deepcopy(config)
    plain_config.train.lookahead_scale = 0.0
    plain_step = jax.jit(make_train_step(plain_config))
    state, _ = plain_step(create_train_state(config, jax.random.key(0)), batch)  # lr 0: moments only
    plain, plain_metrics = plain_step(state, batch)
    # The scale as a traced argument: the tiny and the far step below share this one compile
    # (a lookahead step compiles two gradients; compiles are most of this test's time).
    lookahead_step = chex.assert_max_traces(make_train_step(config), n=1)
    lookahead_step = jax.jit(lookahead_step)
    tiny, tiny_metrics = lookahead_step(state, batch, 1e-6)
    # Adam divides by the gradient's size, so a wrong scale shows in grad_norm, not in the params.
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(tiny_metrics[key], plain_metrics[key], rtol=1e-4)
    grad_fn = jax.jit(make_grad_fn(config))
    (even_loss, _), _ = grad_fn(state.params, jax.tree.map(lambda x: x[0::2], batch))
    (odd_loss, _), _ = grad_fn(state.params, jax.tree.map(lambda x: x[1::2], batch))
    np.testing.assert_allclose(tiny_metrics["inner_loss"], even_loss, rtol=1e-5)
    np.testing.assert_allclose(tiny_metrics["lookahead_loss"], odd_loss, rtol=1e-4)
    moved = optax.tree.norm(jax.tree.map(lambda a, b: a - b, plain.params, state.params))
    gap = optax.tree.norm(jax.tree.map(lambda a, b: a - b, tiny.params, plain.params))
    assert moved > 0 and gap < 1e-2 * moved, (gap, moved)  # float noise, amplified by Adam

    far, far_metrics = lookahead_step(state, batch, 100.0)
    assert abs(float(far_metrics["lookahead_loss"]) - float(odd_loss)) > 5e-2 * float(odd_loss)
    np.testing.assert_allclose(far_metrics["loss"], (far_metrics["inner_loss"] + far_metrics["lookahead_loss"]) / 2,
                               rtol=1e-6)
    far_gap = optax.tree.norm(jax.tree.map(lambda a, b: a - b, far.params, plain.params))
    assert far_gap > 1e-2 * moved, (far_gap, moved)

    config.train.lookahead_scale = 100.0  # the config's scale, a closure constant here
    mesh = parallel.make_mesh(jax.devices()[:2])
    sharded, sharded_metrics = jit_train_step(config, mesh)(
        jax.device_put(state, parallel.replicated(mesh)), parallel.shard_batch(batch, mesh))
    np.testing.assert_allclose(sharded_metrics["lookahead_loss"], far_metrics["lookahead_loss"], rtol=5e-3)
    sharded_gap = optax.tree.norm(jax.tree.map(lambda a, b: a - b, jax.device_get(sharded.params), far.params))
    # Float noise through 100 Adam-sized steps: ~1% of what the lookahead itself changes.
    assert sharded_gap < 5e-2 * far_gap, (sharded_gap, far_gap)
    intra = _small_run_config(tiny_config)
    intra.train.lookahead_scale = 10.0
    with pytest.raises(ValueError, match="one \\(omniglot\\)"):
        make_sampler(intra)
    with pytest.raises(ValueError, match="needs train.lookahead_scale > 0"):
        jax.eval_shape(make_train_step(plain_config), state, batch, 1.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        jax.jit(make_train_step(config, parallel.make_mesh(jax.devices()))).lower(state, batch)


def test_interrupted_run_resumes_to_identical_parameters(tiny_config, tmp_path):
    """Killed at step 2 and resumed: the same parameters bit for bit, the source head and every
    optimiser state included (the run trains with the auxiliary source loss, so all of the
    train state is exercised)."""
    config = _small_run_config(tiny_config, num_steps=4)
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


def test_train_step_compiles_once(tiny_config):
    config = _small_run_config(tiny_config)
    mesh = parallel.make_mesh()
    step_fn = chex.assert_max_traces(make_train_step(config, mesh), n=1)
    replicated = parallel.replicated(mesh)
    step = jax.jit(step_fn, in_shardings=(replicated, parallel.data_sharded(mesh)),
                   out_shardings=(replicated, replicated))
    state = jax.device_put(create_train_state(config, jax.random.key(0)), replicated)
    sampler = make_sampler(config)
    for i in range(3):  # different tasks, same shapes: no retrace
        state, _ = step(state, parallel.shard_batch(sampler.batch(i), mesh))


def test_meta_training_learns_on_real_data(tiny_config):
    """A few dozen steps on Omniglot: query accuracy on *held-out* (meta-val) classes rises well
    above its value at initialisation and far above chance, so gradients reach the hypernetwork
    through the predicted parameters."""
    from pudnet_jax.evaluate import TaskEvaluator
    from pudnet_jax import data
    from pudnet_jax.train import prepare_kwargs

    config = _small_run_config(tiny_config, num_steps=40)
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
    config = _small_run_config(tiny_config, num_steps=4)
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

    config = _small_run_config(tiny_config, num_steps=2)
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

    config = _small_run_config(tiny_config, num_steps=2)
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
    config = _small_run_config(tiny_config, num_steps=4)
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
