"""``leaderboard.png``: normalised scores per task per model, with the average (needs matplotlib:
``hf-model-stock[plots]``). Each lower-is-better task gets its own panel below: HarmBench's attack
success rate (%), or a raw metric in its unit (e.g. NLL in nats/token, on an axis zoomed to the values).
Error bars: ±1 standard error, where a score has one."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from hf_model_stock.evaluation.tasks import benchmark_for
from hf_model_stock.leaderboard.board import Leaderboard, Row, capability_tasks
from hf_model_stock.leaderboard.render import metric_label


def _lower_label(board: Leaderboard, task: str) -> str:
    if task == "harmbench":
        return f"HarmBench %\n{metric_label(board, 'harmbench')}\n(lower is safer)"
    unit = benchmark_for(task).unit
    return f"{task}{' (' + unit + ')' if unit else ''}\n(lower is better{', axis zoomed' if unit else ''})"


def _stderr(row: Row, task: str) -> float:
    """The score's standard error on the chart's scale (normalised, or the raw unit); 0 if none."""
    score = row.score(task)
    if score is None or score.get("stderr") is None:
        return 0.0
    benchmark = benchmark_for(task)
    return float(score["stderr"]) * (1.0 if benchmark.unit else 100.0 / (1.0 - benchmark.random_baseline))


def write_chart(board: Leaderboard, path: Path) -> Path:
    """Grouped bars, one group per model (ranked), one bar per capability task plus the average;
    one panel per lower-is-better task."""
    rows = board.ranked()
    names = [row.name for row in rows]
    capability = capability_tasks(board.tasks)
    lower = [t for t in board.tasks if t not in capability]
    series = [(task, [s["normalised"] if (s := row.score(task)) else float("nan") for row in rows])
              for task in capability]
    if capability:
        series.append(("average", [row.average(board.tasks) if row.average(board.tasks) is not None
                                   else float("nan") for row in rows]))
    panels = (1 if capability else 0) + len(lower)
    width_in = max(6.0, 0.9 * len(rows) * (max(len(series), 1) * 0.3 + 0.4) + 2)
    fig = Figure(figsize=(width_in, (4.8 if capability else 0.8) + 2.7 * len(lower)))
    ratios = ([3] if capability else []) + [1.6 if capability else 1] * len(lower)
    axes = fig.subplots(panels, 1, sharex=True, gridspec_kw={"height_ratios": ratios}, squeeze=False)[:, 0]
    if capability:
        ax = axes[0]
        bar = 0.8 / len(series)
        for k, (label, values) in enumerate(series):
            xs = [i - 0.4 + bar * (k + 0.5) for i in range(len(rows))]
            style = {"color": "black", "alpha": 0.75} if label == "average" else {}
            errors = [0.0] * len(rows) if label == "average" else [_stderr(row, label) for row in rows]
            ax.bar(xs, values, bar, label=label, yerr=errors, capsize=2, ecolor="0.3", **style)
        ax.set_ylim(0, 115)  # room for the legend above 100
        ax.set_ylabel("normalised score (0-100)")
        ax.legend(fontsize=8, ncols=min(len(series), 6))
    for k, task in enumerate(lower):
        ax = axes[k + (1 if capability else 0)]
        values = [s["normalised"] if (s := row.score(task)) else float("nan") for row in rows]
        errors = [_stderr(row, task) for row in rows]
        ax.bar(range(len(rows)), values, 0.5, color="tab:red" if task == "harmbench" else "tab:purple",
               yerr=errors, capsize=3, ecolor="0.3")
        finite = [v for v in values if math.isfinite(v)]
        if benchmark_for(task).unit and finite:  # a raw metric: zoom to the values, label each bar
            lo = min(v - e for v, e in zip(values, errors) if math.isfinite(v))
            hi = max(v + e for v, e in zip(values, errors) if math.isfinite(v))
            pad = max((hi - lo) * 0.25, abs(hi) * 0.005, 1e-6)
            ax.set_ylim(lo - pad, hi + pad)
            for i, v in enumerate(values):
                if math.isfinite(v):
                    ax.text(i, v + errors[i], f"{v:.4f}", ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(_lower_label(board, task), fontsize=8)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    for i, row in enumerate(rows):
        if row.error:
            axes[0].text(i, axes[0].get_ylim()[0], "failed", ha="center", va="bottom", color="tab:red", fontsize=9)
    axes[0].set_title(board.title)
    axes[-1].set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    return path
