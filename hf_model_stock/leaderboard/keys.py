"""Cache keys: what a model is (a Hub commit, or the content of a local directory) and what a task
run is (its settings, data and library versions), so a result is reused exactly when it would be the
same result.

- Hub model: ``org/name@<commit sha>`` (a revision such as ``main`` is resolved; only config.json is
  fetched).
- Local directory: ``sha256:<digest>`` over the relative path and content of every file except the
  model card (README.md) and hidden files. File digests are remembered by (path, size, mtime), so a
  resumed batch does not read the weights again.
- Task: sha256 of the benchmark, the score-relevant settings (limit, dtype, backend, batch size, chat
  template, generation cap; the judge for HarmBench), a digest of its data files and the versions of
  lm-eval and hf-model-stock; and a digest of the task's resolved config (ours in ``evals/tasks``, or
  for any other lm-eval task its and its subtasks' configs and the Python files beside them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hf_model_stock.eval_spec import EVALS_DIR, EvalSpec
from hf_model_stock.evaluation.data import packaged_file
from hf_model_stock.evaluation.tasks import Benchmark, benchmark_for
from hf_model_stock.io.writer import sha256_file
from hf_model_stock.leaderboard.store import write_atomically
from hf_model_stock.recipe import ModelEntry
from hf_model_stock.sources.resolve import is_local
from hf_model_stock.versions import installed_version

UNHASHED_FILES = {"README.md"}  # the model card: the leaderboard may write scores into it
SCORE_SETTINGS = ("limit", "dtype", "backend", "batch_size", "apply_chat_template", "max_gen_toks")


class DigestMemo:
    """File digests remembered in a JSON file by (path, size, mtime_ns)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._known: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._known = {}

    def digest(self, file: Path) -> str:
        stat = file.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        known = self._known.get(str(file))
        if known and known[:2] == stamp:
            return known[2]
        digest = sha256_file(file)
        self._known[str(file)] = [*stamp, digest]
        return digest

    def save(self) -> None:
        text = json.dumps(self._known, indent=0, sort_keys=True)
        write_atomically(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def directory_digest(directory: Path, memo: DigestMemo) -> str:
    """``sha256:<hex>`` of a local model directory's files (names and contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in UNHASHED_FILES
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    for path in files:
        h.update(f"{path.relative_to(directory).as_posix()}\0{memo.digest(path)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def model_identity(ref: str, memo: DigestMemo) -> str:
    """What ``ref`` is, as a cache key: ``org/name@<commit>`` or ``sha256:<content digest>``."""
    entry = ModelEntry.model_validate(ref)
    if is_local(entry):
        return directory_digest(Path(entry.model).expanduser().resolve(), memo)
    from hf_model_stock.sources.resolve import resolve

    commit = resolve(entry, allow_patterns=["config.json"]).commit
    return f"{entry.model}@{commit}"


def task_keys(spec: EvalSpec) -> dict[str, str]:
    """The cache key of each task ``spec`` runs."""
    common = {name: getattr(spec, name) for name in SCORE_SETTINGS}
    common["versions"] = {package: installed_version(package) or "unknown" for package in ("lm_eval", "hf-model-stock")}
    keys = {}
    for name in spec.task_names():
        benchmark = benchmark_for(name)
        if not benchmark.curated:
            from hf_model_stock.evaluation.lm_tasks import task_config_digest

            settings: dict[str, Any] = {"task": name, **common, "data": "lm-eval",
                                        "task_config": task_config_digest(name, spec.include_path)}
            keys[name] = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]
            continue
        settings = {"task": name, "lm_eval_task": benchmark.lm_eval_task, **common,
                    "data": data_digest(benchmark, spec.data_dir)}
        if name == "harmbench":
            settings["judge"] = spec.judge.model_dump(include={"model", "dtype", "max_completion_tokens"})
        task_yaml = EVALS_DIR / "tasks" / f"{benchmark.lm_eval_task}.yaml"
        if task_yaml.is_file():
            settings["task_config"] = hashlib.sha256(task_yaml.read_bytes()).hexdigest()
        text = json.dumps(settings, sort_keys=True, default=str)
        keys[name] = hashlib.sha256(text.encode()).hexdigest()[:20]
    return keys


def data_digest(benchmark: Benchmark, data_dir: Path | None) -> str:
    """Digest of the files ``benchmark`` would read (``hub`` for lm-eval's own Hub data set)."""
    files: list[Path] = []
    root = data_dir / benchmark.name if data_dir is not None else None
    if root is not None and root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        packaged = [packaged_file(split) for split in benchmark.splits]
        if all(packaged):
            files = [p for p in packaged if p is not None]
    files += [split.fallback for split in benchmark.splits if split.fallback is not None and split.fallback.is_file()]
    if not files:
        return "hub"
    h = hashlib.sha256()
    for path in files:
        name = path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else path.name
        h.update(f"{name}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()
