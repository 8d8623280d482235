"""MBPP hooks for ``evals/tasks/hfms_mbpp.yaml``: few-shot selection and sandboxed pass@1 scoring."""

from __future__ import annotations

from typing import Any

from hf_model_stock.evaluation.sandbox import Limits, run_program

FEWSHOT_TASK_IDS = (2, 3, 4)  # the prompt-split problems the MBPP paper and lm-eval's mbpp use as shots
LIMITS = Limits()


def fewshot_docs(dataset: Any) -> Any:
    """The three few-shot problems of the ``prompt`` split, in task-id order."""
    ids = dataset["task_id"]
    return dataset.select(sorted((i for i, task_id in enumerate(ids) if task_id in FEWSHOT_TASK_IDS),
                                 key=lambda i: ids[i]))


def program(doc: dict[str, Any], completion: str) -> str:
    """The program the sandbox runs for ``completion``: the problem's setup code, then the completion.
    Its asserts (``doc["test_list"]``) are not part of it: the sandbox decides them (``tests=``)."""
    return "\n".join([doc.get("test_setup_code") or "", completion])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """pass@1 of the single greedy completion, run in the sandbox, its asserts decided outside it."""
    result = run_program(program(doc, results[0]), LIMITS, tests=doc["test_list"])
    return {"pass@1": float(result.status == "passed")}
