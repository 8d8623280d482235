"""Page-aligned host buffers for the merge's pools and scratch."""

from __future__ import annotations

import mmap

import numpy as np


def host_buffer(nbytes: int, pin: bool = False) -> np.ndarray:
    """A page-aligned byte buffer in host memory; page-locked (through torch) for fast copies to a GPU."""
    if not pin:
        return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
