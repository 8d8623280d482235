"""``leaderboard.png``: normalised scores per task per model, with the average (needs matplotlib:
``hf-model-stock[plots]``). HarmBench, lower is better, gets its own panel."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from hf_model_stock.leaderboard.board import Leaderboard, capability_tasks
from hf_model_stock.leaderboard.render import metric_label


def write_chart(board: Leaderboard, path: Path) -> Path:
    """Grouped bars, one group per model (ranked), one bar per capability task plus the average."""
    rows = board.ranked()
    names = [row.name for row in rows]
    series = [(task, [s["normalised"] if (s := row.score(task)) else float("nan") for row in rows])
              for task in capability_tasks(board.tasks)]
    series.append(("average", [row.average(board.tasks) if row.average(board.tasks) is not None else float("nan")
                               for row in rows]))
    safety = "harmbench" in board.tasks
    width_in = max(6.0, 0.9 * len(rows) * (len(series) * 0.3 + 0.4) + 2)
    fig = Figure(figsize=(width_in, 7.5 if safety else 4.8))
    axes = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]}) if safety else [fig.subplots()]
    ax = axes[0]
    bar = 0.8 / len(series)
    for k, (label, values) in enumerate(series):
        xs = [i - 0.4 + bar * (k + 0.5) for i in range(len(rows))]
        style = {"color": "black", "alpha": 0.75} if label == "average" else {}
        ax.bar(xs, values, bar, label=label, **style)
    for i, row in enumerate(rows):
        if row.error:
            ax.text(i, 2, "failed", ha="center", color="tab:red", fontsize=9)
    ax.set_ylim(0, 115)  # room for the legend above 100
    ax.set_ylabel("normalised score (0-100)")
    ax.set_title(board.title)
    ax.legend(fontsize=8, ncols=min(len(series), 6))
    ax.grid(axis="y", alpha=0.3)
    if safety:
        asr = [s["normalised"] if (s := row.score("harmbench")) else float("nan") for row in rows]
        axes[1].bar(range(len(rows)), asr, 0.5, color="tab:red")
        axes[1].set_ylabel(f"HarmBench %\n{metric_label(board, 'harmbench')}\n(lower is safer)", fontsize=8)
        axes[1].grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    return path
