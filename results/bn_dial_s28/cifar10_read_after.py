"""Session 28, round 8, read after the rule's outcome (decides nothing): the shipped inter predictor
on CIFAR-10 with its predicted BatchNorm weighed by w = 1, 0.5 and 0, paired over the same 5
predict samples (evaluation task seeds 0-4). Run from the repo root:

  python results/bn_dial_s28/cifar10_read_after.py > results/bn_dial_s28/cifar10_read_after.txt

Files: `results/predict_sample_spread/inter_resnet8_s28_bn{1,0.5,0}/` (this session, unpinned: two
CPU threads, as session 25's `inter_resnet8_s25/`, which the w = 1 rows must equal).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _rounds import load, mean_ci  # noqa: E402  (results/_rounds.py)


def draws(name):
    rows = load("predict_sample_spread", name, "spread.json")["rows"]
    assert [r["eval_task_seed"] for r in rows] == list(range(5))
    return np.asarray([r["predicted"] for r in rows])


acc = {w: draws(f"inter_resnet8_s28_bn{w}") for w in ("1", "0.5", "0")}
assert np.array_equal(acc["1"], draws("inter_resnet8_s25")), "w = 1 should reproduce session 25's draws"
print("CIFAR-10, checkpoints/inter_resnet8, 100 images per class given to predict, 5 predict samples")
for w, a in acc.items():
    print(f"w = {w}: {mean_ci(a)}  per draw {' '.join('%.2f' % (100 * x) for x in a)}")
for a, b in (("0.5", "1"), ("0", "1"), ("0.5", "0")):
    d = acc[a] - acc[b]
    print(f"(w = {a}) - (w = {b}), paired: {mean_ci(d, '+')}; ahead on {int((d > 0).sum())} of 5 draws")
