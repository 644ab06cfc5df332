"""Training baselines (docs/protocol.md): random init, Adam from scratch, fine-tuning, prototypes.

- ``train_from_scratch``: Adam on the target network (train mode, BatchNorm statistics updated),
  test accuracy after every epoch against cumulative *training* wall time. With
  ``init_variables`` the same loop fine-tunes predicted variables (baseline 3).
- ``tune_learning_rate``: picks the from-scratch LR on meta-val tasks (``lr_tuning_tasks``), never
  on the unseen ones.
- ``nearest_prototype_accuracy``: test images classified by the nearest class prototype in the
  hypernetwork's own set-encoder feature space (baseline 4).
- ``solved_readout`` / ``random_backbone_accuracy``: a backbone not produced by the hypernetwork
  (random init; or source-trained, ``launch/source_probe.py``) read out exactly as predict reads
  out a predicted one: BatchNorm statistics and the classifier from the dataset batch. Random
  init read out this way is the zero-shot baseline a predictor must beat to show its backbone
  is worth predicting (random init with its random Dense layer is near chance). Where predict
  computes the first conv from the batch (``hyper.stem_pca_components``), so does this read-out
  (``with_pca_stem``); where predict builds every conv on its input's patch statistics
  (``hyper.data_layers``), the random kernels go through the same construction
  (``with_data_layers``): the comparison then measures what the predicted layers add.
- ``refit_classifier``: the Dense layer re-solved by ridge regression on the network's own
  features over the whole support. Fine-tuning a predictor whose classifier was itself solved
  in closed form (``hyper.classifier=ridge``) can re-solve it after each epoch instead of relying
  on a few hundred Adam steps to move it (baseline 3, second variant).

Batches: every epoch is a fresh ``numpy.random.default_rng(seed)`` permutation of the whole
training set cut into batches of ``batch_size``; the last partial batch is *padded and masked*
(padded rows carry no loss and do not enter the BatchNorm statistics), so every image is used
once per epoch and one compiled step serves every batch of a task.

Clocks: compilation happens before the clock starts (as for ``predict``); the clock covers the
host-side shuffling and gathering, host->device transfers and the steps, and stops after
``block_until_ready``. Test-set evaluation after each epoch is timed separately and is not on the
training clock.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pudnet_jax import data, train
from pudnet_jax.evaluate import accuracy, fixed_shape_chunks, init_target
from pudnet_jax.hypernet import build_hypernet, target_specs
from pudnet_jax.hypernet.data_layers import RESIDUAL_SCALE, forward_with_data_layers, kernel_builder
from pudnet_jax.hypernet.encoder import SetEncoder, class_prototypes
from pudnet_jax.hypernet.head import get_path, replaced_path
from pudnet_jax.hypernet.pudnet import ABSENT_CLASS_BIAS
from pudnet_jax.hypernet.ridge import ridge_classifier
from pudnet_jax.hypernet.stem import pca_stem_kernel
from pudnet_jax.models import get_target

PADDING = "pad+mask"  # how the last partial batch of an epoch is handled (see module docstring)


def _optimizer() -> optax.GradientTransformation:
    # The learning rate lives in the optimiser state (inject_hyperparams), so one compiled step
    # serves every LR of the tuning sweep; the value given here is only a placeholder.
    return optax.inject_hyperparams(optax.adam)(learning_rate=0.0)


def _init_opt_state(params, lr: float):
    return optax.inject_hyperparams(optax.adam)(learning_rate=lr).init(params)


@functools.lru_cache(maxsize=32)
def _jitted_step(target_name: str, num_classes: int):
    target = get_target(target_name, num_classes)
    tx = _optimizer()

    def step(state, images, labels, mask):
        params, batch_stats, opt_state = state

        def loss_fn(p):
            logits, updates = target.apply({"params": p, "batch_stats": batch_stats}, images,
                                           train=True, mask=mask, mutable=["batch_stats"])
            weight = mask.astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return (ce * weight).sum() / jnp.maximum(weight.sum(), 1.0), updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    return jax.jit(step, donate_argnums=0)


_COMPILED: dict = {}


def compiled_train_step(target_name: str, num_classes: int, state, batch_shape: tuple[int, ...]):
    """Ahead-of-time compiled step for one (target, classes, batch shape); compile seconds or 0."""
    key = (target_name, num_classes, tuple(batch_shape),
           tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(state)))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    start = time.perf_counter()
    images = jax.ShapeDtypeStruct(batch_shape, jnp.float32)
    labels = jax.ShapeDtypeStruct(batch_shape[:1], jnp.int32)
    mask = jax.ShapeDtypeStruct(batch_shape[:1], jnp.bool_)
    compiled = _jitted_step(target_name, num_classes).lower(state, images, labels, mask).compile()
    _COMPILED[key] = compiled
    return compiled, time.perf_counter() - start


def train_from_scratch(target_name: str, num_classes: int, images: np.ndarray, labels: np.ndarray,
                       test_images: np.ndarray, test_labels: np.ndarray, *, lr: float, epochs: int,
                       batch_size: int, seed: int, init_variables=None,
                       refit_ridge_lambda: float | None = None) -> dict:
    """Adam on the target; test accuracy after every epoch with cumulative training time.

    Returns a dict whose lists are indexed by epoch, entry 0 being *before* any training (the
    initial variables, at 0 seconds): ``epoch_accuracy``, ``epoch_seconds_cumulative`` and
    ``epoch_train_loss`` (NaN at 0); plus ``variables`` (final), ``eval_seconds`` (total, off the
    clock), ``compile_seconds`` (0 if the step shape was compiled before) and the settings.
    ``init_variables`` (e.g. predicted ones) are copied, never modified.

    With ``refit_ridge_lambda``, after every epoch (and at entry 0) the classifier is also
    re-solved on the whole training set (``refit_classifier``) and scored, without changing the
    training trajectory: ``epoch_accuracy_refit`` and ``epoch_refit_seconds`` (the re-solve's own
    wall time, to add to the training clock of that epoch).
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    n = len(images)
    batch = min(int(batch_size), n)  # a task smaller than one batch is one (unpadded) batch
    steps = math.ceil(n / batch)
    if init_variables is None:
        variables = init_target(target_name, num_classes, images.shape[1:], seed)
    else:
        variables = jax.tree.map(lambda x: jnp.array(x, copy=True), dict(init_variables))
    params, stats = variables["params"], variables["batch_stats"]
    state = (params, stats, _init_opt_state(params, lr))
    step, compile_seconds = compiled_train_step(target_name, num_classes, state,
                                                (batch, *images.shape[1:]))

    def evaluate(state):
        start = time.perf_counter()
        acc = accuracy(target_name, {"params": state[0], "batch_stats": state[1]},
                       test_images, test_labels)
        return acc, time.perf_counter() - start

    def evaluate_refit(state):
        start = time.perf_counter()
        refit = jax.block_until_ready(refit_classifier(
            target_name, {"params": state[0], "batch_stats": state[1]}, images, labels,
            refit_ridge_lambda))
        seconds = time.perf_counter() - start
        result["epoch_refit_seconds"].append(seconds)
        result["epoch_accuracy_refit"].append(accuracy(target_name, refit, test_images, test_labels))

    acc0, eval_seconds = evaluate(state)
    result = {"epoch_accuracy": [acc0], "epoch_seconds_cumulative": [0.0],
              "epoch_train_loss": [float("nan")]}
    if refit_ridge_lambda is not None:
        result.update(epoch_accuracy_refit=[], epoch_refit_seconds=[], refit_ridge_lambda=refit_ridge_lambda)
        evaluate_refit(state)
    rng = np.random.default_rng(seed)
    clock = 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        order = np.concatenate([rng.permutation(n), np.full(steps * batch - n, -1)])
        losses = []
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            valid = idx >= 0
            idx = np.where(valid, idx, 0)
            state, loss = step(state, images[idx], labels[idx], valid)
            losses.append(loss)
        jax.block_until_ready(state)
        clock += time.perf_counter() - start
        acc, seconds = evaluate(state)
        eval_seconds += seconds
        result["epoch_accuracy"].append(acc)
        result["epoch_seconds_cumulative"].append(clock)
        result["epoch_train_loss"].append(float(np.mean(jax.device_get(losses))))
        if refit_ridge_lambda is not None:
            evaluate_refit(state)
    result.update(
        variables={"params": state[0], "batch_stats": state[1]}, eval_seconds=eval_seconds,
        compile_seconds=compile_seconds, lr=float(lr), epochs=int(epochs), batch_size=batch,
        steps_per_epoch=steps, num_train_images=n, padding=PADDING, seed=int(seed),
        from_init="given variables" if init_variables is not None else f"init_target(seed={seed})")
    return result


def tune_learning_rate(target_name: str, tasks, lrs, *, epochs: int, batch_size: int,
                       seed: int, init_fn=None, refit_ridge_lambda: float | None = None) -> dict:
    """Best LR by final-epoch test accuracy averaged over ``tasks`` (meta-val tasks only).

    ``init_fn(task) -> variables`` tunes fine-tuning instead (e.g. of predicted variables).
    Ties go to the first LR in ``lrs``. Returns ``best_lr``, ``lrs``, ``mean_final_accuracy``
    (one per LR), the tasks' names and the training seconds spent. With ``refit_ridge_lambda``
    the same runs also choose the LR of the re-solved variant: ``best_lr_refit`` and
    ``mean_final_accuracy_refit``.
    """
    inits = [init_fn(task) if init_fn else None for task in tasks]
    means, means_refit, seconds = [], [], 0.0
    for lr in lrs:
        finals, finals_refit = [], []
        for i, task in enumerate(tasks):
            r = train_from_scratch(target_name, task.num_classes, task.support_images,
                                   task.support_labels, task.test_images, task.test_labels,
                                   lr=lr, epochs=epochs, batch_size=batch_size, seed=seed + i,
                                   init_variables=inits[i], refit_ridge_lambda=refit_ridge_lambda)
            finals.append(r["epoch_accuracy"][-1])
            if refit_ridge_lambda is not None:
                finals_refit.append(r["epoch_accuracy_refit"][-1])
            seconds += r["epoch_seconds_cumulative"][-1]
        means.append(float(np.mean(finals)))
        if finals_refit:
            means_refit.append(float(np.mean(finals_refit)))
    out = {"best_lr": float(lrs[int(np.argmax(means))]), "lrs": [float(x) for x in lrs],
           "mean_final_accuracy": means, "tasks": [t.name for t in tasks], "epochs": int(epochs),
           "train_seconds": seconds}
    if refit_ridge_lambda is not None:
        out.update(best_lr_refit=float(lrs[int(np.argmax(means_refit))]),
                   mean_final_accuracy_refit=means_refit)
    return out


def lr_tuning_tasks(config, num_tasks: int):
    """Meta-val tasks for the LR sweep; never the unseen classes or the held-out dataset.

    intra: the setting's own meta-val classes (the Validator's tasks). inter: meta-val tasks of a
    source dataset (GTSRB if it is one, else Omniglot); the held-out dataset stays unseen.
    """
    d = config.data
    if d.setting == "intra":
        dataset = d.dataset
    else:
        sources = data.inter_split(d.held_out).sources
        dataset = "gtsrb" if "gtsrb" in sources else "omniglot"
    return data.make_eval_tasks("intra", dataset, classes="meta_val", num_tasks=num_tasks,
                                predict_shots=d.predict_shots, seed=d.eval_task_seed + 1,
                                split_seed=d.split_seed, **train.prepare_kwargs(config))


@functools.lru_cache(maxsize=16)
def _encoder_fn(widths: tuple[int, ...], feature_dim: int, sketch_dim: int, downsample: int,
                num_classes: int):
    encoder = SetEncoder(widths, feature_dim, sketch_dim, downsample)
    return jax.jit(lambda p, x, y, m: encoder.apply(p, x, y, m, num_classes))


def nearest_prototype_accuracy(config, hyper_params, task, chunk: int = 500) -> float:
    """Baseline 4: nearest class prototype (squared Euclidean) in the hypernetwork's encoder space.

    Prototypes are the set encoder's class means over the task's predict sample (exactly what
    ``predict`` sees); test images are embedded by the same encoder (its per-image features do
    not depend on labels or on the other images). The encoder is the hypernetwork's ``encoder``
    submodule, applied on its own parameter subtree.
    """
    k = task.num_classes
    hypernet = build_hypernet(config, k)
    fn = _encoder_fn(tuple(hypernet.encoder_widths), hypernet.feature_dim, hypernet.sketch_dim,
                     hypernet.encoder_downsample, k)
    params = {"params": hyper_params["params"]["encoder"]}
    batch = task.dataset_batch()
    _, prototypes, counts, _ = fn(params, batch["image"], batch["label"], batch["mask"])
    test_x, test_y = task.test_images, task.test_labels
    correct = 0
    for start, n, x in fixed_shape_chunks(test_x, chunk):
        size = len(x)
        features = fn(params, x, np.zeros(size, np.int32), np.ones(size, bool))[0]
        dist = jnp.sum((features[:, None, :] - prototypes[None]) ** 2, -1)
        dist = jnp.where(counts[None] > 0, dist, jnp.inf)
        correct += int((np.asarray(jnp.argmin(dist, -1))[:n] == test_y[start:start + n]).sum())
    return correct / len(test_x)


@functools.lru_cache(maxsize=16)
def _features_fn(target_name: str, num_classes: int):
    target = get_target(target_name, num_classes)
    return jax.jit(lambda variables, x: target.apply(variables, x, train=False, features_only=True))


_solve_ridge = jax.jit(ridge_classifier, static_argnums=(3, 4))


def refit_classifier(target_name: str, variables, images: np.ndarray, labels: np.ndarray,
                     ridge_lambda: float, chunk: int = 500):
    """``variables`` with the Dense layer re-solved by ridge regression on ``images``.

    The features are the network's own penultimate ones in inference mode (running BatchNorm
    statistics), computed in fixed-shape chunks; the solve is ``hypernet.ridge.ridge_classifier``,
    the one predict uses, on every image given. Logits come out on the regression's scale
    (one-hot targets, about 0..1): the argmax, hence accuracy, is what this is for. Returns new
    variables; the input is not modified.
    """
    num_classes = int(variables["params"]["Dense_0"]["bias"].shape[0])
    features_fn = _features_fn(target_name, num_classes)
    features = jnp.concatenate([features_fn(variables, x)[:n] for _, n, x in
                                fixed_shape_chunks(np.asarray(images, np.float32), chunk)])
    kernel, bias = _solve_ridge(features, jnp.asarray(labels, jnp.int32),
                                jnp.ones(len(labels), bool), num_classes, float(ridge_lambda))
    params = {**variables["params"], "Dense_0": {"kernel": kernel, "bias": bias}}
    return {**variables, "params": params}


@functools.lru_cache(maxsize=16)
def _readout_fn(target_name: str, num_classes: int, classifier: str, ridge_lambda: float):
    stats_target = get_target(target_name, num_classes, bn_momentum=0.0)

    def readout(params, batch_stats, images, labels, mask):
        features, updates = stats_target.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mask=mask,
            features_only=True, mutable=["batch_stats"])
        means, counts = class_prototypes(features, labels, mask, num_classes)
        if classifier == "ridge":
            kernel, bias = ridge_classifier(features, labels, mask, num_classes, ridge_lambda)
        else:  # ProtoNet as a Dense layer (the positive temperature does not change the argmax)
            kernel, bias = 2.0 * means.T, -jnp.sum(means**2, axis=-1)
        bias = jnp.where(counts > 0, bias, ABSENT_CLASS_BIAS)
        params = {**params, "Dense_0": {"kernel": kernel, "bias": bias}}
        return {"params": params, "batch_stats": updates["batch_stats"]}

    return jax.jit(readout)


def solved_readout(target_name: str, backbone, batch, classifier: str, ridge_lambda: float):
    """``backbone`` with BatchNorm statistics and Dense layer computed from ``batch``, as predict does.

    ``PudNet`` fills a predicted network's ``batch_stats`` by one momentum-0, masked pass over
    the dataset batch and solves its Dense layer from that pass's penultimate features
    ('ridge' or 'prototype'). This applies the same read-out to any backbone (its own Dense
    layer and statistics are replaced), so a backbone that did not come from the hypernetwork
    is compared on equal terms. ``batch``: the dataset batch (``image``, ``label``, ``mask``);
    the class count is taken from ``backbone``'s Dense layer.
    """
    if classifier not in ("ridge", "prototype"):
        raise ValueError(f"solved_readout needs classifier 'ridge' or 'prototype'; got {classifier!r}.")
    num_classes = int(backbone["params"]["Dense_0"]["bias"].shape[0])
    fn = _readout_fn(target_name, num_classes, classifier, float(ridge_lambda))
    return fn(backbone["params"], backbone["batch_stats"], jnp.asarray(batch["image"], jnp.float32),
              jnp.asarray(batch["label"], jnp.int32), jnp.asarray(batch["mask"], bool))


def with_pca_stem(target_name: str, variables, batch, num_components: int):
    """``variables`` with the first conv's first ``2 m`` filters computed from ``batch`` as predict
    computes them under ``hyper.stem_pca_components=m`` (``hypernet.stem``); the input is not
    modified."""
    num_classes = int(variables["params"]["Dense_0"]["bias"].shape[0])
    image_shape = tuple(int(d) for d in np.shape(batch["image"])[1:])
    path = next(s for s in target_specs(target_name, num_classes, image_shape) if s.kind == "conv").path
    kernel = pca_stem_kernel(jnp.asarray(batch["image"], jnp.float32), jnp.asarray(batch["mask"], bool),
                             get_path(variables["params"], path), int(num_components))
    return {**variables, "params": replaced_path(variables["params"], path, kernel)}


@functools.lru_cache(maxsize=16)
def _data_layers_fn(target_name: str, num_classes: int, mode: str, patch_stride: int,
                    residual_scale: float, normalized_residual: bool):
    stats_target = get_target(target_name, num_classes, bn_momentum=0.0)

    def build(variables, images, labels, mask):
        build_kernel = kernel_builder(mode, patch_stride, residual_scale, labels, num_classes,
                                      normalized_residual)
        params, _, _ = forward_with_data_layers(build_kernel, stats_target, variables, images, mask)
        return {**variables, "params": params}

    return jax.jit(build)


def with_data_layers(target_name: str, variables, batch, mode: str, patch_stride: int = 1,
                     residual_scale: float = RESIDUAL_SCALE, normalized_residual: bool = False):
    """``variables`` with every conv kernel taken as the head's ``H`` and rebuilt on ``batch`` as
    predict builds it under ``hyper.data_layers=mode`` (``hypernet.data_layers``); the input is
    not modified (its BatchNorm parameters are kept; a read-out recomputes the statistics)."""
    num_classes = int(variables["params"]["Dense_0"]["bias"].shape[0])
    return _data_layers_fn(target_name, num_classes, mode, int(patch_stride), float(residual_scale),
                           bool(normalized_residual))(
        variables, jnp.asarray(batch["image"], jnp.float32), jnp.asarray(batch["label"], jnp.int32),
        jnp.asarray(batch["mask"], bool))


def random_backbone_accuracy(config, task, seed: int) -> float | None:
    """Test accuracy of a randomly initialised target read out like a predicted one (with the
    data-derived first layer or data-derived layers too, where predict has them).

    None for the 'generated' classifier (its Dense layer comes from learned maps, not a solve).
    """
    classifier = config.hyper.classifier
    if classifier == "generated":
        return None
    target_name = config.model.target
    batch = task.dataset_batch()
    backbone = init_target(target_name, task.num_classes, task.test_images.shape[1:], seed)
    if config.hyper.stem_pca_components:
        backbone = with_pca_stem(target_name, backbone, batch, config.hyper.stem_pca_components)
    if config.hyper.data_layers != "none":
        backbone = with_data_layers(target_name, backbone, batch, config.hyper.data_layers,
                                    config.hyper.data_layers_patch_stride,
                                    config.hyper.data_layers_residual_scale,
                                    config.hyper.data_layers_normalized_residual)
    variables = solved_readout(target_name, backbone, batch, classifier, config.hyper.ridge_lambda)
    return accuracy(target_name, variables, task.test_images, task.test_labels)
