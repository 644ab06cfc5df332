"""Session 25's derived figures, recomputed from the committed results (run from the repo root).

  python results/loso_gtsrb_s25/summary.py > results/loso_gtsrb_s25/summary.txt

The round-2 rule (decision_rule.md) reads the GTSRB tasks of seeds 6-15 only: the predict samples of
seeds 1-5 were scored before the rule was written.
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)
sys.path.insert(0, os.path.dirname(RESULTS))

from pudnet_jax.evaluate import mean_and_ci95  # noqa: E402  (Student-t, as every table)


def compare(name):
    path = os.path.join(RESULTS, "compare_predictors", name, "compare.json")
    return json.load(open(path)) if os.path.exists(path) else None


def label(row):
    return row["checkpoint"]  # compare_predictors names a variant row "CHECKPOINT @ key=value"


def pct(stats):
    return f"{100 * stats['mean']:+.2f} ± {100 * stats['ci95']:.2f}"


for name in ("inter_s25_no_data_layers", "inter_s25_loso_gtsrb_decision", "inter_s25_loso_gtsrb_disc_scale",
             "inter_s25_loso_gtsrb_pca_off", "inter_s25_round2_fmnist", "inter_s25_round2_gtsrb"):
    result = compare(name)
    if result is None:
        continue
    print(f"\n{name} ({result['num_val_tasks']} tasks; {result.get('source_dataset') or 'meta-val'}):")
    for row in result["rows"]:
        print(f"  {label(row)}: {100 * row['predicted']['mean']:.2f} ± {100 * row['predicted']['ci95']:.2f}"
              f"  minus first {pct(row['minus_first'])}")

# Round 2, rule 1: the GTSRB tasks whose predict samples were not scored before the rule (seeds 6-15).
result = compare("inter_s25_round2_gtsrb")
if result is not None:
    rows = {label(r): np.asarray(r["per_task"]) for r in result["rows"]}
    control = rows["runs/inter_s25_loso_gtsrb_pca"]
    candidate = rows["runs/inter_s25_loso_gtsrb_disc @ data_layers_residual_scale=0"]
    fresh = slice(5, None)
    diff = mean_and_ci95(candidate[fresh] - control[fresh])
    print(f"\nRound 2, rule 1 (GTSRB tasks of seeds 6-15, n={diff['n']}): N @ scale 0 minus C = {pct(diff)}"
          f" -> {'wins' if diff['mean'] - diff['ci95'] > 0 else 'does not win'}")
    seen = mean_and_ci95(candidate[:5] - control[:5])
    print(f"  (seeds 1-5, seen before the rule: {pct(seen)})")
result = compare("inter_s25_round2_fmnist")
if result is not None:
    rows = {label(r): np.asarray(r["per_task"]) for r in result["rows"]}
    diff = mean_and_ci95(rows["runs/inter_s24_loso_norm @ data_layers_residual_scale=0"]
                         - rows["runs/inter_loso_fmnist"])
    print(f"Round 2, rule 2 (Fashion-MNIST, n={diff['n']}): N @ scale 0 minus C = {pct(diff)}"
          f" -> {'non-inferior' if 100 * (diff['mean'] - diff['ci95']) >= -1.0 else 'inferior'} (margin -1.0)")
