"""Session 29, round 10: the shipped inter recipe N on the Fashion-MNIST fold (Fashion-MNIST left
out of meta-training), its predicted BatchNorm weighed by w = 1 (as shipped), 0.5 and 0 (the
closed-form network) (run from the repo root; rule: decision_rule.md).

  python results/fmnist_fold_s29/summary.py > results/fmnist_fold_s29/summary.txt

Seeds 1-2: this round's comparison on 10 whole-dataset Fashion-MNIST tasks (task seeds 1-10),
conv corrections at 0 as used, two CPU threads. Session 24's seed 0 (not kept) enters only beside,
with its round-3 row on task seeds 1-5.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _rounds import SCALE0, bn_dial_line, bn_dial_table, mean_ci, row  # noqa: E402

COMPARISON = "inter_s29_round10_fmnist"
SEEDS = {s: f"inter_s29_loso_fmnist_disc_seed{s}" for s in (1, 2)}

scores = bn_dial_table({s: (COMPARISON, run) for s, run in SEEDS.items()})
print("Fashion-MNIST fold, 10 whole-dataset Fashion-MNIST tasks (task seeds 1-10), conv corrections at 0 (as used)")
print("per seed: w = 1 / 0.5 / 0 (closed form); D = (0.5) - (1), F = (0) - (1), paired over the 10 tasks")
for s in SEEDS:
    print(bn_dial_line(s, *(scores[s, w] for w in (1.0, 0.5, 0.0))))
closed = [scores[s, 0.0] for s in SEEDS]
print(f"w = 0 rows of the two seeds: max |per-task difference| {100 * np.abs(closed[0] - closed[1]).max():.2f}"
      " points (the closed form does not depend on the meta-trained parameters)")

seed0 = np.asarray(row("inter_s25_round3_fmnist", "inter_s24_loso_norm", SCALE0))
print(f"\nbeside, task seeds 1-5 (as used): session 24's seed 0 {mean_ci(seed0)}; "
      + "; ".join(f"seed {s} {mean_ci(scores[s, 1.0][:5])}" for s in SEEDS)
      + f"; closed form {mean_ci(scores[1, 0.0][:5])}")

f = [float(np.mean(scores[s, 0.0] - scores[s, 1.0])) for s in SEEDS]
print(f"\nF_s = {', '.join('%+.2f' % (100 * x) for x in f)}")
if all(x > 0 for x in f):
    print("Item 1: the closed form is ahead on both seeds; next session: three more seeds here, round 9's rule 2")
elif all(x < 0 for x in f):
    print("Item 2: the meta-trained BatchNorm is ahead on both seeds; next session: three more seeds to test it")
else:
    print("Item 3: mixed signs; recorded, no follow-up on this fold until new sources exist")
print("The export is unchanged by this round (two seeds cannot meet round 9's five-seed standard).")
