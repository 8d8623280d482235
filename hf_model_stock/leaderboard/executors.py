"""Run one evaluation per model, isolated, and report each start and finish.

- ``LocalExecutor``: a fresh Python process per model (``python -m hf_model_stock.leaderboard.worker``:
  no torch or CUDA state is inherited, the caller's script is not re-imported), ``parallel`` at a
  time, each given its own GPUs through ``CUDA_VISIBLE_DEVICES``. A model that raises, is killed or
  segfaults is reported as failed; the others go on.
- ``RayExecutor``: one Ray task per model with ``num_gpus``/``num_cpus``; ``ray.init(address)`` joins a
  cluster, or starts a local Ray when there is none, so the same command runs on a laptop and on a
  cluster. A small actor records which tasks have started, for the progress view.

Each model's output (lm-eval's logging included) goes to its log file, not to the console.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hf_model_stock.errors import LeaderboardError


@dataclass(frozen=True)
class Job:
    """Evaluate ``ref`` on ``spec`` (an ``EvalSpec`` as a dict, only the tasks still to run), writing
    lm-eval's files under ``run_root`` and the console output to ``log``."""

    name: str
    ref: str
    spec: dict[str, Any]
    run_root: str
    log: str


@dataclass
class JobResult:
    """How a job ended: ``summary`` (an ``EvalSummary`` dict) or ``error`` (one line)."""

    job: Job
    summary: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


Evaluate = Callable[[Job], dict[str, Any]]
POLL_SECONDS = 0.2


class Progress(Protocol):
    def started(self, job: Job) -> None: ...

    def finished(self, result: JobResult) -> None: ...


@dataclass
class Outcome:
    """What ``run_logged`` sends back: ``("ok", summary)`` or ``("error", message)``."""

    status: str
    payload: Any
    seconds: float = 0.0

    def result(self, job: Job) -> JobResult:
        """The job's result: its summary, or its one-line error pointing at its log."""
        if self.status == "ok":
            return JobResult(job, summary=self.payload, seconds=self.seconds)
        return JobResult(job, error=f"{self.payload} (see {job.log})", seconds=self.seconds)


def evaluate_job(job: Job) -> dict[str, Any]:
    """The real evaluation: ``evaluate_model`` on the job's model and tasks."""
    from hf_model_stock.eval_spec import EvalSpec
    from hf_model_stock.evaluation.evaluate import evaluate_model

    return evaluate_model(job.ref, EvalSpec.model_validate(job.spec), output_dir=Path(job.run_root)).to_dict()


def run_logged(evaluate: Evaluate, job: Job) -> Outcome:
    """Run ``evaluate(job)`` with stdout/stderr sent to the job's log; never raises."""
    start = time.perf_counter()
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a", encoding="utf-8") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            return Outcome("ok", evaluate(job), time.perf_counter() - start)
        except BaseException as exc:  # a failing model is a result, whatever it raised
            traceback.print_exc()
            return Outcome("error", one_line(exc), time.perf_counter() - start)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: our errors as they are, others prefixed with their type."""
    from hf_model_stock.errors import ModelStockError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ModelStockError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _death(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode} without a result"


def _last_line(log: str) -> str:
    try:
        lines = [line.strip() for line in Path(log).read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    last = next((line for line in reversed(lines) if line), "")
    return f": {last[:200]}" if last else ""


@dataclass
class _Child:
    job: Job
    process: subprocess.Popen
    workdir: Path
    slot: int


class LocalExecutor:
    """Child processes on this machine; see the module docstring."""

    def __init__(self, evaluate: Evaluate = evaluate_job, *, parallel: int | None = None,
                 gpus_per_model: float | None = None, gpu_ids: Sequence[str] | None = None) -> None:
        self.evaluate = evaluate
        ids = list(gpu_ids) if gpu_ids is not None else visible_gpus()
        self.gpus_per_model = int(gpus_per_model if gpus_per_model is not None else (1 if ids else 0))
        if self.gpus_per_model > len(ids):
            raise LeaderboardError(f"executor.gpus_per_model: {self.gpus_per_model} GPUs per model, "
                                   f"but this machine has {len(ids)}")
        self.gpu_groups = ([ids[i:i + self.gpus_per_model] for i in range(0, len(ids), self.gpus_per_model)
                            if len(ids[i:i + self.gpus_per_model]) == self.gpus_per_model]
                           if self.gpus_per_model else [])
        self.parallel = parallel or max(1, len(self.gpu_groups))
        if self.gpus_per_model:
            self.parallel = min(self.parallel, len(self.gpu_groups))

    def describe(self) -> str:
        where = f"{self.gpus_per_model} GPU(s) each" if self.gpus_per_model else "CPU"
        return f"local: {self.parallel} at a time, {where}"

    def run(self, jobs: Sequence[Job], progress: Progress) -> list[JobResult]:
        """Run every job; results in the order they finish."""
        queue, free, results = list(jobs), list(range(self.parallel)), []
        running: list[_Child] = []
        try:
            while queue or running:
                while queue and free:
                    child = self._start(queue.pop(0), free.pop(0))
                    running.append(child)
                    progress.started(child.job)
                for child in [c for c in running if c.process.poll() is not None]:
                    running.remove(child)
                    free.append(child.slot)
                    result = self._collect(child)
                    results.append(result)
                    progress.finished(result)
                time.sleep(POLL_SECONDS)
        finally:
            for child in running:
                child.process.terminate()
            for child in running:
                child.process.wait(10)
                shutil.rmtree(child.workdir, ignore_errors=True)
        return results

    def _start(self, job: Job, slot: int) -> _Child:
        """Start ``python -m hf_model_stock.leaderboard.worker`` on a pickled (evaluate, job)."""
        workdir = Path(tempfile.mkdtemp(prefix="hfms-job-"))
        with (workdir / "job.pkl").open("wb") as fh:
            pickle.dump((self.evaluate, job), fh)
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpu_groups[slot]) if self.gpus_per_model else ""
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the evaluate function's module too
        Path(job.log).parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "hf_model_stock.leaderboard.worker", str(workdir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return _Child(job, process, workdir, slot)

    @staticmethod
    def _collect(child: _Child) -> JobResult:
        job, returncode = child.job, child.process.returncode
        try:
            with (child.workdir / "outcome.pkl").open("rb") as fh:
                outcome: Outcome | None = pickle.load(fh)
        except (OSError, EOFError, pickle.UnpicklingError):
            outcome = None
        shutil.rmtree(child.workdir, ignore_errors=True)
        if outcome is None:
            detail = _last_line(job.log) if returncode > 0 else ""  # a signal leaves no message of its own
            return JobResult(job, error=f"crashed ({_death(returncode)}{detail}); see {job.log}")
        return outcome.result(job)


def visible_gpus() -> list[str]:
    """The GPU ids child processes may use (``CUDA_VISIBLE_DEVICES`` order, else all CUDA devices)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [part.strip() for part in listed.split(",") if part.strip() and part.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class _StartBoard:
    """A Ray actor: tasks say when they start, so the driver can show what is running."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def start(self, name: str) -> None:
        self.names.append(name)

    def started(self) -> list[str]:
        return list(self.names)


def _ray_task(evaluate: Evaluate, job: Job, board: Any) -> Outcome:
    import ray

    ray.get(board.start.remote(job.name))
    return run_logged(evaluate, job)


class RayExecutor:
    """One Ray task per model; see the module docstring."""

    def __init__(self, evaluate: Evaluate = evaluate_job, *, address: str | None = None,
                 gpus_per_model: float | None = None, cpus_per_model: float = 1.0,
                 init_options: dict[str, Any] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise LeaderboardError("executor ray: Ray is not installed (pip install 'hf-model-stock[ray]')") from None
        self.ray = ray
        self.evaluate = evaluate
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            options = dict(init_options or {})
            if address is None and not os.environ.get("RAY_ADDRESS"):
                # a local instance: workers import what this process can (as the local executor's do);
                # on a cluster, hf-model-stock must be installed on the nodes
                options.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **options)
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        self.gpus_per_model = gpus_per_model if gpus_per_model is not None else (1.0 if cluster_gpus else 0.0)
        self.cpus_per_model = cpus_per_model
        if self.gpus_per_model > cluster_gpus and self.gpus_per_model:
            self.close()
            raise LeaderboardError(f"executor.gpus_per_model: {self.gpus_per_model} GPUs per model, but the Ray "
                                   f"cluster has {cluster_gpus:g}")

    def describe(self) -> str:
        nodes = len(self.ray.nodes())
        return (f"ray: {nodes} node(s), {self.gpus_per_model:g} GPU(s) and {self.cpus_per_model:g} CPU(s) "
                "per model")

    def run(self, jobs: Sequence[Job], progress: Progress) -> list[JobResult]:
        """Submit every job, then collect them as they finish."""
        ray = self.ray
        board = ray.remote(num_cpus=0)(_StartBoard).remote()
        task = ray.remote(_ray_task).options(num_gpus=self.gpus_per_model, num_cpus=self.cpus_per_model,
                                             max_retries=0)
        pending = {task.remote(self.evaluate, job, board): job for job in jobs}
        announced: set[str] = set()
        results = []
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for name in ray.get(board.started.remote()):
                    if name not in announced:
                        announced.add(name)
                        progress.started(next(j for j in jobs if j.name == name))
                for ref in ready:
                    job = pending.pop(ref)
                    if job.name not in announced:
                        announced.add(job.name)
                        progress.started(job)
                    result = self._collect(job, ref)
                    results.append(result)
                    progress.finished(result)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            ray.kill(board)
        return results

    def _collect(self, job: Job, ref: Any) -> JobResult:
        try:
            outcome: Outcome = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # the worker died (segfault, OOM kill, node lost)
            return JobResult(job, error=f"crashed ({type(exc).__name__}); see {job.log}")
        return outcome.result(job)

    def close(self) -> None:
        """Shut down the Ray instance if this executor started it."""
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
