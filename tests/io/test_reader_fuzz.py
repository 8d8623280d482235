"""Property-based fuzzing of the safetensors header reader: for any bytes, and for valid headers mutated
in their lengths, offsets, dtypes, shapes and JSON structure, the reader either returns a header that
is consistent with the file or raises CheckpointError with one line naming the file; never another
exception, and it never reads more than the file holds (so a claimed huge header allocates nothing).

Deterministic (derandomized, no example database), a few seconds in all."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hf_model_stock.errors import CheckpointError
from hf_model_stock.io.dtypes import SAFETENSORS_DTYPES, itemsize
from hf_model_stock.io.reader import (
    MAX_HEADER_BYTES,
    check_header_length,
    parse_header,
    read_header,
)

FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = sorted(SAFETENSORS_DTYPES)
WHERE = "fuzz.safetensors"


def assert_one_line_error(exc: CheckpointError, where: str) -> None:
    message = str(exc)
    assert message.startswith(f"{where}: ") and "\n" not in message and len(message) < 2000


def assert_consistent(entries: dict[str, Any], metadata: dict[str, str], data_size: int) -> None:
    """What a caller relies on: known dtypes, spans that fit their shape and the data, no overlaps."""
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    spans = []
    for begin, end, dtype, shape in entries.values():
        assert dtype in SAFETENSORS_DTYPES and all(type(d) is int and d >= 0 for d in shape)
        assert 0 <= begin <= end <= data_size and end - begin == math.prod(shape) * itemsize(dtype)
        if end > begin:
            spans.append((begin, end))
    spans.sort()
    assert all(b >= prev_e for (_, prev_e), (b, _) in zip(spans, spans[1:]))


def check_parse(raw: bytes, data_size: int) -> None:
    try:
        entries, metadata = parse_header(WHERE, raw, data_size)
    except CheckpointError as exc:
        assert_one_line_error(exc, WHERE)
    else:
        assert_consistent(entries, metadata, data_size)


def check_file(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(content)
        try:
            tensors, metadata = read_header(path)
        except CheckpointError as exc:
            assert_one_line_error(exc, str(path))
            return
    header_len = struct.unpack("<Q", content[:8])[0]
    relative = {n: (t.offset - 8 - header_len, t.offset - 8 - header_len + t.nbytes, t.dtype, t.shape)
                for n, t in tensors.items()}
    assert_consistent(relative, metadata, len(content) - 8 - header_len)


# -- valid headers and their mutations ------------------------------------------------------------

tensor = st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3))


@st.composite
def valid_header(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A correct header (tensors packed in order, with a gap sometimes) and its data size."""
    specs = draw(st.dictionaries(st.text(min_size=1, max_size=8), tensor, max_size=5))
    header: dict[str, Any] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
    pos = 0
    for name, (dtype, shape) in specs.items():
        if name == "__metadata__":
            continue
        pos += draw(st.sampled_from([0, 0, 8]))
        n = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return header, pos


junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=4), st.lists(st.integers(-3, 2**64), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def mutated_header(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    header, size = draw(valid_header())
    names = [n for n in header if n != "__metadata__"]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["offset", "shape", "dtype", "entry", "key", "extra", "metadata", "size"]))
        target = header[draw(st.sampled_from(names))] if names else None
        target = target if isinstance(target, dict) else None  # an entry already replaced by junk
        if kind == "offset" and target and isinstance(target.get("data_offsets"), list) and target["data_offsets"]:
            offsets = target["data_offsets"]
            offsets[draw(st.integers(0, len(offsets) - 1))] = draw(
                st.one_of(st.integers(-16, size + 16), st.just(2**64), junk))
        elif kind == "shape" and target:
            target["shape"] = draw(st.one_of(st.lists(st.integers(-2, 2**40), max_size=4), junk))
        elif kind == "dtype" and target:
            target["dtype"] = draw(st.one_of(st.text(max_size=5), junk))
        elif kind == "entry" and names:
            header[draw(st.sampled_from(names))] = draw(junk)
        elif kind == "key" and target:
            target.pop(draw(st.sampled_from(sorted(target))), None)
        elif kind == "extra" and target:
            target[draw(st.text(max_size=6))] = draw(junk)
        elif kind == "metadata":
            header["__metadata__"] = draw(junk)
        elif kind == "size":
            size = draw(st.integers(0, size + 64))
    return header, size


def encode(header: Any) -> bytes:
    return json.dumps(header, allow_nan=True).encode()


# -- properties -------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=512), st.integers(0, 1 << 20))
@example(b"[" * 100_000, 0)  # deep nesting: the JSON parser's recursion limit
@example(b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, 0)
@example(b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}', 0)  # 5000-digit int
@example(b"\xff\xfe{}", 0)  # not UTF-8
@example(b'{"x": 1, "x": 2}', 0)  # duplicate key
def test_parse_header_on_arbitrary_bytes(raw: bytes, data_size: int) -> None:
    check_parse(raw, data_size)


@FUZZ
@given(mutated_header())
def test_parse_header_on_mutated_headers(case: tuple[dict[str, Any], int]) -> None:
    header, size = case
    check_parse(encode(header), size)


@FUZZ
@given(valid_header())
def test_valid_headers_are_returned_exactly(case: tuple[dict[str, Any], int]) -> None:
    header, size = case
    entries, metadata = parse_header(WHERE, encode(header), size)
    assert metadata == (header.get("__metadata__") or {})
    assert entries == {n: (*e["data_offsets"], e["dtype"], tuple(e["shape"]))
                       for n, e in header.items() if n != "__metadata__"}


@FUZZ
@given(st.integers(0, 2**64 - 1), st.one_of(st.none(), st.integers(0, 2**40)))
def test_check_header_length(header_len: int, file_size: int | None) -> None:
    try:
        check_header_length(WHERE, header_len, file_size)
    except CheckpointError as exc:
        assert_one_line_error(exc, WHERE)
    else:
        assert header_len <= MAX_HEADER_BYTES and (file_size is None or 8 + header_len <= file_size)


@FUZZ
@given(mutated_header(), st.sampled_from(["exact", "delta", "huge", "cut", "flip"]), st.integers(-9, 9),
       st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_read_header_on_mutated_files(case: tuple[dict[str, Any], int], how: str, delta: int, huge: int,
                                      extra: bytes) -> None:
    header, size = case
    text = encode(header)
    header_len = {"exact": len(text), "delta": max(0, len(text) + delta), "huge": huge}.get(how, len(text))
    content = struct.pack("<Q", header_len) + text + bytes(size) + extra
    if how == "cut":
        content = content[: max(0, len(content) - abs(delta) * 7)]
    elif how == "flip" and len(content) > 8:
        i = 8 + abs(huge) % (len(content) - 8)
        content = content[:i] + bytes([content[i] ^ (1 << (abs(delta) % 8))]) + content[i + 1:]
    check_file(content)


@FUZZ
@given(st.binary(max_size=64))
def test_read_header_on_arbitrary_files(content: bytes) -> None:
    check_file(content)
