"""What a merge did, tensor by tensor and layer by layer: the types that the executor produces and
the report, the card, the journal and ``inspect`` read."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")  # the layer index in a tensor name


@dataclass
class TensorStats:
    """What the merge did to one tensor (one row of merge_report.json)."""

    name: str
    shape: list[int]
    dtype_in: list[str]
    dtype_out: str
    action: str  # "merge" | "copy"
    granularity: str | None = None
    t: float | None = None  # layer-wise t, or the mean of the rows' t (filter-wise)
    cos: float | None = None
    delta_norms: list[float] | None = None
    clamped: bool = False
    t_min: float | None = None
    t_max: float | None = None
    rows_clamped: int | None = None
    nonfinite: list[str] | None = None  # inputs holding NaN or Inf (on_nonfinite: warn)


@dataclass
class ExecutionResult:
    """Per-tensor statistics and each shard's sha256."""

    tensors: list[TensorStats]
    shard_sha256: dict[str, str] = field(default_factory=dict)


def layer_key(name: str) -> str:
    """The layer index of a tensor name, as in the merge report ("other" outside numbered layers)."""
    m = _LAYER.search(name)
    return m.group(1) if m else "other"


def layer_sort_key(key: str) -> tuple[bool, int]:
    """Numbered layers in order, then "other"."""
    return (not key.isdigit(), int(key) if key.isdigit() else 0)


@dataclass(frozen=True)
class LayerSummary:
    """t and cosine aggregated over the merged tensors of one transformer layer."""

    layer: str
    tensors: int
    t_mean: float
    t_min: float
    t_max: float
    cos_mean: float


def layer_summary(tensors: list[TensorStats]) -> list[LayerSummary]:
    """Group merged tensors by layer index (tensors outside numbered layers form the group "other")."""
    groups: dict[str, list[TensorStats]] = {}
    for s in tensors:
        if s.action == "merge" and s.t is not None:
            groups.setdefault(layer_key(s.name), []).append(s)
    rows = []
    for key in sorted(groups, key=layer_sort_key):
        ts = [s.t for s in groups[key] if s.t is not None]
        cs = [s.cos for s in groups[key] if s.cos is not None]
        rows.append(LayerSummary(key, len(ts), sum(ts) / len(ts), min(ts), max(ts), sum(cs) / max(len(cs), 1)))
    return rows
