"""How much of each predicted conv kernel is the head's, under ``hyper.data_layers=*_residual``?

Under the residual data layers a conv's kernel is ``D + s * H``: ``D``'s filters are unit-norm
data-derived directions, ``H`` the head's kernel, ``s`` ``hyper.data_layers_residual_scale``.
BatchNorm follows every conv, so only a filter's direction matters, and what decides the
direction is the ratio ``s * |H_j| / |D_j| = s * |H_j|``: far above 1, ``D`` is noise on top of
the head's filter. This script predicts each checkpoint's head kernels (the same predict with the
data layers off) on its first meta-val task and reports, per conv, the mean filter norm of
``H`` and that ratio (``s * |H_j|``; with ``hyper.data_layers_normalized_residual`` it is ``s``
by construction).

  python launch/head_gain_probe.py --checkpoints=checkpoints/inter_resnet8,runs/inter_s24_norm \
      --output=results/head_gain_probe/inter_s24

Writes ``gain.json`` and ``gain.md`` (machine, command and wall time included).
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pudnet_jax import baselines, checkpoints
from pudnet_jax.hypernet.data_layers import filter_norms
from pudnet_jax.hypernet.head import get_path
from pudnet_jax.hypernet import target_specs
from pudnet_jax.metrics import machine_line, write_report
from pudnet_jax.predict import make_predict_fn
from pudnet_jax.metrics import machine_description


def head_filter_norms(config, hyper_params, batch, num_classes: int) -> dict[str, float]:
    """Mean output-filter norm of every conv kernel the head predicts for ``batch`` (data layers
    off), keyed by the kernel's path, in the target's forward order."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.hyper.data_layers = "none"
    params = make_predict_fn(config, num_classes)(hyper_params, batch)["params"]
    convs = [s for s in target_specs(config.model.target, num_classes, tuple(np.shape(batch["image"])[1:]))
             if s.kind == "conv"]
    return {"/".join(s.path): float(np.mean(filter_norms(get_path(params, s.path)))) for s in convs}


def probe(paths: list[str]) -> dict:
    start = time.perf_counter()
    rows = []
    for path in paths:
        config = checkpoints.read_config(path)
        if not config.hyper.data_layers.endswith("_residual"):
            raise ValueError(f"{path}: hyper.data_layers={config.hyper.data_layers!r} has no residual "
                             "head kernel to weigh (needs a *_residual mode).")
        params, info = checkpoints.restore_hyper_params(path, config)
        task = baselines.lr_tuning_tasks(config, 1)[0]
        norms = head_filter_norms(config, params, task.dataset_batch(), task.num_classes)
        scale = float(config.hyper.data_layers_residual_scale)
        normalized = bool(config.hyper.data_layers_normalized_residual)
        rows.append({"checkpoint": path, "info_step": info.get("step"), "task": task.name,
                     "residual_scale": scale, "normalized_residual": normalized,
                     "head_filter_norm": norms,
                     "head_to_data_ratio": {k: scale if normalized else scale * v for k, v in norms.items()}})
    return {"rows": rows, "machine": machine_description(), "wall_seconds": time.perf_counter() - start}


def markdown(result: dict, command: str = "") -> str:
    layers = list(result["rows"][0]["head_filter_norm"])
    lines = ["# The head's share of each conv kernel under the residual data layers", "",
             f"- Machine: {machine_line(result['machine'])}; wall time {result['wall_seconds']:.1f} s"]
    if command:
        lines.append(f"- Command: `{command}`")
    lines += ["- Cell: mean filter norm of the head's kernel `|H_j|` / the head-to-data ratio "
              "`s |H_j|` (data-derived filters have norm 1; normalized: `s` by construction)", "",
              "| checkpoint | scale s | normalized | " + " | ".join(f"`{l}`" for l in layers) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in layers) + " |"]
    for r in result["rows"]:
        cells = [f"{r['head_filter_norm'][l]:.3g} / {r['head_to_data_ratio'][l]:.3g}" for l in layers]
        lines.append(f"| `{r['checkpoint']}` | {r['residual_scale']} | {r['normalized_residual']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", required=True, help="comma-separated exports or workdirs")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    result = probe(args.checkpoints.split(","))
    command = "python launch/head_gain_probe.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result["command"] = command
    write_report(args.output, "gain", result, markdown(result, command))


if __name__ == "__main__":
    main()
