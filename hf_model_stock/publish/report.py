"""merge_report.json: per-tensor t / cosine / delta norms, shard checksums, sources, versions, recipe."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from hf_model_stock.analysis.inspect import layer_key, layer_sort_key
from hf_model_stock.merge.executor import ExecutionResult, TensorStats
from hf_model_stock.merge.plan import MergePlan
from hf_model_stock.sources.resolve import ResolvedModel
from hf_model_stock.versions import installed_version

REPORT_NAME = "merge_report.json"


def versions() -> dict[str, str]:
    """Versions of the packages that determine the bytes of a merge."""
    out = {"python": platform.python_version()}
    for pkg in ("hf-model-stock", "numpy", "torch", "safetensors", "huggingface_hub", "transformers"):
        if (found := installed_version(pkg)) is not None:
            out[pkg] = found
    return out


def _source(m: ResolvedModel) -> dict[str, Any]:
    return {"model": m.entry.model, "revision": m.entry.revision, "path": str(m.path),
            "repo_id": m.repo_id, "commit": m.commit}


@dataclass(frozen=True)
class LayerRow:
    """t and cosine aggregated over the merged tensors of one transformer layer."""

    layer: str
    tensors: int
    t_mean: float
    t_min: float
    t_max: float
    cos_mean: float


def layer_summary(tensors: list[TensorStats]) -> list[LayerRow]:
    """Group merged tensors by layer index (tensors outside numbered layers form the group "other")."""
    groups: dict[str, list[TensorStats]] = {}
    for s in tensors:
        if s.action == "merge" and s.t is not None:
            groups.setdefault(layer_key(s.name), []).append(s)
    rows = []
    for key in sorted(groups, key=layer_sort_key):
        ts = [s.t for s in groups[key] if s.t is not None]
        cs = [s.cos for s in groups[key] if s.cos is not None]
        rows.append(LayerRow(key, len(ts), sum(ts) / len(ts), min(ts), max(ts), sum(cs) / max(len(cs), 1)))
    return rows


def build_report(
    plan: MergePlan,
    result: ExecutionResult,
    *,
    seconds: float,
    recipe: Optional[dict[str, Any]] = None,
    tokenizer_files: Optional[list[str]] = None,
) -> dict[str, Any]:
    """The content of merge_report.json."""
    merged = [s for s in result.tensors if s.action == "merge"]
    t_values = [s.t for s in merged if s.t is not None]
    return {
        "format": "hf-model-stock/merge-report",
        "format_version": 1,
        "method": plan.options.method,
        "parameters": asdict(plan.options.params),
        "dtype": plan.options.dtype,
        "device": plan.options.device,
        "sources": {"base": _source(plan.base), "models": [_source(m) for m in plan.models]},
        "summary": {
            "tensors": len(result.tensors),
            "merged": len(merged),
            "copied": len(result.tensors) - len(merged),
            "clamped": sum(s.clamped for s in merged),
            "nonfinite": [s.name for s in merged if s.nonfinite],
            "t_mean": sum(t_values) / len(t_values) if t_values else None,
            "bytes_in": plan.bytes_in,
            "bytes_out": plan.bytes_out,
            "seconds": round(seconds, 3),
        },
        "shards": result.shard_sha256,
        "tokenizer_files": tokenizer_files or [],
        "notes": plan.notes,
        "versions": versions(),
        "recipe": recipe,
        "tensors": [asdict(s) for s in result.tensors],
    }


def write_report(directory: Path, report: dict[str, Any]) -> Path:
    path = directory / REPORT_NAME
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return path


def load_report(directory: Path) -> dict[str, Any]:
    """Read the merge_report.json of a merged model directory."""
    return json.loads((directory / REPORT_NAME).read_text(encoding="utf-8"))
