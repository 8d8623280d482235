"""EvalSpec: the recipe's ``evals:`` block and the eval command's options."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest
from pydantic import ValidationError

from hf_model_stock.eval_spec import HARMBENCH_CLASSIFIER, EvalSpec, TaskName
from hf_model_stock.evaluation.tasks import BENCHMARKS


def _message(**fields: object) -> str:
    """``location: message`` of the first validation error."""
    with pytest.raises(ValidationError) as info:
        EvalSpec(**fields)
    error = info.value.errors()[0]
    return ".".join(str(part) for part in error["loc"]) + ": " + error["msg"]


def test_tasks_from_list_or_comma_string() -> None:
    assert EvalSpec(tasks=["mbpp", "gsm8k"]).task_names() == ["mbpp", "gsm8k"]
    assert EvalSpec(tasks=" gsm8k, math ,").task_names() == ["gsm8k", "math"]


def test_every_task_name_has_a_benchmark() -> None:
    assert list(get_args(TaskName)) == list(BENCHMARKS) == ["gsm8k", "math", "mmlu_pro", "mbpp", "harmbench",
                                                         "gsm8k_nll", "gsm8k_answer", "pydoc_nll"]


def test_default_is_the_core_suite_and_suites_expand() -> None:
    assert EvalSpec().task_names() == ["gsm8k", "math", "mmlu_pro"]
    assert EvalSpec(suite="all").task_names() == ["gsm8k", "math", "mmlu_pro", "mbpp", "harmbench"]
    assert EvalSpec(suite="safety").task_names() == ["harmbench"]
    assert EvalSpec(suite="study").task_names() == ["gsm8k_nll", "gsm8k_answer", "pydoc_nll"]


def test_rejections_name_the_problem() -> None:
    # any lm-eval task name passes the spec (the index is checked when the run is prepared)
    assert EvalSpec(tasks="gsm8k,arc_easy,leaderboard_bbh").task_names() == ["gsm8k", "arc_easy", "leaderboard_bbh"]
    assert _message(tasks=["gsm8k", "arc easy"]) == "tasks: Value error, not a task name: 'arc easy'"
    assert _message(include_path="/no/such/dir") == "include_path: Value error, /no/such/dir: no such directory of task YAMLs"
    assert _message(tasks=["math", "math"]) == "tasks: Value error, listed more than once: math"
    assert _message(tasks=[]) == ("tasks: Value error, give at least one task: ours (gsm8k, math, mmlu_pro, mbpp, "
                                 "harmbench, gsm8k_nll, gsm8k_answer, pydoc_nll) or any lm-eval task, group or tag")
    assert _message(tasks=["math"], suite="core") == ": Value error, give either tasks or suite, not both"
    assert _message(suite="nope") == "suite: Value error, unknown suite 'nope' (known: all, code, core, math, safety, study)"
    assert _message(limit=0) == "limit: Input should be greater than 0"
    assert _message(batch_size="big") == "batch_size.literal['auto']: Input should be 'auto'"
    assert _message(judge={"modle": "x"}) == "judge.modle: Extra inputs are not permitted"
    assert _message(evals=1) == "evals: Extra inputs are not permitted"


def test_defaults() -> None:
    spec = EvalSpec()
    assert (spec.batch_size, spec.backend, spec.dtype, spec.allow_code_execution, spec.trust_remote_code) == (
        16, "hf", "auto", False, False)
    assert spec.judge.model == HARMBENCH_CLASSIFIER == "cais/HarmBench-Llama-2-13b-cls"
    assert spec.judge.max_completion_tokens == 512


def test_spec_module_imports_nothing_heavy() -> None:
    code = ("import sys, hf_model_stock.eval_spec; "
            "print(sorted(m for m in ('lm_eval', 'transformers', 'torch', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
