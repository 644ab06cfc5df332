"""Meta-training: the ``train_and_evaluate`` loop around the pure step of ``pudnet_jax.train_step``.

The loop samples batches of tasks on the host (a pure function of ``(seed, step)``, so a resumed
run sees exactly the batches an uninterrupted run saw), runs the jitted step on the device mesh,
validates, keeps the best and the latest checkpoints, and ends with the final evaluation on the
held-out tasks. A SIGTERM stops it after the current step with a checkpoint written.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from pudnet_jax import checkpoints, data, distributed, parallel, source_head
from pudnet_jax.evaluate import TaskEvaluator
from pudnet_jax.hypernet import build_hypernet
from pudnet_jax.metrics import MetricsWriter, machine_description, plot_curves
from pudnet_jax.train_step import create_train_state, jit_train_step, make_loss_fn
from pudnet_jax.validation import positive_int


def prepare_kwargs(config) -> dict:
    """The data-loading arguments every dataset preparation takes from the config (where the
    ``.npz`` files and the cache live, the target's image size and channel count)."""
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


def check_run_config(config) -> None:
    """Refuses, before any work, the training settings that would otherwise fail late (at the
    first checkpoint or the final evaluation, hours in) or run silently wrong (a negative step
    count or learning rate)."""
    t = config.train
    for field in ("log_every", "checkpoint_every"):  # eval_every=0 means "never"; these may not
        if int(t[field]) < 1:
            raise ValueError(f"train.{field} must be at least 1 (steps); got {t[field]}.")
    if int(t.num_steps) < 0 or int(t.eval_every) < 0:
        raise ValueError(f"train.num_steps and train.eval_every must be >= 0; got {t.num_steps} and {t.eval_every}.")
    if not float(t.learning_rate) > 0:
        raise ValueError(f"train.learning_rate must be positive; got {t.learning_rate}.")
    if config.data.setting == "intra":
        positive_int("data.num_eval_tasks", config.data.num_eval_tasks)
    build_hypernet(config)  # the model and hyper fields (sizes, counts)


def make_test_tasks(config):
    """The fixed evaluation tasks of the protocol (unseen classes / the unseen dataset)."""
    d = config.data
    if d.setting == "intra":
        positive_int("data.num_eval_tasks", d.num_eval_tasks)
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
    check_run_config(config)
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
