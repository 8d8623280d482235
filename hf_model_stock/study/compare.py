"""``python -m hf_model_stock.study.compare STUDY_DIR...``: one Markdown table over several study runs
(e.g. ``--steps 6``, ``12``, ``24``), read from each run's ``leaderboard/leaderboard.json`` and lm-eval's
per-item files: for each run and metric, the fine-tunes' range, soup-N, stock-N, interp-N, and the paired
differences of stock-N from the best fine-tune (on that metric), soup-N and interp-N, with their
standard errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from hf_model_stock.leaderboard.board import Leaderboard, Row
from hf_model_stock.leaderboard.store import TaskResult
from hf_model_stock.study.data import ID_TASK, OOD_TASK
from hf_model_stock.study.report import headline_value, paired


def load_board(study_dir: Path) -> Leaderboard:
    """The leaderboard a study run wrote (rows in the file's order)."""
    data = json.loads((study_dir / "leaderboard" / "leaderboard.json").read_text(encoding="utf-8"))
    rows = [Row(r["name"], r["roles"], r["ref"], r["identity"],
                {t: TaskResult(**res) for t, res in r["results"].items()}, r["error"], r["cached"])
            for r in data["rows"]]
    return Leaderboard(data["title"], data["tasks"], rows, data["settings"], data["created"])


def steps_of(study_dir: Path) -> int:
    """The fine-tunes' AdamW steps, from ft-1's record."""
    record = json.loads((study_dir / "models" / "ft-1" / "study-finetune.json").read_text(encoding="utf-8"))
    return int(record["fingerprint"]["settings"]["steps"])


def compare_table(study_dirs: Sequence[Path]) -> list[str]:
    """The Markdown table, one line per run and metric."""
    head = ["steps", "metric", "base", "fine-tunes", "soup-N", "stock-N", "interp-N", "stock − best ft", "stock − soup",
            "stock − interp", "stock-N mean t", "interp-N t"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for study_dir in study_dirs:
        board = load_board(study_dir)
        n = sum(r.name.startswith("ft-") for r in board.rows)
        report = json.loads((study_dir / "models" / f"stock-{n}" / "merge_report.json").read_text(encoding="utf-8"))
        interp = json.loads((study_dir / "models" / f"interp-{n}" / "merge_report.json").read_text(encoding="utf-8"))
        for task in (ID_TASK, OOD_TASK):
            if task not in board.tasks:
                continue
            scored = {f"ft-{i}": v for i in range(1, n + 1) if (v := headline_value(board, f"ft-{i}", task)) is not None}
            fts, best = list(scored.values()), min(scored, key=lambda name: scored[name])
            cells = [str(steps_of(study_dir)), task, f"{headline_value(board, 'base', task):.4f}",
                     f"{min(fts):.4f}-{max(fts):.4f}",
                     *[f"{headline_value(board, f'{kind}-{n}', task):.4f}" for kind in ("soup", "stock", "interp")]]
            for other in (best, f"soup-{n}", f"interp-{n}"):
                p = paired(board, f"stock-{n}", other, task)
                cells.append(f"{p.diff:+.4f} ± {p.stderr:.4f}" + (" *" if p.significant else ""))
            cells += [f"{report['summary']['t_mean']:.3f}", f"{interp['summary']['t_mean']:.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table for the study directories given (``<workdir>/study``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    print("\n".join(compare_table([Path(a) for a in args])))
    print("\n(* : more than 2 standard errors; differences are paired over the same items, NLL/token, lower is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
