"""merge_report.json: per-tensor t / cosine / delta norms, shard checksums, sources, versions, recipe.

``MergeReport`` is the typed form; ``to_json``/``from_json`` keep the file's format (format_version 1).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_model_stock.merge.plan import MergePlan
from hf_model_stock.merge.stats import ExecutionResult, TensorStats
from hf_model_stock.methods.model_stock import ModelStockParams
from hf_model_stock.sources.resolve import ResolvedModel, is_local
from hf_model_stock.versions import merge_versions

REPORT_NAME = "merge_report.json"
REPORT_FORMAT = "hf-model-stock/merge-report"
REPORT_VERSION = 1


@dataclass(frozen=True)
class SourceRecord:
    """One input model as the report names it: the recipe's reference (a local directory by its name),
    where it was read (``org/name@commit``, or the directory's name: never an absolute path, since the
    report and card are published), its Hub repo and commit."""

    model: str
    revision: str | None
    path: str
    repo_id: str | None
    commit: str | None

    @property
    def display_id(self) -> str:
        """The Hub repo id, else the recipe's reference."""
        return self.repo_id or self.model


@dataclass(frozen=True)
class ReportSources:
    base: SourceRecord
    models: list[SourceRecord]


@dataclass(frozen=True)
class ReportSummary:
    """Counts and sizes over the whole merge."""

    tensors: int
    merged: int
    copied: int
    clamped: int
    nonfinite: list[str]
    t_mean: float | None
    bytes_in: int
    bytes_out: int
    seconds: float


@dataclass(frozen=True)
class MergeReport:
    """The content of merge_report.json."""

    method: str
    parameters: ModelStockParams
    dtype: str | None
    device: str
    sources: ReportSources
    summary: ReportSummary
    shards: dict[str, str]
    tokenizer_files: list[str]
    notes: list[str]
    versions: dict[str, str]
    recipe: dict[str, Any] | None
    tensors: list[TensorStats] = field(default_factory=list)
    output_format: str = "model"  # "adapter": a merged PEFT LoRA adapter (adapter_model.safetensors)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to merge_report.json (keys in the file's order)."""
        return {"format": REPORT_FORMAT, "format_version": REPORT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MergeReport:
        """Read the JSON object of merge_report.json back."""
        if data.get("format") != REPORT_FORMAT or data.get("format_version") != REPORT_VERSION:
            raise ValueError(f"not a {REPORT_FORMAT} version {REPORT_VERSION} document")
        src = data["sources"]
        return cls(
            method=data["method"],
            parameters=ModelStockParams(**data["parameters"]),
            dtype=data.get("dtype"),
            device=data["device"],
            sources=ReportSources(SourceRecord(**src["base"]), [SourceRecord(**m) for m in src["models"]]),
            summary=ReportSummary(**data["summary"]),
            shards=dict(data["shards"]),
            tokenizer_files=list(data.get("tokenizer_files", [])),
            notes=list(data.get("notes", [])),
            versions=dict(data["versions"]),
            recipe=data.get("recipe"),
            tensors=[TensorStats(**t) for t in data["tensors"]],
            output_format=data.get("output_format", "model"),
        )

    def tensor(self, name: str) -> TensorStats:
        """The statistics of the tensor ``name``."""
        return next(t for t in self.tensors if t.name == name)


def _source(m: ResolvedModel) -> SourceRecord:
    local = is_local(m.entry)
    return SourceRecord(model=m.name if local else m.entry.model, revision=m.entry.revision, path=m.display_name,
                        repo_id=m.repo_id, commit=m.commit)


def _local_names(sources: list[ResolvedModel]) -> dict[str, str]:
    """Absolute path spellings of each local source (as written, absolute, resolved) -> its display name."""
    names: dict[str, str] = {}
    for m in sources:
        if is_local(m.entry):
            raw = Path(m.entry.model).expanduser()
            for spelling in {m.entry.model, str(raw), str(raw.absolute()), str(raw.resolve()), str(m.path)}:
                if Path(spelling).is_absolute():
                    names[spelling] = m.display_name
    return names


def _scrub(text: str, names: dict[str, str]) -> str:
    """``text`` with every local path of ``names`` replaced by its display name (longest first)."""
    for spelling in sorted(names, key=len, reverse=True):
        text = text.replace(spelling, names[spelling])
    return text


def public_recipe(recipe: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """The recipe as the card shows it: local model paths by name, the output path by its last part."""

    def ref(value: Any) -> Any:
        if isinstance(value, str):
            if value in names:
                return names[value]
            return Path(value).name if Path(value).expanduser().is_absolute() else value
        if isinstance(value, dict) and "model" in value:
            return {**value, "model": ref(value["model"])}
        return value

    out = dict(recipe)
    if isinstance(out.get("origin"), dict):  # a translated mergekit config: where it came from
        out["origin"] = {k: ref(v) if k in ("mergekit_config", "reruns") else v for k, v in out["origin"].items()}
    for key in ("base_model", "tokenizer_source"):
        if key in out:
            out[key] = ref(out[key])
    if isinstance(out.get("models"), list):
        out["models"] = [ref(m) for m in out["models"]]
    if isinstance(out.get("output"), dict) and isinstance(out["output"].get("path"), str):
        out["output"] = {**out["output"], "path": Path(out["output"]["path"]).name}
    return out


def build_report(
    plan: MergePlan,
    result: ExecutionResult,
    *,
    seconds: float,
    recipe: dict[str, Any] | None = None,
    tokenizer_files: list[str] | None = None,
) -> MergeReport:
    """The report of an executed plan."""
    merged = [s for s in result.tensors if s.action == "merge"]
    names = _local_names([plan.base, *plan.models])
    t_values = [s.t for s in merged if s.t is not None]
    return MergeReport(
        method=plan.options.method,
        parameters=plan.options.params,
        dtype=plan.options.dtype,
        device=plan.options.device,
        sources=ReportSources(_source(plan.base), [_source(m) for m in plan.models]),
        summary=ReportSummary(
            tensors=len(result.tensors),
            merged=len(merged),
            copied=len(result.tensors) - len(merged),
            clamped=sum(s.clamped for s in merged),
            nonfinite=[s.name for s in merged if s.nonfinite],
            t_mean=sum(t_values) / len(t_values) if t_values else None,
            bytes_in=plan.bytes_in,
            bytes_out=plan.bytes_out,
            seconds=round(seconds, 3),
        ),
        shards=result.shard_sha256,
        tokenizer_files=tokenizer_files or [],
        notes=[_scrub(note, names) for note in [*plan.notes, *((recipe or {}).get("origin") or {}).get("notes", [])]],
        versions=merge_versions(),
        recipe=None if recipe is None else public_recipe(recipe, names),
        tensors=list(result.tensors),
        output_format=plan.options.output_format,
    )


def write_report(directory: Path, report: MergeReport) -> Path:
    """Write ``directory/merge_report.json``."""
    path = directory / REPORT_NAME
    path.write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
    return path


def load_report(directory: Path) -> MergeReport:
    """Read the merge_report.json of a merged model directory."""
    return MergeReport.from_json(json.loads((directory / REPORT_NAME).read_text(encoding="utf-8")))
