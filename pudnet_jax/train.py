"""Meta-training: the pure train step and the ``train_and_evaluate`` loop.

One step takes a batch of tasks. For each task the hypernetwork predicts the target's variables
from the support set; the target, run with those variables, classifies the query set; the query
cross-entropy is back-propagated through the predicted parameters into the hypernetwork. Tasks are
split over the mesh axis ``'data'``; params and optimiser state are replicated.

The step takes no PRNG key on purpose: all randomness (task sampling, augmentation) happens on the
host as a pure function of ``(seed, step)``, so a resumed run sees exactly the batches an
uninterrupted run saw and ends with bitwise-identical parameters.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from pudnet_jax import checkpoints, data, distributed, parallel, source_head
from pudnet_jax.evaluate import TaskEvaluator
from pudnet_jax.metrics import MetricsWriter, plot_curves
from pudnet_jax.models import get_target
from pudnet_jax.hypernet import target_specs
from pudnet_jax.predict import init_hyper_params, make_predict_fn


@flax.struct.dataclass
class TrainState:
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
    """``train_step`` compiled for the mesh: tasks sharded, state replicated and donated."""
    replicated = parallel.replicated(mesh)
    return jax.jit(make_train_step(config, mesh),
                   in_shardings=(replicated, parallel.data_sharded(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


def prepare_kwargs(config) -> dict:
    return {"data_dir": config.data_dir or None, "cache_dir": config.cache_dir or None,
            "image_size": config.model.image_size, "channels": config.model.channels}


def validation_dataset(config) -> str:
    """``data.validation_dataset`` checked ('' when unset): an inter source, not the held-out one
    (leave-one-source-out validation; see configs/common.py). ``data.meta_train_pools`` refuses
    an exclusion that leaves no source to meta-train on."""
    d = config.data
    name = str(d.get("validation_dataset", "") or "")
    if not name:
        return ""
    if d.setting != "inter":
        raise ValueError(f"data.validation_dataset={name!r} is for the inter setting (an intra run "
                         "validates on its own meta-val classes); unset it.")
    sources = data.inter_split(d.held_out).sources
    if name not in sources:
        raise ValueError(f"data.validation_dataset={name!r} must be one of the sources {list(sources)} "
                         f"(the held-out {d.held_out!r} stays unseen until the final evaluation).")
    return name


def source_dataset_tasks(config, dataset: str, num_tasks: int, first_seed: int) -> list:
    """``num_tasks`` whole-dataset tasks of the inter source ``dataset``, built as the held-out
    dataset's evaluation task (``data.predict_shots`` train images per class given to predict,
    scored on its test split), each with its own predict sample (task seeds ``first_seed``,
    ``first_seed + 1``, ...)."""
    return [task for seed in range(first_seed, first_seed + num_tasks)
            for task in data.make_eval_tasks("inter", dataset, predict_shots=config.data.predict_shots,
                                             seed=seed, **prepare_kwargs(config))]


def make_sampler(config, process_share: bool = True) -> data.TaskSampler:
    """The meta-training sampler. With several processes, each samples only its own tasks.

    The global batch of step s is tasks ``0..T-1`` of one stream (seed ``config.seed * 1000``);
    process p makes tasks ``[p*T/P, (p+1)*T/P)`` of it, the ones its devices hold in the mesh
    (``jax.devices()`` lists devices process by process). So the tasks of a step, and the trained
    parameters, do not depend on how many processes share the work.
    """
    d = config.data
    dataset = d.dataset if d.setting == "intra" else d.held_out
    left_out = validation_dataset(config)
    pools = data.meta_train_pools(d.setting, dataset, split_seed=d.split_seed,
                                  rotations=d.get("class_rotations", 1),
                                  exclude=(left_out,) if left_out else (), **prepare_kwargs(config))
    max_way = d.get("train_way", 0) or d.way
    if max_way > config.model.num_classes:
        raise ValueError(f"meta-training tasks are {max_way}-way (data.train_way / data.way) but "
                         f"model.num_classes is {config.model.num_classes}; set model.num_classes "
                         f">= {max_way}.")
    way = (d.min_way, max_way) if d.min_way else max_way
    paired = config.train.get("lookahead_scale", 0.0) > 0
    if paired and len(pools) < 2:
        raise ValueError(f"train.lookahead_scale > 0 pairs two meta-training sources per batch; this "
                         f"run has one ({pools[0].name}): use the inter setting with >= 2 sources.")
    offset, tasks = (distributed.process_task_range(d.tasks_per_batch) if process_share
                     else (0, d.tasks_per_batch))
    train_shots = d.get("train_shots", 0)
    return data.TaskSampler(pools, way=way, shots=train_shots or d.shots, queries=d.queries,
                            cap_shots=train_shots > 0, tasks_per_batch=tasks,
                            seed=config.seed * 1000, augment=d.augment, task_offset=offset,
                            cross_source_prob=d.get("cross_source_prob", 0.0),
                            source_labels=source_head.enabled(config),
                            paired_sources=paired,
                            **source_head.sampler_options(config))


class Validator:
    """Meta-val accuracy, used to keep the best checkpoint.

    intra: fixed tasks over the held-out meta-val classes, scored exactly like the protocol
    (predict from the support sample, classify the task's test images).
    inter: fixed sampled tasks from the *test* splits of the source datasets (images never seen in
    meta-training; their classes are); the held-out dataset is never looked at before the final
    evaluation. With ``data.validation_dataset`` (leave-one-source-out), ``num_val_tasks``
    whole-dataset tasks of that source instead, each with its own predict sample (seeds
    ``eval_task_seed + 1, + 2, ...``), scored as the held-out dataset is: a dataset the
    hypernetwork never meta-trained on.
    """

    def __init__(self, config, evaluator: TaskEvaluator):
        d = config.data
        self.evaluator = evaluator
        self.tasks, self.batches = [], []
        left_out = validation_dataset(config)
        if left_out:
            self.tasks = source_dataset_tasks(config, left_out, max(1, d.num_val_tasks),
                                              first_seed=d.eval_task_seed + 1)
        elif d.setting == "intra":
            self.tasks = data.make_eval_tasks(
                "intra", d.dataset, classes="meta_val", num_tasks=d.num_val_tasks, way=d.way,
                predict_shots=d.predict_shots, seed=d.eval_task_seed + 1, split_seed=d.split_seed,
                **prepare_kwargs(config))
        else:
            pools = []
            for source in data.inter_split(d.held_out).sources:
                test = data.prepare(source, "test", **prepare_kwargs(config))
                pools.append(data.ClassPool(test, tuple(test.class_indices)))
            sampler = data.TaskSampler(pools, way=d.way, shots=d.shots, queries=d.queries,
                                       tasks_per_batch=d.tasks_per_batch, seed=10**6 + d.eval_task_seed)
            # Exactly num_val_tasks tasks, one per batch (so the count need not divide by
            # tasks_per_batch); drawn as the sampler's batches of tasks_per_batch, so they are the
            # tasks that earlier runs' meta-val scores were computed on.
            per_batch = d.tasks_per_batch
            count = max(1, d.num_val_tasks)
            self.batches = [jax.tree.map(lambda x, t=t: x[t:t + 1], sampler.batch(i))
                            for i in range(-(-count // per_batch)) for t in range(per_batch)][:count]
            self._loss = jax.jit(make_loss_fn(config))

    def __call__(self, hyper_params) -> float:
        if self.tasks:
            return self.evaluator.evaluate(hyper_params, self.tasks)["predicted"]["mean"]
        return float(np.mean([self._loss(hyper_params, b)[1]["accuracy"] for b in self.batches]))


def make_test_tasks(config):
    """The fixed evaluation tasks of the protocol (unseen classes / the unseen dataset)."""
    d = config.data
    if d.setting == "intra":
        return data.make_eval_tasks("intra", d.dataset, classes="unseen", num_tasks=d.num_eval_tasks,
                                    way=d.way, predict_shots=d.predict_shots, seed=d.eval_task_seed,
                                    split_seed=d.split_seed, **prepare_kwargs(config))
    return data.make_eval_tasks("inter", d.held_out, predict_shots=d.predict_shots,
                                seed=d.eval_task_seed, **prepare_kwargs(config))


class _StopRequest:
    """Turns SIGTERM into a flag the loop checks between steps (then it checkpoints and exits)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _progress(config, start, total):
    if not config.train.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="meta-train", unit="step", dynamic_ncols=True)


def initial_train_state(config, mesh, ckpt: checkpoints.RunCheckpoints):
    """The state a run starts from, replicated on ``mesh``, and its checkpoint metadata.

    In order: the workdir's latest checkpoint (resume: nothing lost); else, if
    ``config.train.init_from`` names an export or a workdir, a fresh state (step 0, fresh
    optimiser) whose hypernetwork params are that checkpoint's (warm start, e.g. to continue
    meta-training a shipped predictor with another task distribution); else a fresh state from
    ``config.seed``. A warm start from another architecture raises ``ArchitectureMismatchError``.
    """
    state = jax.device_put(create_train_state(config, jax.random.key(config.seed)),
                           parallel.replicated(mesh))
    meta = {"best_val_accuracy": -1.0}
    if ckpt.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, meta = ckpt.restore(abstract)
        ckpt.discard_best_after(int(state.step))
        print(f"Resumed from step {int(state.step)} in {ckpt.workdir}")
    elif config.train.init_from:
        params, info = checkpoints.restore_hyper_params(config.train.init_from, config)
        # Adam's moments start at zero whatever the params, so the fresh opt_state fits.
        state = state.replace(params=jax.device_put(params, parallel.replicated(mesh)))
        meta["init_from"] = {"path": os.path.abspath(config.train.init_from), **info}
        print(f"Warm start: hypernetwork params from {config.train.init_from} ({info})")
    return state, meta


def train_and_evaluate(config, workdir: str, stop_after: int | None = None) -> dict:
    """Meta-trains (resuming from ``workdir`` if it holds a checkpoint) and evaluates.

    Args:
      config: see ``configs/common.py``.
      workdir: where config, checkpoints, metrics, plots and results go.
      stop_after: stop (after checkpointing) once this step is reached, as if killed there; used
        by tests of resume. ``None`` runs to ``config.train.num_steps``.

    Returns:
      The final results dict (also written to ``workdir/results.json``), or the last metrics when
      stopped early.
    """
    for field in ("log_every", "checkpoint_every"):  # eval_every=0 means "never"; these may not
        if int(config.train[field]) < 1:
            raise ValueError(f"train.{field} must be at least 1 (steps); got {config.train[field]}.")
    os.makedirs(workdir, exist_ok=True)
    sampler = make_sampler(config)
    if source_head.enabled(config):
        _set_num_source_classes(config, sampler.num_source_classes)
    if jax.process_index() == 0:
        checkpoints.write_config(config, workdir)
    mesh = parallel.make_mesh()
    parallel.check_divisible(config.data.tasks_per_batch, mesh)
    ckpt = checkpoints.RunCheckpoints(workdir, keep=config.train.keep_checkpoints)

    state, meta = initial_train_state(config, mesh, ckpt)
    start = int(state.step)
    num_steps = config.train.num_steps
    last = num_steps if stop_after is None else min(num_steps, stop_after)

    train_step = jit_train_step(config, mesh)
    if jax.process_count() > 1 and start < last:
        # Compile before the first collective, then meet: processes compile at different speeds,
        # and Gloo gives up on a peer that is more than 30 s late to its first all-reduce.
        train_step = train_step.lower(state, parallel.shard_batch(sampler.batch(start), mesh)).compile()
        multihost_utils.sync_global_devices("pudnet_jax: train step compiled")
    evaluator = TaskEvaluator(config)
    validate = Validator(config, evaluator) if config.train.eval_every else None
    writer = MetricsWriter(workdir, resume_step=start, tensorboard=config.train.tensorboard)
    bar = _progress(config, start, num_steps)
    metrics, t_last, step = {}, time.perf_counter(), start
    logged_step = start

    def save(step):
        ckpt.save(step, state, meta)

    with _StopRequest() as stop, sampler.iterate(start, last - start) as batches:
        for batch in batches:
            state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
            step += 1
            metrics = jax.device_get(metrics)
            if not metrics["finite"]:
                ckpt.close()
                raise FloatingPointError(
                    f"Non-finite loss or gradient at step {step} (loss={metrics['loss']}); parameters "
                    f"were not updated and the last good checkpoint in {workdir} is kept.")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                                tasks_s=f"{bar.format_dict['rate'] * config.data.tasks_per_batch:.1f}"
                                if bar.format_dict.get("rate") else "-")
            if step % config.train.log_every == 0 or step == last:
                now = time.perf_counter()
                # Steps since the last write (not log_every: the first window after a resume
                # is shorter).
                steps_done = step - logged_step
                tasks_per_s = steps_done * config.data.tasks_per_batch / max(now - t_last, 1e-9)
                t_last, logged_step = now, step
                writer.write(step, {k: v for k, v in metrics.items() if k != "finite"}
                             | {"tasks_per_second": tasks_per_s})
            if validate and (step % config.train.eval_every == 0 or step == num_steps):
                acc = validate(state.params)
                writer.write(step, {"val_accuracy": acc})
                if acc > meta["best_val_accuracy"]:
                    meta = {**meta, "best_val_accuracy": acc, "best_step": step}
                    ckpt.save_best(step, state.params, meta)
            # Every process must take the same branch (a SIGTERM may reach only some of them).
            stopping = distributed.any_process(stop.requested)
            if step % config.train.checkpoint_every == 0 or step == last or stopping:
                save(step)
            if stopping:
                print(f"SIGTERM: checkpoint saved at step {step}; exiting.")
                break
    if bar is not None:
        bar.close()
    writer.close()
    if step < num_steps:
        ckpt.close()
        return {"stopped_at": step, **{k: float(v) for k, v in metrics.items()}}

    if distributed.is_primary():
        plot_curves(workdir)
    results = final_evaluation(config, workdir, state.params, evaluator, ckpt)
    ckpt.close()
    return results


def _set_num_source_classes(config, count: int) -> None:
    """Records the source head's size in the config (so the saved config.json rebuilds the state)."""
    recorded = int(config.train.num_source_classes)
    if recorded not in (0, count):
        raise ValueError(f"config.train.num_source_classes is {recorded} but the meta-training pools "
                         f"hold {count} classes; leave it 0 (filled in from the pools).")
    config.train.num_source_classes = count


def final_evaluation(config, workdir, last_params, evaluator, ckpt, last_info=None) -> dict:
    """Evaluates the best (meta-val) params on the fixed unseen tasks; writes results.json.

    Without a best checkpoint it scores ``last_params``, recorded in results.json as
    ``last_info`` (default: the last step of the schedule, for the end of a training run).
    """
    params = last_params
    info = last_info or {"step": int(config.train.num_steps), "source": "last"}
    if ckpt.best.latest_step() is not None:
        params, info = checkpoints.restore_hyper_params(workdir, config)
    tasks = make_test_tasks(config)
    result = evaluator.evaluate(params, tasks, with_random_init=True)
    results = {
        "setting": config.data.setting,
        "dataset": config.data.dataset if config.data.setting == "intra" else config.data.held_out,
        "target": config.model.target,
        "hyper_params_from": info,
        "evaluation": result,
        "task_manifest": data.task_manifest(tasks),
        "config": config.to_dict(),
        "machine": machine_description(),
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"Unseen tasks: predicted {result['predicted']['mean']:.4f} ± {result['predicted']['ci95']:.4f}, "
              f"random init {result['random_init']['mean']:.4f}, chance {result['chance']:.4f}")
    return results


def machine_description() -> dict:
    """CPU model / accelerator names, for every results file."""
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    # The CPUs this process may run on (taskset narrows it): XLA sizes its CPU thread pool by it,
    # and the summation order, hence the last float bits of every score, follows (RESULTS.md).
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax_version": jax.__version__}
