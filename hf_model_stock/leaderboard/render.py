"""The leaderboard as ``leaderboard.md``, ``leaderboard.csv`` and a static ``leaderboard.html``.

Markdown and HTML show a normalised table (0-100, ranked by the capability average; only when some
task is normalised, the average only when some task is averaged), a raw table (each task's headline
metric with its stderr and item count), failures and model identities. Every score is shown with its
standard error where it has one (a normalised score's is the raw one scaled by 100 / (1 - random)).
The CSV has one row per model with every task's metric, raw value, stderr, n and normalised score.
"""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path
from typing import Any

from hf_model_stock.evaluation.tasks import benchmark_for
from hf_model_stock.leaderboard.board import Leaderboard, Row, capability_tasks

MISSING = "—"


def _num(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _normalised_cell(row: Row, task: str) -> str:
    """The normalised score ± its standard error (a raw metric with a unit: the raw value ± its own)."""
    score = row.score(task)
    if score is None or score.get("normalised") is None:  # an lm-eval task the leaderboard does not normalise
        return MISSING
    benchmark = benchmark_for(task)
    digits = 4 if benchmark.unit else 2
    stderr = score.get("stderr")
    if stderr is not None and not benchmark.unit:
        stderr = stderr * 100.0 / (1.0 - benchmark.random_baseline)
    return f"{score['normalised']:.{digits}f}" + (f" ± {stderr:.{digits}f}" if stderr is not None else "")


def has_normalised(board: Leaderboard) -> bool:
    """Whether any task's score is normalised (a curated task without a unit, or an Open LLM Leaderboard
    task): else the normalised table is the raw one."""
    return any(benchmark_for(t).unit is None and (benchmark_for(t).curated or any(
        (s := row.score(t)) is not None and s.get("normalised") is not None for row in board.rows)) for t in board.tasks)


def metric_label(board: Leaderboard, task: str) -> str:
    """The metric of ``task``'s headline scores, with the judge that made them (HarmBench): e.g.
    ``refusal_asr, judge refusal``. Scores of different metrics or judges are listed, never merged."""
    labels = []
    for row in board.rows:
        score = row.score(task)
        if score is not None:
            label = score["metric"] + (f", judge {score['judge']}" if score.get("judge") else "")
            if label not in labels:
                labels.append(label)
    return " | ".join(labels) or next(iter(benchmark_for(task).metrics), "lm-eval's metrics")


def _task_header(task: str, board: Leaderboard | None = None) -> str:
    benchmark = benchmark_for(task)
    if task == "harmbench" and board is not None:  # its scores depend on the judge: name it
        return f"{task} ({metric_label(board, task)}; lower is better)"
    notes = ([f"{benchmark.unit}, not normalised"] if benchmark.unit else []) + \
        ([] if benchmark.higher_is_better else ["lower is better"])
    return f"{task} ({', '.join(notes)})" if notes else task


def _raw_cell(row: Row, task: str) -> str:
    score = row.score(task)
    if score is None:
        return MISSING
    stderr = f" ± {score['stderr']:.4f}" if score.get("stderr") is not None else ""
    return f"{score['value']:.4f}{stderr} (n={score['n']})"


def _identity(row: Row) -> str:
    """The cache key, shortened: ``org/name@<12 hex>`` or ``sha256:<16 hex>``."""
    if row.identity is None:
        return MISSING
    if row.identity.startswith("sha256:"):
        return row.identity[:23]
    repo, _, commit = row.identity.rpartition("@")
    return f"{repo}@{commit[:12]}"


def _settings_line(board: Leaderboard) -> str:
    parts = [f"{k}={v}" for k, v in board.settings.items() if v not in (None, False)]
    return ", ".join(parts)


def _tables(board: Leaderboard) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Header and cells of each table, shared by Markdown and HTML."""
    ranked = board.ranked()
    averaged = bool(capability_tasks(board.tasks))
    normalised_head = ["#", "model", "role", *(["average"] if averaged else []),
                       *[_task_header(t, board) for t in board.tasks]]
    normalised_rows = []
    for i, row in enumerate(ranked, 1):
        cells = [str(i), row.name, ", ".join(row.roles), *([_num(row.average(board.tasks), 2)] if averaged else [])]
        cells += [_normalised_cell(row, t) for t in board.tasks]
        normalised_rows.append(cells)
    raw_head = ["model", *[f"{_task_header(t, board) if not has_normalised(board) else t}: {metric_label(board, t)}"
                           for t in board.tasks]]
    raw_rows = [[row.name, *[_raw_cell(row, t) for t in board.tasks]] for row in ranked]
    model_head = ["model", "role", "model id", "identity (cache key)", "status"]
    model_rows = [[row.name, ", ".join(row.roles), row.ref, _identity(row),
                   "failed" if row.error else ("cached: " + ", ".join(row.cached) if row.cached else "evaluated")]
                  for row in ranked]
    return {"normalised": (normalised_head, normalised_rows), "raw": (raw_head, raw_rows),
            "models": (model_head, model_rows)}


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def _lower_note(task: str) -> str:
    unit = benchmark_for(task).unit
    return f"{task} ({unit + ', ' if unit else ''}lower is better)"


def _not_averaged(board: Leaderboard, lower: list[str]) -> list[str]:
    """Sentences naming the tasks left out of the average (lower is better), HarmBench with its judge."""
    notes = [f"HarmBench ({metric_label(board, 'harmbench')}, lower is safer) is not averaged"] if "harmbench" in lower else []
    others = [t for t in lower if t != "harmbench"]
    return notes + ([f"not averaged: {', '.join(_lower_note(t) for t in others)}"] if others else [])


def _intro(board: Leaderboard) -> list[str]:
    capability = capability_tasks(board.tasks)
    lines = [f"{len(board.rows)} models, tasks: {', '.join(board.tasks)}. Generated {board.created}."]
    if _settings_line(board):
        lines.append(f"Settings: {_settings_line(board)}.")
    lower = [t for t in board.tasks if t not in capability]
    if has_normalised(board):
        lines.append(f"Normalised: max(raw - random, 0) / (1 - random) x 100 (Open LLM Leaderboard v2). Average: "
                     f"mean over {', '.join(capability) or 'no capability task'}"
                     + ("; " + "; ".join(_not_averaged(board, lower)) + "." if lower else "."))
    else:
        lines.append("Raw scores only: " + ", ".join(_lower_note(t) if t in lower else t for t in board.tasks)
                     + " (no task is normalised or averaged). Rows in spec order.")
    lines.append("± is the standard error over items, where the task reports one.")
    return lines


def write_markdown(board: Leaderboard, path: Path, chart: str | None = None) -> Path:
    """``leaderboard.md``; ``chart`` is the PNG's file name beside it, if one was drawn."""
    tables = _tables(board)
    lines = [f"# {board.title}", "", *_intro(board), ""]
    if chart:
        lines += [f"![scores per task]({chart})", ""]
    if has_normalised(board):
        lines += ["## Normalised scores (0-100)", "", *_md_table(*tables["normalised"]), ""]
    lines += ["## Raw scores", "", *_md_table(*tables["raw"]), ""]
    failed = [row for row in board.ranked() if row.error]
    if failed:
        lines += ["## Failed", "", *[f"- **{row.name}**: {row.error}" for row in failed], ""]
    lines += ["## Models", "", *_md_table(*tables["models"]), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def csv_rows(board: Leaderboard) -> list[dict[str, Any]]:
    """One dict per model (ranked), as written to the CSV."""
    out = []
    for rank, row in enumerate(board.ranked(), 1):
        average = row.average(board.tasks)
        record: dict[str, Any] = {"rank": rank, "model": row.name, "roles": ";".join(row.roles), "ref": row.ref,
                                  "identity": row.identity or "", "status": row.status, "error": row.error or "",
                                  "average_normalised": "" if average is None else repr(average)}
        for task in board.tasks:
            score = row.score(task)
            record[f"{task}_metric"] = score["metric"] if score else next(iter(benchmark_for(task).metrics), "")
            record[f"{task}_raw"] = "" if score is None else repr(score["value"])
            record[f"{task}_stderr"] = "" if score is None or score.get("stderr") is None else repr(score["stderr"])
            record[f"{task}_n"] = "" if score is None else score["n"]
            record[f"{task}_normalised"] = "" if score is None else repr(score["normalised"])
        out.append(record)
    return out


def write_csv(board: Leaderboard, path: Path) -> Path:
    """``leaderboard.csv``: one row per model, full-precision numbers."""
    rows = csv_rows(board)
    fields = list(rows[0]) if rows else ["rank", "model"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead>", "<tbody>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
    return "\n".join(out + ["</tbody>", "</table>"])


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:nth-child(-n+3),td:nth-child(-n+3){text-align:left}thead{background:#f3f3f3}img{max-width:100%}
.failed{color:#b00}"""


def write_html(board: Leaderboard, path: Path, chart_png: Path | None = None) -> Path:
    """A static, self-contained ``leaderboard.html`` (the chart is embedded)."""
    tables = _tables(board)
    body = [f"<h1>{html.escape(board.title)}</h1>", *[f"<p>{html.escape(line)}</p>" for line in _intro(board)]]
    if chart_png is not None and chart_png.is_file():
        data = base64.b64encode(chart_png.read_bytes()).decode()
        body.append(f'<img alt="scores per task" src="data:image/png;base64,{data}">')
    if has_normalised(board):
        body += ["<h2>Normalised scores (0-100)</h2>", _html_table(*tables["normalised"])]
    body += ["<h2>Raw scores</h2>", _html_table(*tables["raw"])]
    failed = [row for row in board.ranked() if row.error]
    if failed:
        body += ["<h2>Failed</h2>", "<ul>" + "".join(
            f'<li class="failed"><b>{html.escape(r.name)}</b>: {html.escape(r.error or "")}</li>' for r in failed)
            + "</ul>"]
    body += ["<h2>Models</h2>", _html_table(*tables["models"])]
    page = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(board.title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path
