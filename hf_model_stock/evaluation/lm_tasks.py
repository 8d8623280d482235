"""lm-eval task configs for a run: one small YAML per task that ``include:``s the registered config.

Every task a run evaluates is written to ``<run>/task_configs/`` as an overlay of lm-eval's own
config (or ours in ``evals/tasks``): prompts, few-shot settings, filters and metrics stay exactly
lm-eval's, and local data only adds ``dataset_path``/``data_files``. A group (MATH) gets one overlay
per subtask plus one for the group. The run then loads just that directory (``run_task_manager``),
which also leaves the record of what ran. lm-eval's full index is read once per process, only to
find the registered configs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hf_model_stock.eval_spec import EVALS_DIR
from hf_model_stock.evaluation.data import TaskData
from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.tasks import Benchmark

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


@functools.lru_cache(maxsize=1)
def registry() -> TaskManager:
    """lm-eval's task index plus ``evals/tasks``; built once per process (about 20 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(EVALS_DIR / "tasks"))


def run_task_manager(config_dir: Path) -> TaskManager:
    """A task manager that knows only the overlays in ``config_dir`` (fast to build)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(config_dir), include_defaults=False)


def subsets(benchmark: Benchmark) -> list[tuple[str, str]]:
    """(subtask, dataset_name) for each subtask of a per-subset benchmark, in the group's order."""
    if not benchmark.per_subset:
        return []
    index = registry().task_index
    return [(child, index[child].cfg["dataset_name"]) for child in _entry(benchmark.lm_eval_task).cfg["task"]]


def write_task_config(benchmark: Benchmark, data: TaskData, config_dir: Path) -> str:
    """Write ``benchmark``'s overlay(s) into ``config_dir``; return the lm-eval task or group name."""
    config_dir.mkdir(parents=True, exist_ok=True)
    if benchmark.per_subset:
        for child, subset in subsets(benchmark):
            _write(config_dir, child, _overrides(benchmark, data, data.files.get(subset)))
        _write(config_dir, benchmark.lm_eval_task, {})
    else:
        _write(config_dir, benchmark.lm_eval_task, _overrides(benchmark, data, data.files.get("")))
    return benchmark.lm_eval_task


def _write(config_dir: Path, name: str, overrides: dict[str, Any]) -> None:
    own = EVALS_DIR / "tasks" / f"{name}.yaml"  # ours: no need to build lm-eval's index (10-20 s a process)
    overlay = {"include": str(own if own.is_file() else _entry(name).yaml_path), **overrides}
    (config_dir / f"{name}.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False), encoding="utf-8")


def _entry(name: str) -> Any:
    entry = registry().task_index.get(name)
    if entry is None or entry.yaml_path is None:
        from importlib.metadata import version

        raise EvalError(f"task {name!r} is not in lm-eval {version('lm_eval')}'s task index")
    return entry


def _overrides(benchmark: Benchmark, data: TaskData, files: dict[str, Path] | None) -> dict[str, Any]:
    if not files:
        return {}  # lm-eval's own data set
    return {
        "dataset_path": data.loader,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path.resolve()) for split, path in files.items()}},
        **{key: None for key in benchmark.unset},
    }
