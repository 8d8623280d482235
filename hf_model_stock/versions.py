"""Installed package versions, for reports, cache keys and resume fingerprints."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Optional


def installed_version(package: str) -> Optional[str]:
    """The installed version of ``package`` (a distribution name), or None when it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None
