"""Fused CPU kernels (numba) for the layer-wise hot path on bf16 and float32 inputs.

One pass per block of 2048 elements (it stays in L1): decode the N+1 inputs to float32 (bf16 is
the upper half of a float32, so decoding is a 16-bit shift and exact), form the deltas, accumulate
the pairwise dot products in float32 within the block and add each block's sums into float64, and
store the delta sum. The torch kernels do the same in 2N+1 separate passes with a dispatch per op.

The finish step ``out = w_0 + (t/N) * sum`` uses the same two float32 roundings as the torch kernel
and round-to-nearest-even to bf16, so both backends produce identical bytes.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; torch kernels remain as fallback
    njit = None

BLOCK = 2048

if njit is not None:

    @njit(nogil=True, cache=True)
    def _decode(src: np.ndarray, s: int, k: int, shift: int, x: np.ndarray) -> None:
        # bf16 bits (uint16) << 16, or float32 bits (uint32) << 0, are the float32 bits of the value
        xi = x.view(np.uint32)
        sh = np.uint32(shift)
        for i in range(src.shape[0]):
            for t in range(k):
                xi[i, t] = np.uint32(src[i, s + t]) << sh

    @njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})  # vectorised sums; NaN and Inf kept
    def _accumulate(x: np.ndarray, d: np.ndarray, k: int, gram: np.ndarray) -> None:
        n = d.shape[0]
        for i in range(n):
            for t in range(k):
                d[i, t] = x[i + 1, t] - x[0, t]
        for i in range(n):
            for j in range(i + 1):
                acc = np.float32(0.0)
                for t in range(k):
                    acc += d[i, t] * d[j, t]
                gram[i, j] += acc

    @njit(nogil=True, cache=True)
    def _store_sum(d: np.ndarray, k: int, out: np.ndarray, s: int) -> None:
        # model by model along the block (vectorises), adding in the same order as torch's sum over dim 0
        for t in range(k):
            out[s + t] = d[0, t]
        for i in range(1, d.shape[0]):
            for t in range(k):
                out[s + t] += d[i, t]

    @njit(nogil=True, cache=True)
    def _gram(src: np.ndarray, start: int, stop: int, gram: np.ndarray, delta_sum: np.ndarray, want_sum: bool,
              shift: int) -> None:
        m = src.shape[0]
        x = np.empty((m, BLOCK), np.float32)
        d = np.empty((m - 1, BLOCK), np.float32)
        for s in range(start, stop, BLOCK):
            k = min(stop, s + BLOCK) - s
            _decode(src, s, k, shift, x)
            _accumulate(x, d, k, gram)
            if want_sum:
                _store_sum(d, k, delta_sum, s)

    @njit(nogil=True, cache=True)
    def _finish_bf16(base: np.ndarray, delta_sum: np.ndarray, scale: np.float32, out: np.ndarray,
                     start: int, stop: int) -> None:
        tmp = np.empty(BLOCK, np.float32)
        bits = tmp.view(np.uint32)
        for s in range(start, stop, BLOCK):
            k = min(stop, s + BLOCK) - s
            for t in range(k):
                bits[t] = np.uint32(base[s + t]) << np.uint32(16)
            for t in range(k):
                tmp[t] = np.float32(delta_sum[s + t] * scale) + tmp[t]
            for t in range(k):  # float32 -> bf16, round to nearest even; NaN -> canonical quiet NaN
                u = bits[t]
                if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                    out[s + t] = np.uint16(0x7FC0)
                else:
                    out[s + t] = np.uint16((u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16))

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
