"""Model selection between predictors on meta-val tasks only, paired.

Which of two exported predictors (e.g. a stage and the stage it warm-started from) should ship?
A training run selects its own best step on its meta-val tasks, but those tasks use the
meta-training shots (GTSRB: 10 images per class), while evaluation gives predict
``data.predict_shots`` (GTSRB: 100). This script scores every predictor on the *same* meta-val
tasks built with the evaluation protocol's predict sample (``baselines.lr_tuning_tasks``, the
tasks the benchmark tunes learning rates on; never the unseen classes or the held-out dataset),
and reports each one's accuracy and its paired difference to the first.

  python launch/compare_predictors.py --checkpoints=OLD,NEW --num_val_tasks=30 \
      --output=results/compare_predictors/intra_gtsrb_resnet8

``--encoder_downsample=1,2`` scores each predictor at each of these ``hyper.encoder_downsample``
factors (same parameters; the set encoder reads images pooled by the factor), and
``--predict_shots`` overrides the predict sample (images per class), so a cheaper operating point
of one predictor is chosen on meta-val too. ``--mirror_support=0,1`` likewise scores each one
without and with ``hyper.mirror_support`` (predict also reads mirrored images), and
``--data_layers_patch_stride=1,2`` at each ``hyper.data_layers_patch_stride`` (predictors with
``hyper.data_layers``: their patch statistics from every s-th position). Each row reports
the median predict time beside the accuracy.

``--source_dataset=fashion_mnist`` (inter predictors only) replaces the meta-val tasks by
``--num_val_tasks`` whole-dataset tasks of that *source* dataset, built like the held-out
dataset's evaluation task (``data.predict_shots`` train images per class, scored on its test
split), each with its own predict sample (task seeds 1, 2, ...). The held-out dataset is refused.
That is the validation signal for a choice that depends on the kind of data, such as mirroring,
which GTSRB's meta-val tasks cannot judge (a mirrored sign is another sign). For predictors
meta-trained with ``data.validation_dataset`` (leave-one-source-out), ``--source_dataset`` set
to that dataset scores them on a dataset they never saw; a predictor that did meta-train on it
is then not comparable (its score measures fit, not transfer).

Writes ``compare.json`` and ``compare.md`` (machine, seed, wall time included).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pudnet_jax import baselines, checkpoints, data, train
from pudnet_jax.evaluate import TaskEvaluator, format_mean_ci, mean_and_ci95
from pudnet_jax.metrics import machine_line, write_report
from pudnet_jax.metrics import machine_description


# hyper fields predict reads at inference without changing the parameter tree: the data-derived
# layers, their patch stride and residual weight, the predicted BatchNorm offsets' weight,
# mirroring, the classifier read-out and its ridge strength. (encoder_downsample also qualifies; it
# has its own flag.)
VARIANT_FIELDS = ("data_layers", "data_layers_patch_stride", "data_layers_residual_scale",
                  "data_layers_normalized_residual", "data_layers_discriminant_eps", "batchnorm_residual_scale",
                  "mirror_support", "classifier", "ridge_lambda", "encoder_downsample")


def parse_variants(text: str | None) -> list[dict] | None:
    """``"none;a=1,b=x"`` -> ``[{}, {"a": "1", "b": "x"}]`` (values cast later, by field type)."""
    if not text:
        return None
    variants = []
    for part in text.split(";"):
        part = part.strip()
        if part in ("", "none"):
            variants.append({})
            continue
        overrides = {}
        for item in part.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().removeprefix("hyper.")
            if not sep or not value.strip():
                raise ValueError(f"--variants: {item!r} is not key=value")
            if key not in VARIANT_FIELDS:
                raise ValueError(f"--variants: hyper.{key} cannot vary between rows of a paired "
                                 f"comparison; allowed: {', '.join(VARIANT_FIELDS)}")
            overrides[key] = value.strip()
        variants.append(overrides)
    return variants


def apply_overrides(config, overrides: dict):
    """A copy of ``config`` with ``hyper`` fields set, each value cast to the field's type (strings
    from the command line included: ``"0"``/``"1"``/``"true"``/``"false"`` for booleans). Only
    ``VARIANT_FIELDS`` may be set: the others change the parameter tree or the data protocol."""
    unknown = sorted(set(overrides) - set(VARIANT_FIELDS))
    if unknown:
        raise ValueError(f"hyper.{unknown[0]} cannot be changed at inference; allowed: {', '.join(VARIANT_FIELDS)}")
    config = copy.deepcopy(config)
    with config.unlocked():
        for key, value in overrides.items():
            current = config.hyper[key]
            if isinstance(current, bool) and isinstance(value, str):
                if value.lower() not in ("0", "1", "true", "false"):
                    raise ValueError(f"--variants: hyper.{key}={value!r} is not a boolean")
                config.hyper[key] = value.lower() in ("1", "true")
            else:
                config.hyper[key] = type(current)(value)
    return config


def _variant(config, predict_shots: int | None, encoder_downsample: int | None,
             mirror_support: bool | None = None, patch_stride: int | None = None):
    settings = {"encoder_downsample": encoder_downsample, "mirror_support": mirror_support,
                "data_layers_patch_stride": patch_stride}
    config = apply_overrides(config, {k: v for k, v in settings.items() if v is not None})
    if predict_shots is not None:
        with config.unlocked():
            config.data.predict_shots = int(predict_shots)
    return config


def source_dataset_tasks(config, dataset: str, num_tasks: int):
    """Whole-dataset tasks of an inter predictor's *source* ``dataset`` (task seeds 1..n)."""
    d = config.data
    if d.setting != "inter":
        raise ValueError(f"--source_dataset needs an inter predictor; this one is {d.setting!r}.")
    sources = data.inter_split(d.held_out).sources
    if dataset not in sources:
        raise ValueError(f"--source_dataset={dataset!r} is not a source of this predictor "
                         f"(sources {list(sources)}; {d.held_out!r} is held out and stays unseen).")
    return train.source_dataset_tasks(config, dataset, num_tasks, first_seed=1)


def compare(paths: list[str], num_val_tasks: int, predict_shots: int | None = None,
            encoder_downsample: list[int] | None = None, mirror_support: list[bool] | None = None,
            source_dataset: str | None = None, patch_strides: list[int] | None = None,
            variants: list[dict] | None = None) -> dict:
    """Per-task meta-val accuracy of each predictor in ``paths`` (at each encoder factor in
    ``encoder_downsample``, each ``mirror_support`` setting, each data-layer patch stride in
    ``patch_strides`` and each set of ``hyper`` overrides in ``variants``, if given) on the first
    one's meta-val tasks (or on tasks of an inter predictor's source dataset, ``source_dataset``)."""
    factors = list(encoder_downsample or [None])
    mirrors = list(mirror_support or [None])
    strides = list(patch_strides or [None])
    overrides = list(variants or [{}])
    if len(paths) * len(factors) * len(mirrors) * len(strides) * len(overrides) < 2:
        raise ValueError(f"need at least two predictors (or variants) to compare, got "
                         f"{paths} x {factors} x {mirrors} x {strides} x {overrides}")
    start = time.perf_counter()
    configs = [_variant(checkpoints.read_config(path), predict_shots, None) for path in paths]
    reference = configs[0]
    # Checked before any evaluation: a mismatch should not surface minutes into the run.
    for path, config in zip(paths[1:], configs[1:]):
        for field in ("setting", "dataset", "held_out", "split_seed"):
            if config.data[field] != reference.data[field]:
                raise ValueError(f"{path}: data.{field}={config.data[field]!r} differs from "
                                 f"{paths[0]}'s {reference.data[field]!r}; their meta-val tasks differ.")
    tasks = (source_dataset_tasks(reference, source_dataset, num_val_tasks) if source_dataset
             else baselines.lr_tuning_tasks(reference, num_val_tasks))
    rows = []
    for path, config in zip(paths, configs):
        params, info = checkpoints.restore_hyper_params(path, config)
        for factor, mirror, stride, override in itertools.product(factors, mirrors, strides, overrides):
            if stride is not None and config.hyper.data_layers == "none":
                raise ValueError(f"--data_layers_patch_stride: {path} has no hyper.data_layers "
                                 "(the stride would change nothing).")
            variant = _variant(apply_overrides(config, override), None, factor, mirror, stride)
            result = TaskEvaluator(variant).evaluate(params, tasks)
            name = path + "".join(f" @ {key}={value}" for key, value in
                                  (("encoder_downsample", factor), ("mirror_support", mirror),
                                   ("data_layers_patch_stride", stride), *override.items())
                                  if value is not None)
            rows.append({"checkpoint": name, "info_step": info.get("step"),
                         "encoder_downsample": int(variant.hyper.encoder_downsample),
                         "mirror_support": bool(variant.hyper.mirror_support),
                         "data_layers_patch_stride": int(variant.hyper.data_layers_patch_stride),
                         "overrides": dict(override),
                         "per_task": result["per_task_predicted"], "predicted": result["predicted"],
                         "predict_seconds_median": result["predict_seconds_median"]})
    base = np.array(rows[0]["per_task"])
    for row in rows:
        row["minus_first"] = mean_and_ci95(list(np.array(row["per_task"]) - base))
    return {"rows": rows, "num_val_tasks": len(tasks), "val_tasks": [t.name for t in tasks],
            "source_dataset": source_dataset,
            "predict_shots": reference.data.predict_shots, "eval_task_seed": reference.data.eval_task_seed,
            "machine": machine_description(), "wall_seconds": time.perf_counter() - start}


def markdown(result: dict) -> str:
    m = result["machine"]
    kind = (f"whole-dataset tasks of the source {result['source_dataset']}"
            if result.get("source_dataset") else "meta-val tasks")
    lines = [f"# Predictors compared on {result['num_val_tasks']} {kind} "
             f"({result['predict_shots']} images per class given to predict)", "",
             f"- Machine: {machine_line(m)}; wall time {result['wall_seconds']:.1f} s; "
             + (f"task seeds 1..{result['num_val_tasks']}" if result.get("source_dataset") else
                f"task seed data.eval_task_seed + 1 = {result['eval_task_seed'] + 1}"), "",
             "| predictor | accuracy % | minus the first (paired) | predict s (median) |",
             "| --- | --- | --- | --- |"]
    for row in result["rows"]:
        seconds = row.get("predict_seconds_median")
        lines.append(f"| `{row['checkpoint']}` | {format_mean_ci(row['predicted'])} | "
                     f"{format_mean_ci(row['minus_first'])} | "
                     f"{'-' if seconds is None else f'{seconds:.4f}'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", required=True, help="comma-separated exports or workdirs")
    parser.add_argument("--num_val_tasks", type=int, default=30)
    parser.add_argument("--output", required=True)
    parser.add_argument("--predict_shots", type=int, default=None,
                        help="images per class given to predict (default: the first config's)")
    parser.add_argument("--encoder_downsample", default=None,
                        help="comma-separated hyper.encoder_downsample factors to score each predictor at")
    parser.add_argument("--mirror_support", default=None,
                        help="comma-separated 0/1: score each predictor without / with hyper.mirror_support")
    parser.add_argument("--data_layers_patch_stride", default=None,
                        help="comma-separated hyper.data_layers_patch_stride values to score each predictor at")
    parser.add_argument("--variants", default=None,
                        help="';'-separated sets of hyper key=value overrides ('none': as saved)")
    parser.add_argument("--source_dataset", default=None,
                        help="inter only: score on whole-dataset tasks of this source dataset instead")
    args = parser.parse_args()
    factors = ([int(f) for f in args.encoder_downsample.split(",")]
               if args.encoder_downsample else None)
    mirrors = ([bool(int(m)) for m in args.mirror_support.split(",")]
               if args.mirror_support else None)
    strides = ([int(s) for s in args.data_layers_patch_stride.split(",")]
               if args.data_layers_patch_stride else None)
    result = compare(args.checkpoints.split(","), args.num_val_tasks, args.predict_shots, factors,
                     mirrors, args.source_dataset, strides, parse_variants(args.variants))
    write_report(args.output, "compare", result, markdown(result))


if __name__ == "__main__":
    main()
