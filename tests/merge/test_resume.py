"""--resume: an interrupted merge continues from its journal; the result is bitwise the uninterrupted one,
journalled tensors are verified and not merged again, a corrupted one is merged again, and a journal
of a different plan is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import hf_model_stock.merge.executor as merge_module
from hf_model_stock.cli import main
from hf_model_stock.merge.journal import JOURNAL_NAME, read_journal
from tests.child import start_cli
from tests.modelgen import finetunes, write_checkpoint

PARTIAL = ".hfms-partial-out"


def build(root: Path, tensors: int = 24, rows: int = 64, cols: int = 32) -> list[str]:
    """A base and three fine-tunes: bf16 matrices, one int64 tensor (copied), several output shards."""
    gen = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(rows, cols, generator=gen).bfloat16() for i in range(tensors)}
    base["position_ids"] = torch.arange(rows, dtype=torch.int64)
    write_checkpoint(root / "base", base)
    for i, ft in enumerate(finetunes(base, 3)):
        write_checkpoint(root / f"ft{i}", ft)
    models = sum([["--model", str(root / f"ft{i}")] for i in range(3)], [])
    # 2 KiB units: every matrix (4 KiB per input) is merged in two passes over two units
    return ["merge", "--base", str(root / "base"), *models, "--shard-size", "16KB", "--chunk-size", "2KiB", "-q"]


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name.startswith("model")}


def tensor_stats(directory: Path) -> list[dict]:
    return json.loads((directory / "merge_report.json").read_text())["tensors"]


def journalled(partial: Path) -> dict[str, dict]:
    return {e["tensor"]: e for e in read_journal(partial / JOURNAL_NAME)[1]}


@pytest.fixture()
def reads(monkeypatch) -> list[str]:
    """Names of the tensors the executor reads input bytes for, in order (one entry per unit)."""
    seen: list[str] = []
    original: Callable = merge_module.read_unit

    def spy(buf, task, start, stop, files, mapped=None):
        seen.append(task.name)
        return original(buf, task, start, stop, files, mapped)

    monkeypatch.setattr(merge_module, "read_unit", spy)
    return seen


def interrupt_after(monkeypatch, tensors: int) -> None:
    """Ctrl-C as the reader reaches the (tensors + 1)-th tensor."""
    started: list[str] = []
    original: Callable = merge_module.read_unit

    def stop(buf, task, start, stop_, files, mapped=None):
        if task.name not in started:
            started.append(task.name)
        if len(started) > tensors:
            raise KeyboardInterrupt
        return original(buf, task, start, stop_, files, mapped)

    monkeypatch.setattr(merge_module, "read_unit", stop)


@pytest.fixture()
def setup(tmp_path) -> tuple[list[str], Path]:
    args = build(tmp_path)
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    return args, tmp_path


def interrupted(setup, monkeypatch, caplog, tensors: int = 10) -> tuple[list[str], Path, Path]:
    args, root = setup
    with monkeypatch.context() as m:
        interrupt_after(m, tensors)
        assert main([*args, "--out", str(root / "out")]) == 130
    assert f"partial output kept in {root / PARTIAL}" in caplog.text
    caplog.clear()
    assert not (root / "out").exists()
    return args, root, root / PARTIAL


def test_resume_is_bitwise_the_uninterrupted_merge_and_redoes_nothing(setup, monkeypatch, caplog, reads):
    args, root, partial = interrupted(setup, monkeypatch, caplog)
    reads.clear()
    done = journalled(partial)
    assert 5 <= len(done) <= 10

    assert main([*args, "--out", str(root / "out"), "--resume"]) == 0
    err = caplog.text
    assert f"resuming {partial}: {len(done)} of 25 tensors already written and verified" in err
    assert not set(reads) & set(done)  # no journalled tensor was read, let alone merged, again
    assert set(reads) == {t["name"] for t in tensor_stats(root / "ref")} - set(done)
    assert shard_bytes(root / "out") == shard_bytes(root / "ref") and len(shard_bytes(root / "ref")) > 3
    assert tensor_stats(root / "out") == tensor_stats(root / "ref")
    report = json.loads((root / "out" / "merge_report.json").read_text())
    assert report["shards"] == json.loads((root / "ref" / "merge_report.json").read_text())["shards"]
    assert not partial.exists() and not (root / "out" / JOURNAL_NAME).exists()


def test_a_corrupted_journalled_tensor_is_merged_again(setup, monkeypatch, caplog, reads):
    args, root, partial = interrupted(setup, monkeypatch, caplog)
    reads.clear()
    done = journalled(partial)
    victim = sorted(done)[2]
    entry = done[victim]
    with open(partial / entry["shard"], "r+b") as fh:
        fh.seek(entry["offset"] + entry["nbytes"] // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))

    assert main([*args, "--out", str(root / "out"), "--resume"]) == 0
    assert f"{len(done) - 1} of 25 tensors already written and verified" in caplog.text
    assert victim in reads and not set(reads) & (set(done) - {victim})
    assert shard_bytes(root / "out") == shard_bytes(root / "ref")


@pytest.mark.parametrize("change", [["--eps", "0.5"], ["--dtype", "float32"], ["--chunk-size", "4KiB"]])
def test_a_journal_of_another_plan_is_refused(setup, monkeypatch, caplog, capsys, change):
    args, root, partial = interrupted(setup, monkeypatch, caplog)
    capsys.readouterr()
    before = shard_bytes(partial)
    assert main([*args, *change, "--out", str(root / "out"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {partial}: the interrupted merge had a different plan (recipe, inputs, options or "
                   "versions changed); run without --resume to start over")
    assert not (root / "out").exists() and shard_bytes(partial) == before  # the partial output is kept


def test_changed_input_file_is_another_plan(setup, monkeypatch, caplog, capsys):
    args, root, partial = interrupted(setup, monkeypatch, caplog)
    shard = root / "ft1" / "model.safetensors"
    shard.write_bytes(shard.read_bytes())  # same bytes, new mtime: the journal cannot vouch for it
    assert main([*args, "--out", str(root / "out"), "--resume"]) == 2
    assert "different plan" in capsys.readouterr().err


def test_without_resume_a_leftover_partial_output_is_removed_and_said_so(setup, monkeypatch, caplog, reads):
    args, root, partial = interrupted(setup, monkeypatch, caplog)
    reads.clear()
    assert main([*args, "--out", str(root / "out")]) == 0
    assert f"removed the partial output of an interrupted merge, {partial}" in caplog.text
    assert len(set(reads)) == 25  # everything merged again
    assert shard_bytes(root / "out") == shard_bytes(root / "ref") and not partial.exists()


def test_resume_without_a_partial_output_merges_from_the_start(setup, caplog):
    args, root = setup
    assert main([*args, "--out", str(root / "out"), "--resume"]) == 0
    assert "--resume: no partial output" in caplog.text
    assert shard_bytes(root / "out") == shard_bytes(root / "ref")


def test_a_torn_journal_line_is_ignored(setup, monkeypatch, caplog, reads):
    args, root, partial = interrupted(setup, monkeypatch, caplog)
    reads.clear()
    done = journalled(partial)
    with open(partial / JOURNAL_NAME, "a") as fh:
        fh.write('{"tensor": "layers.23.weight", "shard": "mod')  # a crash mid-append
    assert main([*args, "--out", str(root / "out"), "--resume"]) == 0
    assert not set(reads) & set(done)
    assert shard_bytes(root / "out") == shard_bytes(root / "ref")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGKILL, -signal.SIGKILL)])
def test_killed_then_resumed_in_a_subprocess(tmp_path, sig, code):
    """A real interruption once the journal holds finished tensors: SIGTERM (cleanup runs) or SIGKILL
    (nothing runs: only the journal lines already fsync'd count), then --resume."""
    args = build(tmp_path, tensors=48, rows=128, cols=128)
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    proc = start_cli([*args, "--out", str(tmp_path / "out")],
                            stderr=subprocess.PIPE, text=True)
    journal = tmp_path / PARTIAL / JOURNAL_NAME
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(read_journal(journal)[1] if journal.is_file() else []) < 1:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, f"the merge was not interrupted mid-way: {err}"
    done = len(read_journal(journal)[1])
    assert 0 < done < 49 and not (tmp_path / "out").exists()
    assert main([*args, "--out", str(tmp_path / "out"), "--resume"]) == 0
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")
    assert tensor_stats(tmp_path / "out") == tensor_stats(tmp_path / "ref")


def test_a_second_merge_into_the_same_output_is_refused_while_the_first_runs(setup, capsys):
    from hf_model_stock.publish.output_dir import claim_partial

    args, root = setup
    _, lock, _ = claim_partial(root / "out", resume=False)  # a merge in progress holds the lock
    try:
        for extra in ([], ["--resume"]):
            assert main([*args, "--out", str(root / "out"), *extra]) == 2
            assert capsys.readouterr().err == f"error: {root / PARTIAL}: another merge is writing this output\n"
            assert (root / PARTIAL).is_dir() and not (root / "out").exists()
    finally:
        lock.release()
