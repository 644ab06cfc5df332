"""Run outputs: JSONL metrics, optional TensorBoard, a progress bar, and curve plots."""

from __future__ import annotations

import json
import os
import time

import jax


class MetricsWriter:
    """Appends one JSON object per line to ``DIR/metrics.jsonl`` (process 0 only).

    On resume the file is truncated to steps <= the restored step, so the log of a resumed run
    equals the log of an uninterrupted one.
    """

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = False):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.active:
            return
        if os.path.exists(self.path):
            kept = [line for line in open(self.path) if line.strip()
                    and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional dependency
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                print("TensorBoard requested but tensorboardX is not installed; JSONL only.")

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        record = {"step": int(step), "time": time.time(),
                  **{k: float(v) if hasattr(v, "__float__") else v for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, float):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def plot_curves(workdir: str) -> str | None:
    """Writes ``DIR/curves.png``: meta-training loss and query accuracy, meta-val accuracy."""
    records = read_metrics(workdir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_accuracy" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(xlabel="step", ylabel="query loss", title="meta-training loss")
    axes[1].plot([r["step"] for r in train], [r["accuracy"] for r in train], label="meta-train query")
    if val:
        axes[1].plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "o-", label="meta-val")
    axes[1].set(xlabel="step", ylabel="accuracy", title="accuracy")
    axes[1].legend()
    fig.tight_layout()
    path = os.path.join(workdir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
