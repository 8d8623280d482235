"""The batch's progress: models done, running, failed and queued.

On a terminal a live ``rich`` table (one line per model with its state and time); elsewhere (CI
logs, files) one plain line per event.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from hf_model_stock.leaderboard.executors import Job, JobResult


class BatchProgress:
    """Tracks each model's state and shows it; also calls ``on_finished`` for every result."""

    def __init__(self, names: Sequence[str], *, cached: Sequence[str] = (), stream: TextIO | None = None,
                 live: bool | None = None, on_finished: Callable[[JobResult], None] | None = None) -> None:
        self.state: dict[str, str] = {name: "queued" for name in names}
        self.state.update({name: "cached" for name in cached})
        self.detail: dict[str, str] = {}
        self.since: dict[str, float] = {}
        self.stream = stream or sys.stdout
        self.on_finished = on_finished
        self._live: Any = None
        if live if live is not None else self.stream.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._table(), console=Console(file=self.stream), refresh_per_second=2)

    def counts(self) -> dict[str, int]:
        """How many models are in each state."""
        out = {"done": 0, "running": 0, "failed": 0, "queued": 0, "cached": 0}
        for state in self.state.values():
            out[state] += 1
        return out

    def line(self) -> str:
        c = self.counts()
        return (f"done {c['done'] + c['cached']} ({c['cached']} cached) | running {c['running']} | "
                f"failed {c['failed']} | queued {c['queued']}")

    def __enter__(self) -> BatchProgress:
        if self._live is not None:
            self._live.start()
        else:
            print(f"leaderboard: {self.line()}", file=self.stream, flush=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.stop()

    def started(self, job: Job) -> None:
        self.state[job.name] = "running"
        self.since[job.name] = time.monotonic()
        self._show(f"started {job.name}")

    def finished(self, result: JobResult) -> None:
        name = result.job.name
        self.state[name] = "done" if result.ok else "failed"
        self.detail[name] = f"{result.seconds:.0f} s" if result.ok else (result.error or "")
        if self.on_finished is not None:
            self.on_finished(result)
        self._show(f"{'finished' if result.ok else 'FAILED'} {name}: {self.detail[name]}")

    def _show(self, event: str) -> None:
        if self._live is not None:
            self._live.update(self._table())
        else:
            print(f"leaderboard: {event} | {self.line()}", file=self.stream, flush=True)

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(title=self.line(), title_justify="left")
        table.add_column("model")
        table.add_column("state")
        table.add_column("time / error", overflow="fold")
        now = time.monotonic()
        for name, state in self.state.items():
            detail = self.detail.get(name, "")
            if state == "running":
                detail = f"{now - self.since[name]:.0f} s"
            style = {"failed": "red", "running": "yellow", "done": "green", "cached": "green"}.get(state, "")
            table.add_row(name, f"[{style}]{state}[/]" if style else state, detail)
        return table
