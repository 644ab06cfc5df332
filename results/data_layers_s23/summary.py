"""Recomputes session 23's derived figures from the committed result files (RESULTS.md section 1,
session 23): the discriminant data layers against session 22's pca_residual controls (same
stage-1 recipe, seeds 0-2) on CIFAR-10, each closed-form network's starting point, and the two
stage-5 predictors paired over the same predict samples. Run from the repo root:

  python results/data_layers_s23/summary.py
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.getcwd())

from pudnet_jax.evaluate import mean_and_ci95  # noqa: E402

HERE, CONTROLS = "results/data_layers_s23", "results/data_layers_s22"
PROBE = "results/construction_probe/inter_resnet8/probe.json"


def cifar(path):
    return 100 * json.load(open(path))["evaluation"]["predicted"]["mean"]


def fmt(stats):
    return f"{100 * stats['mean']:.2f} +- {100 * stats['ci95']:.2f}" if stats["n"] > 1 else f"{100 * stats['mean']:.2f}"


disc = np.array([cifar(f"{HERE}/{r}.results.json")
                 for r in ("inter_s23_disc", "inter_s23_disc_seed1", "inter_s23_disc_seed2")])
pca = np.array([cifar(f"{CONTROLS}/{r}.results.json")
                for r in ("inter_s22_scale025", "inter_s22_scale025_seed1", "inter_s22_scale025_seed2")])
print("Stage-1 recipe, CIFAR-10 (protocol's predict sample), seeds 0-2:")
print("  discriminant_residual:", np.round(disc, 2), "mean", round(disc.mean(), 2))
print("  pca_residual (session 22):", np.round(pca, 2), "mean", round(pca.mean(), 2))
diff = mean_and_ci95(list((disc - pca) / 100))
print("  discriminant minus pca, paired by seed:", fmt(diff))

probe = json.load(open(PROBE))["splits"]["unseen"]["rows"]
start = {name: 100 * row["per_task"][0] for name, row in probe.items()}  # task 0 = the protocol's draw
print("Closed-form networks on the protocol's draw (their meta-training starting points):",
      {k: round(v, 2) for k, v in start.items()})
print("  meta-trained minus its closed-form start, seeds 0-2: discriminant",
      np.round(disc - start["discriminant"], 2), "; pca", np.round(pca - start["pca"], 2))

spread = {arm: [100 * r["predicted"] for r in json.load(open(
    f"results/predict_sample_spread/inter_s23_stage5_{arm}/spread.json"))["rows"]] for arm in ("disc", "pca")}
paired = np.subtract(spread["disc"], spread["pca"])
print("Stage 5 over the same 5 CIFAR-10 predict samples: discriminant", np.round(spread["disc"], 2),
      "pca", np.round(spread["pca"], 2))
print(f"  discriminant minus pca, paired by draw: mean {paired.mean():+.2f}, range {paired.min():+.2f} to {paired.max():+.2f}")
