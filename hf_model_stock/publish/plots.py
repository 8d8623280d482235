"""PNG plots of ``inspect`` reports and merge reports (needs matplotlib: ``hf-model-stock[plots]``).

Imported lazily by its callers. Uses matplotlib's object API (``Figure``, Agg canvas), never pyplot,
so no GUI backend or global state is involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from hf_model_stock.analysis.inspect import InspectReport, layer_key, layer_sort_key

MAX_TICKS = 40


def _layer_axis(ax: Any, labels: Sequence[str]) -> None:
    step = max(1, -(-len(labels) // MAX_TICKS))
    ax.set_xticks(range(0, len(labels), step), [labels[i] for i in range(0, len(labels), step)], fontsize=7)
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def angle_t_png(report: InspectReport, path: Path) -> Path:
    """Top: the angle (degrees) between each pair of fine-tunes' deltas per layer; bottom: t per layer
    (mean over the layer's tensors, with their min-max range)."""
    labels = [r.layer for r in report.layers]
    x = list(range(len(labels)))
    fig = Figure(figsize=(max(6.0, 0.18 * len(x) + 3), 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for k, (i, j) in enumerate(report.pairs):
        ys = [float("nan") if r.stats.angles[k] is None else r.stats.angles[k] for r in report.layers]
        top.plot(x, ys, marker=".", label=f"{i}-{j}")
    top.axhline(90, color="grey", lw=0.8, ls="--")
    top.set_ylabel("angle between deltas (deg)")
    if len(report.pairs) <= 10:
        top.legend(title="pair", fontsize=7, ncol=min(5, len(report.pairs)))
    bottom.plot(x, [r.t_mean for r in report.layers], marker=".", color="C0", label="mean t")
    bottom.fill_between(x, [r.t_min for r in report.layers], [r.t_max for r in report.layers],
                        color="C0", alpha=0.2, label="min-max over tensors")
    bottom.set_ylabel("t")
    bottom.set_ylim(-0.02, 1.02)
    bottom.legend(fontsize=7)
    _layer_axis(bottom, labels)
    top.grid(alpha=0.3)
    return _save(fig, path)


def norms_png(report: InspectReport, path: Path) -> Path:
    """Norm of each fine-tune's delta per layer (the layer's tensors concatenated), log scale; a zero
    delta leaves a gap (``inspect`` warns about it)."""
    labels = [r.layer for r in report.layers]
    fig = Figure(figsize=(max(6.0, 0.18 * len(labels) + 3), 4))
    ax = fig.subplots()
    for i, name in enumerate(report.models):
        ys = [r.stats.norms[i] if r.stats.norms[i] > 0 else float("nan") for r in report.layers]
        ax.plot(range(len(labels)), ys, marker=".", label=f"{i}: {name[-40:]}")
    if any(v > 0 for r in report.layers for v in r.stats.norms):
        ax.set_yscale("log")
    ax.set_ylabel("||w_i - w_0||")
    ax.legend(fontsize=7)
    _layer_axis(ax, labels)
    return _save(fig, path)


def t_plot_png(report_tensors: Sequence[dict[str, Any]], path: Path) -> Path:
    """t and mean cosine of every merged tensor by layer, from merge_report.json's ``tensors`` list
    (dicts with name, t, cos, action); the line is the layer mean of t."""
    merged = [r for r in report_tensors if r.get("action") == "merge" and r.get("t") is not None]
    keys = sorted({layer_key(r["name"]) for r in merged}, key=layer_sort_key)
    pos = {k: i for i, k in enumerate(keys)}
    xs = [pos[layer_key(r["name"])] for r in merged]
    fig = Figure(figsize=(max(6.0, 0.18 * len(keys) + 3), 4))
    ax = fig.subplots()
    ax.scatter(xs, [r["t"] for r in merged], s=8, alpha=0.6, label="t (tensor)")
    ax.scatter(xs, [r["cos"] for r in merged], s=8, alpha=0.6, marker="x", label="cos (tensor)")
    means = [[r["t"] for r, x in zip(merged, xs) if x == i] for i in range(len(keys))]
    ax.plot(range(len(keys)), [sum(m) / len(m) for m in means], color="C0", label="mean t")
    ax.set_ylabel("t / cos")
    ax.legend(fontsize=7)
    _layer_axis(ax, keys)
    return _save(fig, path)
