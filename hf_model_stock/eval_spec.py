"""``EvalSpec``: what to evaluate and how (a recipe's ``evals:`` block, or the ``eval`` command's options),
and the task names and suites it may name.

A leaf below ``recipe`` (which holds an ``EvalSpec``): it imports nothing of the package and nothing
heavy (no lm_eval, torch or transformers), so recipes validate in milliseconds.

>>> EvalSpec(tasks="gsm8k,math", limit=20).task_names()
['gsm8k', 'math']
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    field_validator,
    model_validator,
)

TaskName = Literal["gsm8k", "math", "mmlu_pro", "mbpp", "harmbench", "gsm8k_nll", "gsm8k_answer", "pydoc_nll"]
DEFAULT_SUITE = "core"
# The task configs, suites and data files. A source checkout has them at the repository root;
# HF_MODEL_STOCK_EVALS_DIR points elsewhere (e.g. an installed copy).
EVALS_DIR = Path(os.environ.get("HF_MODEL_STOCK_EVALS_DIR") or Path(__file__).resolve().parents[1] / "evals")
DType = Literal["auto", "float32", "bfloat16", "float16"]
HARMBENCH_CLASSIFIER = "cais/HarmBench-Llama-2-13b-cls"
# Requests per forward pass. 16, not lm-eval's 1 (HarmBench on SmolLM2-135M, CPU, 16 behaviors, 48 new
# tokens: see docs/evaluation-tasks.md), nor "auto" (on a CPU lm-eval's search cannot see running out of
# RAM and takes its maximum, 64).
DEFAULT_BATCH_SIZE = 16
_TASK_NAME = re.compile(r"[\w][\w.\-+:/]*")  # lm-eval task names: letters, digits, _ . - + : /


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JudgeSpec(_Strict):
    """The HarmBench judge that labels each completion: a classifier (local dir or Hub repo[@rev], any
    ``cais/HarmBench-*-cls``), or ``refusal``, the refusal-string matcher (no model; its score is
    ``refusal_asr``)."""

    model: str = Field(default=HARMBENCH_CLASSIFIER, min_length=1)
    device: str | None = None  # default: the evaluated model's device
    dtype: DType = "auto"
    batch_size: PositiveInt = 8
    max_completion_tokens: PositiveInt = 512  # HarmBench cuts completions to 512 classifier tokens


class EvalSpec(_Strict):
    """Evaluations to run on one model. ``tasks`` and ``suite`` are exclusive; neither means the
    ``core`` suite. Every field has the lm-eval default unless noted (``batch_size``: 16)."""

    tasks: list[str] | None = None  # ours (TaskName) or any lm-eval task, group or tag
    include_path: Path | None = None  # a directory of the user's own lm-eval task YAMLs
    suite: str | None = None
    limit: PositiveInt | None = None  # items per task (per subtask for MATH): for smoke tests only
    batch_size: Literal["auto"] | PositiveInt = DEFAULT_BATCH_SIZE
    device: str | None = None  # default: cuda if available, else cpu
    dtype: DType = "auto"
    backend: Literal["hf", "vllm"] = "hf"
    data_dir: Path | None = None
    allow_code_execution: bool = False
    output: Path | None = None
    apply_chat_template: bool = False  # for the lm-eval tasks; HarmBench always uses the model's template
    trust_remote_code: bool = False
    max_gen_toks: PositiveInt | None = None  # caps every generation: smoke tests only, changes scores
    judge: JudgeSpec = JudgeSpec()

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_tasks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("tasks")
    @classmethod
    def _known_unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError(f"give at least one task: ours ({', '.join(get_args(TaskName))}) or any lm-eval "
                                 "task, group or tag")
            bad = [name for name in value if not _TASK_NAME.fullmatch(name)]
            if bad:
                raise ValueError(f"not a task name: {bad[0]!r}")
            duplicates = sorted({name for name in value if value.count(name) > 1})
            if duplicates:
                raise ValueError(f"listed more than once: {', '.join(duplicates)}")
        return value

    @field_validator("include_path")
    @classmethod
    def _a_directory(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_dir():
            raise ValueError(f"{value}: no such directory of task YAMLs")
        return value.expanduser().resolve() if value is not None else None

    @field_validator("suite")
    @classmethod
    def _known_suite(cls, value: str | None) -> str | None:
        if value is not None:
            load_suite(value)  # raises with the known names
        return value

    @model_validator(mode="after")
    def _tasks_or_suite(self) -> EvalSpec:
        if self.tasks is not None and self.suite is not None:
            raise ValueError("give either tasks or suite, not both")
        return self

    def task_names(self) -> list[str]:
        """The tasks to run, in order: ``tasks``, else the suite's, else the default suite's."""
        if self.tasks is not None:
            return list(self.tasks)
        return load_suite(self.suite or DEFAULT_SUITE)


def suite_names() -> list[str]:
    """Names of the suites in ``evals/suites``."""
    return sorted(path.stem for path in (EVALS_DIR / "suites").glob("*.yaml"))


def load_suite(name: str) -> list[str]:
    """The task names of suite ``name`` (``evals/suites/<name>.yaml``, key ``tasks``)."""
    path = EVALS_DIR / "suites" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown suite {name!r} (known: {', '.join(suite_names()) or 'none'})")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    tasks = data.get("tasks") if isinstance(data, dict) else None
    known = get_args(TaskName)
    if not isinstance(tasks, list) or not tasks or not all(t in known for t in tasks):
        raise ValueError(f"{path}: 'tasks' must list some of {', '.join(known)}")
    return list(tasks)
