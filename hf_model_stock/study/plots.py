"""``study/id_ood.png``: every model's in-distribution NLL (held-out GSM8K) against its
out-of-distribution NLL (the Python reference's prose), and the base-to-soup-N line through the models
on it, in order of t (the WiSE-FT curve). Lower-left is better. Left: the whole plane. Right: zoomed on
the fine-tunes and merges, with bars of ±1 *paired* standard error against soup-N (the same items
scored by both models: the noise that matters when comparing them; the unpaired standard error of a
score, mostly the spread between texts, is in the table)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from hf_model_stock.study.data import ID_TASK, OOD_TASK
from hf_model_stock.study.report import headline_value, line_points, paired

if TYPE_CHECKING:
    from hf_model_stock.study.experiment import StudyResult

STYLE = {"base": ("black", "s"), "ft": ("tab:gray", "o"), "soup": ("tab:blue", "D"), "stock": ("tab:red", "^"),
         "interp": ("tab:green", "v"), "line": ("tab:cyan", "o")}
ZOOMED = ("ft", "soup", "stock", "interp")  # the right panel's box holds these (and what falls inside it)


def _point(board: Any, name: str) -> tuple[float, float] | None:
    x, y = headline_value(board, name, ID_TASK), headline_value(board, name, OOD_TASK)
    return None if x is None or y is None else (x, y)


def write_id_ood(result: StudyResult, path: Path) -> Path:
    """Draw the ID/OOD plane to ``path`` (PNG)."""
    board = result.board
    soup = f"soup-{result.settings.n_models}"
    points = {row.name: p for row in board.rows if (p := _point(board, row.name)) is not None}
    curve = [(t, points[name]) for t, name in line_points(result) if name in points]
    fig = Figure(figsize=(13, 5.5))
    whole, zoom = fig.subplots(1, 2)
    box = [p for name, p in points.items() if name.partition("-")[0] in ZOOMED]
    x_lo, x_hi = min(p[0] for p in box), max(p[0] for p in box)
    y_lo, y_hi = min(p[1] for p in box), max(p[1] for p in box)
    pad_x, pad_y = 0.25 * (x_hi - x_lo) or 0.01, 0.35 * (y_hi - y_lo) or 0.01
    for ax, zoomed in ((whole, False), (zoom, True)):
        ax.plot([p[0] for _, p in curve], [p[1] for _, p in curve], "-", color="tab:cyan", alpha=0.6,
                label=f"base to {soup} (WiSE-FT line)")
        seen: set[str] = set()
        for name, (x, y) in points.items():
            kind = name.partition("-")[0]
            inside = x_lo - pad_x <= x <= x_hi + pad_x and y_lo - pad_y <= y <= y_hi + pad_y
            if zoomed and not inside:
                continue
            color, marker = STYLE.get(kind, ("tab:purple", "o"))
            xe = ye = 0.0
            if zoomed and name != soup:
                xe, ye = paired(board, name, soup, ID_TASK).stderr, paired(board, name, soup, OOD_TASK).stderr
            ax.errorbar(x, y, xerr=xe, yerr=ye, fmt=marker, color=color, ms=6, capsize=2,
                        label=None if kind in seen else kind)
            seen.add(kind)
            label = f"t={result.merge_t[name]:g}" if kind == "line" else name
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(f"{ID_TASK}: held-out GSM8K, NLL/token (in distribution)")
        ax.grid(alpha=0.3)
    zoom.set_xlim(x_lo - pad_x, x_hi + pad_x)
    zoom.set_ylim(y_lo - pad_y, y_hi + pad_y)
    whole.set_ylabel(f"{OOD_TASK}: Python reference prose, NLL/token\n(out of distribution)")
    whole.set_title("Every model (lower-left is better)", fontsize=10)
    zoom.set_title(f"Zoomed; bars: ±1 paired standard error vs {soup} (same items)", fontsize=10)
    whole.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    return path
