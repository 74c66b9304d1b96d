"""PNG plots of evaluation results, drawn with matplotlib's Agg canvas (no pyplot, no global backend switch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from longlora.io import atomic_path, write_json

__all__ = ["plot_losses", "plot_perplexity", "plot_passkey_heatmap", "plot_passkey_accuracy", "write_json"]


def _figure(width: float = 6.4, height: float = 4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _length_axis(ax, lengths: Sequence[int]) -> None:
    """Log-2 x axis labelled with the evaluated lengths (1k, 4k, 32k, ...)."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(lengths))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")


def plot_perplexity(results_by_label: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """Perplexity vs context length, one line per model, log y axis."""
    if not results_by_label:
        raise ValueError("nothing to plot: no results")
    fig = _figure()
    ax = fig.add_subplot()
    all_lengths, protocols = [], set()
    for label, results in results_by_label.items():
        rows = sorted(results, key=lambda r: r["length"])
        lengths = [r["length"] for r in rows]
        all_lengths += lengths
        protocols |= {r.get("protocol", "") for r in rows}
        ax.plot(lengths, [r["perplexity"] for r in rows], marker="o", label=label)
    ax.set_yscale("log")
    _length_axis(ax, all_lengths)
    ax.set_ylabel("perplexity (log scale)")
    protocols.discard("")
    ax.set_title("Perplexity vs context length" + (f" ({', '.join(sorted(protocols))} protocol)" if protocols else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_passkey_heatmap(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Accuracy for each length (x) and depth (y) of a `run_passkey` result, each cell annotated."""
    lengths, depths, grid = result["lengths"], result["depths"], result["grid"]  # grid: [length][depth]
    fig = _figure(max(4.0, 1.0 + 0.9 * len(lengths)), max(3.0, 1.2 + 0.5 * len(depths)))
    ax = fig.add_subplot()
    cells = [[grid[i][j] for i in range(len(lengths))] for j in range(len(depths))]  # (depth, length)
    image = ax.imshow(cells, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    for j in range(len(depths)):
        for i in range(len(lengths)):
            ax.text(i, j, f"{cells[j][i]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([str(length) for length in lengths])
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels([f"{depth:g}" for depth in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the pass key")
    ax.set_title(f"Passkey accuracy ({result.get('trials', '?')} trials per cell)")
    fig.colorbar(image, ax=ax, label="accuracy")
    return _save(fig, path)


def plot_passkey_accuracy(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Accuracy (averaged over depths) vs context length."""
    lengths = result["lengths"]
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(lengths, [result["accuracy"][str(length)] for length in lengths], marker="o", label=result.get("label"))
    _length_axis(ax, lengths)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("passkey accuracy")
    ax.set_title("Passkey retrieval accuracy vs context length")
    ax.grid(True, alpha=0.3)
    if result.get("label"):
        ax.legend()
    return _save(fig, path)


def plot_losses(losses: Sequence[tuple[int, float]], path: str | os.PathLike, title: str = "") -> Path:
    """Training loss per logged step, from train_summary.json's (step, loss) pairs."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)
