"""Faults mid-merge: a clear one-line error or signal exit code, and no output that looks valid."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_model_stock.cli import main
from tests.child import start_cli
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


def in_private_tmpfs(
    mount: Path, options: str, argv: list[str], before: str = "", after: str = ""
) -> subprocess.CompletedProcess:
    """Run ``argv`` with a tmpfs mounted at ``mount`` in a private mount namespace (root needs no
    chmod tricks: the kernel refuses writes to a read-only or full filesystem even for root), then list
    what is left on it; the mount disappears with the namespace."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount a private tmpfs")
    script = (f'mount -t tmpfs -o {options} tmpfs "$0" || exit 99; {before} "$@"; rc=$?; {after} '
              'echo "left: $(ls -A "$0" | tr "\\n" " ")"; exit $rc')
    mount.mkdir(exist_ok=True)
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, str(mount), *argv], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    return proc


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hf_model_stock.cli", *args]


def test_read_only_location(tmp_path):
    """The previous output lies on a read-only filesystem: refused up front, and left as it was."""
    args = build(tmp_path)
    mnt = tmp_path / "ro"
    proc = in_private_tmpfs(mnt, "size=1m", cli(*args, "--out", str(mnt / "out"), "--overwrite", "-q"),
                            before='mkdir "$0/out" && echo old > "$0/out/keep.txt" && mount -o remount,ro "$0" &&',
                            after='cat "$0/out/keep.txt";')
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {mnt}: output location is not writable"
    assert proc.stdout.splitlines() == ["old", "left: out "]


FILL_SWEEP = """
import contextlib, io, json, os, subprocess, sys
from hf_model_stock.cli import main
mnt, args = sys.argv[1], json.loads(sys.argv[2])
for pages in range(64, 80):
    subprocess.run(["mount", "-o", f"remount,size={pages * 4096}", mnt], check=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*args, "--out", os.path.join(mnt, "out")])
    print(json.dumps({"code": code, "err": err.getvalue(), "left": sorted(os.listdir(mnt))}), flush=True)
    if code == 0:
        break
"""


def test_disk_full_on_a_small_tmpfs(tmp_path):
    """Filesystems one page larger each time: the merge fails at a later file (the shard, the report,
    the t plot, the card; or the pre-flight check refuses it) until it fits; every failure is one line
    naming that file and leaves nothing behind."""
    args = build(tmp_path, rows=512, cols=256)  # a 257 KiB output shard
    mnt = tmp_path / "small"
    proc = in_private_tmpfs(mnt, "size=1m", [sys.executable, "-c", FILL_SWEEP, str(mnt), json.dumps([*args, "-q"])])
    assert proc.returncode == 0, proc.stderr
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert runs[-1]["code"] == 0 and runs[-1]["left"] == ["out"], runs[-1]
    named = []
    for run in runs[:-1]:
        line = run["err"].strip()
        assert run["code"] == 2 and run["left"] == [] and "\n" not in line, run
        if line.startswith("error: disk: "):  # the pre-flight check saw it coming: nothing was written
            assert f"needed on the filesystem of {mnt} " in line, line
            continue
        assert line.startswith(f"error: {mnt / '.hfms-partial-out'}/"), line
        assert line.endswith(": cannot write output (No space left on device)"), line
        named.append(Path(line.split(": ")[1]).name)
    assert {"model.safetensors", "README.md"} <= set(named) and len(set(named)) >= 3, named


def interrupt_merge(tmp_path: Path, sig: int, *options: str) -> tuple[int, str, Path]:
    """Start a merge (32 MiB per model, small chunks) in a subprocess, send ``sig`` once tensors are
    being journalled; return its exit code, its stderr and the partial output's path."""
    args = build(tmp_path, rows=4096, cols=4096, n=3)
    proc = start_cli([*args, "--out", str(tmp_path / "out"),
                             "--chunk-size", "64KiB", "-q", *options], stderr=subprocess.PIPE, text=True)
    partial = tmp_path / ".hfms-partial-out"
    deadline = time.time() + 60
    while time.time() < deadline and not (partial / ".hfms-journal.jsonl").is_file():
        time.sleep(0.02)
    assert (partial / ".hfms-journal.jsonl").is_file(), "merge never started"
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, partial


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_merge_keeps_only_the_partial_output(tmp_path, sig, code):
    returncode, err, partial = interrupt_merge(tmp_path, sig)
    assert returncode == code, err
    assert f"partial output kept in {partial}: run the same command with --resume to continue" in err
    assert outputs(tmp_path) == [".hfms-partial-out"]  # no `out`, no temporary directory
    assert not (partial / "config.json").exists() and not (partial / "merge_report.json").exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_merge_with_on_interrupt_remove_leaves_nothing(tmp_path, sig, code):
    returncode, err, _ = interrupt_merge(tmp_path, sig, "--on-interrupt", "remove")
    assert returncode == code, err
    assert "partial output kept" not in err and "Traceback" not in err
    assert outputs(tmp_path) == []  # neither `out` nor its partial output
