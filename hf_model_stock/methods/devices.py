"""Which torch device a merge computes on: ``cpu`` (the fused C kernels where they apply, else the torch
kernels), ``cuda`` or Apple's ``mps`` (the torch kernels, with float64 sums kept on the CPU)."""

from __future__ import annotations

import os

from hf_model_stock.errors import ModelStockError

GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/kfd")  # NVIDIA; AMD ROCm
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is visible, else ``cpu`` (never ``mps``: the CPU gives the
    reference bytes and is as fast for a merge that reads from disk); ``cuda`` or ``mps`` where it is
    not available is an error naming the device."""
    if name == "cpu" or (name == "auto" and not any(os.path.exists(p) for p in GPU_DRIVER_FILES)):
        return "cpu"  # decided without importing torch (two seconds) when no GPU driver is loaded
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelStockError(f"device {name!r} requested but no CUDA GPU is available (use --device cpu)")
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            built = torch.backends.mps.is_built()
            why = "this Mac has no Metal GPU or macOS is too old" if built else "this torch was built without MPS"
            raise ModelStockError(f"device 'mps' requested but it is not available ({why}; use --device cpu)")
        return name
    raise ModelStockError(f"unknown device {name!r} (use {', '.join(DEVICES)})")

