"""lm-eval hooks of ``hfms_gsm8k_nll``: the per-token negative log-likelihood of gold solutions.

lm-eval hands ``process_results`` only the summed log-likelihood of the continuation, not its length in
tokens, so each document carries ``answer_tokens``: the number of tokens of the continuation as lm-eval
splits it (``tokens(context + continuation) - tokens(context)``), counted with the evaluated models'
tokenizer when the data is written (``hf_model_stock.study.data``). The score is the total NLL over
the total number of tokens (a token-weighted mean, like lm-eval's perplexity metrics), in nats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TOKENS_FIELD = "answer_tokens"


def process_docs(dataset: Any) -> Any:
    """Refuse data without token counts (before any model runs)."""
    if TOKENS_FIELD not in dataset.column_names:
        raise ValueError(f"hfms_gsm8k_nll: the data has no {TOKENS_FIELD!r} column (tokens of each gold solution "
                         "for the evaluated tokenizer); write it with hf_model_stock.study.data.write_eval_data")
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
        raise ValueError("hfms_gsm8k_nll: no tokens to score")
    return -total_ll / total_tokens
