"""The ``eval`` subcommand's options and how they become an EvalSpec."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hf_model_stock.evaluation.cli import (
    add_eval_parser,
    run_eval_command,
    spec_from_args,
)
from hf_model_stock.evaluation.errors import EvalError


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hf-model-stock")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_options_become_a_spec() -> None:
    args = _parse("org/merged@v2", "--tasks", "gsm8k,mbpp", "--limit", "5", "--batch-size", "auto", "--device",
                  "cuda:1", "--backend", "vllm", "--output", "out", "--data-dir", "data", "--allow-code-execution",
                  "--judge-model", "me/judge", "--dtype", "bfloat16", "--max-gen-toks", "64")
    assert (args.model, args.func) == ("org/merged@v2", run_eval_command)
    spec = spec_from_args(args)
    assert spec.task_names() == ["gsm8k", "mbpp"]
    assert (spec.limit, spec.batch_size, spec.device, spec.backend, spec.dtype, spec.max_gen_toks) == (
        5, "auto", "cuda:1", "vllm", "bfloat16", 64)
    assert (spec.output, spec.data_dir, spec.allow_code_execution, spec.judge.model) == (
        Path("out"), Path("data"), True, "me/judge")


def test_defaults() -> None:
    spec = spec_from_args(_parse("./merged"))
    assert (spec.task_names(), spec.batch_size, spec.backend, spec.allow_code_execution, spec.judge.model) == (
        ["gsm8k", "math", "mmlu_pro"], 1, "hf", False, "cais/HarmBench-Llama-2-13b-cls")
    assert spec_from_args(_parse("m", "--suite", "code", "--batch-size", "8")).batch_size == 8


def test_bad_options_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(EvalError) as info:
        spec_from_args(_parse("m", "--tasks", "gsm8k,humaneval"))
    assert str(info.value) == ("tasks.1: Input should be 'gsm8k', 'math', 'mmlu_pro', 'mbpp', 'harmbench', "
                               "'gsm8k_nll', 'gsm8k_answer' or 'pydoc_nll'")
    with pytest.raises(EvalError) as info:
        spec_from_args(_parse("m", "--suite", "fast"))
    assert str(info.value) == "suite: unknown suite 'fast' (known: all, code, core, math, safety, study)"
    with pytest.raises(EvalError) as info:
        spec_from_args(_parse("m", "--limit", "0"))
    assert str(info.value) == "limit: Input should be greater than 0"
    for argv in (["--tasks", "gsm8k", "--suite", "core"], ["--batch-size", "big"], ["--backend", "tgi"]):
        with pytest.raises(SystemExit):
            _parse("m", *argv)
    assert "not allowed with argument" in capsys.readouterr().err
