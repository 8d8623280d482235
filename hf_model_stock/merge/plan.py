"""The merge plan: every tensor's inputs, output dtype, work units and place in the output shards.

Built from safetensors headers and config.json alone, so it is complete (and every compatibility
error has surfaced) before the first byte of weights is read. ``--dry-run`` prints it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from hf_model_stock.errors import CompatibilityError
from hf_model_stock.io.dtypes import is_floating, itemsize
from hf_model_stock.io.reader import TensorInfo
from hf_model_stock.io.writer import OutputTensor, ShardLayout, layout_shards
from hf_model_stock.methods.model_stock import DEFAULT_BLOCK, ModelStockParams
from hf_model_stock.sources.compat import check_tensors, config_problems, headers_of
from hf_model_stock.sources.resolve import ResolvedModel

BASELINE_RSS = 200 * 2**20  # interpreter, numpy and libraries; torch adds ~180 MB where a tensor needs it
OUT_BUFFERS = 3  # merged units waiting for the writer: it may lag the compute by two units
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class MergeOptions:
    """How to merge: method parameters, output dtype, device and memory budget."""

    params: ModelStockParams = ModelStockParams()
    method: str = "model_stock"  # a key of methods.registry.METHODS
    dtype: str | None = None  # safetensors code of the output dtype; None keeps the base's
    device: str = "cpu"
    workers: int = 0  # compute threads on the CPU; 0: one per core
    chunk_bytes: int = 128 * 2**20  # input bytes (all models together) per unit of work
    prefetch: int = 2
    shard_bytes: int = 5 * 10**9
    fsync: bool = False  # flush each shard to disk before the output is renamed into place
    on_nonfinite: str = "error"  # NaN/Inf in a merged tensor's inputs: "error" stops, "warn" merges and reports


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: its inputs (base first), what to do with them and how to split the work."""

    name: str
    shape: tuple[int, ...]
    inputs: tuple[TensorInfo, ...]
    out_dtype: str
    merge: bool  # False: copied from the base (non-floating tensors)
    filter_wise: bool
    unit_elems: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def cols(self) -> int:
        return self.numel // self.shape[0] if self.shape and self.shape[0] else max(self.numel, 1)

    def units(self) -> Iterator[tuple[int, int]]:
        """Element ranges [start, stop) of the flattened tensor, one per unit of work."""
        if self.numel == 0:
            yield (0, 0)
            return
        for start in range(0, self.numel, self.unit_elems):
            yield (start, min(self.numel, start + self.unit_elems))

    @property
    def two_pass(self) -> bool:
        """Layer-wise tensors larger than one unit: pass 1 sums the Gram matrix, pass 2 writes."""
        return self.merge and not self.filter_wise and self.numel > self.unit_elems

    @property
    def in_bytes_per_elem(self) -> int:
        return sum(itemsize(i.dtype) for i in self.inputs)


@dataclass
class MergePlan:
    """Everything the executor needs, decided from headers."""

    base: ResolvedModel
    models: list[ResolvedModel]
    options: MergeOptions
    tasks: list[TensorTask]
    shards: list[ShardLayout]
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_in(self) -> int:
        return sum(i.nbytes for t in self.tasks for i in (t.inputs if t.merge else t.inputs[:1]))

    @property
    def bytes_read(self) -> int:
        """Bytes read from disk, counting the second pass over two-pass tensors."""
        return sum(
            (2 if t.two_pass else 1) * sum(i.nbytes for i in (t.inputs if t.merge else t.inputs[:1]))
            for t in self.tasks
        )

    @property
    def bytes_out(self) -> int:
        return sum(s.file_bytes for s in self.shards)

    @property
    def max_unit_in_bytes(self) -> int:
        return max((min(t.numel, t.unit_elems) * t.in_bytes_per_elem for t in self.tasks), default=0)

    @property
    def max_unit_out_bytes(self) -> int:
        return max((min(t.numel, t.unit_elems) * itemsize(t.out_dtype) for t in self.tasks), default=0)

    @property
    def max_single_unit_elems(self) -> int:
        """Largest layer-wise unit of work: the size of the float32 delta-sum scratch."""
        return max((min(t.numel, t.unit_elems) for t in self.tasks if t.merge and not t.filter_wise), default=0)

    @property
    def peak_memory_estimate(self) -> int:
        n = len(self.models)
        scratch = (2 * n + 2) * DEFAULT_BLOCK * 4 * max(1, self.options.workers or 2)
        buffers = (self.options.prefetch + 1) * self.max_unit_in_bytes + OUT_BUFFERS * self.max_unit_out_bytes
        buffers += 4 * self.max_single_unit_elems
        return BASELINE_RSS + buffers + scratch

    def describe(self) -> str:
        """Human-readable plan, as printed by ``--dry-run``."""
        gib = 2**30
        merged = sum(t.merge for t in self.tasks)
        lines = [
            f"base:   {self.base.label}  ({self.base.path})",
            *[f"model:  {m.label}  ({m.path})" for m in self.models],
            f"method: {self.options.method}  granularity={self.options.params.granularity} "
            f"clamp_t={self.options.params.clamp_t} eps={self.options.params.eps:g}  device={self.options.device}",
            f"tensors: {len(self.tasks)} ({merged} merged, {len(self.tasks) - merged} copied from the base, "
            f"{sum(t.two_pass for t in self.tasks)} in two passes)",
            f"bytes in: {self.bytes_in / gib:.3f} GiB (read {self.bytes_read / gib:.3f} GiB)   "
            f"bytes out: {self.bytes_out / gib:.3f} GiB in {len(self.shards)} shard(s)",
            f"expected peak memory: {self.peak_memory_estimate / gib:.2f} GiB "
            f"(chunk {self.options.chunk_bytes / 2**20:.0f} MiB, prefetch {self.options.prefetch})",
        ]
        lines += [f"shard:  {s.filename}  {len(s.tensors)} tensors  {s.file_bytes / gib:.3f} GiB" for s in self.shards]
        lines += [f"note:   {n}" for n in self.notes]
        return "\n".join(lines)


def build_plan(base: ResolvedModel, models: list[ResolvedModel], options: MergeOptions) -> MergePlan:
    """Check that the models can be merged and plan the merge, reading headers only.

    Raises ``CompatibilityError`` listing every mismatch found (names, shapes, dtypes, configs).
    """
    if len(models) < 2:
        raise CompatibilityError(f"Model Stock needs at least 2 fine-tuned models, got {len(models)}")
    base_ckpt = base.checkpoint()
    ckpts = [m.checkpoint() for m in models]
    problems = config_problems(base.config(), [(m.label, m.config()) for m in models])
    check = check_tensors(base.config(), headers_of(base_ckpt), [(m.label, headers_of(c)) for m, c in zip(models, ckpts)])
    problems += check.problems
    if problems:
        more = len(problems) - MAX_LISTED_PROBLEMS
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
        raise CompatibilityError(f"{len(problems)} incompatibilities with base {base.label}: {listed}")
    order = sorted(check.names, key=lambda n: (str(base_ckpt.tensors[n].path), base_ckpt.tensors[n].offset))
    tasks = [_task(name, [base_ckpt.tensors[name], *(c.tensors[name] for c in ckpts)], options) for name in order]
    shards = layout_shards([OutputTensor(t.name, t.out_dtype, t.shape) for t in tasks], options.shard_bytes)
    return MergePlan(base=base, models=models, options=options, tasks=tasks, shards=shards, notes=check.notes)


def _task(name: str, inputs: list[TensorInfo], options: MergeOptions) -> TensorTask:
    base = inputs[0]
    merge = is_floating(base.dtype)
    out_dtype = (options.dtype or base.dtype) if merge else base.dtype
    per_elem = sum(itemsize(i.dtype) for i in inputs) if merge else itemsize(base.dtype)
    numel = max(base.numel, 1)
    unit = max(1, options.chunk_bytes // per_elem)
    filter_wise = merge and options.params.granularity == "filter" and len(base.shape) >= 2 and base.numel > 0
    if filter_wise:
        cols = max(1, base.numel // max(base.shape[0], 1))
        unit = max(1, unit // cols) * cols  # whole rows: each row's t needs all of that row
    return TensorTask(
        name=name,
        shape=base.shape,
        inputs=tuple(inputs),
        out_dtype=out_dtype,
        merge=merge,
        filter_wise=filter_wise,
        unit_elems=min(unit, numel),
    )
