"""Without the Linux-only calls (as on macOS and Windows: no posix_fallocate, O_DIRECT, pread/preadv/
pwrite, madvise, mincore, sched_getaffinity, libcrypto, fcntl) the merge writes the same bytes: layer-
and filter-wise, in two passes over a tensor larger than a unit, and resumed after an interruption."""

from __future__ import annotations

import hashlib
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_model_stock.io.hashing as hashing
import hf_model_stock.io.reader as reader
from hf_model_stock.cli import main
from hf_model_stock.io import platform
from tests.merge.test_resume import PARTIAL, interrupt_after
from tests.modelgen import finetunes, write_checkpoint

LINUX_ONLY = ("posix_fallocate", "O_DIRECT", "pread", "preadv", "pwrite", "sched_getaffinity")


def build(root: Path) -> list[str]:
    """A base and three fine-tunes (bf16 and float32 matrices, an int64 tensor), two input shards."""
    gen = torch.Generator().manual_seed(3)
    base = {f"layers.{i}.weight": torch.randn(48, 40, generator=gen).bfloat16() for i in range(6)}
    base.update({f"layers.{i}.bias": torch.randn(40, generator=gen) for i in range(6)})
    base["position_ids"] = torch.arange(48, dtype=torch.int64)
    write_checkpoint(root / "base", base, shards=2)
    for i, ft in enumerate(finetunes(base, 3)):
        write_checkpoint(root / f"ft{i}", ft, shards=2)
    models = sum([["--model", str(root / f"ft{i}")] for i in range(3)], [])
    return ["merge", "--base", str(root / "base"), *models, "--shard-size", "8KB", "-q"]


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.name.startswith("model")}


def strip_linux(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Remove the Linux-only calls; returns a list that records the seeks of the portable fallbacks."""
    for name in LINUX_ONLY:
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.delattr(mmap, "MADV_DONTNEED", raising=False)
    monkeypatch.setattr(platform, "_F_NOCACHE", None)
    monkeypatch.setattr(reader, "_libc", None)  # no mincore: every shard counts as cached (mapped)
    monkeypatch.setattr(hashing, "_crypto", None)
    seeks: list[int] = []
    lseek = os.lseek

    def counted(fd: int, pos: int, how: int) -> int:
        seeks.append(pos)
        return lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", counted)
    return seeks


OPTIONS = {
    "layer-wise": [],
    "filter-wise": ["--granularity", "filter"],
    "two-pass": ["--chunk-size", "1KiB"],  # each 3840-byte matrix is merged in two passes over 4 units
}


@pytest.mark.parametrize("name", OPTIONS)
def test_merge_without_linux_calls_writes_the_same_bytes(tmp_path, monkeypatch, name):
    args = [*build(tmp_path), *OPTIONS[name]]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    seeks = strip_linux(monkeypatch)
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert digests(tmp_path / "out") == digests(tmp_path / "ref") and len(digests(tmp_path / "ref")) > 2
    assert len(seeks) >= 12  # the shards were written through the seek-and-write fallback


def test_resume_without_linux_calls_writes_the_same_bytes(tmp_path, monkeypatch, caplog):
    args = [*build(tmp_path), "--chunk-size", "1KiB"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    strip_linux(monkeypatch)
    with monkeypatch.context() as m:
        interrupt_after(m, 5)
        assert main([*args, "--out", str(tmp_path / "out")]) == 130
    assert (tmp_path / PARTIAL).is_dir() and not (tmp_path / "out").exists()
    assert main([*args, "--out", str(tmp_path / "out"), "--resume"]) == 0
    assert "5 of 13 tensors already written and verified" in caplog.text
    assert digests(tmp_path / "out") == digests(tmp_path / "ref")
    assert sorted(p.name for p in tmp_path.iterdir() if ".hfms-" in p.name) == []  # no lock file left


def test_fallback_reads_and_writes_match_the_positional_calls(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 64
    fd = platform.open_write(path)
    try:
        platform.preallocate(fd, len(data))
        for pos in range(0, len(data), 1000):
            assert platform.pwrite(fd, data[pos : pos + 1000], pos) == len(data[pos : pos + 1000])
    finally:
        os.close(fd)
    expected = path.read_bytes()
    path.unlink()
    strip_linux(monkeypatch)
    fd = platform.open_write(path)
    try:
        platform.preallocate(fd, len(data))  # ftruncate: the size is right before any byte is written
        assert os.fstat(fd).st_size == len(data)
        for pos in reversed(range(0, len(data), 1000)):  # out of order: every write seeks
            platform.pwrite(fd, data[pos : pos + 1000], pos)
        platform.preallocate(fd, 10)  # never shrinks
    finally:
        os.close(fd)
    assert path.read_bytes() == expected == data
    fd = platform.open_read(path)
    try:
        dest = bytearray(300)
        assert platform.pread_into(fd, memoryview(dest), 16000) == 300 and bytes(dest) == data[16000:16300]
        assert platform.pread_into(fd, memoryview(dest), len(data) - 10) == 10 and dest[:10] == data[-10:]
        assert platform.pread(fd, 5, 7) == data[7:12] and platform.pread(fd, 5, len(data)) == b""
    finally:
        os.close(fd)
    assert platform.cpu_count() == (os.cpu_count() or 1)


def test_shard_files_read_through_the_fallback(tmp_path, monkeypatch):
    """Unmapped reads (the buffered path) without preadv: the tensors' bytes as safetensors wrote them."""
    from safetensors.torch import load_file

    build(tmp_path)
    seeks = strip_linux(monkeypatch)
    ckpt = reader.Checkpoint.open(tmp_path / "ft1")
    expected = {}
    for f in ckpt.files:
        expected.update(load_file(str(f)))
    with reader.ShardFiles(direct=True, map_cached=True) as files:
        for name, info in ckpt.tensors.items():
            assert files.mapped(info, 0, info.nbytes, 1) is not None  # no mincore: read as if cached
            dest = bytearray(info.nbytes)
            files.read_into(info, 0, memoryview(dest))
            assert bytes(dest) == expected[name].contiguous().view(torch.uint8).numpy().tobytes(), name
            assert not files.reads_direct(info.path)
    assert len(seeks) == len(ckpt.tensors)


FCNTL_BLOCKED = """
import hashlib, sys
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` fails
import os
for name in {linux_only!r}:
    if hasattr(os, name):
        delattr(os, name)
from hf_model_stock.cli import main
code = main(sys.argv[1:])
print(code)
"""


def test_the_package_imports_and_merges_without_fcntl(tmp_path):
    """A fresh interpreter where ``import fcntl`` fails (Windows): the CLI imports and merges, the
    output lock falls back to filelock's portable lock, and the bytes are those of a normal merge."""
    args = build(tmp_path)
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    script = FCNTL_BLOCKED.format(linux_only=LINUX_ONLY)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script, *args, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())},
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "0", proc.stderr
    assert digests(tmp_path / "out") == digests(tmp_path / "ref")
    assert sorted(p.name for p in tmp_path.iterdir() if ".hfms-" in p.name) == []
