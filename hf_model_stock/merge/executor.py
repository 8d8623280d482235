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
import gc
import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

import numpy as np
from zlib_ng import zlib_ng  # CRC-32 with carry-less multiply: 8 GB/s here against zlib's 2.6

from hf_model_stock.merge.compute import UnitCompute
from hf_model_stock.errors import ModelStockError
from hf_model_stock.io.buffers import host_buffer
from hf_model_stock.io.dtypes import itemsize, storage_dtype
from hf_model_stock.io.reader import DIRECT_ALIGN, ShardFiles
from hf_model_stock.io.writer import ShardWriter
from hf_model_stock.methods.model_stock import Ratio, concat_ratios
from hf_model_stock.methods.registry import METHODS
from hf_model_stock.merge.plan import OUT_BUFFERS, MergePlan, TensorTask

if TYPE_CHECKING:
    from hf_model_stock.merge.journal import Journal

# Every input of a unit read into a buffer starts on a cache line of the page-aligned buffer: the
# kernel's copy into a destination 8 to 24 bytes past a cache line ran at 1.6 GB/s instead of 7 on the
# project's machine. An input read with O_DIRECT instead starts where its address agrees with its file
# offset modulo the block (DIRECT_ALIGN), so that whole blocks are read straight into it.
UNIT_ALIGN = 64


def unit_buffer_bytes(plan: MergePlan) -> int:
    """Size of one input buffer: the largest unit and each input's alignment slack (``read_unit``)."""
    return plan.max_unit_in_bytes + (DIRECT_ALIGN + UNIT_ALIGN) * (len(plan.models) + 1)


@dataclass
class TensorStats:
    """What the merge did to one tensor (one row of merge_report.json)."""

    name: str
    shape: list[int]
    dtype_in: list[str]
    dtype_out: str
    action: str  # "merge" | "copy"
    granularity: Optional[str] = None
    t: Optional[float] = None  # layer-wise t, or the mean of the rows' t (filter-wise)
    cos: Optional[float] = None
    delta_norms: Optional[list[float]] = None
    clamped: bool = False
    t_min: Optional[float] = None
    t_max: Optional[float] = None
    rows_clamped: Optional[int] = None
    nonfinite: Optional[list[str]] = None  # inputs holding NaN or Inf (on_nonfinite: warn)


@dataclass
class ExecutionResult:
    """Per-tensor statistics and each shard's sha256."""

    tensors: list[TensorStats]
    shard_sha256: dict[str, str] = field(default_factory=dict)


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


@dataclass
class _Unit:
    task: TensorTask
    phase: str  # "copy" | "full" | "stats" | "write"
    start: int
    stop: int
    last: bool
    views: list[np.ndarray]
    release: Callable[[], None]  # gives the buffer back and the mapped pages up, once the views are used


def read_unit(buf: np.ndarray, task: TensorTask, start: int, stop: int, files: ShardFiles,
              mapped: Optional[list[tuple[Path, np.ndarray]]] = None) -> list[np.ndarray]:
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
            files.read_into(info, start * size, memoryview(region), keep_cached=task.two_pass)
            pos += nbytes
            pos += -pos % UNIT_ALIGN
        views.append(region.view(storage_dtype(info.dtype)))
    return views


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
            phases = ["stats", "write"] if task.two_pass else ["full" if task.merge else "copy"]
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
                        views = read_unit(buf, task, start, stop, files, mapped)
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

    def __init__(self, writers: dict[str, ShardWriter], journal: Optional["Journal"] = None,
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
        self._error: Optional[BaseException] = None
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


def _stats(task: TensorTask, ratio: Ratio, granularity: str) -> TensorStats:
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
    from tqdm.auto import tqdm  # imported only when shown: it brings asyncio along (0.1 s)

    return tqdm(total=total, unit="B", unit_scale=True, desc="merging")


def execute(plan: MergePlan, directory: Path, progress: bool = True, *, journal: Optional["Journal"] = None,
            done: Optional[Mapping[str, TensorStats]] = None) -> ExecutionResult:
    """Merge every tensor of ``plan`` into pre-sized shards in ``directory``. Tensors in ``done`` are
    already there (a resumed merge) and keep their statistics; each tensor finished now is recorded in
    ``journal``."""
    with _frozen_gc():
        return _execute(plan, directory, progress, journal, done or {})


def _execute(plan: MergePlan, directory: Path, progress: bool, journal: Optional["Journal"],
             done: Mapping[str, TensorStats]) -> ExecutionResult:
    order = [t.name for t in plan.tasks]
    plan = dataclasses.replace(plan, tasks=[t for t in plan.tasks if t.name not in done])
    opts = plan.options
    ratio_fn = METHODS[opts.method]
    compute = UnitCompute(len(plan.models), opts.workers, opts.device, plan.max_single_unit_elems)
    in_pool = _Pool(opts.prefetch + 1, unit_buffer_bytes(plan), pin=opts.device != "cpu")
    out_pool = _Pool(OUT_BUFFERS, plan.max_unit_out_bytes)
    writers = {t.name: w for s in plan.shards for w in [ShardWriter(directory, s, opts.fsync)] for t in s.tensors}
    cancelled = threading.Event()
    units: queue.Queue = queue.Queue(maxsize=opts.prefetch)
    files = ShardFiles(map_cached=opts.device == "cpu")
    reader = threading.Thread(
        target=_read_units, args=(plan, in_pool, files, units, cancelled), name="hfms-reader", daemon=True
    )
    writer = _Writer(writers, journal, frozenset(done))
    results: list[TensorStats] = []

    def record(stats: TensorStats) -> None:
        results.append(stats)
        if journal is not None:
            journal.stats(stats)

    gram: Optional[np.ndarray] = None
    ratio: Optional[Ratio] = None
    bar = _progress_bar(plan.bytes_read) if progress else None
    reader.start()
    try:
        while (unit := units.get()) is not None:
            if isinstance(unit, BaseException):
                raise unit
            task = unit.task
            if bar is not None:
                bar.update(sum(v.nbytes for v in unit.views))
            if unit.phase == "copy":
                writer.submit(task.name, unit.start * itemsize(task.out_dtype), unit.views[0].view(np.uint8),
                              unit.release)
                record(TensorStats(task.name, list(task.shape), [task.inputs[0].dtype], task.out_dtype, "copy"))
                continue
            if unit.phase == "stats":
                part = compute.gram(task, unit.views)
                gram = part if unit.start == 0 or gram is None else gram + part
                unit.release()
                if unit.last:
                    ratio = ratio_fn(gram, opts.params)
                    record(_check_finite(plan, task, _stats(task, ratio, "layer")))
                continue
            out_buf = out_pool.acquire(cancelled)
            out_bytes = (unit.stop - unit.start) * itemsize(task.out_dtype)
            out = out_buf[:out_bytes].view(storage_dtype(task.out_dtype))
            if task.filter_wise:
                part_ratio = compute.merge_filter(task, unit.views, out, ratio_fn, opts.params)
                ratio = part_ratio if unit.start == 0 or ratio is None else concat_ratios([ratio, part_ratio])
                if unit.last:
                    record(_check_finite(plan, task, _stats(task, ratio, "filter")))
            elif unit.phase == "full":
                ratio = compute.merge(task, unit.views, out, ratio_fn, opts.params)
                record(_check_finite(plan, task, _stats(task, ratio, "layer")))
            else:
                assert ratio is not None
                compute.merge_second_pass(task, unit.views, float(ratio.t), out)
            unit.release()
            writer.submit(task.name, unit.start * itemsize(task.out_dtype), out_buf[:out_bytes],
                          lambda b=out_buf: out_pool.release(b))
    except BaseException:
        cancelled.set()
        raise
    finally:
        cancelled.set()
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
