"""The file names of a safetensors checkpoint and its index (``model.safetensors.index.json``),
read in one place: every shard it names must stay inside the model directory."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from hf_model_stock.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def shard_name(index_path: Path, name: Any) -> PurePosixPath:
    """A shard name of the index as a relative path, refusing anything that escapes the directory."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index_path}: weight_map values must be file names, got {name!r}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise CheckpointError(f"{index_path}: shard {name!r} is outside the model directory")
    return rel


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The index's tensor name -> shard file map, every shard name checked by ``shard_name``."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{index_path}: unreadable index ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map")
    for shard in weight_map.values():
        shard_name(index_path, shard)
    return weight_map
