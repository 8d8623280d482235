"""A remote safetensors shard's header, read with two range requests (the 8-byte length, then exactly
the header), so no byte of tensor data is transferred; retried like every other range read.
``huggingface_hub.get_safetensors_metadata`` would do it in one request but always asks for the
first 100,000 bytes of every shard, i.e. up to ~98 KB of weights per shard (all of a small model).

>>> tensors, metadata, fetched = remote_header(listing.remote_file("model.safetensors"), path)  # doctest: +SKIP
"""

from __future__ import annotations

import struct
from pathlib import Path

from hf_model_stock.hub.ranges import RemoteFile, location_of, read_range
from hf_model_stock.io.reader import TensorInfo, check_header_length, parse_header


def remote_header(file: RemoteFile, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """The tensors of ``file``'s header as ``TensorInfo``s at their absolute offsets, carrying ``path``
    (where the shard stands in the plan), its ``__metadata__``, and the bytes fetched. Fails closed on
    anything malformed (``CheckpointError`` naming the file)."""
    where = location_of(file)
    (header_len,) = struct.unpack("<Q", read_range(file, 0, 8, where))
    check_header_length(file.where, header_len, file.size)
    raw = read_range(file, 8, header_len, where)
    data_start = 8 + header_len
    entries, metadata = parse_header(file.where, raw, file.size - data_start)
    tensors = {name: TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
               for name, (begin, end, dtype, shape) in entries.items()}
    return tensors, metadata, data_start
