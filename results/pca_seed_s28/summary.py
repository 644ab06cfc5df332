"""Session 28, round 7: C (free principal head, as used) seed 2 against N (shipped recipe, scale 0)
seeds 0-2 on the GTSRB fold (run from the repo root; rule: decision_rule.md).

  python results/pca_seed_s28/summary.py > results/pca_seed_s28/summary.txt

C seed 0: session 25's round-1 comparison (5 tasks, task seeds 1-5); C seed 1: session 27's round 6;
C seed 2: this session's comparison. N: round 3 (seed 0) and round 4 (seeds 1-2), 10 tasks. Tasks are
fixed by their seeds, so the first 5 of every 10-task comparison are round 2's 5 tasks.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _rounds import mean_ci, row, shipped_recipe_gtsrb_fold, welch  # noqa: E402  (results/_rounds.py)

n = shipped_recipe_gtsrb_fold()
c = {0: row("inter_s25_loso_gtsrb_decision", "inter_s25_loso_gtsrb_pca"),
     1: row("inter_s27_round6_gtsrb_c", "inter_s27_loso_gtsrb_pca_seed1"),
     2: row("inter_s28_round7_gtsrb_c", "inter_s28_loso_gtsrb_pca_seed2")}
assert len(c[0]) == 5 and len(c[1]) == len(c[2]) == 10 and all(len(v) == 10 for v in n.values())

print("GTSRB fold; C as used (pca_residual, scale 0.25), N at data_layers_residual_scale=0")
for s, v in c.items():
    print(f"C seed {s}: tasks 1-5 {mean_ci(v[:5])}" + (f"; tasks 1-10 {mean_ci(v)}" if len(v) == 10 else ""))
for s, v in n.items():
    print(f"N seed {s}: tasks 1-5 {mean_ci(v[:5])}; tasks 1-10 {mean_ci(v)}")
c_means = [float(np.mean(v[:5])) for v in c.values()]
n_means = [float(np.mean(v[:5])) for v in n.values()]
diff, half = welch(n_means, c_means)
print(f"over seeds, tasks 1-5: N {mean_ci(n_means)}  C {mean_ci(c_means)} (t, n=3 each);"
      f" N - C {100 * diff:+.2f} ± {100 * half:.2f} (Welch 95%)")
c2, n_min = c_means[2], min(n_means)
assert max(c_means[:2]) < n_min  # rounds 2 and 6: C seeds 0-1 are below every N seed
verdict = ("every C seed is below every N seed: round 2's verdict is settled on three seeds of each"
           if c2 < n_min else "round 2's verdict is in doubt")
print(f"Rule: C_2 (tasks 1-5) {100 * c2:.2f} vs min_s N_s {100 * n_min:.2f} -> {verdict}")
