"""PNG plot of a merge report's t by layer, for the model card (needs matplotlib: ``hf-model-stock[plots]``).

Imported lazily by its callers. Uses matplotlib's object API (``Figure``, Agg canvas), never pyplot,
so no GUI backend or global state is involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hf_model_stock.merge.stats import TensorStats, layer_key, layer_sort_key

MAX_TICKS = 40


def layer_axis(ax: Any, labels: Sequence[str]) -> None:
    """Label the x axis with layer names, at most ``MAX_TICKS`` of them."""
    step = max(1, -(-len(labels) // MAX_TICKS))
    ax.set_xticks(range(0, len(labels), step), [labels[i] for i in range(0, len(labels), step)], fontsize=7)
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)


def save_png(fig: Figure, path: Path) -> Path:
    """Lay out and write ``fig`` as a PNG."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def t_plot_png(tensors: Sequence[TensorStats], path: Path) -> Path:
    """t and mean cosine of every merged tensor by layer (the report's ``tensors``); the line is the
    layer mean of t."""
    merged = [r for r in tensors if r.action == "merge" and r.t is not None]
    keys = sorted({layer_key(r.name) for r in merged}, key=layer_sort_key)
    pos = {k: i for i, k in enumerate(keys)}
    xs = [pos[layer_key(r.name)] for r in merged]
    fig = Figure(figsize=(max(6.0, 0.18 * len(keys) + 3), 4))
    ax = fig.subplots()
    ts = [float(r.t) for r in merged if r.t is not None]  # every merged row has a t
    coss = [math.nan if r.cos is None else float(r.cos) for r in merged]
    ax.scatter(xs, ts, s=8, alpha=0.6, label="t (tensor)")
    ax.scatter(xs, coss, s=8, alpha=0.6, marker="x", label="cos (tensor)")
    means = [[t for t, x in zip(ts, xs) if x == i] for i in range(len(keys))]
    ax.plot(range(len(keys)), [sum(m) / len(m) for m in means], color="C0", label="mean t")
    ax.set_ylabel("t / cos")
    ax.legend(fontsize=7)
    layer_axis(ax, keys)
    return save_png(fig, path)
