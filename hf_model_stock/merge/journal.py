"""Resuming an interrupted merge: a journal of finished tensors and a fingerprint of the plan.

The partial output directory holds the pre-sized shards and ``.hfms-journal.jsonl``: a first line
with the plan's fingerprint, then one line per tensor whose bytes are completely written (shard,
absolute offset, length, CRC-32 of the bytes, and the tensor's merge statistics). Lines are appended
as tensors complete and fsync'd in batches. ``--resume`` re-reads every journalled tensor from the
partial shards and keeps it only if its CRC-32 still matches; the rest is merged again.

CRC-32 catches torn and lost writes at several GB/s; it is not a defence against deliberate
tampering (the sha256 of every finished shard, in merge_report.json, covers integrity).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from zlib_ng import zlib_ng

from hf_model_stock.errors import ModelStockError
from hf_model_stock.io import platform
from hf_model_stock.merge.plan import MergePlan
from hf_model_stock.merge.stats import TensorStats
from hf_model_stock.versions import merge_versions

JOURNAL_NAME = ".hfms-journal.jsonl"
JOURNAL_VERSION = 1
# options that cannot change a single output byte (of a full-weight output, which alone is resumable)
_NOT_IN_FINGERPRINT = ("prefetch", "fsync", "output_format", "adapter_base_mismatch", "tokenizer_source")


def plan_fingerprint(plan: MergePlan) -> str:
    """sha256 of everything that decides the output bytes: options, inputs (path, size, mtime),
    tensors and their work units, the shard layout, and the versions of the code that computes."""
    options = {k: v for k, v in dataclasses.asdict(plan.options).items() if k not in _NOT_IN_FINGERPRINT}
    files: dict[str, list[int]] = {}
    for task in plan.tasks:
        for info in task.inputs:
            if str(info.path) not in files:  # a streamed shard is not on disk: its source's commit names it
                st = info.path.stat() if info.path.exists() else None
                files[str(info.path)] = [st.st_size, st.st_mtime_ns] if st else [-1, -1]
    for adapter in plan.adapters.values():  # LoRA adapters, loaded whole
        for path in adapter.files:
            st = path.stat()
            files[str(path)] = [st.st_size, st.st_mtime_ns]
    sources = [[m.label, str(m.path), m.commit] for m in [plan.base, *plan.models]]
    tasks = [[t.name, t.out_dtype, t.merge, t.filter_wise, t.unit_elems,
              [[str(i.path), i.offset, i.dtype] for i in t.inputs]] for t in plan.tasks]
    shards = [[s.filename, hashlib.sha256(s.header).hexdigest()] for s in plan.shards]
    doc = {"versions": merge_versions(), "options": options, "sources": sources,
           "files": files, "tasks": tasks, "shards": shards}
    if plan.vocab is not None:  # rows matched by token: the row map decides the embedding's bytes
        doc["vocab"] = plan.vocab.digest()
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class Journal:
    """Append-only record of finished tensors; thread-safe. A tensor's line is written once both its
    statistics (compute thread) and its CRC-32 (writer thread, after the last byte) are known."""

    def __init__(self, path: Path, fingerprint: str, *, batch: int = 64, interval_s: float = 1.0):
        self.path = path
        self._batch, self._interval = batch, interval_s
        self._lock = threading.Lock()
        self._stats: dict[str, TensorStats] = {}
        self._written: dict[str, dict[str, Any]] = {}
        self._unsynced, self._synced_at = 0, time.monotonic()
        fresh = not path.exists()
        self._fh = open(path, "a", encoding="utf-8")
        if fresh:
            self._append({"journal": JOURNAL_VERSION, "plan": fingerprint})
            self._sync()

    def stats(self, stats: TensorStats) -> None:
        """The merge statistics of a tensor (the compute thread has finished it)."""
        with self._lock:
            self._stats[stats.name] = stats
            self._maybe_line(stats.name)

    def written(self, name: str, shard: str, offset: int, nbytes: int, crc32: int) -> None:
        """The last byte of tensor ``name`` is written (the writer thread has finished it)."""
        with self._lock:
            self._written[name] = {"tensor": name, "shard": shard, "offset": offset, "nbytes": nbytes,
                                   "crc32": crc32}
            self._maybe_line(name)

    def _maybe_line(self, name: str) -> None:
        if name in self._stats and name in self._written:
            entry = self._written.pop(name)
            entry["stats"] = dataclasses.asdict(self._stats.pop(name))
            self._append(entry)
            self._unsynced += 1
            if self._unsynced >= self._batch or time.monotonic() - self._synced_at >= self._interval:
                self._sync()

    def _append(self, obj: dict[str, Any]) -> None:
        self._fh.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._unsynced, self._synced_at = 0, time.monotonic()

    def close(self) -> None:
        """Flush and fsync what is recorded, and close."""
        with self._lock:
            if not self._fh.closed:
                try:
                    self._sync()
                finally:
                    self._fh.close()


def read_journal(path: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """The plan fingerprint and the tensor entries of a journal; unparsable lines (a torn last line
    after a crash) are left out, so their tensors are merged again."""
    fingerprint, entries = None, []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise ModelStockError(f"{path}: cannot read the resume journal ({exc.strerror or exc})") from None
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("journal") == JOURNAL_VERSION and fingerprint is None:
            fingerprint = obj.get("plan")
        elif isinstance(obj, dict) and isinstance(obj.get("stats"), dict):
            entries.append(obj)
    return fingerprint, entries


def crc32_range(fd: int, offset: int, nbytes: int, block: int = 16 << 20) -> int | None:
    """CRC-32 of ``nbytes`` at ``offset`` of an open file; None when the file is shorter."""
    crc, done = 0, 0
    while done < nbytes:
        chunk = platform.pread(fd, min(block, nbytes - done), offset + done)
        if not chunk:
            return None
        crc = zlib_ng.crc32(chunk, crc)
        done += len(chunk)
    return crc


def verified_tensors(plan: MergePlan, directory: Path) -> dict[str, TensorStats]:
    """The journalled tensors of the partial output in ``directory`` whose bytes still match their
    CRC-32, with their statistics. Refuses a journal written for a different plan."""
    fingerprint, entries = read_journal(directory / JOURNAL_NAME)
    if fingerprint != plan_fingerprint(plan):
        raise ModelStockError(f"{directory}: the interrupted merge had a different plan (recipe, inputs, "
                              "options or versions changed); run without --resume to start over")
    where = {t.name: (s.filename, s.offsets[t.name], t.nbytes) for s in plan.shards for t in s.tensors}
    good: dict[str, TensorStats] = {}
    fds: dict[str, int] = {}
    try:
        for e in entries:
            name = e.get("tensor")
            if not isinstance(name, str) or where.get(name) != (e.get("shard"), e.get("offset"), e.get("nbytes")):
                continue
            shard = directory / e["shard"]
            if e["shard"] not in fds:
                try:
                    fds[e["shard"]] = platform.open_read(shard)
                except OSError:
                    continue
            if crc32_range(fds[e["shard"]], e["offset"], e["nbytes"]) != e.get("crc32"):
                continue
            try:
                good[name] = TensorStats(**e["stats"])
            except TypeError:
                continue
    finally:
        for fd in fds.values():
            os.close(fd)
    return good
