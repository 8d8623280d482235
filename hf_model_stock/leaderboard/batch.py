"""Run a leaderboard: expand the spec, build missing merges, identify every model, skip what the cache
already holds (``resume``), evaluate the rest on the chosen executor, and write the tables and chart.

Files under the output directory:
  leaderboard.md / .csv / .html / .png / .json   the results (rewritten at the end of every run)
  cache/results/<model>/<task>-<key>.json         one finished (model, task) result each
  cache/file-digests.json                         content digests of local model files
  runs/<model>/...                                each model's lm-eval files (see evaluation.runner)
  logs/<model>.log                                each model's console output
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from hf_model_stock.errors import LeaderboardError
from hf_model_stock.evaluation.evaluate import check_request
from hf_model_stock.leaderboard.board import Leaderboard, Row
from hf_model_stock.leaderboard.contenders import Contender, expand, slug
from hf_model_stock.leaderboard.executors import (
    Evaluate,
    Job,
    JobResult,
    LocalExecutor,
    RayExecutor,
    evaluate_job,
    one_line,
)
from hf_model_stock.leaderboard.keys import DigestMemo, model_identity, task_keys
from hf_model_stock.leaderboard.progress import BatchProgress
from hf_model_stock.leaderboard.render import write_csv, write_html, write_markdown
from hf_model_stock.leaderboard.spec import LeaderboardSpec
from hf_model_stock.leaderboard.store import (
    ResultStore,
    results_from_summary,
    write_atomically,
)


@dataclass
class LeaderboardRun:
    """The finished board, the files written, and the rows that failed."""

    board: Leaderboard
    files: dict[str, Path]

    @property
    def failed(self) -> list[Row]:
        return [row for row in self.board.rows if row.error]


def run_leaderboard(
    spec: LeaderboardSpec,
    *,
    executor: str | None = None,
    gpus_per_model: float | None = None,
    resume: bool = False,
    output: Path | None = None,
    evaluate: Evaluate = evaluate_job,
    merge_missing: bool = True,
    stream: TextIO | None = None,
    live: bool | None = None,
    ray_init: dict[str, Any] | None = None,
) -> LeaderboardRun:
    """Evaluate every model of ``spec`` (see the module docstring); ``executor`` and ``gpus_per_model``
    override the spec's. A model that fails is reported in its row; the batch goes on."""
    out = (output or spec.output).expanduser()
    check_request(spec.evals)
    contenders = expand(spec)
    tasks = spec.evals.task_names()
    keys = task_keys(spec.evals)
    rows = {c.name: Row(c.name, list(c.roles), c.ref) for c in contenders}
    out.mkdir(parents=True, exist_ok=True)
    if merge_missing:
        _build_missing_merges(contenders, rows, stream)
    _identify(contenders, rows, DigestMemo(out / "cache" / "file-digests.json"))
    store = ResultStore(out / "cache" / "results")
    jobs = _jobs_to_run(spec, contenders, rows, store if resume else None, out)

    def finished(result: JobResult) -> None:
        _record(result, rows[result.job.name], store, keys)

    runner = _executor(spec, executor, gpus_per_model, evaluate, ray_init)
    try:
        done_already = [r.name for r in rows.values() if not r.error and len(r.cached) == len(tasks)]
        print(f"leaderboard: {len(contenders)} models, {len(jobs)} to evaluate on {runner.describe()}",
              file=stream or sys.stdout, flush=True)
        with BatchProgress([job.name for job in jobs] + done_already, cached=done_already, stream=stream,
                           live=live, on_finished=finished) as progress:
            runner.run(jobs, progress)
    finally:
        if isinstance(runner, RayExecutor):
            runner.close()
    board = Leaderboard(
        title=spec.title, tasks=tasks, rows=list(rows.values()),
        settings=spec.evals.model_dump(mode="json", include={"limit", "dtype", "backend", "batch_size",
                                                              "apply_chat_template", "max_gen_toks"}),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    files = write_outputs(board, out)
    if spec.model_cards:
        from hf_model_stock.leaderboard.cards import write_model_cards

        write_model_cards(board, stream)
    return LeaderboardRun(board, files)


def _jobs_to_run(spec: LeaderboardSpec, contenders: list[Contender], rows: dict[str, Row], store: ResultStore | None,
                 out: Path) -> list[Job]:
    """One job per built contender, for the tasks ``store`` (with --resume) has no result for; cached results
    go into the rows, and a contender that was not built gets its error."""
    tasks, keys = spec.evals.task_names(), task_keys(spec.evals)
    jobs = []
    for contender in contenders:
        row = rows[contender.name]
        if row.error or row.identity is None:
            if not row.error:
                row.error = f"not built: {contender.ref} does not exist (run its recipe, or drop --no-merge)"
            continue
        todo = []
        for task in tasks:
            cached = store.get(row.identity, task, keys[task]) if store is not None else None
            if cached is None:
                todo.append(task)
            else:
                row.results[task] = cached
                row.cached.append(task)
        if todo:
            jobs.append(Job(
                name=contender.name, ref=contender.ref,
                spec=spec.evals.model_copy(update={"tasks": todo, "suite": None}).model_dump(mode="json"),
                run_root=str((out / "runs" / slug(contender.name)).resolve()),
                log=str((out / "logs" / f"{slug(contender.name)}.log").resolve()),
            ))
    return jobs


def _build_missing_merges(contenders: list[Contender], rows: dict[str, Row], stream: TextIO | None) -> None:
    """Merge each recipe whose output directory does not exist yet (no push, no evals)."""
    from hf_model_stock.workflow import run_recipe

    for contender in contenders:
        if contender.recipe is None or Path(contender.ref).exists():
            continue
        recipe = contender.recipe.model_copy(update={
            "evals": None, "output": contender.recipe.output.model_copy(update={"push_to_hub": None})})
        print(f"leaderboard: merging {contender.recipe_path} -> {contender.ref}", file=stream or sys.stdout,
              flush=True)
        try:
            run_recipe(recipe, progress=False)
        except Exception as exc:  # one failed merge fails its row, not the batch
            rows[contender.name].error = f"merge of {contender.recipe_path} failed: {one_line(exc)}"


def _identify(contenders: list[Contender], rows: dict[str, Row], memo: DigestMemo) -> None:
    """Each existing model's cache identity (Hub commit or content digest)."""
    try:
        for contender in contenders:
            row = rows[contender.name]
            if row.error or (contender.recipe is not None and not Path(contender.ref).exists()):
                continue
            try:
                row.identity = model_identity(contender.ref, memo)
            except Exception as exc:  # an unreachable repo fails its row, not the batch
                row.error = one_line(exc)
    finally:
        memo.save()


def _record(result: JobResult, row: Row, store: ResultStore, keys: dict[str, str]) -> None:
    """Store a finished job's per-task results (at once, so an interrupted batch keeps them)."""
    if not result.ok or result.summary is None:
        row.error = result.error
        return
    assert row.identity is not None
    asked = result.job.spec["tasks"]
    for task_result in results_from_summary(result.summary, row.identity, keys, result.job.run_root):
        store.put(task_result)
        row.results[task_result.task] = task_result
    missing = [task for task in asked if task not in row.results]
    if missing:
        row.error = f"the evaluation returned no score for {', '.join(missing)} (see {result.job.log})"


def _executor(spec: LeaderboardSpec, kind: str | None, gpus_per_model: float | None, evaluate: Evaluate,
              ray_init: dict[str, Any] | None) -> Any:
    settings = spec.executor
    kind = kind or settings.kind
    gpus = gpus_per_model if gpus_per_model is not None else settings.gpus_per_model
    if kind == "ray":
        return RayExecutor(evaluate, address=settings.address, gpus_per_model=gpus,
                           cpus_per_model=settings.cpus_per_model, init_options=ray_init)
    if kind == "local":
        if gpus is not None and gpus % 1:
            raise LeaderboardError("--gpus-per-model: a local run gives each model whole GPUs")
        return LocalExecutor(evaluate, parallel=settings.parallel, gpus_per_model=gpus)
    raise LeaderboardError(f"--executor: unknown executor {kind!r} (local or ray)")


def write_outputs(board: Leaderboard, out: Path) -> dict[str, Path]:
    """leaderboard.json, .csv, .png (when matplotlib is installed), .md and .html under ``out``."""
    files = {"json": write_atomically(out / "leaderboard.json", board.write_json),
             "csv": write_atomically(out / "leaderboard.csv", lambda p: write_csv(board, p))}
    try:
        from hf_model_stock.leaderboard.chart import write_chart
    except ImportError:
        chart = None
    else:
        chart = files["png"] = write_atomically(out / "leaderboard.png", lambda p: write_chart(board, p))
    files["md"] = write_atomically(out / "leaderboard.md", lambda p: write_markdown(board, p, chart.name if chart else None))
    files["html"] = write_atomically(out / "leaderboard.html", lambda p: write_html(board, p, chart))
    return files
