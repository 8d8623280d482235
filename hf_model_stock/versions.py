"""Installed package versions, for reports, cache keys and resume fingerprints."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def installed_version(package: str) -> str | None:
    """The installed version of ``package`` (a distribution name), or None when it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def merge_versions() -> dict[str, str]:
    """Versions of the packages that determine the bytes of a merge."""
    out = {"python": platform.python_version()}
    for pkg in ("hf-model-stock", "numpy", "torch", "safetensors", "huggingface_hub", "transformers"):
        if (found := installed_version(pkg)) is not None:
            out[pkg] = found
    return out
