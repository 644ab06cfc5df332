"""Session 24's derived figures, recomputed from the committed results (run from the repo root).

  python results/data_layers_s24/summary.py > results/data_layers_s24/summary.txt
"""

import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)


def load(*parts):
    with open(os.path.join(RESULTS, *parts)) as f:
        return json.load(f)


# The head's share of each kernel: s |H_j| over the unit data-derived filters, per checkpoint.
gain = load("head_gain_probe", "inter_s24", "gain.json")
print("Head-to-data ratio s|H_j| (min-max over the 9 convs):")
for row in gain["rows"]:
    ratios = list(row["head_to_data_ratio"].values())
    norms = list(row["head_filter_norm"].values())
    print(f"  {row['checkpoint']}: ratio {min(ratios):.3g}-{max(ratios):.3g}, |H_j| {min(norms):.3g}-{max(norms):.3g}")
shipped = gain["rows"][0]
smallest = min(shipped["head_to_data_ratio"].values())
# A unit vector added to one `smallest` times longer turns it by at most atan(1 / smallest).
print(f"Shipped: the data-derived filter turns each head filter by at most "
      f"{math.degrees(math.atan(1 / smallest)):.2f} degrees")

# Paired comparisons quoted in RESULTS.md, straight from compare_predictors' outputs.
for name in ("inter_s24_no_data_layers", "inter_s24_disc_scale", "inter_s24_normalized",
             "inter_s24_loso_disc_scale", "inter_s24_loso_normalized", "inter_s24_loso_decision",
             "inter_s24_loso_norm_scale", "inter_s24_norm_scale", "inter_s24_round2",
             "inter_s24_loso_shots100_scale", "inter_s24_shots100_scale"):
    path = os.path.join(RESULTS, "compare_predictors", name, "compare.json")
    if not os.path.exists(path):
        continue
    result = load("compare_predictors", name, "compare.json")
    print(f"\n{name} ({result['num_val_tasks']} tasks):")
    for row in result["rows"]:
        p, d = row["predicted"], row["minus_first"]
        print(f"  {row['checkpoint']}: {100 * p['mean']:.2f} ± {100 * p['ci95']:.2f}  "
              f"minus first {100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f}")

# Each run's own final evaluation (CIFAR-10, the protocol's draw).
print("\nCIFAR-10, each run's final evaluation:")
for run in ("inter_s24_norm", "inter_s24_loso_norm", "inter_s24_shots100", "inter_s24_loso_shots100"):
    path = os.path.join(HERE, f"{run}.results.json")
    if os.path.exists(path):
        r = load("data_layers_s24", f"{run}.results.json")
        print(f"  {run}: {100 * r['evaluation']['predicted']['mean']:.2f}%")
