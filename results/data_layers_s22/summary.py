"""Recomputes session 22's derived figures from the committed result files (RESULTS.md section 1,
session 22): the residual-scale comparison over seeds, source meta-val vs CIFAR-10 across the
stage-1 runs, and the predict-sample gains on Fashion-MNIST. Run from the repo root:

  python results/data_layers_s22/summary.py
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "launch"))

from pudnet_jax.evaluate import mean_and_ci95  # noqa: E402
from selection_signals import spearman  # noqa: E402

HERE = "results/data_layers_s22"
COMPARE = "results/compare_predictors"


def cifar(run):
    return 100 * json.load(open(f"{HERE}/{run}.results.json"))["evaluation"]["predicted"]["mean"]


def meta_val(compare_dir):
    rows = json.load(open(f"{COMPARE}/{compare_dir}/compare.json"))["rows"]
    return {os.path.basename(r["checkpoint"]): 100 * r["predicted"]["mean"] for r in rows}


scale_025 = ["inter_s22_scale025", "inter_s22_scale025_seed1", "inter_s22_scale025_seed2"]
scale_1 = ["inter_s22_scale1", "inter_s22_scale1_seed1", "inter_s22_scale1_seed2"]
a, b = np.array([cifar(r) for r in scale_025]), np.array([cifar(r) for r in scale_1])
print("CIFAR-10 at scale 0.25 (seeds 0-2):", np.round(a, 2), "mean", round(a.mean(), 2))
print("CIFAR-10 at scale 1.0 (seeds 0-2):", np.round(b, 2), "mean", round(b.mean(), 2))
print("1.0 minus 0.25, paired by seed:", mean_and_ci95(list(b - a)))

mv = {**meta_val("inter_s22_stage1_seeds"), **meta_val("inter_s22_stage1_seed2")}
order = ["inter_s22_scale025", "inter_s22_scale025_seed1", "inter_s22_scale1",
         "inter_s22_scale1_seed1", "inter_s22_scale025_seed2", "inter_s22_scale1_seed2"]
x, y = [mv[r] for r in order], [cifar(r) for r in order]
print("GTSRB meta-val vs CIFAR-10, Spearman: first four runs", round(spearman(x[:4], y[:4]), 2),
      "all six", round(spearman(x, y), 2))

for run in ("inter_loso_fmnist_scale1", "inter_loso_fmnist"):
    per = {}
    for shots in (100, 300, 1000):
        rows = json.load(open(f"{COMPARE}/inter_loso_fmnist_predict_shots{shots}/compare.json"))["rows"]
        per[shots] = np.array(next(r["per_task"] for r in rows if r["checkpoint"].endswith(run)))
    print(run, "Fashion-MNIST 100 -> 1000 per class, paired:", mean_and_ci95(list(100 * (per[1000] - per[100]))))

# The within-run ranks of results/selection_signals/inter_loso_fmnist_scale2 with their p-values.
import scipy.stats  # noqa: E402

rows = json.load(open("results/selection_signals/inter_loso_fmnist_scale2/signals.json"))["rows"]
held_out = [r["held_out"] for r in rows]
for signal in ("loso", "source_meta_val"):
    test = scipy.stats.spearmanr([r[signal] for r in rows], held_out)
    print(f"{signal} vs CIFAR-10 across {len(rows)} steps: Spearman {test.statistic:+.2f}, p = {test.pvalue:.2f}")
