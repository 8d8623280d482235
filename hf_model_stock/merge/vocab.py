"""Reading and merging units of embedding-like tensors whose rows are matched by token
(``TensorTask.vocab``, built by ``sources.vocab``): the row rule is in that module's docstring.

A unit is a range of whole output rows. Each input's rows for them are gathered (runs of consecutive
source rows read at once, through the page cache) into the unit's buffer, zeros where the input lacks
the token; then, in float64, the Gram matrix of the deltas over the rows every model shares (layer-wise)
or per row (filter-wise), and the output rows: Model Stock for tokens of the base, the mean of the
fine-tunes that define a new token, a copy for padded rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hf_model_stock.io.dtypes import itemsize, storage_dtype, torch_dtype
from hf_model_stock.io.reader import ShardFiles
from hf_model_stock.merge.plan import TensorTask
from hf_model_stock.merge.units import UNIT_ALIGN
from hf_model_stock.methods.model_stock import ModelStockParams, Ratio
from hf_model_stock.methods.registry import RatioFn
from hf_model_stock.sources.vocab import MERGE, NEW


def _rows(task: TensorTask, start: int, stop: int) -> tuple[int, int, int]:
    cols = task.cols
    return start // cols, -(-stop // cols), cols


def read_vocab_unit(buf: np.ndarray, task: TensorTask, start: int, stop: int, files: ShardFiles,
                    mapped: list[tuple[Path, np.ndarray]] | None = None) -> list[np.ndarray]:
    """Each input's rows for output elements [start, stop) (whole rows), gathered into ``buf``."""
    assert task.vocab is not None
    r0, r1, cols = _rows(task, start, stop)
    views, pos = [], 0
    for j, info in enumerate(task.inputs):
        size = itemsize(info.dtype)
        row_bytes = cols * size
        region = buf[pos : pos + (r1 - r0) * row_bytes]
        src = task.vocab.source[j, r0:r1]
        k = 0
        while k < len(src):
            if src[k] < 0:
                region[k * row_bytes : (k + 1) * row_bytes] = 0
                k += 1
                continue
            e = k + 1
            while e < len(src) and src[e] == src[e - 1] + 1:
                e += 1
            files.read_into(info, int(src[k]) * row_bytes, region[k * row_bytes : e * row_bytes].data,
                            keep_cached=True)
            k = e
        pos += region.nbytes
        pos += -pos % UNIT_ALIGN
        views.append(region.view(storage_dtype(info.dtype)))
    return views


class VocabCompute:
    """Gram matrices and outputs of units of token-matched tensors (the interface of ``LowRankCompute``)."""

    def _load(self, task: TensorTask, views: Sequence[np.ndarray], start: int, stop: int) -> tuple[Any, ...]:
        import torch

        assert task.vocab is not None
        r0, r1, cols = _rows(task, start, stop)
        x = [torch.from_numpy(v).view(torch_dtype(i.dtype)).to(torch.float64).reshape(r1 - r0, cols)
             for v, i in zip(views, task.inputs)]
        present = torch.from_numpy(task.vocab.source[:, r0:r1] >= 0)
        kind = torch.from_numpy(task.vocab.kind[r0:r1].astype(np.int64))
        anchored = present[0] & (kind == MERGE)
        deltas = [torch.where((present[i] & anchored).unsqueeze(1), x[i] - x[0], 0.0) for i in range(1, len(x))]
        shared = torch.from_numpy(task.vocab.shared[r0:r1])
        return x, present, kind, deltas, shared

    def _row_gram(self, deltas: list[Any]) -> np.ndarray:
        import torch

        n = len(deltas)
        g = torch.zeros(deltas[0].shape[0], n, n, dtype=torch.float64)
        for a in range(n):
            for b in range(a, n):
                g[:, a, b] = g[:, b, a] = (deltas[a] * deltas[b]).sum(-1)
        return g.numpy()

    def gram(self, task: TensorTask, views: Sequence[np.ndarray], start: int, stop: int) -> np.ndarray:
        """The unit's share of the layer-wise Gram matrix: over rows every model shares only."""
        _, _, _, deltas, shared = self._load(task, views, start, stop)
        return self._row_gram(deltas)[shared.numpy()].sum(0)

    def write(self, task: TensorTask, views: Sequence[np.ndarray], start: int, stop: int, t: Any,
              out: np.ndarray) -> None:
        import torch

        assert task.vocab is not None
        x, present, kind, deltas, _ = self._load(task, views, start, stop)
        n = len(deltas)
        scale = torch.as_tensor(np.asarray(t, dtype=np.float64) / n)
        merged = x[0] + (scale.reshape(-1, 1) if scale.ndim else scale) * torch.stack(deltas).sum(0)
        fine = present[1:].unsqueeze(-1)
        mean = (torch.stack(x[1:]) * fine).sum(0) / fine.sum(0).clamp(min=1)
        r0, r1, _ = _rows(task, start, stop)
        copy_from = torch.from_numpy(task.vocab.copy_from[r0:r1])
        copied = torch.zeros_like(x[0])
        for j in range(len(x)):
            rows = copy_from == j
            copied[rows] = x[j][rows]
        result = torch.where((kind == MERGE).unsqueeze(1), merged, torch.where((kind == NEW).unsqueeze(1), mean, copied))
        host = torch.from_numpy(out).view(torch_dtype(task.out_dtype))
        host.copy_(result.reshape(-1).to(host.dtype))

    def merge(self, task: TensorTask, views: Sequence[np.ndarray], start: int, stop: int, out: np.ndarray,
              ratio_fn: RatioFn, params: ModelStockParams) -> Ratio:
        """A one-pass unit: its t (per row filter-wise, else from the shared rows) and its output."""
        _, _, _, deltas, shared = self._load(task, views, start, stop)
        g = self._row_gram(deltas)
        ratio = ratio_fn(g if task.filter_wise else g[shared.numpy()].sum(0), params)
        self.write(task, views, start, stop, ratio.t, out)
        return ratio
