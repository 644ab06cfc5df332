"""Meta-training's auxiliary objectives: the source loss (a head classifying source classes
from the predicted backbone's features: its gradient paths, its mean over labelled images, its
warm-up ramp) and the cross-source lookahead step. Split from test_train so that the two files
run on different workers under pytest-xdist (these tests are compile-heavy)."""

import copy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _run_config import small_run_config
from pudnet_jax import parallel
from pudnet_jax.train import make_sampler
from pudnet_jax.train_step import (create_train_state, jit_train_step, make_grad_fn, make_optimizer,
                                   make_train_step)


def test_source_loss_reaches_the_hypernetwork_trains_its_head_and_ramps_in(tiny_config):
    """train.source_loss_weight > 0: the head's cross-entropy on the predicted backbone's query
    features changes the hypernetwork's gradient (it flows through the predicted parameters),
    the head gets a gradient of its own, and without a head the loss is the episodic one.
    train.source_head_warmup_steps: at gradient scale 0 the hypernetwork's gradient is the
    episodic one (the source loss cannot reach it) while the head's gradient is unchanged; the
    train step ramps the scale linearly with the step, and its steps lower the source loss on a
    repeated batch. (One test: the compiles, not the checks, are what cost.)"""
    from pudnet_jax import source_head

    config = small_run_config(tiny_config)
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
    config = small_run_config(tiny_config)
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
    # Where the odd tasks are scored: 100 optimiser updates along the even tasks' gradient from
    # the parameters (not against it, not along the odd tasks' own gradient).
    _, even_grads = grad_fn(state.params, jax.tree.map(lambda x: x[0::2], batch))
    updates, _ = make_optimizer(config).update(even_grads, state.opt_state, state.params)
    ahead = jax.tree.map(lambda p, u: p + 100.0 * u, state.params, updates)
    (ahead_loss, _), _ = grad_fn(ahead, jax.tree.map(lambda x: x[1::2], batch))
    np.testing.assert_allclose(far_metrics["lookahead_loss"], ahead_loss, rtol=1e-3)  # measured 2e-5
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
    intra = small_run_config(tiny_config)
    intra.train.lookahead_scale = 10.0
    with pytest.raises(ValueError, match="one \\(omniglot\\)"):
        make_sampler(intra)
    with pytest.raises(ValueError, match="needs train.lookahead_scale > 0"):
        jax.eval_shape(make_train_step(plain_config), state, batch, 1.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        jax.jit(make_train_step(config, parallel.make_mesh(jax.devices()))).lower(state, batch)
