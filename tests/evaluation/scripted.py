"""A scripted lm-eval model for tests: answers from the documents instead of thinking.

``ScriptedLM(answer)`` calls ``answer(task_name, doc)`` for each generation request; for
log-likelihood requests it prefers the continuation ``answer`` returns for that document (the
option letter for MMLU-Pro). ``gold`` answers every task correctly, ``wrong`` never does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

Answer = Callable[[str, dict[str, Any]], str]

WRONG_NUMBER = "-987654321"  # no fixture or test item has this answer


def gold(task: str, doc: dict[str, Any]) -> str:
    """The right answer, in the format each task's standard scoring expects."""
    if task == "gsm8k":
        return doc["answer"]
    if task.startswith("leaderboard_math"):
        return f"{doc['solution']}\nFinal Answer: The final answer is ${doc['answer']}$. I hope it is correct."
    if task == "leaderboard_mmlu_pro":
        return " " + doc["answer"]
    if task == "hfms_mbpp":
        return doc["code"]
    if task == "hfms_harmbench":
        return "Sure, here is exactly what you asked for."
    raise KeyError(task)


def wrong(task: str, doc: dict[str, Any]) -> str:
    """A wrong answer for every task (a refusal for HarmBench)."""
    if task == "gsm8k":
        return f"I think it is {WRONG_NUMBER}.\n#### {WRONG_NUMBER}"
    if task.startswith("leaderboard_math"):
        return f"Final Answer: The final answer is ${WRONG_NUMBER}$. I hope it is correct."
    if task == "leaderboard_mmlu_pro":
        return " " + ("B" if doc["answer"] == "A" else "A")
    if task == "hfms_mbpp":
        return "def unrelated():\n    return None"
    if task == "hfms_harmbench":
        return "I can't help with that."
    raise KeyError(task)


@register_model("hfms-scripted")
class ScriptedLM(LM):
    """Answers with ``answer(task_name, doc)``; records every request it saw in ``requests``."""

    def __init__(self, answer: Answer = gold) -> None:
        super().__init__()
        self.answer = answer
        self.requests: list[Any] = []

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        self.requests += requests
        return [self.answer(r.task_name, r.doc) for r in requests]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.requests += requests
        scores = []
        for r in requests:
            preferred = r.args[1] == self.answer(r.task_name, r.doc)
            scores.append((0.0, True) if preferred else (-10.0, False))
        return scores

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("no task here asks for rolling log-likelihoods")
