"""Session 26, round 4: the rule's figures from the committed comparisons (run from the repo root).

  python results/loso_seeds_s26/summary.py > results/loso_seeds_s26/summary.txt

Seed 0 of both recipes: session 25's round-3 comparison (same 10 GTSRB tasks, task seeds 1-10).
Seeds 1-2: this session's comparisons (one per recipe, run side by side; the tasks are fixed by
their seeds, so per-task scores pair across invocations). Closed-form discriminant network: the construction probe
on the same tasks (its first 5 tasks must equal session 25's 5-task probe: a check that the tasks
are the same ones).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _rounds import load, mean_ci, run_name  # noqa: E402  (results/_rounds.py)

seed0 = load("compare_predictors", "inter_s25_round3_gtsrb", "compare.json")["rows"]
new = {run_name(row): row
       for name in ("inter_s26_round4_gtsrb_n", "inter_s26_round4_gtsrb_r")
       for row in load("compare_predictors", name, "compare.json")["rows"]}
per_task = {("N", 0): seed0[0]["per_task"], ("R", 0): seed0[1]["per_task"]}
for s in (1, 2):
    per_task[("N", s)] = new[f"inter_s26_loso_gtsrb_disc_seed{s}"]["per_task"]
    per_task[("R", s)] = new[f"inter_s26_bn_loso_gtsrb_seed{s}"]["per_task"]

probe = load("construction_probe", "loso_gtsrb_s26_10tasks", "probe.json")["splits"]["source"]["rows"]
closed = probe["discriminant"]["per_task"]
old_probe = load("construction_probe", "loso_gtsrb_s25", "probe.json")["splits"]["source"]["rows"]
assert np.allclose(closed[:5], old_probe["discriminant"]["per_task"]), "the probe's tasks differ from session 25's"
assert len(closed) == len(per_task[("N", 0)]) == 10

print("GTSRB fold, 10 whole-dataset GTSRB tasks (task seeds 1-10), both recipes at data_layers_residual_scale=0")
print(f"closed-form discriminant network (no meta-training): {mean_ci(closed)}")
d, vs_closed = [], []
for s in (0, 1, 2):
    n, r = np.asarray(per_task[("N", s)]), np.asarray(per_task[("R", s)])
    d.append(np.mean(r - n))
    vs_closed.append(np.mean(n - np.asarray(closed)))
    print(f"seed {s}: N {mean_ci(n)}  R {mean_ci(r)}"
          f"  R - N {mean_ci(r - n, '+')}  N - closed form {mean_ci(n - closed, '+')}"
          f"  R - closed form {mean_ci(r - closed, '+')}")
print(f"over the 3 seeds (t interval, n=3): R - N {mean_ci(d, '+')};"
      f" N - closed form {mean_ci(vs_closed, '+')}")

negative, positive = sum(x < 0 for x in d), sum(x > 0 for x in d)
if negative >= 2:
    verdict = "round 3's verdict stands over seeds (R does not beat N on the fold)"
elif positive == 3:
    verdict = "R is better over seeds: its all-sources run is trained next and replaces the export"
else:
    verdict = "mixed: the fold does not separate the recipes over seeds; the shipped predictor stays"
print(f"Rule 1: d_s = {', '.join('%+.2f' % (100 * x) for x in d)} -> {verdict}")
premise = all(x > 0 for x in vs_closed)
print(f"Rule 2: N_s - closed form = {', '.join('%+.2f' % (100 * x) for x in vs_closed)} -> "
      + ("the predicted BatchNorm beats the closed form on every seed" if premise
         else "not established over seeds"))
