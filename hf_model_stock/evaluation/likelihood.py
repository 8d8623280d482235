"""lm-eval hooks of ``hfms_gsm8k_nll`` and ``hfms_pydoc_nll``: the per-token negative log-likelihood
of a continuation (a gold solution; a paragraph of the Python reference).

lm-eval hands ``process_results`` only the summed log-likelihood of the continuation, not its length in
tokens, so each document carries ``answer_tokens``: the number of tokens of the continuation as lm-eval
splits it (``tokens(context + continuation) - tokens(context)``), counted with the evaluated models'
tokenizer when the data is written (``hf_model_stock.study.data``, ``hf_model_stock.evaluation.prose``).
The score is the total NLL over the total number of tokens (a token-weighted mean, like lm-eval's
perplexity metrics), in nats. lm-eval has no standard error for an aggregation of ours, so
``per_token_stderr`` gives the ratio estimator's, from the same per-item pairs (``SAMPLE_STDERR``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

TOKENS_FIELD = "answer_tokens"


def process_docs(dataset: Any) -> Any:
    """Refuse data without token counts (before any model runs)."""
    if TOKENS_FIELD not in dataset.column_names:
        raise ValueError(f"the data has no {TOKENS_FIELD!r} column (tokens of each scored continuation for the "
                         "evaluated tokenizer); write it with hf_model_stock.study.data.write_eval_data or "
                         "hf_model_stock.evaluation.prose.write_prose_data")
    return dataset


def process_results(doc: dict[str, Any], results: Sequence[tuple[float, bool]]) -> dict[str, tuple[float, int]]:
    """One (log-likelihood, token count) pair per document."""
    (loglikelihood, _), = results
    return {"nll_per_token": (float(loglikelihood), int(doc[TOKENS_FIELD]))}


def per_token(items: Sequence[tuple[float, int]]) -> float:
    """Total NLL / total tokens (nats per token)."""
    total_ll = sum(ll for ll, _ in items)
    total_tokens = sum(n for _, n in items)
    if total_tokens <= 0:
        raise ValueError("nll_per_token: no tokens to score")
    return -total_ll / total_tokens


def per_token_stderr(items: Sequence[tuple[float, int]]) -> float | None:
    """The standard error of ``per_token`` (a ratio of sums), items as the sampling unit: the
    delta-method estimate sqrt(m / (m - 1) * sum_j (x_j - R n_j)^2) / sum_j n_j, with x_j the item's
    NLL, n_j its tokens, R the score. None for fewer than 2 items."""
    m = len(items)
    total = sum(n for _, n in items)
    if m < 2 or total <= 0:
        return None
    ratio = per_token(items)
    return math.sqrt(m / (m - 1) * sum((-ll - ratio * n) ** 2 for ll, n in items)) / total


# metric name -> its standard error from the per-item values lm-eval logs, where lm-eval gives none
SAMPLE_STDERR: dict[str, Callable[[Sequence[tuple[float, int]]], float | None]] = {"nll_per_token": per_token_stderr}
