"""Session 28, round 8: the predicted BatchNorm weighed by w = 1 (as shipped), 0.5 and 0 (the
closed-form network) on the GTSRB fold (run from the repo root; rule: decision_rule.md).

  python results/bn_dial_s28/summary.py > results/bn_dial_s28/summary.txt

N (shipped recipe): seed 0 re-run this session, seeds 1-2 from session 26; L (round 5's lookahead
runs) reported beside. All rows: this session's comparisons on round 4's 10 GTSRB tasks (task
seeds 1-10), conv corrections at 0 as used. Also: does the re-run reproduce session 25's seed 0,
and do the w = 0 rows equal the committed closed-form probe on the same tasks?
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _rounds import (bn_dial_export, bn_dial_line, bn_dial_scores,  # noqa: E402
                     closed_form_gtsrb_10_tasks, mean_ci, shipped_recipe_gtsrb_fold)

# recipe -> [(comparison, run) for seeds 0, 1, 2]
RUNS = {"N": [("inter_s28_round8_gtsrb_n0", "inter_s28_loso_gtsrb_disc_seed0_rerun"),
              ("inter_s28_round8_gtsrb_n12", "inter_s26_loso_gtsrb_disc_seed1"),
              ("inter_s28_round8_gtsrb_n12", "inter_s26_loso_gtsrb_disc_seed2")],
        "L": [("inter_s28_round8_gtsrb_l", f"inter_s27_lookahead_gtsrb_seed{s}") for s in range(3)]}

closed = closed_form_gtsrb_10_tasks()
session25_seed0 = np.asarray(shipped_recipe_gtsrb_fold()[0])
print("GTSRB fold, 10 whole-dataset GTSRB tasks (task seeds 1-10), conv corrections at 0 (as used)")
print(f"closed-form discriminant network (construction probe, no meta-training): {mean_ci(closed)}")
scores = {}
for recipe, seeds in RUNS.items():
    for s, (comparison, run) in enumerate(seeds):
        for w, per_task in bn_dial_scores(comparison, run).items():
            scores[recipe, s, w] = per_task
rerun = scores["N", 0, 1.0]
print(f"N seed 0 re-run at w = 1: {mean_ci(rerun)} vs session 25's run {mean_ci(session25_seed0)};"
      f" max |per-task difference| {100 * np.abs(rerun - session25_seed0).max():.2f} points")
gap = max(np.abs(scores[key] - closed).max() for key in scores if key[2] == 0.0)
print(f"w = 0 rows vs the closed-form probe: max |per-task difference| {100 * gap:.2f} points")

for recipe in RUNS:
    print(f"\n{recipe}: per seed, w = 1 / 0.5 / 0; D = (0.5) - (1), F = (0) - (1), paired over tasks")
    for s in range(3):
        one, half, zero = (scores[recipe, s, w] for w in (1.0, 0.5, 0.0))
        print(bn_dial_line(s, one, half, zero) + f"  (0.5) - closed form {mean_ci(half - closed, '+')}")
    for w in (1.0, 0.5, 0.0):
        print(f"over seeds (t, n=3), w = {w:g}: {mean_ci([scores[recipe, s, w].mean() for s in range(3)])}")

d = [float(np.mean(scores["N", s, 0.5] - scores["N", s, 1.0])) for s in range(3)]
f = [float(np.mean(scores["N", s, 0.0] - scores["N", s, 1.0])) for s in range(3)]
rule1, rule2 = all(x > 0 for x in d), all(x > 0 for x in f)
print(f"\nRule 1: D_s = {', '.join('%+.2f' % (100 * x) for x in d)} -> "
      + ("w = 0.5 beats the shipped w = 1 on every seed" if rule1 else "not on every seed"))
print(f"Rule 2: F_s = {', '.join('%+.2f' % (100 * x) for x in f)} -> "
      + ("the closed form beats w = 1 on every seed" if rule2 else "not on every seed"))
print(f"The export ships: {bn_dial_export(rule1, rule2, np.mean(d), np.mean(f))}")
