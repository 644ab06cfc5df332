"""The pure meta-training step: train state, optimiser, loss, gradients and the step itself.

One step takes a batch of tasks. For each task the hypernetwork predicts the target's variables
from the support set; the target, run with those variables, classifies the query set; the query
cross-entropy is back-propagated through the predicted parameters into the hypernetwork. Tasks are
split over the mesh axis ``'data'``; params and optimiser state are replicated.

The step takes no PRNG key on purpose: all randomness (task sampling, augmentation) happens on the
host as a pure function of ``(seed, step)``, so a resumed run sees exactly the batches an
uninterrupted run saw and ends with bitwise-identical parameters. The loop that drives the step
(sampling, validation, checkpoints) is ``pudnet_jax.train``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from pudnet_jax import parallel, source_head
from pudnet_jax.hypernet import target_specs
from pudnet_jax.models import get_target
from pudnet_jax.predict import init_hyper_params, make_predict_fn


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the config: the step, the hypernetwork's variables
    and their optimiser state (a pytree, so it jits, shards and checkpoints as one value)."""

    step: jax.Array
    params: Any  # hypernetwork variables {'params': ...}
    opt_state: Any
    # The auxiliary source-class head and its Adam state (``pudnet_jax.source_head``); None when
    # train.source_loss_weight is 0. Meta-training only: never exported.
    source_head: Any = None
    source_head_opt_state: Any = None


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, cosine decay to ``end_lr_fraction`` of it."""
    t = config.train
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
        decay_steps=max(t.num_steps, t.warmup_steps + 1), end_value=t.learning_rate * t.end_lr_fraction)


def make_optimizer(config) -> optax.GradientTransformation:
    """The hypernetwork's optimiser: global-norm clipping (``train.grad_clip``), then AdamW on
    ``learning_rate_schedule`` with ``train.weight_decay``."""
    return optax.chain(
        optax.clip_by_global_norm(config.train.grad_clip),
        optax.adamw(learning_rate_schedule(config), weight_decay=config.train.weight_decay),
    )


def create_train_state(config, rng) -> TrainState:
    params = init_hyper_params(config, rng)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=make_optimizer(config).init(params))
    if source_head.enabled(config):
        # fold_in: the hypernetwork's init stays what it is without the head.
        head = source_head.init_source_head(config, jax.random.fold_in(rng, 1))
        state = state.replace(source_head=head, source_head_opt_state=
                              source_head.make_source_head_optimizer(config).init(head))
    return state


def make_loss_fn(config):
    """``loss(hyper_params, batch, head=None) -> (loss, metrics)`` averaged over the batch's tasks.

    With a source ``head`` (``pudnet_jax.source_head``; the batch's query sets then carry
    'source_label'), the loss adds ``train.source_loss_weight`` times the head's cross-entropy on
    the predicted backbone's query features, averaged over every labelled query image of the
    batch (of all devices under a mesh: ``axis_name``), not per task, so tasks with no labelled
    image do not dilute it.

    Tasks are looped over in Python (unrolled), not vmapped: under ``vmap`` every task's convs
    get their own predicted kernels, which XLA lowers to grouped convolutions, 20x slower on CPU
    than T ordinary ones (measured: 7.3 s vs 0.38 s per task for resnet8). ``config.train.task_loop
    = 'vmap'`` selects the batched form for accelerators where grouped convs are fast.
    """
    predict = make_predict_fn(config)
    target = get_target(config.model.target, config.model.num_classes)
    image_shape = (config.model.image_size, config.model.image_size, config.model.channels)
    dense_path = next(s.path[:-1] for s in target_specs(
        config.model.target, config.model.num_classes, image_shape) if s.kind == "dense_kernel")
    source_weight = float(config.train.source_loss_weight)

    standardize = bool(config.train.source_head_standardize)

    def task_loss(hyper_params, task, head, source_grad_scale):
        variables = predict(hyper_params, task["support"])
        query = task["query"]
        mask = query["mask"].astype(jnp.float32)
        if head is None:
            logits = target.apply(variables, query["image"], train=False)
        else:  # the features once, for the task's classifier and the source head
            features = target.apply(variables, query["image"], train=False, features_only=True)
            dense = functools.reduce(lambda tree, key: tree[key], dense_path, variables["params"])
            logits = features @ dense["kernel"] + dense["bias"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, query["label"])
        correct = (jnp.argmax(logits, -1) == query["label"]).astype(jnp.float32)
        n = jnp.maximum(mask.sum(), 1.0)
        loss, accuracy = (ce * mask).sum() / n, (correct * mask).sum() / n
        if head is None:
            return loss, {"accuracy": accuracy}
        sums = source_head.source_head_sums(
            head, source_head.scale_gradient(features, source_grad_scale), query["source_label"],
            query["mask"], standardize=standardize)
        return loss, {"accuracy": accuracy, "source_sums": jnp.stack(sums)}

    def loss_fn(hyper_params, batch, head=None, source_grad_scale=1.0, axis_name=None):
        if head is not None and "source_label" not in batch["query"]:
            raise ValueError("a source head needs query sets with 'source_label' "
                             "(TaskSampler(source_labels=True)).")
        if config.train.task_loop == "vmap":
            losses, metrics = jax.vmap(task_loss, in_axes=(None, 0, None, None))(
                hyper_params, batch, head, source_grad_scale)
        else:
            num_tasks = jax.tree.leaves(batch)[0].shape[0]
            results = [task_loss(hyper_params, jax.tree.map(lambda x: x[i], batch), head,
                                 source_grad_scale) for i in range(num_tasks)]
            losses = jnp.stack([r[0] for r in results])
            metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *[r[1] for r in results])
        loss = losses.mean()
        if head is None:
            return loss, jax.tree.map(jnp.mean, metrics)
        sums = metrics.pop("source_sums").sum(0)  # [ce, correct, count] over the local tasks
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        n = jnp.maximum(sums[2], 1.0)
        source_loss, source_accuracy = sums[0] / n, sums[1] / n
        metrics = {**jax.tree.map(jnp.mean, metrics), "task_loss": loss,
                   "source_loss": source_loss, "source_accuracy": source_accuracy,
                   "source_labelled": sums[2]}
        return loss + source_weight * source_loss, metrics

    return loss_fn


def make_grad_fn(config, mesh=None):
    """``(hyper_params, batch, head=None, source_grad_scale=1.0) -> ((loss, metrics), grads)``,
    averaged over the tasks.

    ``grads`` has the structure of ``hyper_params``, or is ``(hyper_grads, head_grads)`` when a
    source ``head`` is given (``make_loss_fn``). ``source_grad_scale`` multiplies the part of the
    hypernetwork's gradient that comes from the source loss (``source_head.scale_gradient``; the
    head's own gradient is unscaled): the train step ramps it over ``train.source_head_warmup_steps``.

    With a ``mesh``, it runs under ``jax.shard_map``: each device computes the loss on its own
    tasks and the gradients are averaged over the ``'data'`` axis (an all-reduce), so the result
    equals the single-device computation on the whole batch up to float summation order.
    """
    loss_fn = make_loss_fn(config)
    axis = parallel.DATA_AXIS

    def local_grads(trainable, batch, source_grad_scale):
        # The mean over devices goes *inside* the differentiated function: shard_map tracks that
        # params are replicated, so their gradient is summed over devices by the transpose of the
        # implicit broadcast; differentiating the global mean loss makes that sum the right one.
        def global_loss(t):
            loss, aux = loss_fn(t[0], batch, t[1], source_grad_scale,
                                axis_name=None if mesh is None else axis)
            if mesh is None:
                return loss, aux
            return jax.lax.pmean(loss, axis), jax.lax.pmean(aux, axis)

        return jax.value_and_grad(global_loss, has_aux=True)(trainable)

    if mesh is not None:
        local_grads = jax.shard_map(local_grads, mesh=mesh, in_specs=(P(), P(axis), P()),
                                    out_specs=P())

    def grad_fn(hyper_params, batch, head=None, source_grad_scale=1.0):
        value, grads = local_grads((hyper_params, head), batch,
                                   jnp.asarray(source_grad_scale, jnp.float32))
        return value, (grads if head is not None else grads[0])

    return grad_fn


def make_train_step(config, mesh=None):
    """The pure step ``(state, batch) -> (state, metrics)`` (gradients from ``make_grad_fn``).

    With ``train.lookahead_scale > 0`` the gradient is the cross-source lookahead's (see
    ``lookahead_grads`` inside; the sampler then pairs sources, ``make_sampler``). The step then
    also takes an optional third argument, ``lookahead_scale``, that replaces the config's value as
    a traced scalar: one compiled step serves a schedule or a sweep of scales (being traced, it is
    not checked for sign: pass a value >= 0, as the config's is checked). Whether the
    lookahead runs at all is fixed by the config (it changes the computation, so it is static).

    A non-finite loss or gradient leaves the state unchanged and reports ``finite=0``; the loop
    then stops with the step number instead of writing NaN parameters.
    """
    optimizer = make_optimizer(config)
    head_optimizer = source_head.make_source_head_optimizer(config)
    schedule = learning_rate_schedule(config)
    grad_fn = make_grad_fn(config, mesh)

    lookahead = float(config.train.get("lookahead_scale", 0.0))
    if lookahead < 0:
        raise ValueError(f"train.lookahead_scale must be >= 0; got {lookahead}.")
    if lookahead > 0 and source_head.enabled(config):
        raise ValueError("train.lookahead_scale > 0 with a source head (train.source_loss_weight > 0) "
                         "is not implemented; set one of them to 0.")

    def lookahead_grads(state: TrainState, batch, scale):
        """Cross-source lookahead (first-order MLDG, Li et al. 2018): the gradient of the even
        tasks (source A, ``TaskSampler(paired_sources=True)``) at the parameters, and of the odd
        tasks (source B) at the parameters moved ``scale`` optimiser steps along A's
        gradient, averaged. Fit to A that costs B is penalised: to first order the pair's
        gradient adds ``scale x lr x`` the gradient of A's and B's gradient alignment
        (the argument of Fish, Shi et al. 2022). The optimiser state is not advanced by the
        lookahead, only by the real update."""
        num_tasks = jax.tree.leaves(batch)[0].shape[0]
        devices = 1 if mesh is None else mesh.size
        if num_tasks % (2 * devices):
            raise ValueError(f"train.lookahead_scale > 0 splits each batch into two halves of tasks "
                             f"(one source each) sharded over {devices} device(s): "
                             f"data.tasks_per_batch={num_tasks} must be a multiple of {2 * devices}.")
        inner, outer = (jax.tree.map(lambda x: x[half::2], batch) for half in (0, 1))
        (inner_loss, inner_aux), inner_grads = grad_fn(state.params, inner)
        step_updates, _ = optimizer.update(inner_grads, state.opt_state, state.params)
        ahead = jax.tree.map(lambda p, u: p + scale * u, state.params, step_updates)
        (ahead_loss, ahead_aux), ahead_grads = grad_fn(ahead, outer)
        grads = jax.tree.map(lambda a, b: (a + b) / 2, inner_grads, ahead_grads)
        aux = jax.tree.map(lambda a, b: (a + b) / 2, inner_aux, ahead_aux)
        aux = {**aux, "inner_loss": inner_loss, "lookahead_loss": ahead_loss}
        return ((inner_loss + ahead_loss) / 2, aux), grads

    def train_step(state: TrainState, batch, lookahead_scale=None):
        head = state.source_head
        source_grad_scale = source_head.hypernet_gradient_scale(config, state.step)
        if lookahead_scale is not None and lookahead == 0:
            raise ValueError("a lookahead_scale argument needs train.lookahead_scale > 0 in the config "
                             "(the config decides whether the step has a lookahead at all).")
        if lookahead > 0:
            scale = lookahead if lookahead_scale is None else jnp.asarray(lookahead_scale, jnp.float32)
            (loss, aux), grads = lookahead_grads(state, batch, scale)
        else:
            (loss, aux), grads = grad_fn(state.params, batch, head, source_grad_scale)
        head_grads = None
        if head is not None:
            grads, head_grads = grads
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        if head is not None:
            head_updates, head_opt_state = head_optimizer.update(
                head_grads, state.source_head_opt_state, head)
            new_state = new_state.replace(source_head=optax.apply_updates(head, head_updates),
                                          source_head_opt_state=head_opt_state)
            finite = finite & jnp.isfinite(optax.tree.norm(head_grads))
            aux = {**aux, "source_grad_scale": source_grad_scale}
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux,
                   "learning_rate": schedule(state.step), "finite": finite.astype(jnp.float32)}
        return new_state, metrics

    return train_step


def jit_train_step(config, mesh):
    """``train_step`` compiled for the mesh: tasks sharded, state replicated and donated. It takes
    ``(state, batch)`` only: a lookahead runs at the config's scale (the traced third argument is
    for ``make_train_step`` jitted by the caller)."""
    replicated = parallel.replicated(mesh)
    return jax.jit(make_train_step(config, mesh),
                   in_shardings=(replicated, parallel.data_sharded(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
