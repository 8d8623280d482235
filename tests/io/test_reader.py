"""The header reader fails closed on malformed safetensors files and indexes."""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_model_stock.errors import CheckpointError
from hf_model_stock.io.reader import (
    DIRECT_PIECE,
    Checkpoint,
    ShardFiles,
    cached_fraction,
    read_header,
)


def raw_file(path: Path, header: dict, data: bytes = b"", header_len: int | None = None) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)
    return path


def test_reads_what_safetensors_wrote(tmp_path):
    tensors = {"x": torch.arange(12, dtype=torch.float32).view(3, 4), "y": torch.tensor([1, 2], dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    found, _ = read_header(tmp_path / "m.safetensors")
    assert found["x"].shape == (3, 4) and found["x"].dtype == "F32" and found["y"].nbytes == 16
    buf = torch.empty(48, dtype=torch.uint8)
    with ShardFiles() as files:
        files.read_into(found["x"], 0, memoryview(buf.numpy()))
    assert torch.equal(buf.view(torch.float32).view(3, 4), tensors["x"])


@pytest.mark.parametrize("header, data, header_len, message", [
    ({}, b"", 10**12, "header claims 1000000000000 bytes, more than the 104857600 allowed"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"", 500, "runs past the end of the file"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "lie beyond the data section"),
    ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype 'Q4'"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12, None, "need 12"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative integers"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "0 <= begin <= end"),
])
def test_malformed_headers(tmp_path, header, data, header_len, message):
    path = raw_file(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(CheckpointError) as exc:
        read_header(path)
    assert str(exc.value).startswith(str(path)) and message in str(exc.value)


def test_truncated_and_malformed_json(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        read_header(tmp_path / "t.safetensors")
    (tmp_path / "j.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="malformed safetensors header JSON"):
        read_header(tmp_path / "j.safetensors")


@pytest.mark.parametrize("shard, message", [
    ("../outside.safetensors", "is outside the model directory"),
    ("/etc/passwd", "is outside the model directory"),
    ("missing.safetensors", "is missing"),
    ("link.safetensors", "is a link that escapes the model directory"),
])
def test_index_cannot_point_outside(tmp_path, shard, message):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    (model / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    with pytest.raises(CheckpointError) as exc:
        Checkpoint.open(model)
    assert message in str(exc.value) and "model.safetensors.index.json" in str(exc.value)


def evict(path: Path) -> float:
    """Drop a file's clean pages from the page cache; the fraction still cached afterwards."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return cached_fraction(fd)
    finally:
        os.close(fd)


def odd_file(tmp_path: Path) -> tuple[Path, bytes, dict]:
    """A file of random bytes with tensors at offsets and lengths that are not multiples of 4096."""
    data = np.random.default_rng(0).integers(0, 256, 3 * DIRECT_PIECE + 12345, dtype=np.uint8).tobytes()
    header = {"a": {"dtype": "U8", "shape": [5000], "data_offsets": [0, 5000]},
              "big": {"dtype": "U8", "shape": [len(data) - 5001], "data_offsets": [5001, len(data)]},
              "tiny": {"dtype": "U8", "shape": [1], "data_offsets": [5000, 5001]}}
    return raw_file(tmp_path / "m.safetensors", header, data), data, header


@pytest.mark.parametrize("direct", [True, False])
def test_cold_files_read_the_same_bytes_with_or_without_o_direct(tmp_path, direct):
    path, data, header = odd_file(tmp_path)
    found, _ = read_header(path)
    if evict(path) > 0.5:
        pytest.skip("this filesystem keeps the file cached")
    with ShardFiles(direct=direct) as files:
        got = []
        for name, start, length in [("big", 0, 4096), ("big", 777, 2 * DIRECT_PIECE + 3), ("a", 1, 4999),
                                    ("tiny", 0, 1), ("big", len(data) - 5001 - 10, 10)]:
            dest = bytearray(length)
            files.read_into(found[name], start, memoryview(dest))
            got.append((found[name].offset + start, bytes(dest)))
        assert (files._direct_fds[path] >= 0) == direct  # read with O_DIRECT only when asked
    raw = path.read_bytes()
    assert all(dest == raw[lo : lo + len(dest)] for lo, dest in got)


def test_a_cached_file_is_read_through_the_cache(tmp_path):
    path, _, _ = odd_file(tmp_path)
    path.read_bytes()  # cached now
    found, _ = read_header(path)
    with ShardFiles() as files:
        files.read_into(found["a"], 0, memoryview(bytearray(5000)))
        assert files._direct_fds[path] == -1


def test_direct_read_of_a_truncated_file_fails_with_its_name(tmp_path):
    path, data, _ = odd_file(tmp_path)
    found, _ = read_header(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    evict(path)
    with ShardFiles() as files, pytest.raises(CheckpointError, match="unexpected end of file reading tensor 'big'"):
        files.read_into(found["big"], 0, memoryview(bytearray(len(data) - 5001)))


def test_keep_cached_reads_a_cold_file_through_the_page_cache(tmp_path):
    """What a two-pass tensor's first pass reads stays in the page cache for its second pass."""
    path, data, _ = odd_file(tmp_path)
    found, _ = read_header(path)
    if evict(path) > 0.5:
        pytest.skip("this filesystem keeps the file cached")
    with ShardFiles() as files:
        files.read_into(found["a"], 0, memoryview(bytearray(5000)))  # a cold file: read with O_DIRECT
        assert files._direct_fds[path] >= 0
        dest = bytearray(len(data) - 5001)
        files.read_into(found["big"], 0, memoryview(dest), keep_cached=True)
        assert bytes(dest) == data[5001:]
        assert cached_fraction(files._fd(path)) > 0.9


def test_a_cold_file_is_never_mapped(tmp_path):
    path, _, _ = odd_file(tmp_path)
    found, _ = read_header(path)
    if evict(path) > 0.5:
        pytest.skip("this filesystem keeps the file cached")
    with ShardFiles(map_cached=True) as files:
        assert files.mapped(found["a"], 0, 5000, 1) is None
    path.read_bytes()
    with ShardFiles(map_cached=True) as files:
        view = files.mapped(found["a"], 0, 5000, 1)
        assert view is not None and view.tobytes() == path.read_bytes()[found["a"].offset : found["a"].offset + 5000]
        files.release(path, view)
        del view


def test_direct_reads_go_straight_into_a_destination_on_the_block_grid(tmp_path, monkeypatch):
    """Where the destination's address agrees with the file offset modulo the block, whole blocks are
    read into it in one request (no bounce copy); the unaligned head and tail still come out right."""
    from hf_model_stock.io.buffers import DIRECT_ALIGN, host_buffer

    path, data, _ = odd_file(tmp_path)
    found, _ = read_header(path)
    if evict(path) > 0.5:
        pytest.skip("this filesystem keeps the file cached")
    buf = host_buffer(len(data) + 2 * DIRECT_ALIGN)
    with ShardFiles() as files:
        sizes: list[int] = []
        original = files._pread_direct
        def spy(info, dest, offset):
            sizes.append(len(dest))
            return original(info, dest, offset)

        monkeypatch.setattr(files, "_pread_direct", spy)
        for start, length in [(0, len(data) - 5001), (123, 3 * DIRECT_ALIGN + 7), (1, 100)]:
            pos = found["big"].offset + start
            at = (pos - buf.ctypes.data) % DIRECT_ALIGN
            dest = memoryview(buf[at : at + length])
            files.read_into(found["big"], start, dest)
            assert files.reads_direct(path)
            assert bytes(dest) == data[5001 + start : 5001 + start + length]
    assert max(sizes) > DIRECT_PIECE  # the middle of the first range in one request, past the bounce size
