"""Model Stock (Jang, Yun, Han 2024), generalised to N fine-tunes. Pure math, no I/O.

For fine-tunes w_1..w_N of a pre-trained w_0 and one tensor (layer-wise) or one output row
(filter-wise)::

    d_i = w_i - w_0
    cos = mean over pairs i<j of <d_i, d_j> / (||d_i|| ||d_j|| + eps), clamped to [-1, 1]
    t   = N cos / (1 + (N - 1) cos)
    w_H = t mean_i(w_i) + (1 - t) w_0  =  w_0 + t mean_i(d_i)

The kernels below work block by block so that big tensors never need a float32 copy of all N
deltas at once: each block is converted to float32, its Gram matrix D D^T is formed with float32
dot products over at most ``block`` elements, and the blocks' partial Grams are summed in float64.
The merged values are written as ``w_0 + t/N * sum_i d_i`` (the deltas are small next to w_0, so
this loses far less precision than averaging the raw weights).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, TypeVar

import numpy as np
import torch

from hf_model_stock.methods import fused_cpu

T = TypeVar("T")
_FUSED_DTYPES = {torch.bfloat16: torch.uint16, torch.float32: torch.float32}

DEFAULT_EPS = 1e-8  # the authors' reference code adds this to the product of norms
DEFAULT_BLOCK = 1 << 18  # elements per block: four bf16 inputs and the float32 scratch stay in L2

Granularity = Literal["layer", "filter"]


@dataclass(frozen=True)
class ModelStockParams:
    """Options of the method (recipe ``parameters``)."""

    granularity: Granularity = "layer"
    clamp_t: bool = True
    eps: float = DEFAULT_EPS


@dataclass(frozen=True)
class Ratio:
    """Interpolation ratio(s) derived from a Gram matrix: one value, or one per row (filter-wise)."""

    t: torch.Tensor  # float64, shape (...)
    cos: torch.Tensor  # float64, mean pairwise cosine after clamping to [-1, 1]
    norms: torch.Tensor  # float64, shape (..., N): ||d_i||
    clamped: torch.Tensor  # bool: t fell outside [0, 1] (and was clamped if clamp_t)


def ratio_from_gram(gram: torch.Tensor, params: ModelStockParams) -> Ratio:
    """Model Stock's t from the Gram matrix of the deltas, shape (..., N, N), float64.

    >>> g = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    >>> round(ratio_from_gram(g, ModelStockParams(eps=0.0)).t.item(), 6)  # cos 0.5, N 2
    0.666667
    """
    n = gram.shape[-1]
    if n < 2:
        raise ValueError(f"Model Stock needs at least 2 fine-tuned models, got {n}")
    gram = gram.to(torch.float64)
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    i, j = torch.triu_indices(n, n, offset=1)
    denom = norms[..., i] * norms[..., j] + params.eps
    pair_cos = torch.where(denom > 0, gram[..., i, j] / denom.where(denom > 0, 1.0), 0.0)
    cos = pair_cos.mean(-1).clamp(-1.0, 1.0)
    t = n * cos / (1 + (n - 1) * cos)  # cos >= -1/(N-1) in exact arithmetic; at equality t = -inf
    clamped = ~((t >= 0) & (t <= 1))
    if params.clamp_t:
        t = t.nan_to_num(nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    return Ratio(t=t, cos=cos, norms=norms, clamped=clamped)


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
        if self.device.type != "cpu":  # on a GPU, float64 matmul is cheap and avoids host syncs
            d64 = d.to(torch.float64)
            return d64 @ d64.T
        if self.n > 6:  # many models: one matmul beats N(N+1)/2 separate dot products
            return (d @ d.T).to(torch.float64)
        g = torch.empty(self.n, self.n, dtype=torch.float64)
        for a, b in self._pairs:
            g[a, b] = g[b, a] = torch.dot(d[a], d[b]).item()
        return g

    def gram(
        self, sources: Sequence[torch.Tensor], start: int, stop: int, delta_sum: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Gram matrix (N x N, float64) of the deltas over [start, stop); optionally also store
        sum_i d_i (float32) into ``delta_sum[start:stop]`` for ``merge_from_sum``."""
        gram = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device if self.device.type != "cpu" else None)
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
        row_start: int, row_stop: int, ratio_fn: Callable[[torch.Tensor, ModelStockParams], Ratio] = ratio_from_gram,
    ) -> Ratio:
        """Filter-wise merge of rows [row_start, row_stop) of flat (rows x cols) sources into flat
        ``out``; returns one ratio per row."""
        step = max(1, self.block // max(cols, 1))
        ratios = []
        for r0 in range(row_start, row_stop, step):
            r1 = min(row_stop, r0 + step)
            d = self._deltas(sources, r0 * cols, r1 * cols).view(self.n, r1 - r0, cols)
            g = torch.empty(r1 - r0, self.n, self.n, dtype=torch.float64, device=self.device)
            for a, b in self._pairs:
                g[:, a, b] = g[:, b, a] = (d[a] * d[b]).sum(-1, dtype=torch.float64)
            ratio = ratio_fn(g, params)
            scale = (ratio.t / self.n).to(torch.float32).unsqueeze(-1)
            acc = d.sum(0).mul_(scale).add_(self._x[0, : (r1 - r0) * cols].view(r1 - r0, cols))
            out[r0 * cols : r1 * cols].copy_(acc.reshape(-1))
            ratios.append(ratio)
        return concat_ratios(ratios)


def concat_ratios(ratios: Sequence[Ratio]) -> Ratio:
    """Join per-row ratios of consecutive row ranges (on the CPU)."""
    return Ratio(
        t=torch.cat([r.t.cpu() for r in ratios]),
        cos=torch.cat([r.cos.cpu() for r in ratios]),
        norms=torch.cat([r.norms.cpu() for r in ratios]),
        clamped=torch.cat([r.clamped.cpu() for r in ratios]),
    )


class ParallelKernel:
    """Runs ``BlockKernel`` work on contiguous slices of a unit from several threads at once.

    On a 2-core machine torch's own intra-op threads spin-wait while the I/O threads need the CPU;
    splitting a unit into one slice per worker (each with its own scratch, torch ops releasing the
    GIL) keeps every core on useful work instead.
    """

    def __init__(self, n_models: int, workers: int = 1, block: int = DEFAULT_BLOCK, device: torch.device | str = "cpu"):
        self.n = n_models
        self.kernels = [BlockKernel(n_models, block, device) for _ in range(max(1, workers))]
        self._pool = ThreadPoolExecutor(len(self.kernels), "hfms-compute") if len(self.kernels) > 1 else None

    def _slices(self, total: int, align: int) -> list[tuple[int, int]]:
        """Split [0, total) into one range per worker, boundaries on multiples of ``align``."""
        w = len(self.kernels)
        if self._pool is None or total < 2 * align:
            return [(0, total)]
        per = -(-total // (w * align)) * align
        return [(s, min(total, s + per)) for s in range(0, total, per)]

    def _map(self, fn: Callable[..., T], ranges: list[tuple[int, int]]) -> list[T]:
        if len(ranges) == 1:
            return [fn(self.kernels[0], *ranges[0])]
        assert self._pool is not None
        futures = [self._pool.submit(fn, k, s, e) for k, (s, e) in zip(self.kernels, ranges)]
        return [f.result() for f in futures]

    def _fused(self, sources: Sequence[torch.Tensor]) -> Optional[np.ndarray]:
        """The inputs as one (N+1) x n numpy array for the fused CPU kernels, when they are CPU
        tensors of one supported dtype laid out at a uniform stride in one buffer (as the reader
        lays them out); None otherwise."""
        first = sources[0]
        if (
            self.kernels[0].device.type != "cpu"
            or not fused_cpu.available()
            or len(sources) < 2
            or first.dtype not in _FUSED_DTYPES
            or any(s.dtype != first.dtype or s.numel() != first.numel() or not s.is_contiguous() for s in sources)
        ):
            return None
        step = sources[1].data_ptr() - first.data_ptr()
        size = first.element_size()
        if step <= 0 or step % size or any(
            s.data_ptr() - first.data_ptr() != i * step for i, s in enumerate(sources)
        ):
            return None
        stacked = torch.as_strided(first, (len(sources), first.numel()), (step // size, 1))
        return stacked.view(_FUSED_DTYPES[first.dtype]).numpy()

    def gram(self, sources: Sequence[torch.Tensor], delta_sum: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Gram matrix of the deltas of whole flat ``sources`` (float64, N x N); with ``delta_sum``
        (float32, at least as long), also store sum_i d_i there."""
        numel = sources[0].numel()
        stacked = self._fused(sources)
        if stacked is not None:
            sums = delta_sum.numpy() if delta_sum is not None else None
            grams = self._map(lambda k, s, e: fused_cpu.gram(stacked, s, e, sums), self._slices(numel, 4096))
            return torch.from_numpy(np.sum(grams, axis=0))
        block = self.kernels[0].block
        grams = self._map(lambda k, s, e: k.gram(sources, s, e, delta_sum), self._slices(numel, block))
        return torch.stack(grams).sum(0)

    def merge_from_sum(self, base: torch.Tensor, delta_sum: torch.Tensor, t: float, out: torch.Tensor) -> None:
        """``out = w_0 + t/N * delta_sum`` over whole flat tensors."""
        if (
            self.kernels[0].device.type == "cpu"
            and fused_cpu.available()
            and base.dtype in _FUSED_DTYPES
            and out.dtype == base.dtype
            and base.is_contiguous()
            and out.is_contiguous()
        ):
            b, o, sums = (x.view(_FUSED_DTYPES[x.dtype]).numpy() for x in (base, out, delta_sum))
            self._map(lambda k, s, e: fused_cpu.finish(b, sums, t / self.n, o, s, e), self._slices(out.numel(), 4096))
            return
        self._map(lambda k, s, e: k.merge_from_sum(base, delta_sum, t, out, s, e),
                  self._slices(out.numel(), self.kernels[0].block))

    def merge_recompute(
        self, sources: Sequence[torch.Tensor], t: float, out: torch.Tensor, scratch: torch.Tensor
    ) -> None:
        """``out = w_0 + t/N * sum_i d_i`` over whole flat tensors, recomputing the deltas (the
        second pass over a tensor too big for one unit); ``scratch`` is float32, at least as long."""
        if self._fused(sources) is not None:
            self.gram(sources, scratch)
            self.merge_from_sum(sources[0], scratch, t, out)
            return
        self._map(lambda k, s, e: k.merge_recompute(sources, t, out, s, e),
                  self._slices(out.numel(), self.kernels[0].block))

    def merge_filter(
        self, sources: Sequence[torch.Tensor], cols: int, params: ModelStockParams, out: torch.Tensor,
        ratio_fn: Callable[[torch.Tensor, ModelStockParams], Ratio] = ratio_from_gram,
    ) -> Ratio:
        """Filter-wise merge of whole flat (rows x cols) sources; one ratio per row."""
        rows = out.numel() // max(cols, 1)
        step = max(1, self.kernels[0].block // max(cols, 1))
        ratios = self._map(lambda k, s, e: k.merge_filter(sources, cols, params, out, s, e, ratio_fn),
                           self._slices(rows, step))
        return concat_ratios(ratios)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
