"""PNG plots: learning curves and other small figures, drawn headless."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.io import atomic_path  # noqa: E402


def save_figure(fig: "plt.Figure", path: str | Path, dpi: int = 100) -> None:
    """Save a figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def plot_learning_curves(history: Sequence[dict[str, float]], path: str | Path,
                         metric: str, title: str = "") -> None:
    """Two panels: losses, and the stage's validation ``metric``, against optimiser steps."""
    steps = [row["step"] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("train_loss", "val_loss"):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            ax_loss.plot(steps, values, marker="o", label=key)
    ax_loss.set_xlabel("optimiser step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_metric.plot(steps, [row.get(metric) for row in history], marker="o", color="tab:green")
    ax_metric.set_xlabel("optimiser step")
    ax_metric.set_ylabel(metric)
    ax_metric.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
