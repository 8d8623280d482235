"""Fused CPU kernels (numba) for the layer-wise hot path on bf16 and float32 inputs.

One pass per block of 2048 elements (the N deltas and the decoded base stay in L1): decode each
input to float32 (bf16 is the upper half of a float32, so decoding is a 16-bit shift and exact)
straight into its delta row and subtract the base, accumulate
the pairwise dot products in float32 within the block and add each block's sums into float64, and
store the delta sum. The torch kernels do the same in 2N+1 separate passes with a dispatch per op.

The finish step ``out = w_0 + (t/N) * sum`` uses the same two float32 roundings as the torch kernel
and round-to-nearest-even to bf16, so both backends produce identical bytes.

Every loop is written over 1-D slices with 32-bit integer ops and constant shifts so that LLVM
vectorises it (numba widens integer arithmetic to 64 bits, which otherwise defeats it).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from hf_model_stock.methods.workers import Workers

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; torch kernels remain as fallback
    njit = None

BLOCK = 2048

if njit is not None:

    @njit(nogil=True, cache=True)
    def _decode(src: np.ndarray, shift: int, x: np.ndarray) -> None:
        # bf16 bits (uint16) << 16, or float32 bits (uint32) as they are, are the float32 bits of the
        # value; the shift is a constant in each loop so that both vectorise
        xi = x.view(np.uint32)
        if shift:
            for t in range(src.shape[0]):
                xi[t] = np.uint32(src[t]) << np.uint32(16)
        else:
            for t in range(src.shape[0]):
                xi[t] = src[t]

    @njit(nogil=True, cache=True)
    def _deltas(src: np.ndarray, s: int, k: int, shift: int, base: np.ndarray, d: np.ndarray) -> None:
        # each row is decoded in place and then has the base subtracted while it is still in L1
        b = base[:k]
        _decode(src[0, s : s + k], shift, b)
        for i in range(d.shape[0]):
            row = d[i, :k]
            _decode(src[i + 1, s : s + k], shift, row)
            for t in range(k):
                row[t] -= b[t]

    @njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})  # vectorised sums; NaN and Inf kept
    def _accumulate(d: np.ndarray, k: int, gram: np.ndarray) -> None:
        n = d.shape[0]
        for i in range(n):
            for j in range(i + 1):
                acc = np.float32(0.0)
                for t in range(k):
                    acc += d[i, t] * d[j, t]
                gram[i, j] += acc

    @njit(nogil=True, cache=True)
    def _store_sum(d: np.ndarray, k: int, out: np.ndarray) -> None:
        # model by model along the block (vectorises), adding in the same order as torch's sum over dim 0
        first = d[0, :k]
        for t in range(k):
            out[t] = first[t]
        for i in range(1, d.shape[0]):
            row = d[i, :k]
            for t in range(k):
                out[t] += row[t]

    @njit(nogil=True, cache=True)
    def _gram(src: np.ndarray, start: int, stop: int, gram: np.ndarray, delta_sum: np.ndarray, want_sum: bool,
              shift: int) -> None:
        base = np.empty(BLOCK, np.float32)
        d = np.empty((src.shape[0] - 1, BLOCK), np.float32)
        for s in range(start, stop, BLOCK):
            k = min(stop, s + BLOCK) - s
            _deltas(src, s, k, shift, base, d)
            _accumulate(d, k, gram)
            if want_sum:
                _store_sum(d, k, delta_sum[s : s + k])

    @njit(nogil=True, cache=True)
    def _finish_bf16(base: np.ndarray, delta_sum: np.ndarray, scale: np.float32, out: np.ndarray,
                     start: int, stop: int) -> None:
        tmp = np.empty(BLOCK, np.float32)
        for s in range(start, stop, BLOCK):
            k = min(stop, s + BLOCK) - s
            x, sums, o = tmp[:k], delta_sum[s : s + k], out[s : s + k]
            _decode(base[s : s + k], 16, x)
            for t in range(k):
                x[t] = np.float32(sums[t] * scale) + x[t]
            _round_bf16(x.view(np.uint32), o)

    @njit(nogil=True, cache=True)
    def _round_bf16(bits: np.ndarray, out: np.ndarray) -> None:
        # float32 -> bf16, round to nearest even; NaN -> canonical quiet NaN; 32-bit ops so it vectorises
        for t in range(bits.shape[0]):
            u = bits[t]
            r = np.uint32(u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            out[t] = np.uint16(0x7FC0) if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else np.uint16(r)

    @njit(nogil=True, cache=True)
    def _finish_f32(base: np.ndarray, delta_sum: np.ndarray, scale: np.float32, out: np.ndarray,
                    start: int, stop: int) -> None:
        for e in range(start, stop):
            out[e] = np.float32(delta_sum[e] * scale) + base[e]


def available() -> bool:
    """Whether the fused kernels can run (numba is importable)."""
    return njit is not None


def gram(sources: np.ndarray, start: int, stop: int, delta_sum: np.ndarray | None) -> np.ndarray:
    """Float64 Gram matrix of the deltas over [start, stop) of ``sources`` ((N+1) x n, base first,
    bf16 bits as uint16 or float32); stores sum_i d_i into ``delta_sum`` when given."""
    n = sources.shape[0] - 1
    g = np.zeros((n, n), np.float64)
    store = delta_sum if delta_sum is not None else np.empty(0, np.float32)
    bits = sources if sources.dtype == np.uint16 else sources.view(np.uint32)
    _gram(bits, start, stop, g, store, delta_sum is not None, 16 if sources.dtype == np.uint16 else 0)
    return g + np.tril(g, -1).T


def finish(base: np.ndarray, delta_sum: np.ndarray, scale: float, out: np.ndarray, start: int, stop: int) -> None:
    """``out = w_0 + scale * sum`` over [start, stop); base and out are bf16 bits (uint16) or float32."""
    kernel = _finish_bf16 if out.dtype == np.uint16 else _finish_f32
    kernel(base, delta_sum, np.float32(scale), out, start, stop)


SLICE_ALIGN = 4096  # elements: workers' slices start on whole blocks and cache lines
FUSED_DTYPES = frozenset({"BF16", "F32"})  # safetensors codes the kernels read (as uint16 / float32 bits)


class FusedKernel:
    """``gram`` and ``finish`` over a whole unit, one contiguous slice per worker thread."""

    def __init__(self, workers: int = 1):
        self._workers = Workers(workers)

    def gram(self, sources: np.ndarray, delta_sum: Optional[np.ndarray] = None) -> np.ndarray:
        """Float64 Gram matrix of the deltas of ``sources`` ((N+1) x n, base first); stores sum_i d_i
        into ``delta_sum`` (float32, at least n long) when given."""
        ranges = self._workers.slices(sources.shape[1], SLICE_ALIGN)
        return np.sum(self._workers.map(lambda w, s, e: gram(sources, s, e, delta_sum), ranges), axis=0)

    def finish(self, base: np.ndarray, delta_sum: np.ndarray, scale: float, out: np.ndarray) -> None:
        """``out = w_0 + scale * delta_sum`` over the whole of ``out``."""
        self._workers.map(lambda w, s, e: finish(base, delta_sum, scale, out, s, e),
                          self._workers.slices(out.shape[0], SLICE_ALIGN))

    def close(self) -> None:
        self._workers.close()


def load_kernels() -> None:
    """Load the bf16 kernels from numba's cache (about a second: LLVM start-up and typing) by running
    them once on a small block; the CLI calls it on a background thread at start-up."""
    if not available():
        return
    src = np.zeros((3, BLOCK), np.uint16)
    sums = np.empty(BLOCK, np.float32)
    gram(src, 0, BLOCK, sums)
    finish(src[0], sums, 0.5, np.empty(BLOCK, np.uint16), 0, BLOCK)
