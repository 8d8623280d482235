"""Our summary of a run: one row per (task, metric) with the Open LLM Leaderboard v2 normalisation,
written as ``summary.json`` beside lm-eval's own JSON, and printed as a table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.likelihood import SAMPLE_STDERR
from hf_model_stock.evaluation.tasks import Benchmark


def normalised(raw: float, random_baseline: float) -> float:
    """Open LLM Leaderboard v2: ``max(raw - random, 0) / (1 - random) * 100`` (raw in [0, 1])."""
    return max(raw - random_baseline, 0.0) / (1.0 - random_baseline) * 100.0


@dataclass(frozen=True)
class Score:
    """One number: ``value`` as lm-eval reports it (in [0, 1] unless its benchmark has a ``unit``),
    ``normalised`` in [0, 100] (the raw value for a benchmark with a ``unit``)."""

    task: str
    lm_eval_task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    normalised: float | None  # None: an lm-eval task the Open LLM Leaderboard v2 does not normalise
    higher_is_better: bool
    data: str  # the test file(s), or "hub"
    judge: str | None = None  # HarmBench: the judge whose verdicts these are (a classifier, or "refusal")


@dataclass
class EvalSummary:
    """Everything a leaderboard or model card needs about one model's run."""

    model: str
    revision: str | None
    sha: str | None  # the commit a Hub revision resolved to; None for a local directory
    path: str
    created: str
    versions: dict[str, str]
    spec: dict[str, Any]
    scores: list[Score] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # what else the run wrote, relative to summary.json
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def lm_eval_scores(benchmark: Benchmark, results: dict[str, Any], data: str) -> list[Score]:
    """``benchmark``'s rows from lm-eval's results dict (a task's or a group's aggregate entry)."""
    entry = results["results"].get(benchmark.lm_eval_task)
    if entry is None:
        raise EvalError(f"{benchmark.name}: lm-eval returned no results for {benchmark.lm_eval_task}")
    scores = []
    for metric in benchmark.metrics:
        if metric not in entry:
            raise EvalError(f"{benchmark.name}: lm-eval's results for {benchmark.lm_eval_task} lack {metric!r}")
        name, _, filter_name = metric.partition(",")
        value = float(entry[metric])
        stderr = entry.get(f"{name}_stderr,{filter_name}")
        if not isinstance(stderr, (int, float)) and name in SAMPLE_STDERR:  # lm-eval's "N/A": ours, from the items
            samples = results.get("samples", {}).get(benchmark.lm_eval_task, [])
            stderr = SAMPLE_STDERR[name]([tuple(s[name]) for s in samples if s.get("filter") == filter_name])
        scores.append(Score(
            task=benchmark.name, lm_eval_task=benchmark.lm_eval_task, metric=metric, value=value,
            stderr=float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
            n=int(entry["sample_len"]),
            normalised=value if benchmark.unit else normalised(value, benchmark.random_baseline),
            higher_is_better=benchmark.higher_is_better, data=data,
        ))
    return scores


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def task_scores(name: str, results: dict[str, Any], data: str, baselines: dict[str, float] | None) -> list[Score]:
    """The rows of any lm-eval task, group or tag ``name``: every metric lm-eval reports for it, with
    its stderr and direction; a group without an aggregate gives its tasks' rows. With ``baselines``
    (each leaf task's random baseline: an Open LLM Leaderboard v2 task) a task's value is normalised,
    and a group's normalised score is the mean of its tasks' normalised scores, as the leaderboard does."""
    table = results.get("results", {})
    leaves = [t for t in results.get("group_subtasks", {}).get(name, []) if t in table]
    if name not in table and not leaves:
        raise EvalError(f"{name}: lm-eval returned no results for it")
    rows = []
    for task in ([name] if name in table and _metrics(table[name]) else leaves):
        entry = table[task]
        for metric in _metrics(entry):
            metric_name, _, filter_name = metric.partition(",")
            value = _finite(entry[metric])
            if value is None:
                continue
            members = [t for t in _leaves(task, results) if t in table] or [task]
            rows.append(Score(
                task=name, lm_eval_task=task, metric=metric, value=value,
                stderr=_finite(entry.get(f"{metric_name}_stderr,{filter_name}")),
                n=sum(_count(t, results) for t in members),
                normalised=_leaderboard_normalised(members, metric, table, baselines),
                higher_is_better=bool(results.get("higher_is_better", {}).get(task, {}).get(metric_name, True)),
                data=data,
            ))
    if not rows:
        raise EvalError(f"{name}: lm-eval's results for it have no numeric metric")
    return rows


def _metrics(entry: dict[str, Any]) -> list[str]:
    return [k for k in entry if "," in k and not k.partition(",")[0].endswith("_stderr")]


def _leaves(task: str, results: dict[str, Any]) -> list[str]:
    children = results.get("group_subtasks", {}).get(task)
    if not children:
        return [task]
    return [leaf for child in children for leaf in _leaves(child, results)]


def _count(task: str, results: dict[str, Any]) -> int:
    n = results.get("n-samples", {}).get(task)
    count = n.get("effective", n.get("original")) if isinstance(n, dict) else None
    return int(count) if isinstance(count, int) else 0


def _leaderboard_normalised(members: list[str], metric: str, table: dict[str, Any],
                            baselines: dict[str, float] | None) -> float | None:
    if baselines is None or not all(m in baselines and _finite(table[m].get(metric)) is not None for m in members):
        return None
    return sum(normalised(float(table[m][metric]), baselines[m]) for m in members) / len(members)


def format_table(summary: EvalSummary) -> str:
    """A plain-text table of the scores (lower-is-better metrics are marked)."""
    where = f" @ {summary.sha[:12]}" if summary.sha else ""
    header = ("task", "metric", "value", "stderr", "n", "normalised")
    rows = [(s.task, s.metric + (f" (judge {s.judge})" if s.judge else "")
             + ("" if s.higher_is_better else " (lower is better)"), f"{s.value:.4f}",
             "-" if s.stderr is None else f"{s.stderr:.4f}", str(s.n),
             "-" if s.normalised is None else f"{s.normalised:.2f}")
            for s in summary.scores]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"{summary.model}{where}"]
    for row in [header, *rows]:
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines += [f"note: {note}" for note in summary.notes]
    return "\n".join(lines)
