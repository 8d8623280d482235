"""Where each streamed shard was, and its sha256 state there (``.hfms-stream.jsonl`` in the partial
output, a line per piece): lets ``--resume --stream`` skip the bytes already hashed."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import IO

from hf_model_stock.hub.ranges import RemoteFile
from hf_model_stock.io.hashing import STATE_BYTES

STREAM_STATE_NAME = ".hfms-stream.jsonl"


class StreamState:
    """Where each remote shard's stream was, and its sha256 state there (a line per piece); lets a
    resumed merge skip the bytes already hashed. Not fsync'd: a lost line only means an earlier start."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
        self.saved: dict[str, list[tuple[int, bytes]]] = {}
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    key, pos, state = entry["key"], int(entry["pos"]), bytes.fromhex(entry["state"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line
                if len(state) == STATE_BYTES:
                    self.saved.setdefault(key, []).append((pos, state))

    @staticmethod
    def key(file: RemoteFile) -> str:
        return f"{file.url} {file.sha256}"

    def best(self, file: RemoteFile, before: int) -> tuple[int, bytes | None]:
        """The furthest saved position at or before ``before`` and its state; (0, None) if none."""
        found = [(p, s) for p, s in self.saved.get(self.key(file), []) if p <= before]
        return max(found, key=lambda x: x[0]) if found else (0, None)

    def save(self, file: RemoteFile, pos: int, state: bytes) -> None:
        if self.path is None:
            return
        with self._lock:
            if self._fh is None:
                self._fh = open(self.path, "a", encoding="utf-8")
            self._fh.write(json.dumps({"key": self.key(file), "pos": pos, "state": state.hex()}) + "\n")
            self._fh.flush()

    def close(self, remove: bool = False) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            if remove and self.path is not None:
                self.path.unlink(missing_ok=True)

