"""The console script's fast exit after a merge: everything written and printed first, exit codes kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.modelgen import finetunes, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


def console(args: list[str]) -> subprocess.CompletedProcess:
    code = f"import sys\nsys.argv = ['hf-model-stock', *{args!r}]\nfrom hf_model_stock.cli import entry\nentry()\n"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_merge_exits_fast_with_complete_output_and_flushed_summary(tmp_path):
    base = {"w": torch.randn(64, 32).to(torch.bfloat16), "model.layers.0.b": torch.randn(32).to(torch.bfloat16)}
    write_checkpoint(tmp_path / "base", base)
    models = [str(write_checkpoint(tmp_path / f"ft{i}", ft)) for i, ft in enumerate(finetunes(base, 2))]
    proc = console(["merge", "--base", str(tmp_path / "base"), "--model", models[0], "--model", models[1],
                    "--out", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "merged 2 tensors" in proc.stdout  # printed before the fast exit
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["summary"]["merged"] == 2 and (tmp_path / "out" / "README.md").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft0", "ft1", "out"]  # no partial directory left


def test_a_failed_merge_keeps_its_exit_code_and_error_line(tmp_path):
    proc = console(["merge", "--base", str(tmp_path / "nope"), "--model", "a", "--model", "b", "--out", str(tmp_path / "o")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nope'}: no such local directory, and not a Hub repo id (org/name); "
        "a: no such local directory, and not a Hub repo id (org/name); "
        "b: no such local directory, and not a Hub repo id (org/name)")
    assert not (tmp_path / "o").exists()
