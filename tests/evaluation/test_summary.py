"""Summary rows, the Open LLM Leaderboard v2 normalisation, and the printed table."""

from __future__ import annotations

import pytest

from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.summary import (
    EvalSummary,
    Score,
    format_table,
    lm_eval_scores,
    normalised,
)
from hf_model_stock.evaluation.tasks import BENCHMARKS


@pytest.mark.parametrize("raw, random, expected", [
    (0.55, 0.1, 50.0),  # MMLU-Pro: 10 options
    (0.05, 0.1, 0.0),  # below chance clips to 0
    (0.1, 0.1, 0.0),
    (1.0, 0.1, 100.0),
    (0.37, 0.0, 37.0),  # generative tasks: random 0, so just a percentage
    (0.0, 0.0, 0.0),
])
def test_leaderboard_normalisation(raw: float, random: float, expected: float) -> None:
    assert normalised(raw, random) == pytest.approx(expected, abs=1e-12)


def test_rows_from_lm_eval_results() -> None:
    results = {"results": {
        "gsm8k": {"sample_len": 20, "exact_match,strict-match": 0.05, "exact_match_stderr,strict-match": 0.05,
                  "exact_match,flexible-extract": 0.1, "exact_match_stderr,flexible-extract": "N/A"},
        "leaderboard_mmlu_pro": {"sample_len": 40, "acc,none": 0.325, "acc_stderr,none": 0.074}}}
    assert lm_eval_scores(BENCHMARKS["gsm8k"], results, "data.jsonl") == [
        Score("gsm8k", "gsm8k", "exact_match,strict-match", 0.05, 0.05, 20, 5.0, True, "data.jsonl"),
        Score("gsm8k", "gsm8k", "exact_match,flexible-extract", 0.1, None, 20, 10.0, True, "data.jsonl")]
    (row,) = lm_eval_scores(BENCHMARKS["mmlu_pro"], results, "hub")
    assert (row.value, row.stderr, row.n, row.normalised) == (0.325, 0.074, 40, pytest.approx(25.0))
    with pytest.raises(EvalError, match=r"^math: lm-eval returned no results for leaderboard_math_hard$"):
        lm_eval_scores(BENCHMARKS["math"], results, "hub")
    del results["results"]["gsm8k"]["exact_match,flexible-extract"]
    with pytest.raises(EvalError, match=r"^gsm8k: lm-eval's results for gsm8k lack 'exact_match,flexible-extract'$"):
        lm_eval_scores(BENCHMARKS["gsm8k"], results, "hub")


def test_table() -> None:
    summary = EvalSummary(model="org/merged", revision="v1", sha="0123456789abcdef0123", path="/p", created="now",
                          versions={}, spec={}, notes=["limit 20 items per task"], scores=[
                              Score("gsm8k", "gsm8k", "exact_match,strict-match", 0.05, 0.05, 20, 5.0, True, "x"),
                              Score("harmbench", "hfms_harmbench", "attack_success_rate", 0.25, None, 4, 25.0, False,
                                    "y")])
    assert format_table(summary) == (
        "org/merged @ 0123456789ab\n"
        "task       metric                                  value  stderr   n  normalised\n"
        "gsm8k      exact_match,strict-match               0.0500  0.0500  20        5.00\n"
        "harmbench  attack_success_rate (lower is better)  0.2500       -   4       25.00\n"
        "note: limit 20 items per task")
