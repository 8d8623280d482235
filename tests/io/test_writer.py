"""The shard writer writes the same file and sha256 whatever the order of writes and whether the
filesystem takes O_DIRECT (staged, aligned writes) or not."""

import hashlib
import random

import pytest

from hf_model_stock.io import writer as writer_mod
from hf_model_stock.io.writer import STAGE_BYTES, OutputTensor, ShardLayout, ShardWriter


def _tensors() -> tuple[ShardLayout, dict[str, bytes]]:
    rng = random.Random(0)
    sizes = {"a": 3, "b": STAGE_BYTES // 2 + 5, "c": STAGE_BYTES + 4099, "d": 1}  # odd sizes, spanning stages
    tensors = [OutputTensor(name, "U8", (n,)) for name, n in sizes.items()]
    return ShardLayout("model.safetensors", tensors), {name: rng.randbytes(n) for name, n in sizes.items()}


def _pieces(data: dict[str, bytes], step: int) -> list[tuple[str, int, bytes]]:
    return [(name, s, raw[s : s + step]) for name, raw in data.items() for s in range(0, len(raw), step)]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("order", ["file", "shuffled"])
def test_writer_bytes_and_sha256(tmp_path, monkeypatch, direct, order):
    if not direct:
        monkeypatch.setattr(writer_mod, "_open_direct", lambda path: -1)
    layout, data = _tensors()
    pieces = _pieces(data, 1 << 20)
    if order == "shuffled":
        random.Random(1).shuffle(pieces)
    w = ShardWriter(tmp_path, layout)
    for name, start, raw in pieces:
        w.write(name, start, memoryview(raw))
    digest = w.finish()
    content = (tmp_path / "model.safetensors").read_bytes()
    assert content == layout.header + b"".join(data.values())
    assert digest == hashlib.sha256(content).hexdigest()
