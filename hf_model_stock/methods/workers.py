"""A few compute threads that each take one contiguous slice of a unit of work.

On a 2-core machine torch's intra-op threads would spin-wait while the I/O threads need
the CPU; splitting a unit into one slice per worker, with kernels that release the GIL, keeps every
core on useful work instead.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Workers:
    """``count`` threads; ``map`` runs ``fn(worker, start, stop)`` on each slice of a range."""

    def __init__(self, count: int = 1):
        self.count = max(1, count)
        self._pool = ThreadPoolExecutor(self.count, "hfms-compute") if self.count > 1 else None

    def slices(self, total: int, align: int) -> list[tuple[int, int]]:
        """Split [0, total) into one range per worker, boundaries on multiples of ``align``."""
        if self._pool is None or total < 2 * align:
            return [(0, total)]
        per = -(-total // (self.count * align)) * align
        return [(s, min(total, s + per)) for s in range(0, total, per)]

    def map(self, fn: Callable[[int, int, int], T], ranges: list[tuple[int, int]]) -> list[T]:
        """``[fn(i, start, stop) for i, (start, stop) in enumerate(ranges)]``, run side by side."""
        if len(ranges) == 1:
            return [fn(0, *ranges[0])]
        assert self._pool is not None
        futures = [self._pool.submit(fn, i, s, e) for i, (s, e) in enumerate(ranges)]
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
