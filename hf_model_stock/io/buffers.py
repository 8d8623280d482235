"""Page-aligned host buffers for the merge's pools and scratch, and the alignment that direct I/O needs."""

from __future__ import annotations

import mmap

import numpy as np

DIRECT_ALIGN = 4096  # file offset, length and buffer address alignment that O_DIRECT accepts on common filesystems


def host_buffer(nbytes: int, pin: bool = False) -> np.ndarray:
    """A page-aligned byte buffer in host memory; page-locked (through torch) for fast copies to a GPU.

    Private, not shared, anonymous memory: its pages are first touched faster than shared ones (and
    than with transparent huge pages); see tests/benchmarks/README.md."""
    if not pin:
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags) if flags else mmap.mmap(-1, nbytes), np.uint8)
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
