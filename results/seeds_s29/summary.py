"""Session 29, round 9: the shipped inter recipe N on the GTSRB fold over five meta-training seeds,
its predicted BatchNorm weighed by w = 1 (as shipped), 0.5 and 0 (the closed-form network)
(run from the repo root; rule: decision_rule.md).

  python results/seeds_s29/summary.py > results/seeds_s29/summary.txt

Seeds 0-2: round 8's committed rows; seeds 3-4: this round's comparison. All on round 4's 10
GTSRB tasks (task seeds 1-10), conv corrections at 0 as used, scored with two CPU threads.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _rounds import (N_SEEDS_GTSRB_FOLD, bn_dial_export, bn_dial_line, bn_dial_seed_differences,  # noqa: E402
                     bn_dial_table, closed_form_gtsrb_10_tasks, interval, mean_ci, seed_spread_line)

SEEDS = N_SEEDS_GTSRB_FOLD

closed = closed_form_gtsrb_10_tasks()
scores = bn_dial_table(SEEDS)
print("GTSRB fold, 10 whole-dataset GTSRB tasks (task seeds 1-10), conv corrections at 0 (as used)")
print(f"closed-form discriminant network (construction probe, no meta-training): {mean_ci(closed)}")
gap = max(np.abs(scores[s, 0.0] - closed).max() for s in SEEDS)
print(f"w = 0 rows vs the closed-form probe: max |per-task difference| {100 * gap:.2f} points")

print("\nper seed: w = 1 / 0.5 / 0; D = (0.5) - (1), F = (0) - (1), paired over the 10 tasks")
for s in SEEDS:
    print(bn_dial_line(s, *(scores[s, w] for w in (1.0, 0.5, 0.0))))

print(f"\nover the {len(SEEDS)} seeds (95% Student t, n = {len(SEEDS)}):")
for w in (1.0, 0.5):
    print(seed_spread_line(w, [scores[s, w].mean() for s in SEEDS]))

verdicts = {}
for name, per_seed in bn_dial_seed_differences(SEEDS).items():
    mean, low, _ = interval(per_seed)
    verdicts[name] = (low > 0, mean)
    print(f"{name}_s = {', '.join('%+.2f' % (100 * x) for x in per_seed)}; mean {mean_ci(per_seed, '+')}"
          f" -> interval {'wholly above 0' if low > 0 else 'not wholly above 0'}")

(rule1, d_mean), (rule2, f_mean) = verdicts["D"], verdicts["F"]
print(f"\nRule 1 (w = 0.5 replaces w = 1): {'holds' if rule1 else 'does not hold'}")
print(f"Rule 2 (the closed form replaces w = 1): {'holds' if rule2 else 'does not hold'}")
print(f"The export ships: {bn_dial_export(rule1, rule2, d_mean, f_mean)}")
