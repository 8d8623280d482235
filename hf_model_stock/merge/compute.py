"""The compute stage of the merge: one unit of work (a slice of one tensor, all models) at a time.

Units arrive as numpy views of the reader's buffer or of mapped shards, holding each input's raw
bits (bfloat16 as uint16). On the CPU, layer-wise bf16 or float32 merges run on the fused C kernels
straight from those bits. Everything else (float16, float8 or mixed inputs, filter-wise merges,
another output dtype, CUDA) runs on the torch kernels, and torch is imported only when a unit needs
it: a plain CPU merge never pays its two-second import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_model_stock.io import platform
from hf_model_stock.io.buffers import host_buffer
from hf_model_stock.io.dtypes import torch_dtype
from hf_model_stock.merge.plan import TensorTask
from hf_model_stock.methods import fused_cpu
from hf_model_stock.methods.model_stock import DEFAULT_BLOCK, ModelStockParams, Ratio
from hf_model_stock.methods.registry import RatioFn

if TYPE_CHECKING:
    from hf_model_stock.methods.torch_kernels import ParallelKernel

CUDA_BLOCK = 1 << 24


class UnitCompute:
    """Merges units on ``device`` with ``workers`` CPU threads (0: one per core; one on a GPU),
    choosing the fused CPU kernels per tensor when they apply. ``scratch_elems`` sizes the float32
    delta sum of the largest layer-wise unit."""

    def __init__(self, n_models: int, workers: int, device: str, scratch_elems: int):
        self.n = n_models
        self.device = device
        self._workers = 1 if device != "cpu" else (workers or platform.cpu_count())
        self._fused = fused_cpu.FusedKernel(self._workers) if device == "cpu" and fused_cpu.available() else None
        self._scratch = host_buffer(4 * max(scratch_elems, 1)).view(np.float32) if device == "cpu" else None
        self._scratch_elems = scratch_elems
        self._torch: ParallelKernel | None = None
        self._torch_scratch: Any = None
        self._torch_threads: int | None = None

    def fused(self, task: TensorTask) -> bool:
        """Whether ``task`` runs on the fused CPU kernels."""
        code = task.inputs[0].dtype
        return (
            self._fused is not None
            and not task.filter_wise
            and code in fused_cpu.FUSED_DTYPES
            and task.out_dtype == code
            and all(i.dtype == code for i in task.inputs)
        )

    def _fused_rows(self, task: TensorTask, views: Sequence[np.ndarray]) -> Sequence[np.ndarray] | None:
        """The unit's inputs as the fused kernels' rows, or None where the torch kernels run it."""
        return views if self.fused(task) else None

    def gram(self, task: TensorTask, views: Sequence[np.ndarray]) -> np.ndarray:
        """Gram matrix (N x N, float64) of the deltas of one unit (the first pass of a big tensor)."""
        if (src := self._fused_rows(task, views)) is not None:
            assert self._fused is not None
            return self._fused.gram(src)
        return self._kernel().gram(self._inputs(task, views))

    def merge(self, task: TensorTask, views: Sequence[np.ndarray], out: np.ndarray, ratio_fn: RatioFn,
              params: ModelStockParams) -> Ratio:
        """A whole layer-wise tensor in one unit: Gram and delta sum in one pass, then ``out``."""
        if (src := self._fused_rows(task, views)) is not None:
            assert self._fused is not None and self._scratch is not None
            sums = self._scratch[: src[0].shape[0]]
            ratio = ratio_fn(self._fused.gram(src, sums), params)
            self._fused.finish(src[0], sums, float(ratio.t) / self.n, out)
            return ratio
        inputs, sums = self._inputs(task, views), self._torch_sums(out.shape[0])
        ratio = ratio_fn(self._kernel().gram(inputs, sums), params)
        self._torch_out(task, out, lambda o: self._kernel().merge_from_sum(inputs[0], sums, float(ratio.t), o))
        return ratio

    def merge_second_pass(self, task: TensorTask, views: Sequence[np.ndarray], t: float, out: np.ndarray) -> None:
        """One unit of a tensor whose t is known (the second pass): ``out = w_0 + t/N * sum_i d_i``."""
        if (src := self._fused_rows(task, views)) is not None:
            assert self._fused is not None and self._scratch is not None
            sums = self._scratch[: src[0].shape[0]]
            self._fused.delta_sum(src, sums)
            self._fused.finish(src[0], sums, t / self.n, out)
            return
        inputs = self._inputs(task, views)
        self._torch_out(task, out, lambda o: self._kernel().merge_recompute(inputs, t, o))

    def merge_filter(self, task: TensorTask, views: Sequence[np.ndarray], out: np.ndarray, ratio_fn: RatioFn,
                     params: ModelStockParams) -> Ratio:
        """Whole rows of a filter-wise tensor; one ratio per row."""
        inputs = self._inputs(task, views)
        result: list[Ratio] = []
        self._torch_out(task, out, lambda o: result.append(self._kernel().merge_filter(inputs, task.cols, params, o, ratio_fn)))
        return result[0]

    def _kernel(self) -> ParallelKernel:
        if self._torch is None:
            import torch

            from hf_model_stock.methods.torch_kernels import ParallelKernel

            self._torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)  # parallelism comes from our workers; idle OpenMP threads would spin
            block = DEFAULT_BLOCK if self.device == "cpu" else CUDA_BLOCK
            self._torch = ParallelKernel(self.n, self._workers, block, self.device)
        return self._torch

    def _inputs(self, task: TensorTask, views: Sequence[np.ndarray]) -> list[Any]:
        import torch

        tensors = [torch.from_numpy(v).view(torch_dtype(i.dtype)) for v, i in zip(views, task.inputs)]
        return tensors if self.device == "cpu" else [t.to(self.device, non_blocking=True) for t in tensors]

    def _torch_sums(self, n: int) -> Any:
        import torch

        if self._scratch is not None:
            return torch.from_numpy(self._scratch[:n])
        if self._torch_scratch is None:
            self._torch_scratch = torch.empty(self._scratch_elems, dtype=torch.float32, device=self.device)
        return self._torch_scratch[:n]

    def _torch_out(self, task: TensorTask, out: np.ndarray, fill: Callable[[Any], None]) -> None:
        """Run ``fill`` on ``out`` as a torch tensor of the output dtype (on the device, then copied back)."""
        import torch

        host = torch.from_numpy(out).view(torch_dtype(task.out_dtype))
        if self.device == "cpu":
            fill(host)
            return
        on_device = torch.empty(host.numel(), dtype=host.dtype, device=self.device)
        fill(on_device)
        host.copy_(on_device)

    def close(self) -> None:
        if self._fused is not None:
            self._fused.close()
        if self._torch is not None:
            import torch

            self._torch.close()
            torch.set_num_threads(self._torch_threads or 1)
