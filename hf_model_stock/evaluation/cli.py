"""The ``eval`` subcommand: options -> ``EvalSpec`` -> ``evaluate_model`` -> printed table.

    hf-model-stock eval MODEL [--tasks gsm8k,math,...,ANY_LM_EVAL_TASK | --suite NAME] [--include-path DIR]
        [--limit N]
        [--device DEV] [--batch-size auto|N] [--backend hf|vllm] [--output DIR] [--data-dir DIR]
        [--allow-code-execution] [--dtype ...] [--judge refusal|CLASSIFIER] [--apply-chat-template]
        [--trust-remote-code] [--max-gen-toks N] [--update-card] [-q]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hf_model_stock.eval_spec import DEFAULT_BATCH_SIZE, EvalSpec, JudgeSpec, suite_names
from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.tasks import BENCHMARKS


def add_eval_parser(subparsers: Any) -> None:
    """Add ``eval`` to the main parser's subparsers; its handler is ``args.func(args) -> exit code``."""
    p = subparsers.add_parser("eval", help="evaluate a model with lm-eval (+ MBPP sandbox, HarmBench judge)",
                              description="Evaluate a local model directory or a Hub repo org/name[@rev].")
    p.add_argument("model", help="local directory or Hub repo org/name[@revision]")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tasks", help=f"comma-separated: ours ({', '.join(BENCHMARKS)}) or any lm-eval task, "
                                       "group or tag (arc_easy, leaderboard_bbh, ...)")
    which.add_argument("--suite", help=f"a named set of tasks: {', '.join(suite_names())} (default: core)")
    p.add_argument("--include-path", type=Path, help="a directory of your own lm-eval task YAMLs (for --tasks)")
    p.add_argument("--limit", type=int, help="items per task (per subject for math): smoke tests only")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--batch-size", type=_batch_size, default=DEFAULT_BATCH_SIZE,
                   help=f"auto or a number (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--output", type=Path, help="results directory (default ./eval-results)")
    p.add_argument("--data-dir", type=Path, help="local data: <dir>/<task>/<split>.jsonl|parquet|csv")
    p.add_argument("--allow-code-execution", action="store_true", help="run MBPP's generated code in the sandbox")
    p.add_argument("--judge", "--judge-model", dest="judge_model", metavar="JUDGE",
                   help=f"HarmBench judge: a classifier, cais/HarmBench-*-cls by repo id or a directory (default "
                        f"{JudgeSpec().model}), or 'refusal' (refusal-string match, reported as refusal_asr)")
    p.add_argument("--apply-chat-template", action="store_true", help="chat template for the lm-eval tasks")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own Python code")
    p.add_argument("--max-gen-toks", type=int, help="cap every generation (smoke tests; changes scores)")
    p.add_argument("--update-card", action="store_true",
                   help="write the results into the model's README.md (model-index + table); local directories only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (from any library)")
    p.set_defaults(func=run_eval_command)


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    """The ``EvalSpec`` the options describe; invalid combinations raise ``EvalError`` (one line)."""
    fields: dict[str, Any] = {
        "tasks": args.tasks, "suite": args.suite, "limit": args.limit, "device": args.device,
        "batch_size": args.batch_size, "backend": args.backend, "dtype": args.dtype, "output": args.output,
        "data_dir": args.data_dir, "allow_code_execution": args.allow_code_execution,
        "apply_chat_template": args.apply_chat_template, "trust_remote_code": args.trust_remote_code,
        "max_gen_toks": args.max_gen_toks, "include_path": getattr(args, "include_path", None),
    }
    if args.judge_model:
        fields["judge"] = {"model": args.judge_model}
    try:
        return EvalSpec.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "options"
        raise EvalError(f"{where}: {error['msg'].removeprefix('Value error, ')}") from None


def run_eval_command(args: argparse.Namespace) -> int:
    """Handler of ``eval``: evaluate, print the table, return 0."""
    from hf_model_stock.evaluation.card import check_card_target, write_results_to_card
    from hf_model_stock.evaluation.evaluate import evaluate_model
    from hf_model_stock.evaluation.summary import format_table

    spec = spec_from_args(args)
    directory = check_card_target(args.model) if getattr(args, "update_card", False) else None
    summary = evaluate_model(args.model, spec)
    print(format_table(summary))
    if directory is not None:
        print(f"card: results written to {write_results_to_card(directory, summary)}")
    return 0


def _batch_size(value: str) -> str | int:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {value!r}") from None
