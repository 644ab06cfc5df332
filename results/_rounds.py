"""Shared helpers of the decision rounds' summary scripts (``results/*/summary.py``).

Each round's ``summary.py`` turns committed comparison files into the figures its
``decision_rule.md`` asks for; this module holds what they all need: locating and reading those
files, pairing per-task scores by run name, and formatting a mean with its 95% interval (Student's
t, ``pudnet_jax.evaluate.mean_and_ci95``, as every table in RESULTS.md). A script imports it after
putting ``results/`` on ``sys.path`` (scripts run from the repo root as ``python results/<round>/summary.py``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys

import numpy as np

RESULTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(RESULTS))

from pudnet_jax.evaluate import format_mean_ci, mean_and_ci95, t_quantile_975  # noqa: E402


def load(*parts):
    """The JSON file at ``results/<parts...>``."""
    with open(os.path.join(RESULTS, *parts)) as f:
        return json.load(f)


def run_name(row) -> str:
    """The run directory's name of a ``compare.json`` row (``"runs/x @ variant"`` -> ``"x"``)."""
    return row["checkpoint"].split(" @ ")[0].rstrip("/").split("/")[-1]


@functools.lru_cache(maxsize=None)
def _comparison_rows(name: str) -> tuple:
    """The rows of ``results/compare_predictors/<name>/compare.json``, read once per script."""
    return tuple(load("compare_predictors", name, "compare.json")["rows"])


def row(name: str, run: str, variant: str = ""):
    """Per-task scores of ``run`` under ``variant`` ('' for as used; overrides joined by ' @ ', as
    ``compare_predictors`` names its rows) in ``results/compare_predictors/<name>``."""
    for r in _comparison_rows(name):
        got = r["checkpoint"].partition(" @ ")[2]
        if run_name(r) == run and got == variant:
            return r["per_task"]
    raise KeyError(f"{run} @ {variant!r} not in {name}")


SCALE0 = "data_layers_residual_scale=0"


def shipped_recipe_gtsrb_fold() -> dict:
    """Per-task scores of the shipped inter recipe N on round 4's 10 GTSRB tasks (task seeds 1-10)
    with GTSRB left out of meta-training, as used (conv corrections at 0), by meta-training seed:
    seed 0 is session 25's run (round 3's comparison), seeds 1-2 session 26's (round 4's)."""
    return {0: row("inter_s25_round3_gtsrb", "inter_s25_loso_gtsrb_disc", SCALE0),
            1: row("inter_s26_round4_gtsrb_n", "inter_s26_loso_gtsrb_disc_seed1", SCALE0),
            2: row("inter_s26_round4_gtsrb_n", "inter_s26_loso_gtsrb_disc_seed2", SCALE0)}


# The BatchNorm dial's three rows (rounds 8-10): w = 1 (shipped), 0.5, 0 (the closed form), each
# with the conv corrections at 0 as used, named as ``compare_predictors --variants`` names them.
BN_DIAL = {1.0: SCALE0, 0.5: SCALE0 + " @ batchnorm_residual_scale=0.5",
           0.0: SCALE0 + " @ batchnorm_residual_scale=0"}


# The shipped inter recipe N's meta-training seeds on each leave-one-source-out fold, as
# {seed: (comparison, run)} of the committed BatchNorm-dial comparisons (rounds 8-11).
N_SEEDS_GTSRB_FOLD = {0: ("inter_s28_round8_gtsrb_n0", "inter_s28_loso_gtsrb_disc_seed0_rerun"),
                      1: ("inter_s28_round8_gtsrb_n12", "inter_s26_loso_gtsrb_disc_seed1"),
                      2: ("inter_s28_round8_gtsrb_n12", "inter_s26_loso_gtsrb_disc_seed2"),
                      3: ("inter_s29_round9_gtsrb_n34", "inter_s29_loso_gtsrb_disc_seed3"),
                      4: ("inter_s29_round9_gtsrb_n34", "inter_s29_loso_gtsrb_disc_seed4")}
N_SEEDS_FMNIST_FOLD = {1: ("inter_s29_round10_fmnist", "inter_s29_loso_fmnist_disc_seed1"),
                       2: ("inter_s29_round10_fmnist", "inter_s29_loso_fmnist_disc_seed2"),
                       3: ("inter_s30_round11_fmnist", "inter_s30_loso_fmnist_disc_seed3"),
                       4: ("inter_s30_round11_fmnist", "inter_s30_loso_fmnist_disc_seed4"),
                       5: ("inter_s30_round11_fmnist", "inter_s30_loso_fmnist_disc_seed5")}


def bn_dial_table(seeds: dict) -> dict:
    """``{(seed, w): per-task scores}`` for ``seeds`` ({seed: (comparison, run)}) at the three
    ``BN_DIAL`` weights."""
    return {(s, w): per_task for s, where in seeds.items() for w, per_task in bn_dial_scores(*where).items()}


def bn_dial_seed_differences(seeds: dict) -> dict:
    """``{'D': [...], 'F': [...]}``: per seed of ``seeds`` ({seed: (comparison, run)}), the paired
    mean differences over tasks D = (w = 0.5) - (w = 1) and F = (w = 0) - (w = 1)."""
    scores = bn_dial_table(seeds)
    return {name: [float(np.mean(scores[s, w] - scores[s, 1.0])) for s in seeds]
            for name, w in (("D", 0.5), ("F", 0.0))}


def interval(values) -> tuple:
    """(mean, low, high) of the 95% Student-t interval of ``values``."""
    ci = mean_and_ci95(values)
    return ci["mean"], ci["mean"] - ci["ci95"], ci["mean"] + ci["ci95"]


def seed_spread_line(w: float, means) -> str:
    """One BatchNorm weight's line over seeds: mean with interval, range, standard deviation."""
    means = np.asarray(means)
    return (f"w = {w:g}: {mean_ci(means)}; range {100 * means.min():.2f}-{100 * means.max():.2f},"
            f" standard deviation {100 * means.std(ddof=1):.2f} points")


def bn_dial_scores(comparison: str, run: str) -> dict:
    """``{w: per-task scores}`` of ``run`` at the three ``BN_DIAL`` weights in ``comparison``."""
    return {w: np.asarray(row(comparison, run, variant)) for w, variant in BN_DIAL.items()}


def bn_dial_line(seed, one, half, zero) -> str:
    """One seed's line: the three rows, then D = (0.5) - (1) and F = (0) - (1) paired over tasks."""
    return (f"seed {seed}: {mean_ci(one)} / {mean_ci(half)} / {mean_ci(zero)}"
            f"  D {mean_ci(half - one, '+')}  F {mean_ci(zero - one, '+')}")


def bn_dial_export(rule1: bool, rule2: bool, d_mean: float, f_mean: float) -> str:
    """What the export ships under the dial rounds' rules: w = 0.5 if rule 1 holds, the closed form
    if rule 2 does, the one with the larger mean gain if both, otherwise w = 1 unchanged."""
    if rule1 and rule2:
        return "w = 0.5" if d_mean >= f_mean else "w = 0 (the closed form)"
    return "w = 0.5" if rule1 else "w = 0 (the closed form)" if rule2 else "w = 1 (unchanged)"


def closed_form_gtsrb_10_tasks() -> np.ndarray:
    """The closed-form discriminant network on round 4's 10 GTSRB tasks (task seeds 1-10)."""
    probe = load("construction_probe", "loso_gtsrb_s26_10tasks", "probe.json")["splits"]["source"]["rows"]
    return np.asarray(probe["discriminant"]["per_task"])


def mean_ci(values, sign: str = "") -> str:
    """'mean ± half-width of the 95% Student-t interval', in points (``evaluate.format_mean_ci``;
    sign='+': a positive mean gets its '+')."""
    text = format_mean_ci(mean_and_ci95(values))
    return "+" + text if sign == "+" and not text.startswith("-") else text


def welch(a, b):
    """mean(a) - mean(b) and the half-width of its Welch 95% interval (degrees of freedom rounded
    down: a slightly wider interval than the exact one)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return a.mean() - b.mean(), t_quantile_975(max(1, math.floor(dof))) * math.sqrt(va + vb)
