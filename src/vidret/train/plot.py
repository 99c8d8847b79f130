"""``vidret plot RUN``: a run's loss and learning-rate curves (and final recalls) to PNG, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from vidret.errors import VidretError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise VidretError(f"{path} not found: pass a run folder written by `vidret train`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss and lr against step (plus T2V/V2T recall bars when results.json exists); returns the PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise VidretError("plotting needs matplotlib: pip install 'vidret[plot]'") from e
    run = Path(run_dir)
    records = read_metrics(run)
    if not records:
        raise VidretError(f"{run}/metrics.jsonl has no records yet")
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else None
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3 if results else 2, figsize=(13 if results else 9, 3.6))
    axes[0].plot(steps, [r["loss"] for r in records])
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    axes[1].plot(steps, [r["lr"] for r in records], color="tab:orange")
    axes[1].set(xlabel="step", ylabel="lr", title="learning rate")
    if results:
        keys = ["R1", "R5", "R10"]
        x = range(len(keys))
        axes[2].bar([i - 0.2 for i in x], [results["t2v"][k] for k in keys], width=0.4, label="T2V")
        axes[2].bar([i + 0.2 for i in x], [results["v2t"][k] for k in keys], width=0.4, label="V2T")
        axes[2].set_xticks(list(x), keys)
        axes[2].set(ylabel="%", title="test recall")
        axes[2].legend()
    fig.tight_layout()
    path = Path(out) if out else run / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
