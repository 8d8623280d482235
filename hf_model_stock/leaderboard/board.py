"""The leaderboard's data: one row per model with its per-task results, ranked by the average of the
normalised capability scores (Open LLM Leaderboard v2 normalisation, 0-100).

HarmBench's attack success rate is lower-is-better: it is shown beside the capability scores and
left out of the average, so safety never hides a capability difference (or the reverse).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_model_stock.evaluation.tasks import benchmark_for
from hf_model_stock.leaderboard.store import TaskResult


def capability_tasks(tasks: list[str]) -> list[str]:
    """The tasks where higher is better (all but HarmBench), in order."""
    return [t for t in tasks if benchmark_for(t).higher_is_better]


@dataclass
class Row:
    """One model: ``results`` per task; ``error`` when its evaluation (or merge) failed."""

    name: str
    roles: list[str]
    ref: str
    identity: str | None = None
    results: dict[str, TaskResult] = field(default_factory=dict)
    error: str | None = None
    cached: list[str] = field(default_factory=list)  # tasks whose result came from the cache

    def score(self, task: str) -> dict[str, Any] | None:
        """The task's headline score, or None."""
        result = self.results.get(task)
        return result.headline() if result else None

    def average(self, tasks: list[str]) -> float | None:
        """Mean normalised headline score over the capability tasks among ``tasks``; None unless the
        row has all of them."""
        scores = [self.score(task) for task in capability_tasks(tasks)]
        if not scores or any(s is None for s in scores):
            return None
        normalised = [s["normalised"] for s in scores if s is not None and s["normalised"] is not None]
        return sum(normalised) / len(normalised) if normalised else None  # tasks not normalised: left out

    @property
    def status(self) -> str:
        return "failed" if self.error else "ok"


@dataclass
class Leaderboard:
    """Every row, the tasks in spec order, and what the scores were measured with."""

    title: str
    tasks: list[str]
    rows: list[Row]
    settings: dict[str, Any]
    created: str

    def ranked(self) -> list[Row]:
        """Rows with an average first (best first), then the rest in spec order."""
        scored = [r for r in self.rows if r.average(self.tasks) is not None]
        rest = [r for r in self.rows if r.average(self.tasks) is None]
        return sorted(scored, key=lambda r: -(r.average(self.tasks) or 0.0)) + rest

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title, "created": self.created, "tasks": self.tasks, "settings": self.settings,
            "rows": [{"rank": i + 1, "name": r.name, "roles": r.roles, "ref": r.ref, "identity": r.identity,
                      "status": r.status, "error": r.error, "average_normalised": r.average(self.tasks),
                      "cached": r.cached, "results": {t: res.__dict__ for t, res in r.results.items()}}
                     for i, r in enumerate(self.ranked())],
        }

    def write_json(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path
