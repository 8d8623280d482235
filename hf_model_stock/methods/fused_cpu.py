"""Fused CPU kernels (C, ``_fused.c``) for the layer-wise hot path on bf16 and float32 inputs.

One pass per block of 2048 elements decodes each input to float32 (bf16 is the upper half of a
float32: a shift, exact), subtracts the base, accumulates the pairwise dot products (float32 within
the block, float64 across blocks) and stores the delta sum; the finish step
``out = w_0 + (t/N) * sum`` rounds as the torch kernel does, so both give identical bytes. Each
input is its own row (a view of the reader's buffer or of a mapped shard), so nothing is copied
to line them up. The kernels release the GIL; ``FusedKernel`` runs one slice per worker thread.

The extension is built at install time; where it could not be (no C compiler), ``available()`` is
False and the CPU merge takes the torch kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np

from hf_model_stock.methods.workers import Workers

_fused: ModuleType | None
try:
    from hf_model_stock.methods import _fused
except ImportError:  # pragma: no cover - built without a C compiler; the torch kernels remain
    _fused = None

SLICE_ALIGN = 4096  # elements: workers' slices start on whole blocks and cache lines
FUSED_DTYPES = frozenset({"BF16", "F32"})  # safetensors codes the kernels read (as uint16 / float32 bits)


def available() -> bool:
    """Whether the fused kernels can run (the C extension was built)."""
    return _fused is not None


def gram(rows: Sequence[np.ndarray], start: int, stop: int, delta_sum: np.ndarray | None) -> np.ndarray:
    """Float64 Gram matrix of the deltas over elements [start, stop) of ``rows`` (base first, bf16
    bits as uint16 or float32, one array each); stores sum_i d_i into ``delta_sum`` when given."""
    n = len(rows) - 1
    g = np.zeros((n, n), np.float64)
    assert _fused is not None
    _fused.gram(rows, rows[0].dtype == np.uint16, start, stop, g, delta_sum)
    return g


def delta_sum(rows: Sequence[np.ndarray], start: int, stop: int, out: np.ndarray) -> None:
    """Store sum_i d_i over elements [start, stop) of ``rows`` into ``out`` (no Gram matrix)."""
    assert _fused is not None
    _fused.gram(rows, rows[0].dtype == np.uint16, start, stop, None, out)


def finish(base: np.ndarray, delta_sum: np.ndarray, scale: float, out: np.ndarray, start: int, stop: int) -> None:
    """``out = w_0 + scale * sum`` over [start, stop); base and out are bf16 bits (uint16) or float32."""
    assert _fused is not None
    _fused.finish(base, delta_sum, scale, out, out.dtype == np.uint16, start, stop)


class FusedKernel:
    """``gram`` and ``finish`` over a whole unit, one contiguous slice per worker thread."""

    def __init__(self, workers: int = 1):
        self._workers = Workers(workers)

    def gram(self, rows: Sequence[np.ndarray], delta_sum: np.ndarray | None = None) -> np.ndarray:
        """Float64 Gram matrix of the deltas of ``rows`` (base first, equal lengths); stores sum_i d_i
        into ``delta_sum`` (float32, at least as long as a row) when given."""
        ranges = self._workers.slices(rows[0].shape[0], SLICE_ALIGN)
        return np.sum(self._workers.map(lambda w, s, e: gram(rows, s, e, delta_sum), ranges), axis=0)

    def delta_sum(self, rows: Sequence[np.ndarray], out: np.ndarray) -> None:
        """Store sum_i d_i of ``rows`` into ``out`` (the second pass of a big tensor: t is known)."""
        self._workers.map(lambda w, s, e: delta_sum(rows, s, e, out),
                          self._workers.slices(rows[0].shape[0], SLICE_ALIGN))

    def finish(self, base: np.ndarray, delta_sum: np.ndarray, scale: float, out: np.ndarray) -> None:
        """``out = w_0 + scale * delta_sum`` over the whole of ``out``."""
        self._workers.map(lambda w, s, e: finish(base, delta_sum, scale, out, s, e),
                          self._workers.slices(out.shape[0], SLICE_ALIGN))

    def close(self) -> None:
        self._workers.close()
