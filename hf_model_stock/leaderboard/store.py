"""Finished results, one JSON file per (model identity, task key), written as each model finishes so
an interrupted batch loses nothing:

    <output>/cache/results/<sha256(identity)[:20]>/<task>-<task key>.json
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TaskResult:
    """One task's scores for one model, with where they came from."""

    task: str
    task_key: str
    identity: str
    scores: list[dict[str, Any]]  # evaluation.summary.Score fields
    created: str
    run_dir: str
    notes: list[str]

    def headline(self) -> dict[str, Any]:
        """The task's first (headline) score."""
        return self.scores[0]


def write_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a hidden temporary file beside ``path``, then rename it to ``path``: a reader
    never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


class ResultStore:
    """Reads and writes ``TaskResult`` files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, identity: str, task: str, task_key: str) -> Path:
        model = hashlib.sha256(identity.encode()).hexdigest()[:20]
        return self.root / model / f"{task}-{task_key}.json"

    def get(self, identity: str, task: str, task_key: str) -> TaskResult | None:
        """The stored result, or None (also for an unreadable file, which is then redone)."""
        try:
            data = json.loads(self._path(identity, task, task_key).read_text(encoding="utf-8"))
            result = TaskResult(**data)
        except (OSError, ValueError, TypeError):
            return None
        return result if result.identity == identity and result.scores else None

    def put(self, result: TaskResult) -> None:
        """Write atomically (temp file + rename)."""
        text = json.dumps(result.__dict__, indent=1, ensure_ascii=False) + "\n"
        write_atomically(self._path(result.identity, result.task, result.task_key),
                         lambda tmp: tmp.write_text(text, encoding="utf-8"))


def results_from_summary(summary: dict[str, Any], identity: str, keys: dict[str, str],
                         run_dir: str) -> list[TaskResult]:
    """Split an ``EvalSummary`` dict into one ``TaskResult`` per task it scored."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for score in summary.get("scores", []):
        by_task.setdefault(score["task"], []).append(score)
    return [TaskResult(task=task, task_key=keys[task], identity=identity, scores=scores,
                       created=summary.get("created", ""), run_dir=run_dir, notes=list(summary.get("notes", [])))
            for task, scores in by_task.items() if task in keys]
