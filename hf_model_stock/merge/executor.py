"""The streaming executor: read units of work, merge them, write them in place.

Three stages overlap: a reader thread gets the next units ready (views of the mapped shards that are
in the page cache, else reads into a small pool of reusable buffers), the calling thread computes
(``compute.UnitCompute``: fused C kernels on the CPU, torch where they do not apply or on CUDA), and a
writer thread ``pwrite``s results into the pre-sized output shards while hashing them. Memory is
bounded by the units in flight, whatever the size of the model: (prefetch + 1) input units (a
buffer each, or the mapped pages, dropped once merged) and three output buffers of at most one unit.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from zlib_ng import (
    zlib_ng,  # CRC-32 with carry-less multiply, several times zlib's speed
)

from hf_model_stock.errors import ModelStockError
from hf_model_stock.io.buffers import host_buffer
from hf_model_stock.io.dtypes import itemsize, storage_dtype
from hf_model_stock.io.reader import ShardFiles
from hf_model_stock.io.writer import ShardWriter
from hf_model_stock.merge.compute import UnitCompute
from hf_model_stock.merge.lowrank import LowRankCompute
from hf_model_stock.merge.plan import OUT_BUFFERS, MergePlan, TensorTask
from hf_model_stock.merge.stats import ExecutionResult, TensorStats
from hf_model_stock.merge.streaming import open_shard_files
from hf_model_stock.merge.units import read_unit, unit_buffer_bytes
from hf_model_stock.merge.vocab import VocabCompute, read_vocab_unit
from hf_model_stock.methods.model_stock import Ratio, concat_ratios
from hf_model_stock.methods.registry import METHODS

if TYPE_CHECKING:
    from hf_model_stock.merge.journal import Journal

class _Pool:
    """A fixed set of reusable byte buffers; ``acquire`` blocks until one is free."""

    def __init__(self, count: int, nbytes: int, pin: bool = False):
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(count):
            self._free.put(host_buffer(max(nbytes, 1), pin))

    def acquire(self, cancelled: threading.Event) -> np.ndarray:
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if cancelled.is_set():
                    raise _Cancelled() from None

    def release(self, buf: np.ndarray) -> None:
        self._free.put(buf)


class _Cancelled(Exception):
    pass


class Phase(Enum):
    """What the compute thread does with a unit of work."""

    COPY = "copy"  # a non-floating tensor: the base's bytes go out as they are
    FULL = "full"  # a tensor merged in one pass: its Gram matrix and its output from the same units
    GRAM = "gram"  # first pass over a tensor too big for one unit: accumulate its Gram matrix
    WRITE = "write"  # second pass: write w_0 + t/N sum_i d_i with the t of the first pass


@dataclass
class _Unit:
    task: TensorTask
    phase: Phase
    start: int
    stop: int
    last: bool
    views: list[np.ndarray]
    release: Callable[[], None]  # gives the buffer back and the mapped pages up, once the views are used


def _put(q: queue.Queue, item: object, cancelled: threading.Event) -> None:
    while True:
        try:
            return q.put(item, timeout=0.1)
        except queue.Full:
            if cancelled.is_set():
                raise _Cancelled() from None


def _read_units(
    plan: MergePlan, pool: _Pool, files: ShardFiles, out: queue.Queue, cancelled: threading.Event
) -> None:
    """Reader thread: every unit of every task, in output order, two passes where needed."""
    try:
        for task in plan.tasks:
            phases = [Phase.GRAM, Phase.WRITE] if task.two_pass else [Phase.FULL if task.merge else Phase.COPY]
            units = list(task.units())
            for phase in phases:
                for k, (start, stop) in enumerate(units):
                    buf = pool.acquire(cancelled)
                    mapped: list[tuple[Path, np.ndarray]] = []

                    def release(buf: np.ndarray = buf, mapped: list[tuple[Path, np.ndarray]] = mapped) -> None:
                        for path, view in mapped:
                            files.release(path, view)
                        pool.release(buf)

                    try:
                        read = read_vocab_unit if task.vocab is not None else read_unit
                        views = read(buf, task, start, stop, files, mapped)
                    except BaseException:
                        release()
                        raise
                    _put(out, _Unit(task, phase, start, stop, k == len(units) - 1, views, release), cancelled)
        _put(out, None, cancelled)
    except _Cancelled:
        pass
    except BaseException as exc:  # handed to the compute thread, which re-raises it
        try:
            _put(out, exc, cancelled)
        except _Cancelled:
            pass


class _Writer:
    """Writer thread: writes results in place and finishes each shard once it is complete. Tensors in
    ``done`` are already in place (a resumed merge); each tensor completed here goes to ``journal``."""

    def __init__(self, writers: dict[str, ShardWriter], journal: Journal | None = None,
                 done: frozenset[str] = frozenset()):
        self._writers = writers
        self._journal = journal
        self._sizes = {t.name: t.nbytes for w in set(writers.values()) for t in w.layout.tensors}
        self._tensor_left = {name: n for name, n in self._sizes.items() if name not in done}
        self._crc = dict.fromkeys(self._tensor_left, 0)
        self._remaining = {w.layout.filename: sum(self._tensor_left.get(t.name, 0) for t in w.layout.tensors)
                           for w in set(writers.values())}
        self.sha256: dict[str, str] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._checksums = ThreadPoolExecutor(1, "hfms-crc32")
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hfms-writer", daemon=True)
        self._thread.start()
        for w in set(writers.values()):
            if self._remaining[w.layout.filename] == 0:
                self.sha256[w.layout.filename] = w.finish()

    def submit(self, name: str, start_byte: int, data: np.ndarray, done: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.put((name, start_byte, data, done))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            name, start_byte, data, done = job
            try:
                if self._error is None:
                    writer = self._writers[name]
                    view = memoryview(data)
                    crc = self._checksums.submit(zlib_ng.crc32, view, self._crc[name]) if self._journal else None
                    writer.write(name, start_byte, view)
                    if crc is not None:  # the CRC-32 (for resuming) is computed while the bytes are hashed and written
                        self._tensor_written(writer, name, view.nbytes, crc.result())
                    key = writer.layout.filename
                    self._remaining[key] -= data.nbytes
                    if self._remaining[key] == 0:
                        self.sha256[key] = writer.finish()
            except BaseException as exc:
                self._error = exc
            finally:
                done()

    def _tensor_written(self, writer: ShardWriter, name: str, nbytes: int, crc: int) -> None:
        assert self._journal is not None
        self._crc[name] = crc
        self._tensor_left[name] -= nbytes
        if self._tensor_left[name] == 0:
            layout = writer.layout
            self._journal.written(name, layout.filename, layout.offsets[name], self._sizes[name], self._crc[name])

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        self._checksums.shutdown()
        if self._error is not None:
            raise self._error


def tensor_stats(task: TensorTask, ratio: Ratio, granularity: str) -> TensorStats:
    """The report row of a merged tensor, from its ratio (t per tensor or per row)."""
    stats = TensorStats(
        name=task.name,
        shape=list(task.shape),
        dtype_in=[i.dtype for i in task.inputs],
        dtype_out=task.out_dtype,
        action="merge",
        granularity=granularity,
    )
    if ratio.t.ndim == 0:
        stats.t, stats.cos = float(ratio.t), float(ratio.cos)
        stats.delta_norms = [float(x) for x in ratio.norms]
        stats.clamped = bool(ratio.clamped)
    else:
        stats.t, stats.cos = float(ratio.t.mean()), float(ratio.cos.mean())
        stats.t_min, stats.t_max = float(ratio.t.min()), float(ratio.t.max())
        stats.delta_norms = [float(x) for x in np.sqrt(np.square(ratio.norms).sum(0))]
        stats.rows_clamped = int(ratio.clamped.sum())
        stats.clamped = stats.rows_clamped > 0
    return stats


def _check_finite(plan: MergePlan, task: TensorTask, stats: TensorStats) -> TensorStats:
    """Name the inputs with NaN or Inf (their squared delta norm is not finite); stop unless told to warn."""
    norms = stats.delta_norms or []
    bad = [m.label for m, v in zip(plan.models, norms) if not math.isfinite(v)]
    if not bad:
        return stats
    if len(bad) == len(plan.models):
        bad = [f"{plan.base.label} (the base) or every fine-tune"]
    if plan.options.on_nonfinite != "warn":
        raise ModelStockError(f"tensor {task.name!r}: NaN or Inf in the weights of {', '.join(bad)}")
    stats.nonfinite = bad
    return stats


@contextmanager
def _frozen_gc() -> Iterator[None]:
    """Hide the objects that exist now (the libraries', alive for the whole process) from
    the garbage collector while merging, so that its full collections do not walk them again."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _progress_bar(total: int) -> Any:
    from tqdm.auto import (
        tqdm,  # imported only when shown: it brings asyncio along (0.1 s)
    )

    return tqdm(total=total, unit="B", unit_scale=True, desc="merging")


class _UnitMerger:
    """The compute side of the executor, one method per phase; holds the Gram matrix and t of the
    tensor in progress between its units."""

    def __init__(self, plan: MergePlan, compute: UnitCompute, writer: _Writer, out_pool: _Pool,
                 cancelled: threading.Event, record: Callable[[TensorStats], None]):
        self.plan, self.compute, self.writer, self.out_pool = plan, compute, writer, out_pool
        self.cancelled, self.record = cancelled, record
        self.ratio_fn = METHODS[plan.options.method]
        self.lowrank = LowRankCompute()  # tensors where some fine-tunes are LoRA adapters
        self.vocab = VocabCompute()  # embedding rows matched by token (different vocabularies)
        self.gram_sum: np.ndarray | None = None
        self.ratio: Ratio | None = None

    def _finish(self, task: TensorTask, ratio: Ratio, granularity: str) -> None:
        self.record(_check_finite(self.plan, task, tensor_stats(task, ratio, granularity)))

    def copy(self, unit: _Unit) -> None:
        task = unit.task
        self.writer.submit(task.name, unit.start * itemsize(task.out_dtype), unit.views[0].view(np.uint8), unit.release)
        self.record(TensorStats(task.name, list(task.shape), [task.inputs[0].dtype], task.out_dtype, "copy"))

    def gram(self, unit: _Unit) -> None:
        task = unit.task
        if task.deltas or task.vocab is not None:
            part = self._rows_compute(task).gram(task, unit.views, unit.start, unit.stop)
        else:
            part = self.compute.gram(task, unit.views)
        self.gram_sum = part if unit.start == 0 or self.gram_sum is None else self.gram_sum + part
        unit.release()
        if unit.last:
            self.ratio = self.ratio_fn(self.gram_sum, self.plan.options.params)
            self._finish(task, self.ratio, "layer")

    def _rows_compute(self, task: TensorTask) -> LowRankCompute | VocabCompute:
        return self.vocab if task.vocab is not None else self.lowrank

    def _merge_rows(self, unit: _Unit, out: np.ndarray) -> None:
        """A unit of whole rows of a tensor with adapter deltas or token-matched rows."""
        task, params = unit.task, self.plan.options.params
        compute = self._rows_compute(task)
        if unit.phase is Phase.WRITE:
            assert self.ratio is not None
            compute.write(task, unit.views, unit.start, unit.stop, self.ratio.t, out)
            return
        part = compute.merge(task, unit.views, unit.start, unit.stop, out, self.ratio_fn, params)
        if task.filter_wise:
            self.ratio = part if unit.start == 0 or self.ratio is None else concat_ratios([self.ratio, part])
        else:
            self.ratio = part
        if unit.last:
            self._finish(task, self.ratio, "filter" if task.filter_wise else "layer")

    def merge(self, unit: _Unit) -> None:
        """A unit of a one-pass tensor (``FULL``) or of a second pass (``WRITE``): compute and write it."""
        task, params = unit.task, self.plan.options.params
        out_buf = self.out_pool.acquire(self.cancelled)
        out_bytes = (unit.stop - unit.start) * itemsize(task.out_dtype)
        out = out_buf[:out_bytes].view(storage_dtype(task.out_dtype))
        if task.deltas or task.vocab is not None:
            self._merge_rows(unit, out)
        elif task.filter_wise:
            part = self.compute.merge_filter(task, unit.views, out, self.ratio_fn, params)
            self.ratio = part if unit.start == 0 or self.ratio is None else concat_ratios([self.ratio, part])
            if unit.last:
                self._finish(task, self.ratio, "filter")
        elif unit.phase is Phase.FULL:
            self.ratio = self.compute.merge(task, unit.views, out, self.ratio_fn, params)
            self._finish(task, self.ratio, "layer")
        else:
            assert self.ratio is not None
            self.compute.merge_second_pass(task, unit.views, float(self.ratio.t), out)
        unit.release()
        self.writer.submit(task.name, unit.start * itemsize(task.out_dtype), out_buf[:out_bytes],
                           functools.partial(self.out_pool.release, out_buf))


def execute(plan: MergePlan, directory: Path, progress: bool = True, *, journal: Journal | None = None,
            done: Mapping[str, TensorStats] | None = None) -> ExecutionResult:
    """Merge every tensor of ``plan`` into pre-sized shards in ``directory``. Tensors in ``done`` are
    already there (a resumed merge) and keep their statistics; each tensor finished now is recorded in
    ``journal``."""
    with _frozen_gc():
        return _execute(plan, directory, progress, journal, done or {})


def _execute(plan: MergePlan, directory: Path, progress: bool, journal: Journal | None,
             done: Mapping[str, TensorStats]) -> ExecutionResult:
    order = [t.name for t in plan.tasks]
    plan = dataclasses.replace(plan, tasks=[t for t in plan.tasks if t.name not in done])
    opts = plan.options
    compute = UnitCompute(len(plan.models), opts.workers, opts.device, plan.max_single_unit_elems)
    in_pool = _Pool(opts.prefetch + 1, unit_buffer_bytes(plan), pin=opts.device.startswith("cuda"))  # MPS memory is unified
    out_pool = _Pool(OUT_BUFFERS, plan.max_unit_out_bytes)
    writers = {t.name: w for s in plan.shards for w in [ShardWriter(directory, s, opts.fsync)] for t in s.tensors}
    cancelled = threading.Event()
    units: queue.Queue = queue.Queue(maxsize=opts.prefetch)
    files = open_shard_files(plan, directory, map_cached=opts.device == "cpu", progress=progress)
    reader = threading.Thread(
        target=_read_units, args=(plan, in_pool, files, units, cancelled), name="hfms-reader", daemon=True
    )
    writer = _Writer(writers, journal, frozenset(done))
    results: list[TensorStats] = []

    def record(stats: TensorStats) -> None:
        results.append(stats)
        if journal is not None:
            journal.stats(stats)

    merger = _UnitMerger(plan, compute, writer, out_pool, cancelled, record)
    handlers = {Phase.COPY: merger.copy, Phase.GRAM: merger.gram, Phase.FULL: merger.merge, Phase.WRITE: merger.merge}
    bar = _progress_bar(plan.bytes_read) if progress else None
    reader.start()
    try:
        while (unit := units.get()) is not None:
            if isinstance(unit, BaseException):
                raise unit
            if bar is not None:
                bar.update(sum(v.nbytes for v in unit.views))
            handlers[unit.phase](unit)
    except BaseException:
        cancelled.set()
        raise
    finally:
        cancelled.set()
        getattr(files, "interrupt", lambda: None)()  # streamed shards: stop waiting for the network
        reader.join()
        if bar is not None:
            bar.close()
        compute.close()
        try:
            writer.close()
        finally:
            files.close()
            for w in set(writers.values()):
                w.abort()
    missing = [s.filename for s in plan.shards if s.filename not in writer.sha256]
    if missing:
        raise ModelStockError(f"internal error: shards not completely written: {', '.join(missing)}")
    by_name = {**done, **{s.name: s for s in results}}
    return ExecutionResult(tensors=[by_name[name] for name in order], shard_sha256=writer.sha256)
