"""Session 30, round 11: the shipped inter recipe N on the Fashion-MNIST fold (Fashion-MNIST left
out of meta-training) over five meta-training seeds, its predicted BatchNorm weighed by w = 1 (as
shipped), 0.5 and 0 (the closed-form network) (run from the repo root; rule: decision_rule.md).

  python results/fmnist_fold_s30/summary.py > results/fmnist_fold_s30/summary.txt

Seeds 1-2: round 10's committed rows; seeds 3-5: this round's comparison. All on round 10's 10
whole-dataset Fashion-MNIST tasks (task seeds 1-10), conv corrections at 0 as used, two CPU threads.
The GTSRB fold's five-seed intervals (round 9's rows) enter only as the rules' "not contradicted" check.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _rounds import (N_SEEDS_FMNIST_FOLD, N_SEEDS_GTSRB_FOLD, bn_dial_export, bn_dial_line,  # noqa: E402
                     bn_dial_seed_differences, bn_dial_table, interval, mean_ci, seed_spread_line)

SEEDS = N_SEEDS_FMNIST_FOLD

scores = bn_dial_table(SEEDS)
print("Fashion-MNIST fold, 10 whole-dataset Fashion-MNIST tasks (task seeds 1-10), conv corrections at 0 (as used)")
print("per seed: w = 1 / 0.5 / 0 (closed form); D = (0.5) - (1), F = (0) - (1), paired over the 10 tasks")
for s in SEEDS:
    print(bn_dial_line(s, *(scores[s, w] for w in (1.0, 0.5, 0.0))))
gap = max(np.abs(scores[s, 0.0] - scores[1, 0.0]).max() for s in SEEDS)
print(f"w = 0 rows of the five seeds: max |per-task difference| from seed 1's {100 * gap:.2f} points"
      " (the closed form uses no meta-trained parameter)")

print(f"\nover the {len(SEEDS)} seeds (95% Student t, n = {len(SEEDS)}):")
for w in (1.0, 0.5):
    print(seed_spread_line(w, [scores[s, w].mean() for s in SEEDS]))


here = bn_dial_seed_differences(SEEDS)
gtsrb = bn_dial_seed_differences(N_SEEDS_GTSRB_FOLD)
for name in ("D", "F"):
    print(f"{name}_s = {', '.join('%+.2f' % (100 * x) for x in here[name])}; mean {mean_ci(here[name], '+')}")
    print(f"  GTSRB fold (round 9, five seeds): mean {mean_ci(gtsrb[name], '+')}")

(f_mean, f_low, f_high), (d_mean, d_low, d_high) = interval(here["F"]), interval(here["D"])
gtsrb_f_below, gtsrb_d_below = interval(gtsrb["F"])[2] < 0, interval(gtsrb["D"])[2] < 0
rule1 = f_high < 0
rule2 = f_low > 0 and not gtsrb_f_below
rule3 = d_low > 0 and not gtsrb_d_below
print(f"\nRule 1 (mean F wholly below 0: the meta-trained BatchNorm beats the closed form here): "
      f"{'holds' if rule1 else 'does not hold'}")
print(f"Rule 2 (mean F wholly above 0, the GTSRB fold not wholly below: the closed form replaces w = 1): "
      f"{'holds' if rule2 else 'does not hold'}")
print(f"Rule 3 (mean D wholly above 0, the GTSRB fold not wholly below: w = 0.5 replaces w = 1): "
      f"{'holds' if rule3 else 'does not hold'}")
if not (rule1 or f_low > 0 or d_low > 0 or d_high < 0):
    print("Rule 4: neither interval excludes 0: on this fold the meta-trained BatchNorm is level with the closed form")
print(f"The export ships: {bn_dial_export(rule3, rule2, d_mean, f_mean)}")
