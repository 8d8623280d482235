"""``pydoc_nll``: the prose paragraphs it scores, its token counts, and the standard error of a
token-weighted NLL (lm-eval reports "N/A" for an aggregation of ours; the summary computes it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hf_model_stock.evaluation.likelihood import per_token, per_token_stderr
from hf_model_stock.evaluation.prose import passages, prose_paragraphs, token_count, write_prose_data
from hf_model_stock.evaluation.summary import lm_eval_scores
from hf_model_stock.evaluation.tasks import BENCHMARKS

TOPIC = """The "pass" statement
********************

   pass_stmt ::= "pass"

"pass" is a null operation — when it is executed, nothing happens. It is
useful as a placeholder when a statement is required syntactically, but
no code needs to be executed, for example in a function body that is not yet written, or a class.

   def f(arg): pass    # a function that does nothing (yet)

Note: this paragraph is a note and is long enough to be kept if notes were kept, which they are
not, because notes are asides rather than the running prose of the reference manual itself here.

Short line.
"""


def test_only_prose_paragraphs_are_kept() -> None:
    # grammar and code (indented), the heading, a note and a short line are left out; so is the one
    # prose paragraph here, as it does not start with a capital (the rule keeps sentences only)
    assert prose_paragraphs(TOPIC) == []


def test_paragraph_rules() -> None:
    text = TOPIC.replace('"pass" is a null', 'The "pass" statement is a null')
    paragraphs = prose_paragraphs(text)
    assert len(paragraphs) == 1 and paragraphs[0].startswith('The "pass" statement is a null operation — when')
    assert "\n" not in paragraphs[0] and "  " not in paragraphs[0]  # joined onto one line
    assert not any("pass_stmt" in p or "def f" in p or p.startswith("Note:") for p in paragraphs)


def test_stdlib_passages_are_a_fixed_sample_of_prose() -> None:
    got = passages()
    assert len(got) > 200 and got == passages()  # fixed order
    assert len({p.topic for p in got}) > 40  # drawn from across the reference
    assert all(30 <= len(p.text.split()) <= 80 and "####" not in p.text for p in got)
    assert passages(seed=1) != got


def test_token_counts_are_lm_evals_split(tmp_path: Path) -> None:
    class Chars:  # one token per character: the continuation is exactly its characters
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": [ord(c) for c in text]}

    items = passages()[:3]
    path = write_prose_data(items, Chars(), tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["answer_tokens"] for r in records] == [len(" " + p.text) for p in items]
    assert [token_count(Chars(), p) for p in items] == [len(" " + p.text) for p in items]
    assert records[0]["title"] == items[0].title and records[0]["source"].startswith("pydoc_data.topics of Python")


def test_per_token_stderr_is_the_ratio_estimators() -> None:
    items = [(-2.0, 4), (-3.0, 1), (-10.0, 5)]  # (log-likelihood, tokens)
    r = 15.0 / 10
    expected = math.sqrt(3 / 2 * ((2 - 4 * r) ** 2 + (3 - r) ** 2 + (10 - 5 * r) ** 2)) / 10
    assert per_token(items) == r and per_token_stderr(items) == pytest.approx(expected, rel=1e-15)
    assert per_token_stderr(items[:1]) is None
    same = [(-1.5 * n, n) for n in (2, 3, 7)]  # every item at the mean: no spread
    assert per_token_stderr(same) == pytest.approx(0.0, abs=1e-15)


def test_summary_fills_lm_evals_missing_stderr_from_the_items() -> None:
    items = [(-2.0, 4), (-3.0, 1), (-10.0, 5)]
    samples = [{"filter": "none", "nll_per_token": list(pair)} for pair in items]
    results = {"results": {"hfms_pydoc_nll": {"nll_per_token,none": 1.5, "nll_per_token_stderr,none": "N/A",
                                              "sample_len": 3}},
               "samples": {"hfms_pydoc_nll": samples}}
    (score,) = lm_eval_scores(BENCHMARKS["pydoc_nll"], results, "test.jsonl")
    assert score.stderr == pytest.approx(per_token_stderr(items), rel=1e-15)
    assert (score.value, score.normalised, score.higher_is_better, score.n) == (1.5, 1.5, False, 3)
    without = {"results": results["results"]}  # no per-item records: no standard error, not a made-up one
    assert lm_eval_scores(BENCHMARKS["pydoc_nll"], without, "test.jsonl")[0].stderr is None
