"""Model Stock during training (paper, section 4): N runs start from the same pre-trained weights;
every k steps each tensor of every run is replaced by the Model Stock merge of the N current weights,
anchored at the pre-trained ones, and all runs continue from the merged weights.

In one process, N ``Trainer`` instances run in lockstep on threads (``train_in_lockstep``); a shared
``PeriodicModelStock`` holds the anchor (float32, CPU) and a barrier: when the last run reaches step
k*m it merges, in place, while the others wait. Runs in separate processes can save checkpoints every
k steps instead and merge them with ``merge_checkpoints`` before resuming.

>>> stock = PeriodicModelStock(pretrained_model, n_runs=3, every=100)  # doctest: +SKIP
>>> trainers = [Trainer(..., callbacks=[stock.callback()]) for _ in range(3)]  # doctest: +SKIP
>>> train_in_lockstep(trainers, stock)  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from hf_model_stock.errors import ModelStockError
from hf_model_stock.io.dtypes import is_floating
from hf_model_stock.io.index import INDEX_NAME
from hf_model_stock.io.reader import Checkpoint
from hf_model_stock.merge.plan import MergeOptions
from hf_model_stock.methods.model_stock import ModelStockParams, Ratio, ratio_from_gram
from hf_model_stock.publish.report import MergeReport

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

DEFAULT_CHUNK_ELEMS = 1 << 20  # float64 elements per model and chunk while merging in memory


@torch.no_grad()
def merge_into_(
    anchor: torch.Tensor,
    weights: Sequence[torch.Tensor],
    params: ModelStockParams = ModelStockParams(),
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Ratio:
    """Set every tensor of ``weights`` to ``w_0 + t/N * sum_i (w_i - w_0)`` in place (w_0: ``anchor``).

    Two passes over float64 chunks: the Gram matrix of the deltas, then the merged values, so the
    scratch is ``N * chunk_elems`` float64 whatever the tensor size.
    """
    n = len(weights)
    flat = [w.view(-1) for w in weights]
    base = anchor.reshape(-1)
    device = flat[0].device
    ranges = [(s, min(base.numel(), s + chunk_elems)) for s in range(0, base.numel(), chunk_elems)]

    def deltas(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = base[s:e].to(device, torch.float64)
        return torch.stack([f[s:e].to(device, torch.float64) for f in flat]) - b, b

    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for s, e in ranges:
        d, _ = deltas(s, e)
        gram += d @ d.T
    ratio = ratio_from_gram(gram.cpu(), params)
    scale = float(ratio.t) / n
    for s, e in ranges:
        d, b = deltas(s, e)
        merged = d.sum(0).mul_(scale).add_(b)
        for f in flat:
            f[s:e].copy_(merged)
    return ratio


@dataclass(frozen=True)
class MergeEvent:
    """One periodic merge: the step and each tensor's t."""

    step: int
    t: dict[str, float]


def _anchor_from(pretrained: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    items = pretrained.named_parameters() if isinstance(pretrained, torch.nn.Module) else pretrained.items()
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in items if v.is_floating_point()}


class PeriodicModelStock:
    """Shared by the callbacks of N runs: merges all runs every ``every`` optimizer steps.

    ``pretrained`` (a module or a state dict) is copied to float32 on the CPU as the anchor. With
    ``merge_at_end``, the runs are also merged at their last step so they finish identical.
    ``timeout`` (seconds) bounds how long a run waits for the others at a merge step.
    """

    def __init__(
        self,
        pretrained: torch.nn.Module | Mapping[str, torch.Tensor],
        n_runs: int,
        every: int,
        *,
        params: ModelStockParams = ModelStockParams(),
        merge_at_end: bool = True,
        timeout: float | None = 3600.0,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    ):
        if n_runs < 2:
            raise ModelStockError(f"Model Stock needs at least 2 runs, got {n_runs}")
        if every < 1:
            raise ModelStockError(f"every: merge period must be >= 1 step, got {every}")
        self.anchor = _anchor_from(pretrained)
        self.n_runs, self.every, self.params = n_runs, every, params
        self.merge_at_end, self.timeout, self.chunk_elems = merge_at_end, timeout, chunk_elems
        self.history: list[MergeEvent] = []
        self._models: list[torch.nn.Module | None] = []
        self._steps: dict[int, int] = {}
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(n_runs, action=self._merge_all)

    def callback(self) -> ModelStockCallback:
        """A callback for one more run (call once per Trainer, at most ``n_runs`` times)."""
        with self._lock:
            if len(self._models) == self.n_runs:
                raise ModelStockError(f"all {self.n_runs} runs already have a callback")
            self._models.append(None)
            return ModelStockCallback(self, len(self._models) - 1)

    def due(self, step: int, max_steps: int) -> bool:
        """Whether runs merge after optimizer step ``step``."""
        return step % self.every == 0 or (self.merge_at_end and step == max_steps)

    def register(self, run: int, model: torch.nn.Module) -> None:
        """Attach run ``run``'s model; its parameters must match the anchor's names and shapes."""
        for name, p in model.named_parameters():
            a = self.anchor.get(name)
            if a is None or a.shape != p.shape:
                found = "missing" if a is None else f"shape {list(a.shape)}"
                raise ModelStockError(f"run {run}: parameter {name!r} {list(p.shape)} vs pre-trained: {found}")
            if not p.is_contiguous():
                raise ModelStockError(f"run {run}: parameter {name!r} is not contiguous")
        with self._lock:
            self._models[run] = model

    def arrive(self, run: int, step: int) -> None:
        """Wait until all runs reach ``step``; the last to arrive merges them all."""
        self._steps[run] = step
        try:
            self._barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            if self._error is not None:
                raise ModelStockError(f"periodic merge at step {step} failed: {self._error}") from self._error
            raise ModelStockError(f"run {run}: the other runs did not reach step {step} (aborted or timed out)") from None

    def abort(self) -> None:
        """Release runs waiting at a merge step (they raise); for when one run fails."""
        self._barrier.abort()

    def _merge_all(self) -> None:
        try:
            steps = set(self._steps.values())
            if len(steps) != 1:
                raise ModelStockError(f"runs are not in lockstep: steps {sorted(self._steps.items())}")
            models = [m for m in self._models if m is not None]
            if len(models) != self.n_runs:
                raise ModelStockError(f"only {len(models)} of {self.n_runs} runs registered a model")
            runs = [dict(m.named_parameters()) for m in models]
            t = {}
            for name, anchor in self.anchor.items():
                if name in runs[0]:
                    ratio = merge_into_(anchor, [r[name].data for r in runs], self.params, self.chunk_elems)
                    t[name] = float(ratio.t)
            self.history.append(MergeEvent(step=steps.pop(), t=t))
        except BaseException as exc:
            self._error = exc
            raise


class ModelStockCallback(TrainerCallback):
    """Joins its Trainer to a ``PeriodicModelStock`` (get one from ``PeriodicModelStock.callback``)."""

    def __init__(self, coordinator: PeriodicModelStock, run: int):
        self.coordinator = coordinator
        self.run = run

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            raise ModelStockError("ModelStockCallback: the Trainer passed no model")
        self.coordinator.register(self.run, model)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.coordinator.due(state.global_step, state.max_steps):
            self.coordinator.arrive(self.run, state.global_step)


def train_in_lockstep(trainers: Sequence[Trainer], coordinator: PeriodicModelStock) -> list[Any]:
    """Run ``trainer.train()`` of every trainer on its own thread; returns their outputs.

    If a run fails, the others are released from the merge barrier and the first error is raised.
    """
    results: list[Any] = [None] * len(trainers)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            results[k] = trainers[k].train()
        except BaseException as exc:
            errors.append(exc)
            coordinator.abort()

    threads = [threading.Thread(target=run, args=(k,), name=f"hfms-run-{k}") for k in range(len(trainers))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


def _weight_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name == INDEX_NAME or (p.suffix == ".safetensors" and p.name.startswith("model"))]


def merge_checkpoints(
    pretrained: str | Path,
    checkpoints: Sequence[str | Path],
    *,
    params: ModelStockParams = ModelStockParams(),
    chunk_bytes: int = 128 << 20,
) -> MergeReport:
    """Merge the weights of N Trainer checkpoint directories with the streaming merger and write the
    result into every one of them (optimizer and trainer state are kept), so that each run resumes
    from the merged weights with ``trainer.train(resume_from_checkpoint=dir)``.

    The merged weights keep the checkpoints' floating dtype. Returns the merge report (``publish.report.MergeReport``).
    """
    from hf_model_stock.pipeline import merge_models

    dirs = [Path(c) for c in checkpoints]
    dtype = next((t.dtype for t in Checkpoint.open(dirs[0]).tensors.values() if is_floating(t.dtype)), None)
    options = MergeOptions(params=params, dtype=dtype, chunk_bytes=chunk_bytes)
    with tempfile.TemporaryDirectory(prefix=".hfms-ckpt-", dir=dirs[0].parent) as tmp:
        outcome = merge_models(pretrained, dirs, Path(tmp) / "merged", options)
        new = _weight_files(outcome.path)
        for d in dirs:
            old = _weight_files(d)
            for f in new:
                shutil.copyfile(f, d / (f.name + ".tmp"))
            for f in old:
                f.unlink()
            for f in new:
                (d / (f.name + ".tmp")).replace(d / f.name)
    return outcome.report
