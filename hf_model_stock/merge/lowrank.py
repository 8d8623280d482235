"""The compute stage for tensors where some fine-tunes are LoRA adapters (``TensorTask.deltas``).

Units of such a tensor are whole rows of its (rows, cols) view. Every model's delta over the unit's
rows is one of: a dense block ``D`` (a streamed full fine-tune minus the base, or a weight the adapter
stores whole), or a low-rank ``L @ R`` (``L`` the unit's rows of the left factor). The Gram matrix is
formed per row, in float64, without ever forming ``L @ R`` for it:

    dense · dense       sum_c D_a[r, c] D_b[r, c]
    dense · low-rank    (D_a[r] Rᵀ) · L[r]                       (r x cols times cols x rank)
    low-rank · low-rank L_a[r] (R_a R_bᵀ) L_b[r]ᵀ                (R_a R_bᵀ once per tensor: rank x rank)

summed over the rows for a layer-wise t (the layer-wise form is the trace formula
``<L_a R_a, L_b R_b> = tr((L_aᵀ L_b)(R_b R_aᵀ))``), or kept per row for a filter-wise t. The output
``w_0 + t/N (Σ D + Σ L R)`` is formed for the unit's rows only, in float64, and rounded once to the
output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hf_model_stock.io.dtypes import torch_dtype
from hf_model_stock.merge.plan import TensorTask
from hf_model_stock.methods.model_stock import ModelStockParams, Ratio
from hf_model_stock.methods.registry import RatioFn
from hf_model_stock.sources.adapters import DenseWeight, LowRankDelta, rows_cols


class LowRankCompute:
    """Gram matrices and outputs of units of tensors with in-memory (adapter) deltas."""

    def __init__(self) -> None:
        self._cross: tuple[str, dict[tuple[int, int], Any]] | None = None  # (tensor, R_a R_bᵀ by pair)

    def _cross_products(self, task: TensorTask) -> dict[tuple[int, int], Any]:
        if self._cross is None or self._cross[0] != task.name:
            low = {i: d for i, d in enumerate(task.deltas) if isinstance(d, LowRankDelta) and d.rank}
            self._cross = (task.name, {(a, b): low[a].right @ low[b].right.T for a in low for b in low if a <= b})
        return self._cross[1]

    def _rows(self, task: TensorTask, views: Sequence[np.ndarray], start: int, stop: int) -> tuple[Any, list[Any]]:
        """The base's rows (float64, R x cols) and each model's delta over them: a dense block or
        the low-rank delta's left rows."""
        import torch

        _, cols = rows_cols(task.shape)
        r0, r1 = start // cols, -(-stop // cols)
        as64 = [torch.from_numpy(v).view(torch_dtype(i.dtype)).to(torch.float64).reshape(r1 - r0, cols)
                for v, i in zip(views, task.inputs)]
        base, streamed = as64[0], iter(as64[1:])
        parts: list[Any] = []
        for d in task.deltas:
            if d is None:
                parts.append(next(streamed) - base)
            elif isinstance(d, DenseWeight):
                parts.append(d.weight.reshape(-1, cols)[r0:r1].to(torch.float64) - base)
            else:
                parts.append(d.left[r0:r1])
        return base, parts

    def row_gram(self, task: TensorTask, views: Sequence[np.ndarray], start: int, stop: int) -> np.ndarray:
        """The Gram matrix of every row of the unit: (rows, N, N), float64."""
        return self.parts_gram(task, self._rows(task, views, start, stop)[1])

    def parts_gram(self, task: TensorTask, parts: list[Any]) -> np.ndarray:
        """The per-row Gram matrix (rows, N, N) of deltas given as ``_rows`` gives them (a dense block,
        or the left factor's rows of a low-rank delta)."""
        import torch

        cross = self._cross_products(task)
        n = len(parts)
        rows = parts[0].shape[0]
        g = torch.zeros(rows, n, n, dtype=torch.float64)
        for a in range(n):
            for b in range(a, n):
                g[:, a, b] = g[:, b, a] = self._row_dot(task, parts, cross, a, b)
        return g.numpy()

    @staticmethod
    def _row_dot(task: TensorTask, parts: list[Any], cross: dict[tuple[int, int], Any], a: int, b: int) -> Any:
        import torch

        da, db = task.deltas[a], task.deltas[b]
        low_a = da if isinstance(da, LowRankDelta) else None
        low_b = db if isinstance(db, LowRankDelta) else None
        rows = parts[a].shape[0]
        if (low_a is not None and not low_a.rank) or (low_b is not None and not low_b.rank):
            return torch.zeros(rows, dtype=torch.float64)
        if low_a is None and low_b is None:
            return (parts[a] * parts[b]).sum(-1)
        if low_a is not None and low_b is not None:
            return ((parts[a] @ cross[(a, b)]) * parts[b]).sum(-1)
        if low_b is not None:
            dense, low, delta = parts[a], parts[b], low_b
        else:
            assert low_a is not None
            dense, low, delta = parts[b], parts[a], low_a
        return ((dense @ delta.right.T) * low).sum(-1)

    def gram(self, task: TensorTask, views: Sequence[np.ndarray], start: int, stop: int) -> np.ndarray:
        """The unit's share of the layer-wise Gram matrix (N x N)."""
        return self.row_gram(task, views, start, stop).sum(0)

    def write(self, task: TensorTask, views: Sequence[np.ndarray], start: int, stop: int, t: Any,
              out: np.ndarray) -> None:
        """``out = w_0 + t/N Σ d_i`` over the unit's rows (``t`` a scalar or one per row)."""
        import torch

        base, parts = self._rows(task, views, start, stop)
        total = torch.zeros_like(base)
        for d, part in zip(task.deltas, parts):
            if isinstance(d, LowRankDelta):
                if d.rank:
                    total.addmm_(part, d.right)
            else:
                total += part
        scale = torch.as_tensor(np.asarray(t, dtype=np.float64) / len(task.deltas))
        merged = base + (scale.reshape(-1, 1) if scale.ndim else scale) * total
        host = torch.from_numpy(out).view(torch_dtype(task.out_dtype))
        host.copy_(merged.reshape(-1).to(host.dtype))

    def merge(self, task: TensorTask, views: Sequence[np.ndarray], start: int, stop: int, out: np.ndarray,
              ratio_fn: RatioFn, params: ModelStockParams) -> Ratio:
        """A one-pass unit: its t (per row filter-wise, else of the whole tensor) and its output."""
        g = self.row_gram(task, views, start, stop)
        ratio = ratio_fn(g if task.filter_wise else g.sum(0), params)
        self.write(task, views, start, stop, ratio.t, out)
        return ratio
