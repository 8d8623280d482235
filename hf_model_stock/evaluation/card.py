"""Evaluation results in a local model's card (README.md): ``model-index`` metadata and an Evaluation
table, through ``publish.card.card_with_evals``. ``run`` writes them before it pushes, so the pushed
card carries the scores; ``eval MODEL --update-card`` does the same for a local directory."""

from __future__ import annotations

import os
from pathlib import Path

from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.summary import EvalSummary

CARD_NAME = "README.md"


def card_rows(summary: EvalSummary) -> list[tuple[str, str, float, str]]:
    """(task, metric, value, display name) of every score; HarmBench's names its judge."""
    return [(s.task, s.metric, s.value, f"{s.metric} (judge: {s.judge})" if s.judge else s.metric)
            for s in summary.scores]


def check_card_target(model: str) -> Path:
    """The local model directory whose card ``--update-card`` will change; ``EvalError`` otherwise."""
    directory = Path(model).expanduser()
    if not directory.is_dir():
        raise EvalError(f"--update-card: {model} is not a local model directory (a Hub model's card changes only "
                        "by a push: evaluate the local copy, then push it)")
    return directory


def write_results_to_card(directory: Path, summary: EvalSummary) -> Path:
    """Add ``summary``'s scores to ``directory/README.md`` (created if missing); results for other
    (task, metric) pairs already there are kept. Written atomically; returns the card's path."""
    from huggingface_hub import ModelCard

    from hf_model_stock.publish.card import card_with_evals

    path = directory / CARD_NAME
    card = ModelCard.load(path) if path.is_file() else ModelCard(
        f"---\nlibrary_name: transformers\n---\n\n# {directory.resolve().name}\n")  # non-empty metadata: no warning
    updated = card_with_evals(card, card_rows(summary))
    tmp = path.with_name(f".{CARD_NAME}.tmp")
    updated.save(tmp)
    os.replace(tmp, path)
    return path
