"""Session 27, round 5: the rule's figures from the committed comparisons (run from the repo root).

  python results/lookahead_s27/summary.py > results/lookahead_s27/summary.txt

L (cross-source lookahead, seeds 0-2): this session's comparison. N (shipped recipe, seeds 0-2) and
the closed-form discriminant network: round 4's committed files (same 10 GTSRB tasks, task seeds
1-10; per-task scores pair across invocations because the tasks are fixed by their seeds).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _rounds import (closed_form_gtsrb_10_tasks, load, mean_ci, run_name,  # noqa: E402
                     shipped_recipe_gtsrb_fold, welch)

per_task = {("N", s): v for s, v in shipped_recipe_gtsrb_fold().items()}
round5 = {run_name(row): row for row in load("compare_predictors", "inter_s27_round5_gtsrb_l", "compare.json")["rows"]}
for s in (0, 1, 2):
    per_task[("L", s)] = round5[f"inter_s27_lookahead_gtsrb_seed{s}"]["per_task"]
closed = closed_form_gtsrb_10_tasks()
assert all(len(v) == 10 for v in per_task.values()) and len(closed) == 10

print("GTSRB fold, 10 whole-dataset GTSRB tasks (task seeds 1-10), predictors at data_layers_residual_scale=0")
print(f"closed-form discriminant network (no meta-training): {mean_ci(closed)}")
means = {key: float(np.mean(v)) for key, v in per_task.items()}
vs_closed = []
for s in (0, 1, 2):
    n, l = np.asarray(per_task[("N", s)]), np.asarray(per_task[("L", s)])
    vs_closed.append(means[("L", s)] - closed.mean())
    print(f"seed {s}: L {mean_ci(l)}  N {mean_ci(n)}  L - N (same seed, paired over tasks) {mean_ci(l - n, '+')}"
          f"  L - closed form {mean_ci(l - closed, '+')}")
l_means, n_means = [means[("L", s)] for s in range(3)], [means[("N", s)] for s in range(3)]
diff, half = welch(l_means, n_means)
print(f"over seeds: L {mean_ci(l_means)}  N {mean_ci(n_means)} (t, n=3 each);"
      f" L - N {100 * diff:+.2f} ± {100 * half:.2f} (Welch 95%)")

premise = all(x > 0 for x in vs_closed)
print(f"Rule 1: L_s - closed form = {', '.join('%+.2f' % (100 * x) for x in vs_closed)} -> "
      + ("L beats the closed form on every seed" if premise else "not established for L either"))
if diff - half > 0:
    better = "L is better than N over seeds"
elif diff + half < 0:
    better = "L is worse than N over seeds"
else:
    better = "the fold does not separate L and N over seeds"
print(f"Rule 2: {better}")
ship = premise and diff - half > 0
print("Rule 3: " + ("L replaces the shipped recipe (all-sources run next)" if ship
                    else "the shipped predictor stays"))
