"""Faults mid-merge: a clear one-line error or signal exit code, and no output that looks valid."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_model_stock.cli import main
from tests.modelgen import finetunes, write_checkpoint


def build(tmp_path: Path, rows: int = 64, cols: int = 64, n: int = 2, poison: str | None = None) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(rows, cols, generator=gen).bfloat16(),
            "b.weight": torch.randn(cols, generator=gen).bfloat16()}
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(finetunes(base, n)):
        if poison == f"ft{i}":
            ft["a.weight"][3, 5] = float("nan")
        write_checkpoint(tmp_path / f"ft{i}", ft)
    return ["merge", "--base", str(tmp_path / "base"), *sum([["--model", str(tmp_path / f"ft{i}")] for i in range(n)], [])]


def outputs(path: Path) -> list[str]:
    """The output and anything the tool writes beside it (partial and temporary directories)."""
    return sorted(p.name for p in path.iterdir() if p.name == "out" or ".hfms-" in p.name)


def test_nan_in_a_finetune_is_named(tmp_path, capsys):
    args = build(tmp_path, poison="ft1")
    assert main([*args, "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: tensor 'a.weight': NaN or Inf in the weights of {tmp_path / 'ft1'}"
    assert outputs(tmp_path) == []


def test_nan_policy_warn_merges_and_reports(tmp_path):
    build(tmp_path, poison="ft0")
    (tmp_path / "r.yaml").write_text(
        "base_model: base\nmodels: [ft0, ft1]\non_nonfinite: warn\noutput: {path: out}\n")
    assert main(["run", str(tmp_path / "r.yaml"), "-q"]) == 0
    import json

    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["summary"]["nonfinite"] == ["a.weight"]


def _merge_with_file_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    def limit_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "hf_model_stock.cli", *args], capture_output=True, text=True,
                          preexec_fn=limit_size, timeout=120)


def test_disk_full_mid_write(tmp_path):
    args = build(tmp_path, rows=512, cols=256)  # 256 KiB output
    proc = _merge_with_file_limit([*args, "--out", str(tmp_path / "out"), "-q"], 100_000)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.safetensors: cannot write output (File too large)" in last
    assert outputs(tmp_path) == []


def test_read_only_location(tmp_path, capsys):
    args = build(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root without restrictions)")
        assert main([*args, "--out", str(ro / "out"), "-q"]) == 2
        assert capsys.readouterr().err.strip() == f"error: {ro}: output location is not writable"
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_merge_keeps_only_the_partial_output(tmp_path, sig, code):
    args = build(tmp_path, rows=4096, cols=4096, n=3)  # 32 MiB per model
    proc = subprocess.Popen([sys.executable, "-m", "hf_model_stock.cli", *args, "--out", str(tmp_path / "out"),
                             "--chunk-size", "64KiB", "-q"], stderr=subprocess.PIPE, text=True)
    partial = tmp_path / ".hfms-partial-out"
    deadline = time.time() + 60
    while time.time() < deadline and not (partial / ".hfms-journal.jsonl").is_file():
        time.sleep(0.02)
    assert (partial / ".hfms-journal.jsonl").is_file(), "merge never started"
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"partial output kept in {partial}: run the same command with --resume to continue" in err
    assert outputs(tmp_path) == [".hfms-partial-out"]  # no `out`, no temporary directory
    assert not (partial / "config.json").exists() and not (partial / "merge_report.json").exists()
