"""``pydoc_nll``'s data: prose paragraphs of the Python language reference, as the standard library
ships it (``pydoc_data.topics``, the text ``help()`` shows), scored by ``hfms_pydoc_nll`` as the
per-token negative log-likelihood of each paragraph given its section's title.

Why this text as an out-of-distribution check for GSM8K fine-tunes: it installs with Python itself
(offline, no package), it is English expository prose about programming, with no arithmetic word
problems and no ``#### N`` answers, and nothing trains on it here, so a rise of its NLL after
fine-tuning on GSM8K measures what the fine-tune forgot, not what it learned. Only prose is kept:
paragraphs with no indented lines (grammar rules, code examples and tables are indented), not
headings, notes, lists or footnotes, 30 to 80 words, joined onto one line. The topics differ between
Python versions, so the data says which Python it came from (``source``).
"""

from __future__ import annotations

import json
import platform
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASK = "pydoc_nll"
MIN_WORDS, MAX_WORDS = 30, 80
SKIP_STARTS = ("* ", "[", "Note:", "See also", "Changed in", "Added in", "Deprecated", "Warning:")


@dataclass(frozen=True)
class Passage:
    """One paragraph of the reference: its topic key, its section's title and its text (one line)."""

    topic: str
    title: str
    text: str


def prose_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of one topic's text (see the module docstring), whitespace collapsed."""
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in para.split("\n") if line.strip()]
        if not lines or any(line[0].isspace() for line in lines):
            continue
        if re.fullmatch(r"[*=\-^~]+", lines[-1].strip()) or lines[0].startswith(SKIP_STARTS):
            continue
        joined = " ".join(" ".join(lines).split())
        if MIN_WORDS <= len(joined.split()) <= MAX_WORDS and joined[0].isupper() and joined.endswith((".", ":")):
            out.append(joined)
    return out


def passages(topics: dict[str, str] | None = None, seed: int = 0) -> list[Passage]:
    """Every prose paragraph of ``topics`` (default: the stdlib's ``pydoc_data.topics``), in a fixed
    shuffled order (``seed``), so that the first N are a sample of the whole reference."""
    if topics is None:
        from pydoc_data.topics import topics as stdlib_topics

        topics = stdlib_topics
    out = [Passage(name, text.split("\n", 1)[0].strip(), para)
           for name, text in sorted(topics.items()) for para in prose_paragraphs(text)]
    random.Random(seed).shuffle(out)
    return out


def context(passage: Passage) -> str:
    """The context: exactly ``doc_to_text`` of evals/tasks/hfms_pydoc_nll.yaml."""
    return f"{passage.title}:"


def continuation(passage: Passage) -> str:
    """The scored text: ``doc_to_target`` of the task (the space included)."""
    return " " + passage.text


def token_count(tokenizer: Any, passage: Passage) -> int:
    """Tokens of the continuation as lm-eval splits them: the whole text encoded once, the context's
    own encoding's length cut off the front."""
    whole = tokenizer(context(passage) + continuation(passage), add_special_tokens=False)["input_ids"]
    return len(whole) - len(tokenizer(context(passage), add_special_tokens=False)["input_ids"])


def write_prose_data(items: Sequence[Passage], tokenizer: Any, data_dir: Path, task: str = TASK) -> Path:
    """``<data_dir>/<task>/test.jsonl``: each passage with its token count (``answer_tokens``, the
    field the likelihood hooks read) for ``tokenizer``. Returns the file."""
    source = f"pydoc_data.topics of Python {platform.python_version()}"
    path = data_dir / task / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"topic": p.topic, "title": p.title, "text": p.text,
                                        "answer_tokens": token_count(tokenizer, p), "source": source},
                                       ensure_ascii=False) + "\n" for p in items), encoding="utf-8")
    return path
