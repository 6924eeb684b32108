"""The figures of the programs that load a server: latency (loadtest) and throughput
(bench), written as PNG the way training/analysis/plots.py writes its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.analysis.plots import plt, save_figure


def plot_latency_histogram(latencies_ms: list[float], title: str, path: str | Path) -> Path:
    """Latency histogram with the p50 / p99 marked."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    values = np.asarray(latencies_ms) if latencies_ms else np.zeros(1)
    ax.hist(values, bins=50, color="tab:blue", alpha=0.8)
    for q, style in ((50, "--"), (99, ":")):
        x = float(np.percentile(values, q))
        ax.axvline(x, color="k", ls=style, lw=1, label=f"p{q} {x:.1f} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_throughput(throughput: dict[str, dict], title: str, path: str | Path) -> Path:
    """Decisions per second against concurrent sessions, one line per batching mode."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for mode, rows in throughput.items():
        sessions = [int(n) for n in rows]
        ax.plot(sessions, [rows[n]["decisions_per_s"] for n in rows], "o-", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("decisions / s")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
