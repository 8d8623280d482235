"""Write each local model's leaderboard scores into its model card (README.md), as ``model-index``
metadata and an Evaluation table. Hub models are left alone: we never push to repos we did not make."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from huggingface_hub import ModelCard

from hf_model_stock.leaderboard.board import Leaderboard
from hf_model_stock.leaderboard.store import write_atomically
from hf_model_stock.publish.card import card_with_evals


def write_model_cards(board: Leaderboard, stream: TextIO | None = None) -> list[Path]:
    """Update README.md of every local model with results; returns the cards written."""
    written = []
    for row in board.rows:
        directory = Path(row.ref)
        if not row.results or not directory.is_dir():
            continue
        readme = directory / "README.md"
        card = ModelCard.load(readme) if readme.is_file() else ModelCard(f"---\n---\n\n# {row.name}\n")
        scores = [(s["task"], s["metric"], s["value"], f"{s['metric']} (judge: {s['judge']})" if s.get("judge")
                   else s["metric"]) for result in row.results.values() for s in result.scores]
        updated = card_with_evals(card, scores, model_name=row.name)
        write_atomically(readme, updated.save)
        written.append(readme)
    skipped = [row.name for row in board.rows if row.results and not Path(row.ref).is_dir()]
    if skipped:
        print(f"leaderboard: model cards of Hub models left unchanged: {', '.join(skipped)}",
              file=stream or sys.stdout)
    return written
