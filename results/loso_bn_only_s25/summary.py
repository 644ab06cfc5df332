"""Session 25, round 3: the rule's figures from the committed comparisons (run from the repo root).

  python results/loso_bn_only_s25/summary.py > results/loso_bn_only_s25/summary.txt
"""

import json
import os

RESULTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(name):
    with open(os.path.join(RESULTS, "compare_predictors", name, "compare.json")) as f:
        result = json.load(f)
    print(f"\n{name} ({result['num_val_tasks']} tasks; {result['source_dataset']}):")
    for row in result["rows"]:
        p, d = row["predicted"], row["minus_first"]
        print(f"  {row['checkpoint']}: {100 * p['mean']:.2f} ± {100 * p['ci95']:.2f}"
              f"  minus first {100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f}")
    return {row["checkpoint"]: row for row in result["rows"]}


# Each comparison's first row is the shipped recipe's LOSO run at scale 0, the second R.
gtsrb = list(rows("inter_s25_round3_gtsrb").values())[1]["minus_first"]
fmnist = list(rows("inter_s25_round3_fmnist").values())[1]["minus_first"]
wins = gtsrb["mean"] - gtsrb["ci95"] > 0
non_inferior = 100 * (fmnist["mean"] - fmnist["ci95"]) >= -1.0
print(f"\nRule 1 (GTSRB fold): R minus shipped recipe {100 * gtsrb['mean']:+.2f} ± {100 * gtsrb['ci95']:.2f}"
      f" -> {'wins' if wins else 'does not win'}")
print(f"Rule 2 (Fashion-MNIST fold): {100 * fmnist['mean']:+.2f} ± {100 * fmnist['ci95']:.2f}"
      f" -> {'non-inferior' if non_inferior else 'inferior'} (margin -1.0)")
print(f"R is the better recipe: {wins and non_inferior}")
