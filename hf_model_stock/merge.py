"""The streaming executor: read units of work, merge them, write them in place.

Three stages overlap: a reader thread ``pread``s the next units into a small pool of reusable
buffers, the calling thread computes (torch, CPU or CUDA), and a writer thread ``pwrite``s results
into the pre-sized output shards while hashing them. Memory is bounded by the pools, whatever the
size of the model: (prefetch + 1) input buffers and two output buffers of at most one unit each.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import queue
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Optional

import torch
from tqdm.auto import tqdm

from hf_model_stock.errors import ModelStockError
from hf_model_stock.io.dtypes import SAFETENSORS_TO_TORCH, itemsize
from hf_model_stock.io.reader import ShardFiles
from hf_model_stock.io.writer import ShardWriter
from hf_model_stock.methods.model_stock import (
    DEFAULT_BLOCK,
    ParallelKernel,
    Ratio,
    concat_ratios,
)
from hf_model_stock.methods.registry import METHODS
from hf_model_stock.plan import MergePlan, TensorTask

if TYPE_CHECKING:
    from hf_model_stock.resume import Journal

CUDA_BLOCK = 1 << 24
UNIT_ALIGN = 8  # inputs of one dtype pack tightly, so the fused kernels see one C-contiguous array


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
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin))

    def acquire(self, cancelled: threading.Event) -> torch.Tensor:
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if cancelled.is_set():
                    raise _Cancelled() from None

    def release(self, buf: torch.Tensor) -> None:
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
    buffer: torch.Tensor
    views: list[torch.Tensor]


def read_unit(buf: torch.Tensor, task: TensorTask, start: int, stop: int, files: ShardFiles) -> list[torch.Tensor]:
    """Read elements [start, stop) of each input of ``task`` (base first; only the base for copied
    tensors) into ``buf``, each at an offset aligned to its element size; return typed views."""
    views, pos = [], 0
    for info in task.inputs if task.merge else task.inputs[:1]:
        size = itemsize(info.dtype)
        nbytes = (stop - start) * size
        region = buf[pos : pos + nbytes]
        files.read_into(info, start * size, memoryview(region.numpy()))
        views.append(region.view(SAFETENSORS_TO_TORCH[info.dtype]))
        pos += nbytes
        pos += -pos % UNIT_ALIGN if any(i.dtype != info.dtype for i in task.inputs) else 0
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
                    try:
                        views = read_unit(buf, task, start, stop, files)
                    except BaseException:
                        pool.release(buf)
                        raise
                    _put(out, _Unit(task, phase, start, stop, k == len(units) - 1, buf, views), cancelled)
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
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="hfms-writer", daemon=True)
        self._thread.start()
        for w in set(writers.values()):
            if self._remaining[w.layout.filename] == 0:
                self.sha256[w.layout.filename] = w.finish()

    def submit(self, name: str, start_byte: int, data: torch.Tensor, done: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.put((name, start_byte, data, done))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            name, start_byte, data, done = job
            try:
                if self._error is None:
                    writer = self._writers[name]
                    view = memoryview(data.numpy())
                    writer.write(name, start_byte, view)
                    self._tensor_written(writer, name, view)
                    key = writer.layout.filename
                    self._remaining[key] -= data.numel()
                    if self._remaining[key] == 0:
                        self.sha256[key] = writer.finish()
            except BaseException as exc:
                self._error = exc
            finally:
                done()

    def _tensor_written(self, writer: ShardWriter, name: str, view: memoryview) -> None:
        if self._journal is None:
            return
        self._crc[name] = zlib.crc32(view, self._crc[name])
        self._tensor_left[name] -= view.nbytes
        if self._tensor_left[name] == 0:
            layout = writer.layout
            self._journal.written(name, layout.filename, layout.offsets[name], self._sizes[name], self._crc[name])

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
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
    if ratio.t.dim() == 0:
        stats.t, stats.cos = float(ratio.t), float(ratio.cos)
        stats.delta_norms = [float(x) for x in ratio.norms]
        stats.clamped = bool(ratio.clamped)
    else:
        stats.t, stats.cos = float(ratio.t.mean()), float(ratio.cos.mean())
        stats.t_min, stats.t_max = float(ratio.t.min()), float(ratio.t.max())
        stats.delta_norms = [float(x) for x in ratio.norms.square().sum(0).sqrt()]
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
    """Hide the objects that exist now (mostly torch's and numba's, alive for the whole process) from
    the garbage collector while merging, so that its full collections do not walk them again."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
    device = torch.device(opts.device)
    on_gpu = device.type != "cpu"
    threads = torch.get_num_threads()
    workers = 1 if on_gpu else (opts.workers or threads)
    torch.set_num_threads(1)  # parallelism comes from our workers; idle OpenMP threads would spin
    ratio_fn = METHODS[opts.method]
    kernel = ParallelKernel(len(plan.models), workers, CUDA_BLOCK if on_gpu else DEFAULT_BLOCK, device)
    delta_sum = torch.empty(plan.max_single_unit_elems, dtype=torch.float32, device=device)
    in_pool = _Pool(opts.prefetch + 1, plan.max_unit_in_bytes + UNIT_ALIGN * (len(plan.models) + 1), pin=on_gpu)
    out_pool = _Pool(2, plan.max_unit_out_bytes)
    writers = {t.name: w for s in plan.shards for w in [ShardWriter(directory, s, opts.fsync)] for t in s.tensors}
    cancelled = threading.Event()
    units: queue.Queue = queue.Queue(maxsize=opts.prefetch)
    files = ShardFiles()
    reader = threading.Thread(
        target=_read_units, args=(plan, in_pool, files, units, cancelled), name="hfms-reader", daemon=True
    )
    writer = _Writer(writers, journal, frozenset(done))
    results: list[TensorStats] = []

    def record(stats: TensorStats) -> None:
        results.append(stats)
        if journal is not None:
            journal.stats(stats)

    gram: Optional[torch.Tensor] = None
    ratio: Optional[Ratio] = None
    bar = tqdm(total=plan.bytes_read, unit="B", unit_scale=True, desc="merging", disable=not progress)
    reader.start()
    try:
        while (unit := units.get()) is not None:
            if isinstance(unit, BaseException):
                raise unit
            task = unit.task
            bar.update(sum(v.numel() * v.element_size() for v in unit.views))
            if unit.phase == "copy":
                raw = unit.buffer[: unit.views[0].numel() * unit.views[0].element_size()]
                writer.submit(task.name, unit.start * itemsize(task.out_dtype), raw,
                              lambda b=unit.buffer: in_pool.release(b))
                record(TensorStats(task.name, list(task.shape), [task.inputs[0].dtype], task.out_dtype, "copy"))
                continue
            src = [v.to(device, non_blocking=True) for v in unit.views] if on_gpu else unit.views
            if unit.phase == "stats":
                part = kernel.gram(src)
                gram = part if unit.start == 0 or gram is None else gram + part
                in_pool.release(unit.buffer)
                if unit.last:
                    ratio = ratio_fn(gram, opts.params)
                    record(_check_finite(plan, task, _stats(task, ratio, "layer")))
                continue
            out_buf = out_pool.acquire(cancelled)
            n = unit.stop - unit.start
            out_host = out_buf[: n * itemsize(task.out_dtype)].view(SAFETENSORS_TO_TORCH[task.out_dtype])
            out = torch.empty(n, dtype=out_host.dtype, device=device) if on_gpu else out_host
            if task.filter_wise:
                part_ratio = kernel.merge_filter(src, task.cols, opts.params, out, ratio_fn)
                ratio = part_ratio if unit.start == 0 or ratio is None else concat_ratios([ratio, part_ratio])
                if unit.last:
                    record(_check_finite(plan, task, _stats(task, ratio, "filter")))
            elif unit.phase == "full":
                sums = delta_sum[:n]
                ratio = ratio_fn(kernel.gram(src, sums), opts.params)
                record(_check_finite(plan, task, _stats(task, ratio, "layer")))
                kernel.merge_from_sum(src[0], sums, float(ratio.t), out)
            else:
                assert ratio is not None
                kernel.merge_recompute(src, float(ratio.t), out, delta_sum[:n])
            if on_gpu:
                out_host.copy_(out)
            in_pool.release(unit.buffer)
            writer.submit(task.name, unit.start * itemsize(task.out_dtype), out_buf[: n * itemsize(task.out_dtype)],
                          lambda b=out_buf: out_pool.release(b))
    except BaseException:
        cancelled.set()
        raise
    finally:
        cancelled.set()
        reader.join()
        bar.close()
        kernel.close()
        torch.set_num_threads(threads)
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
