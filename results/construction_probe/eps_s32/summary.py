"""Session 32: closed-form discriminant network at eps 0.3 / 1.0 minus eps 0.1, paired per task
(the probes' tasks are the same: same config, same seeds). Run from the repo root:

  python results/construction_probe/eps_s32/summary.py > results/construction_probe/eps_s32/summary.txt
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))

from pudnet_jax.evaluate import format_mean_ci, mean_and_ci95  # noqa: E402

runs = {eps: json.load(open(os.path.join(HERE, f"eps{eps}", "probe.json"))) for eps in ("0.1", "0.3", "1.0")}
reference = runs["0.1"]
for eps, run in runs.items():
    assert run["discriminant_eps"] == float(eps), (eps, run["discriminant_eps"])
for split in ("meta_val", "source", "unseen"):
    tasks = reference["splits"][split]["tasks"]
    base = np.array(reference["splits"][split]["rows"]["discriminant"]["per_task"])
    line = [f"{split} ({len(tasks)} tasks{'; reported, not used' if split == 'unseen' else ''}): "
            f"eps 0.1 {format_mean_ci(mean_and_ci95(base))}"]
    for eps in ("0.3", "1.0"):
        assert runs[eps]["splits"][split]["tasks"] == tasks
        other = np.array(runs[eps]["splits"][split]["rows"]["discriminant"]["per_task"])
        diff = mean_and_ci95(other - base)
        line.append(f"eps {eps} {format_mean_ci(mean_and_ci95(other))}, minus 0.1 {format_mean_ci(diff)}")
    print("; ".join(line))
for eps in ("0.3", "1.0"):
    verdicts = []
    for split in ("meta_val", "source"):
        base = np.array(reference["splits"][split]["rows"]["discriminant"]["per_task"])
        other = np.array(runs[eps]["splits"][split]["rows"]["discriminant"]["per_task"])
        d = mean_and_ci95(other - base)
        verdicts.append(d["mean"] > -0.005 and d["mean"] + d["ci95"] > 0)
    print(f"eps {eps}: {'carried' if all(verdicts) else 'not carried'} to the meta-training round "
          f"(decision_rule.md; meta_val {verdicts[0]}, source {verdicts[1]})")
