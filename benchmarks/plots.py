"""PNG plots of a suite result: throughput and latency vs concurrency, and the scaling curves."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _points(sweep: list[dict], request_size: int) -> list[dict]:
    return sorted((p for p in sweep if p["request_size"] == request_size), key=lambda p: p["concurrency"])


def throughput_vs_concurrency(results: dict, dest: Path) -> Path:
    plt = _pyplot()
    sizes = sorted({p["request_size"] for s in results["server"].values() for p in s.get("sweep", [])})
    fig, axes = plt.subplots(1, max(1, len(sizes)), figsize=(6 * max(1, len(sizes)), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for name, server in results["server"].items():
            points = _points(server.get("sweep", []), size)
            if points:
                ax.plot([p["concurrency"] for p in points], [p["sentences_per_s"] for p in points], marker="o",
                        label=f"triton {name}")
        pa = [p for p in results.get("perf_analyzer", {}).get("points", []) if "sentences_per_s" in p]
        if size == 1 and pa:
            ax.plot([p["concurrency"] for p in pa], [p["sentences_per_s"] for p in pa], "k--x",
                    label=f"perf_analyzer ({results['perf_analyzer'].get('variant')})")
        for name, engine in results["inprocess"].items():
            b32 = engine.get("short", {}).get("b32")
            if b32 and name in results.get("plot_inprocess", []):
                ax.axhline(b32["sentences_per_s"], linestyle=":", linewidth=1, color="grey")
                ax.text(1, b32["sentences_per_s"], f" in-process {name} b32", fontsize=7, va="bottom", color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests (closed loop)")
        ax.set_ylabel("sentences / s")
        ax.set_title(f"{size}-text requests, short texts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def latency_vs_concurrency(results: dict, variant: str, dest: Path) -> Path:
    plt = _pyplot()
    sweep = results["server"].get(variant, {}).get("sweep", [])
    sizes = sorted({p["request_size"] for p in sweep})
    fig, axes = plt.subplots(1, max(1, len(sizes)), figsize=(6 * max(1, len(sizes)), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        points = _points(sweep, size)
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            ax.plot([p["concurrency"] for p in points], [p[key] for p in points], marker="o", label=key[:3])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent requests (closed loop)")
        ax.set_ylabel("latency, ms")
        ax.set_title(f"triton {variant}: {size}-text requests, short texts")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def scaling(results: dict, dest: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for row, (kind, x_key, x_label) in enumerate((("batch", "batch_size", "batch size (short texts)"),
                                                   ("sequence", "length", "sequence length (tokens)"))):
        curves = results.get("scaling", {}).get(kind, {})
        for name, points in curves.items():
            points = [p for p in points if "sentences_per_s" in p]
            if not points:
                continue
            xs = [p[x_key] for p in points]
            y_key = "sentences_per_s" if kind == "batch" else "tokens_per_s"
            axes[row][0].plot(xs, [p[y_key] for p in points], marker="o", label=name)
            axes[row][1].plot(xs, [p["p50_ms"] for p in points], marker="o", label=name)
        axes[row][0].set_ylabel("sentences / s" if kind == "batch" else "tokens / s")
        axes[row][1].set_ylabel("p50 latency per batch, ms")
        for ax in axes[row]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        axes[row][1].set_yscale("log")
    seq_batch = results.get("scaling", {}).get("sequence_batch_size")
    axes[1][0].set_title(f"in-process, batch of {seq_batch}" if seq_batch else "")
    axes[0][0].set_title("in-process engines (tokenization included)")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def write_all(results: dict, directory: Path, variant: str) -> list[Path]:
    """All plots into `directory`; a failing plot is logged, never fatal to the run's results."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in (("throughput_vs_concurrency.png", lambda d: throughput_vs_concurrency(results, d)),
                       ("latency_vs_concurrency.png", lambda d: latency_vs_concurrency(results, variant, d)),
                       ("scaling.png", lambda d: scaling(results, d))):
        try:
            written.append(make(directory / name))
        except Exception:  # noqa: BLE001 - a plot must not lose the measured numbers
            log.exception("plot %s failed", name)
    return written
