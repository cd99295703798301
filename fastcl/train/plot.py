"""Training curves with matplotlib: the step loss, the epoch metrics, alignment / uniformity."""

from __future__ import annotations

import os

__all__ = ["plot_history", "read_jsonl"]


def read_jsonl(path: str) -> list:
    """The records of a JSON-lines log."""
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_history(history: list, path: str, title: str = "") -> str:
    """Draw the records of a run (its ``history`` or :func:`read_jsonl` of its log) to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r for r in history if r.get("event") == "step"]
    evals = [r for r in history if r.get("event") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))

    ax = axes[0]
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="step loss")
    tl = [r for r in evals if r.get("train_loss") is not None]
    if tl:
        ax.plot([r["step"] for r in tl], [r["train_loss"] for r in tl], "o-", ms=3, label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend(fontsize=8)

    ax = axes[1]
    for key in ("knn_acc", "recall@1", "recall@5"):
        pts = [r for r in evals if r.get(key) is not None]
        if pts:
            ax.plot([r["epoch"] for r in pts], [r[key] for r in pts], "o-", ms=3, label=key)
    ax.set_xlabel("epoch (0: untrained)")
    ax.set_ylim(0, 1.02)
    ax.set_title("retrieval / k-NN")
    ax.legend(fontsize=8)

    ax = axes[2]
    for key in ("alignment", "uniformity"):
        pts = [r for r in evals if r.get(key) is not None]
        if pts:
            ax.plot([r["epoch"] for r in pts], [r[key] for r in pts], "o-", ms=3, label=key)
    ax.set_xlabel("epoch (0: untrained)")
    ax.set_title("alignment / uniformity (lower is better)")
    ax.legend(fontsize=8)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
