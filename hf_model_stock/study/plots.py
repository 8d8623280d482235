"""``study/id_ood.png``: every model's in-distribution NLL (held-out GSM8K) against its
out-of-distribution NLL (the Python reference's prose), each with its standard error, and the
base-to-soup-N line through the models on it, in order of t (the WiSE-FT curve). Lower-left is better."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from hf_model_stock.study.data import ID_TASK, OOD_TASK

if TYPE_CHECKING:
    from hf_model_stock.study.runner import StudyResult

STYLE = {"base": ("black", "s"), "ft": ("tab:gray", "o"), "soup": ("tab:blue", "D"), "stock": ("tab:red", "^"),
         "interp": ("tab:green", "v"), "line": ("tab:blue", ".")}


def score(board: Any, name: str, task: str) -> tuple[float, float] | None:
    """(value, stderr or 0) of a row's headline score, or None."""
    row = next((r for r in board.rows if r.name == name), None)
    s = row.score(task) if row else None
    return None if s is None else (float(s["value"]), float(s.get("stderr") or 0.0))


def line_points(result: StudyResult) -> list[tuple[float, str]]:
    """(t, row) of the models on the base-to-soup-N line, by t: the base, the line's points, interp-N, the soup."""
    n = result.settings.n_models
    points = [(0.0, "base"), (1.0, f"soup-{n}")]
    points += [(t, name) for name, t in result.merge_t.items() if name.startswith("line-") or name == f"interp-{n}"]
    return sorted(points)


def write_id_ood(result: StudyResult, path: Path) -> Path:
    """Draw the ID/OOD plane to ``path`` (PNG)."""
    board = result.board
    fig = Figure(figsize=(7.5, 5.5))
    ax = fig.subplots()
    curve = [(p, t) for t, name in line_points(result) if (p := _both(board, name))]
    ax.plot([p[0][0] for p, _ in curve], [p[1][0] for p, _ in curve], "-", color="tab:blue", alpha=0.4,
            label=f"base to soup-{result.settings.n_models} (WiSE-FT line)")
    for (at_x, at_y), t in curve:
        ax.annotate(f"t={t:g}", (at_x[0], at_y[0]), textcoords="offset points", xytext=(6, -10), fontsize=7,
                    color="tab:blue")
    seen: set[str] = set()
    for row in board.rows:
        both = _both(board, row.name)
        if both is None:
            continue
        (x, xe), (y, ye) = both
        kind = row.name.partition("-")[0]
        color, marker = STYLE.get(kind, ("tab:purple", "o"))
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt=marker, color=color, ms=6 if kind != "line" else 8, capsize=2,
                    label=None if kind in seen else kind)
        seen.add(kind)
        if kind != "line":
            ax.annotate(row.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"{ID_TASK}: held-out GSM8K, NLL/token (in distribution, lower is better)")
    ax.set_ylabel(f"{OOD_TASK}: Python reference prose, NLL/token\n(out of distribution, lower is better)")
    ax.set_title("In vs out of distribution (bars: ±1 standard error over items)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


def _both(board: Any, name: str) -> tuple[tuple[float, float], tuple[float, float]] | None:
    x, y = score(board, name, ID_TASK), score(board, name, OOD_TASK)
    return None if x is None or y is None else (x, y)
