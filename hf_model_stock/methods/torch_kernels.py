"""Block kernels in torch: the CPU fallback for what the fused kernels do not cover (float16, mixed
or float8 inputs, filter-wise merges, another output dtype) and the CUDA path.

Each block of at most ``block`` elements is converted to float32, its Gram matrix D D^T is formed
with float32 dot products (float64 on a GPU, where it is cheap) and the blocks' partial Grams are
summed in float64, so big tensors never need a float32 copy of all N deltas at once. Apple's MPS has
no float64: there each block's Gram is formed in float32 on the GPU and summed in float64 on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hf_model_stock.methods.model_stock import (
    DEFAULT_BLOCK,
    ModelStockParams,
    Ratio,
    concat_ratios,
    ratio_from_gram,
)
from hf_model_stock.methods.registry import RatioFn
from hf_model_stock.methods.workers import Workers


class BlockKernel:
    """Float32 scratch for one block of N+1 inputs, reused across calls (CPU or CUDA).

    Every method works on the element range [start, stop) of flat sources (base first), so several
    kernels can share one tensor, each on its own range, from several threads.
    """

    def __init__(self, n_models: int, block: int = DEFAULT_BLOCK, device: torch.device | str = "cpu"):
        if n_models < 2:
            raise ValueError(f"Model Stock needs at least 2 fine-tuned models, got {n_models}")
        self.n = n_models
        self.block = block
        self.device = torch.device(device)
        self._gpu64 = self.device.type not in ("cpu", "mps")  # float64 on the device itself
        self._pairs = [(a, b) for a in range(n_models) for b in range(a, n_models)]
        self._alloc(block)

    def _alloc(self, k: int) -> None:
        self._x = torch.empty(self.n + 1, k, dtype=torch.float32, device=self.device)
        self._d = torch.empty(self.n, k, dtype=torch.float32, device=self.device)
        self._acc = torch.empty(k, dtype=torch.float32, device=self.device)

    def _deltas(self, sources: Sequence[torch.Tensor], start: int, stop: int) -> torch.Tensor:
        """float32 deltas d_i = w_i - w_0 of elements [start, stop); the base stays in ``_x[0]``."""
        k = stop - start
        if k > self._x.shape[1]:  # one filter-wise row longer than a block
            self._alloc(k)
        x = self._x[:, :k]
        for row, src in zip(x, sources):
            row.copy_(src[start:stop])
        d = self._d[:, :k]
        torch.sub(x[1:], x[0], out=d)
        return d

    def _block_gram(self, d: torch.Tensor) -> torch.Tensor:
        if self._gpu64:  # on a GPU, float64 matmul is cheap and avoids host syncs
            d64 = d.to(torch.float64)
            return d64 @ d64.T
        if self.device.type == "mps":
            return (d @ d.T).cpu().to(torch.float64)
        if self.n > 6:  # many models: one matmul beats N(N+1)/2 separate dot products
            return (d @ d.T).to(torch.float64)
        g = torch.empty(self.n, self.n, dtype=torch.float64)
        for a, b in self._pairs:
            g[a, b] = g[b, a] = torch.dot(d[a], d[b]).item()
        return g

    def _row_dots(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-row dot products, summed in float64 (float32 on MPS, then float64 on the CPU)."""
        if self.device.type == "mps":
            return (a * b).sum(-1).cpu().to(torch.float64)
        return (a * b).sum(-1, dtype=torch.float64)

    def gram(
        self, sources: Sequence[torch.Tensor], start: int, stop: int, delta_sum: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Gram matrix (N x N, float64) of the deltas over [start, stop); optionally also store
        sum_i d_i (float32) into ``delta_sum[start:stop]`` for ``merge_from_sum``."""
        gram = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device if self._gpu64 else None)
        for s in range(start, stop, self.block):
            e = min(stop, s + self.block)
            d = self._deltas(sources, s, e)
            gram += self._block_gram(d)
            if delta_sum is not None:
                torch.sum(d, 0, out=delta_sum[s:e])
        return gram.cpu()

    def merge_from_sum(
        self, base: torch.Tensor, delta_sum: torch.Tensor, t: float, out: torch.Tensor, start: int, stop: int
    ) -> None:
        """``out = w_0 + t/N * sum_i d_i`` over [start, stop), from a sum stored by ``gram``."""
        scale = t / self.n
        for s in range(start, stop, self.block):
            e = min(stop, s + self.block)
            acc = torch.mul(delta_sum[s:e], scale, out=self._acc[: e - s])
            out[s:e].copy_(acc.add_(base[s:e]))

    def merge_recompute(
        self, sources: Sequence[torch.Tensor], t: float, out: torch.Tensor, start: int, stop: int
    ) -> None:
        """``out = w_0 + t/N * sum_i d_i`` over [start, stop), recomputing the deltas (second pass)."""
        scale = t / self.n
        for s in range(start, stop, self.block):
            e = min(stop, s + self.block)
            d = self._deltas(sources, s, e)
            acc = torch.sum(d, 0, out=self._acc[: e - s])
            out[s:e].copy_(acc.mul_(scale).add_(self._x[0, : e - s]))

    def merge_filter(
        self, sources: Sequence[torch.Tensor], cols: int, params: ModelStockParams, out: torch.Tensor,
        row_start: int, row_stop: int, ratio_fn: RatioFn = ratio_from_gram,
    ) -> Ratio:
        """Filter-wise merge of rows [row_start, row_stop) of flat (rows x cols) sources into flat
        ``out``; returns one ratio per row."""
        step = max(1, self.block // max(cols, 1))
        ratios = []
        for r0 in range(row_start, row_stop, step):
            r1 = min(row_stop, r0 + step)
            d = self._deltas(sources, r0 * cols, r1 * cols).view(self.n, r1 - r0, cols)
            g = torch.empty(r1 - r0, self.n, self.n, dtype=torch.float64, device=self.device if self._gpu64 else None)
            for a, b in self._pairs:
                g[:, a, b] = g[:, b, a] = self._row_dots(d[a], d[b])
            ratio = ratio_fn(g.cpu().numpy(), params)
            scale = torch.from_numpy(ratio.t / self.n).to(self.device, torch.float32).unsqueeze(-1)
            acc = d.sum(0).mul_(scale).add_(self._x[0, : (r1 - r0) * cols].view(r1 - r0, cols))
            out[r0 * cols : r1 * cols].copy_(acc.reshape(-1))
            ratios.append(ratio)
        return concat_ratios(ratios)


class ParallelKernel:
    """``BlockKernel`` work on contiguous slices of a unit, one slice per worker thread (torch ops
    release the GIL), each worker with its own scratch."""

    def __init__(self, n_models: int, workers: int = 1, block: int = DEFAULT_BLOCK, device: torch.device | str = "cpu"):
        self.n = n_models
        self.block = block
        self._workers = Workers(workers)
        self.kernels = [BlockKernel(n_models, block, device) for _ in range(self._workers.count)]

    def gram(self, sources: Sequence[torch.Tensor], delta_sum: torch.Tensor | None = None) -> np.ndarray:
        """Gram matrix of the deltas of whole flat ``sources`` (float64, N x N); with ``delta_sum``
        (float32, at least as long), also store sum_i d_i there."""
        grams = self._workers.map(lambda w, s, e: self.kernels[w].gram(sources, s, e, delta_sum),
                                  self._workers.slices(sources[0].numel(), self.block))
        return torch.stack(grams).sum(0).numpy()

    def merge_from_sum(self, base: torch.Tensor, delta_sum: torch.Tensor, t: float, out: torch.Tensor) -> None:
        """``out = w_0 + t/N * delta_sum`` over whole flat tensors."""
        self._workers.map(lambda w, s, e: self.kernels[w].merge_from_sum(base, delta_sum, t, out, s, e),
                          self._workers.slices(out.numel(), self.block))

    def merge_recompute(self, sources: Sequence[torch.Tensor], t: float, out: torch.Tensor) -> None:
        """``out = w_0 + t/N * sum_i d_i`` over whole flat tensors, recomputing the deltas (the
        second pass over a tensor too big for one unit)."""
        self._workers.map(lambda w, s, e: self.kernels[w].merge_recompute(sources, t, out, s, e),
                          self._workers.slices(out.numel(), self.block))

    def merge_filter(
        self, sources: Sequence[torch.Tensor], cols: int, params: ModelStockParams, out: torch.Tensor,
        ratio_fn: RatioFn = ratio_from_gram,
    ) -> Ratio:
        """Filter-wise merge of whole flat (rows x cols) sources; one ratio per row."""
        rows = out.numel() // max(cols, 1)
        step = max(1, self.block // max(cols, 1))
        ratios = self._workers.map(lambda w, s, e: self.kernels[w].merge_filter(sources, cols, params, out, s, e, ratio_fn),
                                   self._workers.slices(rows, step))
        return concat_ratios(ratios)

    def close(self) -> None:
        self._workers.close()
