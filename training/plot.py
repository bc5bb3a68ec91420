"""Plot a run's metrics.jsonl (loss, dev Spearman, alignment, uniformity vs step) to a PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSON lines of a run's metrics log ([] when there is none yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(metrics_jsonl: str | os.PathLike, png: str | os.PathLike, title: str = "") -> Path:
    """Four panels against the optimizer step; panels without data say so. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_jsonl)
    panels = [
        ("loss", "training loss"),
        ("dev_spearman", "dev Spearman x100"),
        ("dev_alignment", "alignment (lower is better)"),
        ("dev_uniformity", "uniformity (lower is better)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, png, dpi=100)


def save_figure(figure, path: str | os.PathLike, dpi: int) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the PNG's path."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
