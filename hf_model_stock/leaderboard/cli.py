"""The ``leaderboard`` subcommand.

    hf-model-stock leaderboard SPEC [--executor local|ray] [--gpus-per-model N] [--resume] [--output DIR]
        [--no-merge]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_leaderboard_parser(subparsers: Any) -> None:
    """Add ``leaderboard`` to the main parser's subparsers; its handler returns the exit code."""
    p = subparsers.add_parser(
        "leaderboard", help="evaluate many models (and recipes' merges) side by side",
        description="Evaluate every model a spec lists (a recipe brings its base, fine-tunes and merge), "
                    "then write leaderboard.md/.csv/.html/.png. Exit code 1 if any model failed.")
    p.add_argument("spec", type=Path, help="leaderboard spec (YAML)")
    p.add_argument("--executor", choices=["local", "ray"], help="where evaluations run (default: the spec's, local)")
    p.add_argument("--gpus-per-model", type=float, help="GPUs each evaluation gets (default: 1 if there are GPUs)")
    p.add_argument("--resume", action="store_true", help="skip (model, task) results already in the cache")
    p.add_argument("--output", type=Path, help="output directory (default: the spec's output)")
    p.add_argument("--no-merge", action="store_true", help="do not build recipes' missing merges (they fail)")
    p.set_defaults(func=run_leaderboard_command)


def run_leaderboard_command(args: argparse.Namespace) -> int:
    """Handler of ``leaderboard``: run, report where the tables are, 1 if any model failed."""
    from hf_model_stock.leaderboard.batch import run_leaderboard
    from hf_model_stock.leaderboard.spec import load_leaderboard_spec

    result = run_leaderboard(load_leaderboard_spec(args.spec), executor=args.executor,
                             gpus_per_model=args.gpus_per_model, resume=args.resume, output=args.output,
                             merge_missing=not args.no_merge)
    print(f"leaderboard: {result.files['md']}")
    if result.failed:
        print(f"error: {len(result.failed)} of {len(result.board.rows)} models failed: "
              + "; ".join(f"{row.name}: {row.error}" for row in result.failed), file=sys.stderr)
        return 1
    return 0
