"""Run outputs: JSONL metrics, optional TensorBoard, a progress bar, curve plots, and the machine
description every results file carries."""

from __future__ import annotations

import json
import os
import time

import jax


def machine_description() -> dict:
    """CPU model / accelerator names, for every results file."""
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    # The CPUs this process may run on (taskset narrows it): XLA sizes its CPU thread pool by it,
    # and the summation order, hence the last float bits of every score, follows (RESULTS.md).
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax_version": jax.__version__}


def machine_line(machine: dict) -> str:
    """``machine_description()`` as the one line every report prints: CPU, CPU count (and
    how many the process could use, when pinned to fewer), JAX version and backend."""
    usable = machine.get("usable_cpus", machine["cpu_count"])  # absent in files before session 28
    pinned = f", pinned to {usable}" if usable != machine["cpu_count"] else ""
    return (f"{machine['cpu']} ({machine['cpu_count']} CPUs{pinned}), JAX {machine['jax_version']} "
            f"backend `{machine['jax_backend']}`")


def write_report(output_dir: str, name: str, result: dict, markdown: str) -> None:
    """Writes a probe's or benchmark script's ``NAME.json`` (the full result) and ``NAME.md``
    (its table) into ``output_dir`` (created if needed), and prints the table."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    text = markdown if markdown.endswith("\n") else markdown + "\n"
    with open(os.path.join(output_dir, f"{name}.md"), "w") as f:
        f.write(text)
    print(text, end="")


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
            kept = [r for r in _parse_records(self.path) if r.get("step", 0) <= resume_step]
            # Written aside and renamed: a kill during the rewrite leaves the old log whole.
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
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


def _parse_records(path: str) -> list[dict]:
    """The JSON records of a metrics file, skipping lines that do not parse.

    A run killed in the middle of ``write`` leaves a torn last line; the steps it logged are
    rerun and logged again after the resume, so dropping it loses nothing.
    """
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}:{number}: skipping a torn metrics line (a killed write): {line[:80]!r}")
    return records


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``DIR/metrics.jsonl`` in order ([] if there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return _parse_records(path)


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
