"""Session 26: the shipped inter predictor minus the closed-form discriminant network on CIFAR-10,
paired over the same 5 predict samples (evaluation task seeds 0-4). Run from the repo root:

  python results/construction_probe/inter_resnet8_s26/paired_with_predictor.py \
      > results/construction_probe/inter_resnet8_s26/paired_with_predictor.txt
  python results/construction_probe/inter_resnet8_s26/paired_with_predictor.py inter_resnet8_s32 \
      > results/construction_probe/inter_resnet8_s26/paired_with_predictor_s32.txt

Predictor: `results/predict_sample_spread/<argument, default inter_resnet8_s25>/` (session 25, the
same export; session 32's `inter_resnet8_s32` scores it with predict's rows sorted first).
Closed form: this directory's probe of that export's config (`probe.json`, split `unseen`).
Read after every decision it could bear on; decides nothing.
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(RESULTS))

from pudnet_jax.evaluate import mean_and_ci95  # noqa: E402  (Student-t, as every table)

SPREAD = sys.argv[1] if len(sys.argv) > 1 else "inter_resnet8_s25"
spread = json.load(open(os.path.join(RESULTS, "predict_sample_spread", SPREAD, "spread.json")))
probe = json.load(open(os.path.join(HERE, "probe.json")))
predicted = {r["eval_task_seed"]: r["predicted"] for r in spread["rows"]}
closed = probe["splits"]["unseen"]["rows"]["discriminant"]["per_task"]
seeds = list(range(len(closed)))  # the probe draws eval_task_seed 0, 1, ... (base seed 0)
assert probe["held_out"] == "cifar10" and sorted(predicted) == seeds
diff = np.array([predicted[s] - closed[s] for s in seeds])
for s in seeds:
    print(f"eval_task_seed {s}: predicted {100 * predicted[s]:.2f}  closed-form discriminant "
          f"{100 * closed[s]:.2f}  difference {100 * (predicted[s] - closed[s]):+.2f}")
paired = mean_and_ci95(diff)
print(f"predicted minus closed form over {len(diff)} draws: {100 * paired['mean']:+.2f} ± {100 * paired['ci95']:.2f} "
      f"(95% t interval); draws where the predictor is ahead: {int((diff > 0).sum())} of {len(diff)}")
