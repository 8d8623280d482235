"""lm-eval task configs for a run: one small YAML per task that ``include:``s the registered config.

Every task a run evaluates is written to ``<run>/task_configs/`` as an overlay of lm-eval's own
config (or ours in ``evals/tasks``): prompts, few-shot settings, filters and metrics stay exactly
lm-eval's, and local data only adds ``dataset_path``/``data_files``. A group (MATH) gets one overlay
per subtask plus one for the group. The run then loads just that directory (``run_task_manager``),
which also leaves the record of what ran. lm-eval's full index is read once per process, only to
find the registered configs.

Any other lm-eval task, group or tag (``tasks.benchmark_for``: not curated) runs from lm-eval's own
index, plus the user's ``--include-path`` directory, through one task manager per process
(``registry``), built only when such a task is asked for. Before any model is loaded each of its
data sets is checked to be within reach (``check_task_data``), and its resolved config is digested
(``task_config_digest``) for the record and the leaderboard's cache keys.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hf_model_stock.eval_spec import EVALS_DIR
from hf_model_stock.evaluation.data import TaskData
from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.tasks import Benchmark

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


@functools.lru_cache(maxsize=2)
def registry(include_path: Path | None = None) -> TaskManager:
    """lm-eval's task index plus ``evals/tasks`` (and the user's ``include_path``, which takes precedence);
    built once per process (10-20 s)."""
    from lm_eval.tasks import TaskManager

    paths = [str(EVALS_DIR / "tasks"), *([str(include_path)] if include_path is not None else [])]
    return TaskManager(include_path=paths)


def lm_eval_entry(name: str, include_path: Path | None = None) -> Any:
    """The index entry of an lm-eval task, group or tag; ``EvalError`` naming it where there is none."""
    entry = registry(include_path).task_index.get(name)
    if entry is None:
        from importlib.metadata import version

        where = f" nor in --include-path {include_path}" if include_path is not None else ""
        raise EvalError(f"task {name!r} is not one of ours, nor an lm-eval {version('lm_eval')} task, group or "
                        f"tag{where} (`lm-eval ls tasks` lists them)")
    return entry


def leaf_configs(name: str, include_path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The configs (includes resolved, functions by name) of every task ``name`` runs: itself, or
    the leaves of its group or tag, by task name."""
    index = registry(include_path).task_index
    out: dict[str, dict[str, Any]] = {}

    def walk(item: Any) -> None:
        if isinstance(item, dict):  # an inline subtask or subgroup
            if "task" in item and "group" not in item and isinstance(item["task"], str):
                out[item["task"]] = item
            for child in item.get("task", []) if isinstance(item.get("task"), list) else []:
                walk(child)
            return
        entry = index.get(item)
        if entry is None:
            raise EvalError(f"task {name!r}: its member {item!r} is not in lm-eval's task index")
        kind = entry.kind.name
        if kind == "TAG":
            for member in sorted(k for k, e in index.items() if item in (e.tags or set())):
                walk(member)
        elif kind == "GROUP":
            for child in (entry.cfg or {}).get("task", []):
                walk(child)
        else:
            out[item] = dict(entry.cfg or {})

    lm_eval_entry(name, include_path)
    walk(name)
    return out


def task_config_digest(name: str, include_path: Path | None = None) -> str:
    """sha256 of what ``name`` runs: its own and its leaves' resolved configs, and the Python files
    beside each YAML (where its ``!function``s live)."""
    index = registry(include_path).task_index
    h = hashlib.sha256()
    entry = lm_eval_entry(name, include_path)
    h.update(json.dumps(entry.cfg or {}, sort_keys=True, default=str).encode())
    dirs = set()
    for leaf, cfg in sorted(leaf_configs(name, include_path).items()):
        h.update(f"\0{leaf}\0".encode() + json.dumps(cfg, sort_keys=True, default=str).encode())
        leaf_entry = index.get(leaf)
        if leaf_entry is not None and leaf_entry.yaml_path is not None:
            dirs.add(Path(leaf_entry.yaml_path).parent)
    for directory in sorted(dirs):
        for py in sorted(directory.glob("*.py")):
            h.update(f"\0{py.name}\0".encode() + py.read_bytes())
    return h.hexdigest()


def check_task_data(name: str, include_path: Path | None = None) -> None:
    """Check that every data set ``name`` reads is within reach (offline: in the local cache), by
    loading each one's builder (metadata only); ``EvalError`` naming the task and the data set."""
    import datasets

    seen = set()
    for leaf, cfg in leaf_configs(name, include_path).items():
        path = cfg.get("dataset_path")
        if not isinstance(path, str):
            continue  # a Python task, or one that builds its data in code
        subset = cfg.get("dataset_name")
        given = cfg.get("dataset_kwargs")
        kwargs: dict[str, Any] = given if isinstance(given, dict) else {}
        key = (path, subset, json.dumps(kwargs, sort_keys=True, default=str))
        if key in seen:
            continue
        seen.add(key)
        try:
            datasets.load_dataset_builder(path, subset, **kwargs)
        except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
            offline = " offline" if datasets.config.HF_HUB_OFFLINE else ""
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            shown = path + (f" ({subset})" if subset else "")
            raise EvalError(f"{name}: task {leaf} reads data set {shown}, which is not available{offline}: "
                            f"{first}") from None


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


# Answer options of the Open LLM Leaderboard v2 tasks whose choices are not a list in lm-eval's YAML
# (MuSR's come with each item, MMLU-Pro's from a function), as the leaderboard documents them.
LEADERBOARD_CHOICES = {
    "leaderboard_musr_murder_mysteries": 2,
    "leaderboard_musr_object_placements": 5,
    "leaderboard_musr_team_allocation": 3,
    "leaderboard_mmlu_pro": 10,
}


def leaderboard_baselines(name: str, include_path: Path | None = None) -> dict[str, float] | None:
    """The random baseline of each task ``name`` runs, where it is an Open LLM Leaderboard v2 task
    (``leaderboard_*``): 1 / the number of answer options for a multiple-choice task, 0 for a
    generative one (IFEval, MATH Lvl 5); None for any other task, which is not normalised."""
    if not name.startswith("leaderboard"):
        return None
    out = {}
    for leaf, cfg in leaf_configs(name, include_path).items():
        if not leaf.startswith("leaderboard_"):
            return None
        choices = cfg.get("doc_to_choice")
        if cfg.get("output_type") != "multiple_choice":
            out[leaf] = 0.0
        elif isinstance(choices, list) and choices:
            out[leaf] = 1.0 / len(choices)
        elif leaf in LEADERBOARD_CHOICES:
            out[leaf] = 1.0 / LEADERBOARD_CHOICES[leaf]
        else:
            return None
    return out
