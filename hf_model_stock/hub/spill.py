"""The spill file of one streamed shard: bytes of the stream kept for a later read (a second pass over
a tensor, bytes skipped ahead of the reads), at their offsets in the shard, freed as soon as they
have been read for the last time. Positional reads and writes go through ``io.platform`` (which seeks
where the platform has no pread/pwrite); where holes cannot be punched (not Linux), freed bytes stay
until the file is truncated or closed."""

from __future__ import annotations

import ctypes
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from hf_model_stock.errors import CheckpointError
from hf_model_stock.io.platform import pread_into, pwrite


def _load_fallocate() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return fn


_fallocate = _load_fallocate()
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class SpillFile:
    """A temporary file in ``directory`` (default: the system's), created on the first write; ``where``
    names the shard in errors. Not thread-safe: its shard's lock serialises every call."""

    def __init__(self, where: str, directory: Path | None = None):
        self.where = where
        self._directory = directory
        self._file: IO[bytes] | None = None
        self.written = False  # anything was ever kept


    def write(self, pos: int, data: memoryview) -> None:
        """Keep ``data`` at offset ``pos``."""
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix="hfms-spill-")
        self.written = True
        fd, done = self._file.fileno(), 0
        while done < len(data):
            done += pwrite(fd, data[done:], pos + done)

    def read(self, pos: int, dest: memoryview) -> None:
        """Fill ``dest`` with the bytes kept from ``pos``; ``CheckpointError`` if they were not kept."""
        done = 0
        while done < len(dest):
            n = pread_into(self._file.fileno(), dest[done:], pos + done) if self._file is not None else 0
            if n <= 0:
                raise CheckpointError(f"{self.where}: internal error: bytes {pos + done}.. were not kept for a "
                                      "second read")
            done += n

    def free(self, offset: int, length: int) -> None:
        """Bytes [offset, offset + length) are no longer needed: dirty pages there are dropped before
        they reach the disk (where the filesystem can punch holes)."""
        if self._file is not None and _fallocate is not None and length > 0:
            _fallocate(self._file.fileno(), _PUNCH_HOLE, offset, length)

    def clear(self) -> None:
        """Nothing kept is needed any more."""
        if self._file is not None:
            self._file.truncate(0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
