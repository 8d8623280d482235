"""PNG plots of ``inspect`` reports (needs matplotlib: ``hf-model-stock[plots]``): pairwise angles
and t by layer, and delta norms by layer. Imported lazily, like ``publish.plots``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from hf_model_stock.publish.plots import layer_axis, save_png

if TYPE_CHECKING:  # inspect imports this module when it writes its plots
    from hf_model_stock.analysis.inspect import InspectReport


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
    layer_axis(bottom, labels)
    top.grid(alpha=0.3)
    return save_png(fig, path)


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
    layer_axis(ax, labels)
    return save_png(fig, path)
