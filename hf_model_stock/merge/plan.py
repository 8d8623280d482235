"""The merge plan: every tensor's inputs, output dtype, work units and place in the output shards.

Built from safetensors headers and config.json alone, so it is complete (and every compatibility
error has surfaced) before the first byte of weights is read. ``--dry-run`` prints it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_model_stock.errors import CompatibilityError
from hf_model_stock.io.dtypes import is_floating, itemsize
from hf_model_stock.io.reader import Checkpoint, TensorInfo
from hf_model_stock.io.writer import OutputTensor, ShardLayout, layout_shards
from hf_model_stock.methods.model_stock import DEFAULT_BLOCK, ModelStockParams
from hf_model_stock.recipe import BaseMismatch, OnNonfinite, OutputFormat
from hf_model_stock.sources.adapters import Adapter, BaseRef, InMemoryDelta, is_adapter, load_adapter
from hf_model_stock.sources.compat import check_tensors, config_problems, headers_of, listed_problems
from hf_model_stock.sources.resolve import ResolvedModel
from hf_model_stock.sources.vocab import (
    VocabInput,
    VocabRows,
    token_ids,
    tokenizer_digest,
    union_tokens,
    vocab_rows,
    vocab_tensor_names,
)

BASELINE_RSS = 200 * 2**20  # interpreter, numpy and libraries; torch adds ~180 MB where a tensor needs it
OUT_BUFFERS = 3  # merged units waiting for the writer: it may lag the compute by two units


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
    on_nonfinite: OnNonfinite = "error"
    output_format: OutputFormat = "model"
    adapter_base_mismatch: BaseMismatch = "error"
    tokenizer_source: str = "base"  # the output's vocabulary: "base", a model (its entry), a directory, "union"
    chat_template: str | None = None  # base, a model, a file or inline Jinja; None: see publish.chat


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
    # With adapters among the fine-tunes: one entry per fine-tune, its delta held in memory
    # (sources.adapters: low-rank or a whole weight), or None where it is streamed from ``inputs``
    # (``inputs`` then holds the base and the streamed fine-tunes, in order). Empty: every fine-tune streams.
    deltas: tuple[InMemoryDelta | None, ...] = ()
    # Embedding-like tensors of models with different vocabularies: which input row makes each output
    # row (sources.vocab); ``shape`` is then the output's, each input keeps its own.
    vocab: VocabRows | None = None

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
    adapters: dict[int, Adapter] = field(default_factory=dict)  # fine-tunes (by index) that are LoRA adapters
    vocab: VocabRows | None = None  # rows of embedding-like tensors matched by token (different vocabularies)

    def tokenizer_dir(self) -> Path:
        """The directory whose tokenizer files the output carries (``tokenizer_source``; for ``union``
        the base's, which the merge extends)."""
        if self.options.tokenizer_source == "union":
            return self.base.path
        return tokenizer_source_dir(self.options.tokenizer_source, self.base, self.models)[0]

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
    base_headers = headers_of(base_ckpt)
    adapters, problems, notes = _load_adapters(base, base_ckpt, models, options)
    full = [i for i in range(len(models)) if i not in adapters]
    ckpts = {i: models[i].checkpoint() for i in full}
    problems += config_problems(base.config(), [(models[i].label, models[i].config()) for i in full])
    tokenized = not adapters and all(tokenizer_digest(p) is not None for p in [base.path, *(m.path for m in models)])
    resizable = vocab_tensor_names(base_headers) if tokenized else set()
    check = check_tensors(base.config(), base_headers, [(models[i].label, headers_of(ckpts[i])) for i in full],
                          resizable=resizable)
    problems += check.problems
    vocab = None
    if tokenized and not check.problems and (resizable & check.names):
        vocab = _vocab(base, base_ckpt, models, [ckpts[i] for i in full], resizable & check.names, options)
        if vocab is not None:
            problems += vocab.problems
            notes += vocab.notes
    for adapter in adapters.values():
        problems += [f"{adapter.label}: tensor {name!r} is left out of the merge (tied), the adapter changes it"
                     for name in adapter.deltas if name not in check.names]
    if problems:
        raise CompatibilityError(f"{len(problems)} incompatibilities with base {base.label}: "
                                 + listed_problems(problems))
    order = sorted(check.names, key=lambda n: (str(base_ckpt.tensors[n].path), base_ckpt.tensors[n].offset))
    tasks = []
    for name in order:
        info = base_ckpt.tensors[name]
        inputs = [info, *(ckpts[i].tensors[name] for i in full)]
        deltas = tuple(adapters[i].delta(name, info.shape) if i in adapters else None
                       for i in range(len(models))) if adapters else ()
        if vocab is not None and name in resizable:
            tasks.append(_vocab_task(name, inputs, options, vocab))
        else:
            tasks.append(_task(name, inputs, options, deltas))
    shards = layout_shards([OutputTensor(t.name, t.out_dtype, t.shape) for t in tasks], options.shard_bytes)
    return MergePlan(base=base, models=models, options=options, tasks=tasks, shards=shards,
                     notes=notes + check.notes, adapters=adapters, vocab=vocab)


def tokenizer_source_dir(source: str, base: ResolvedModel, models: list[ResolvedModel]) -> tuple[Path, int | None]:
    """The directory of the tokenizer the output carries, and its index among the inputs (base 0)."""
    if source == "base":
        return base.path, 0
    for i, m in enumerate(models):
        if source in (m.entry.model, m.entry.label, str(m.path)):
            return m.path, i + 1
    path = Path(source).expanduser()
    for i, m in enumerate([base, *models]):
        if path.exists() and path.resolve() == m.path.resolve():
            return m.path, i
    return path, None


def _vocab(base: ResolvedModel, base_ckpt: Checkpoint, models: list[ResolvedModel], ckpts: list[Checkpoint],
           names: set[str], options: MergeOptions) -> VocabRows | None:
    """The row map of the embedding-like tensors, where vocabularies or their sizes differ; else None."""
    union = options.tokenizer_source == "union"
    source_dir, source_index = (base.path, 0) if union else tokenizer_source_dir(options.tokenizer_source, base, models)
    dirs = [base.path, *(m.path for m in models)]
    rows = [min(c.tensors[n].shape[0] for n in names) for c in [base_ckpt, *ckpts]]
    if len({tokenizer_digest(d) for d in [*dirs, source_dir]}) == 1 and len(set(rows)) == 1:
        return None  # one vocabulary: the rows line up as they are
    inputs = []
    for m, d, r in zip([base, *models], dirs, rows):
        inputs.append(VocabInput(label="the base" if m is base else m.label, tokens=token_ids(d) or {}, rows=r))
    if union:
        out_tokens, added = union_tokens(base.path, dirs[1:])
        found = vocab_rows(inputs, out_tokens, max(rows[0], max(out_tokens.values(), default=-1) + 1), 0,
                           "the union of the models' vocabularies")
        found.added_tokens = added
        return found
    source_tokens = token_ids(source_dir)
    if source_tokens is None:
        raise CompatibilityError(f"tokenizer_source {source_dir}: no tokenizer.json to match embedding rows by token")
    out_tokens = source_tokens
    if source_index is not None:
        out_rows = rows[source_index]
    else:
        config = source_dir / "config.json"
        size = json.loads(config.read_text()).get("vocab_size", 0) if config.is_file() else 0
        out_rows = max(max(out_tokens.values(), default=-1) + 1, int(size or 0))
    label = "the base" if source_index == 0 else (models[source_index - 1].label if source_index else str(source_dir))
    found = vocab_rows(inputs, out_tokens, out_rows, source_index, label)
    identity = np.arange(out_rows)
    if len(set(rows)) == 1 and out_rows == rows[0] and bool((found.source == identity).all()):
        return None  # tokenizers that differ in other ways, but every row is the same token: merged as ever
    return found


def _load_adapters(base: ResolvedModel, base_ckpt: Checkpoint, models: list[ResolvedModel],
                   options: MergeOptions) -> tuple[dict[int, Adapter], list[str], list[str]]:
    """The fine-tunes that are PEFT LoRA adapters, loaded whole; the problems and notes they bring."""
    if not any(is_adapter(m.path) for m in models):
        return {}, [], []
    from safetensors import safe_open

    def read_base(name: str) -> object:
        with safe_open(str(base_ckpt.tensors[name].path), framework="pt") as f:
            return f.get_tensor(name)

    names = [base.entry.model, base.entry.label, base.repo_id or "", str(base.config().get("_name_or_path") or "")]
    ref = BaseRef(label=base.label, headers=headers_of(base_ckpt), read=read_base, names=names, path=base.path)
    adapters, problems, notes = {}, [], []
    for i, m in enumerate(models):
        if is_adapter(m.path):
            adapter, found = load_adapter(m.path, m.label, ref, options.adapter_base_mismatch)
            adapters[i] = adapter
            problems += found
            notes += adapter.notes
    full = len(models) - len(adapters)
    notes.append(f"{len(adapters)} LoRA adapter(s) among the fine-tunes: their deltas are low-rank (Gram "
                 "matrix from the factors, in float64); a tensor an adapter does not touch is a zero delta for it"
                 + (f"; {full} full fine-tune(s) streamed" if full else "; only the base is streamed"))
    return adapters, problems, notes


def _vocab_task(name: str, inputs: list[TensorInfo], options: MergeOptions, vocab: VocabRows) -> TensorTask:
    """An embedding-like tensor whose output rows are gathered by token (``merge.vocab``)."""
    base = inputs[0]
    cols = base.shape[1]
    per_elem = max(sum(itemsize(i.dtype) for i in inputs), 8 * (len(inputs) + 3))
    unit = max(1, options.chunk_bytes // per_elem // cols) * cols
    numel = vocab.rows * cols
    return TensorTask(
        name=name,
        shape=(vocab.rows, cols),
        inputs=tuple(inputs),
        out_dtype=options.dtype or base.dtype,
        merge=True,
        filter_wise=options.params.granularity == "filter",
        unit_elems=max(1, min(unit, numel)),
        vocab=vocab,
    )


def _task(name: str, inputs: list[TensorInfo], options: MergeOptions, deltas: tuple = ()) -> TensorTask:
    base = inputs[0]
    merge = is_floating(base.dtype)
    out_dtype = (options.dtype or base.dtype) if merge else base.dtype
    per_elem = sum(itemsize(i.dtype) for i in inputs) if merge else itemsize(base.dtype)
    numel = max(base.numel, 1)
    if merge and deltas:  # float64 rows of every model's delta, their sum and the output, per unit
        per_elem = max(per_elem, 8 * (len(deltas) + 3))
    unit = max(1, options.chunk_bytes // per_elem)
    filter_wise = merge and options.params.granularity == "filter" and len(base.shape) >= 2 and base.numel > 0
    if filter_wise or (merge and deltas and base.numel > 0):
        cols = max(1, base.numel // max(base.shape[0], 1)) if len(base.shape) >= 2 else 1
        unit = max(1, unit // cols) * cols  # whole rows: each row's t needs all of that row
    return TensorTask(
        name=name,
        shape=base.shape,
        inputs=tuple(inputs),
        out_dtype=out_dtype,
        merge=merge,
        filter_wise=filter_wise,
        unit_elems=min(unit, numel),
        deltas=deltas if merge else (),
    )
