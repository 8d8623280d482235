"""``hfms_gsm8k_nll``'s hooks: token-weighted NLL, and data without token counts refused up front."""

from __future__ import annotations

import pytest
from datasets import Dataset

from hf_model_stock.evaluation.likelihood import per_token, process_docs, process_results
from hf_model_stock.evaluation.summary import lm_eval_scores
from hf_model_stock.evaluation.tasks import BENCHMARKS


def test_nll_is_weighted_by_tokens() -> None:
    items = [process_results({"answer_tokens": 4}, [(-2.0, False)]),
             process_results({"answer_tokens": 1}, [(-3.0, True)])]
    assert items == [{"nll_per_token": (-2.0, 4)}, {"nll_per_token": (-3.0, 1)}]
    assert per_token([i["nll_per_token"] for i in items]) == pytest.approx(5.0 / 5)  # not (0.5 + 3) / 2


def test_data_without_token_counts_is_refused() -> None:
    with pytest.raises(ValueError, match="answer_tokens"):
        process_docs(Dataset.from_list([{"question": "q", "answer": "a #### 1"}]))
    ok = Dataset.from_list([{"question": "q", "answer": "a #### 1", "answer_tokens": 3}])
    assert process_docs(ok) is ok


def test_nll_score_is_raw_and_lower_is_better() -> None:
    results = {"results": {"hfms_gsm8k_nll": {"nll_per_token,none": 1.2345, "nll_per_token_stderr,none": "N/A",
                                              "sample_len": 40}}}
    (score,) = lm_eval_scores(BENCHMARKS["gsm8k_nll"], results, "test.jsonl")
    assert (score.value, score.normalised, score.stderr, score.n, score.higher_is_better) == (1.2345, 1.2345, None,
                                                                                              40, False)
