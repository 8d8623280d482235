"""Reading one unit of work: a slice of one tensor from every model, viewed where it is mapped or
read into a reusable buffer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hf_model_stock.io.buffers import DIRECT_ALIGN
from hf_model_stock.io.dtypes import itemsize, storage_dtype
from hf_model_stock.io.reader import ShardFiles
from hf_model_stock.merge.plan import MergePlan, TensorTask

# Every input of a unit read into a buffer starts on a cache line of the page-aligned buffer: the
# kernel's copy into a destination a few bytes past a cache line is several times slower. An input
# read with O_DIRECT instead starts where its address agrees with its file offset modulo the block
# (DIRECT_ALIGN), so that whole blocks are read straight into it.
UNIT_ALIGN = 64


def unit_buffer_bytes(plan: MergePlan) -> int:
    """Size of one input buffer: the largest unit and each input's alignment slack (``read_unit``)."""
    return plan.max_unit_in_bytes + (DIRECT_ALIGN + UNIT_ALIGN) * (len(plan.models) + 1)


def read_unit(buf: np.ndarray, task: TensorTask, start: int, stop: int, files: ShardFiles,
              mapped: list[tuple[Path, np.ndarray]] | None = None) -> list[np.ndarray]:
    """Views of the bits (``io.dtypes.storage_dtype``: bfloat16 as uint16) of elements [start, stop)
    of each input of ``task`` (base first; only the base for copied tensors). Inputs that ``files``
    maps are viewed where they lie, and listed in ``mapped`` for ``files.release`` once used (given
    ``mapped``); the others are read into ``buf`` (of ``unit_buffer_bytes``), each where ``UNIT_ALIGN``
    says. A tensor merged in two passes is read through the page cache even from a cold shard, so
    that its second pass finds it there instead of reading the disk again."""
    views, pos = [], 0
    for info in task.inputs if task.merge else task.inputs[:1]:
        size = itemsize(info.dtype)
        nbytes = (stop - start) * size
        region = files.mapped(info, start * size, nbytes, size) if mapped is not None else None
        if region is not None:
            mapped.append((info.path, region))  # type: ignore[union-attr]
        else:
            offset = info.offset + start * size
            if not task.two_pass and offset % size == 0 and files.reads_direct(info.path):
                pos += (offset - buf.ctypes.data - pos) % DIRECT_ALIGN
            region = buf[pos : pos + nbytes]
            files.read_into(info, start * size, region.data, keep_cached=task.two_pass)
            pos += nbytes
            pos += -pos % UNIT_ALIGN
        views.append(region.view(storage_dtype(info.dtype)))
    return views
