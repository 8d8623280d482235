"""The model card (README.md) of a merged model, written with ``huggingface_hub.ModelCard``."""

from __future__ import annotations

from typing import Any, Optional

import yaml
from huggingface_hub import ModelCard, ModelCardData

from hf_model_stock.merge import TensorStats
from hf_model_stock.report import layer_summary


def _source_id(src: dict[str, Any]) -> str:
    return src.get("repo_id") or src["model"]


def build_card(report: dict[str, Any], repo_id: Optional[str] = None) -> ModelCard:
    """A model card with merge metadata (base_model list, relation, tags) and a reproducible body."""
    sources = [report["sources"]["base"], *report["sources"]["models"]]
    data = ModelCardData(
        base_model=[_source_id(s) for s in sources],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["merge", "model-stock", "hf-model-stock"],
    )
    data.base_model_relation = "merge"
    stats = [TensorStats(**t) for t in report["tensors"]]
    rows = layer_summary(stats)
    summary = report["summary"]
    lines = [
        f"# {repo_id or 'Model Stock merge'}",
        "",
        "This model is a merge of fine-tuned models made with hf-model-stock using **Model Stock** "
        "(Jang, Yun, Han, 2024, arXiv:2403.19522).",
        "Model Stock averages the fine-tunes and moves that average back towards the pre-trained weights by a "
        "per-tensor ratio t = N·cos / (1 + (N−1)·cos), where cos is the mean pairwise cosine between the "
        "fine-tunes' weight deltas: the more the fine-tunes agree, the closer the merge stays to their average.",
        "",
        "## Sources",
        "",
        "| role | model | revision | commit |",
        "|---|---|---|---|",
    ]
    for role, s in [("base", sources[0])] + [("fine-tune", s) for s in sources[1:]]:
        lines.append(f"| {role} | {_source_id(s)} | {s.get('revision') or ''} | {s.get('commit') or ''} |")
    params = report["parameters"]
    lines += [
        "",
        "## Merge",
        "",
        f"granularity `{params['granularity']}`, clamp_t `{params['clamp_t']}`, eps `{params['eps']:g}`, "
        f"output dtype `{report.get('dtype') or 'as base'}`; {summary['merged']} tensors merged, "
        f"{summary['copied']} copied from the base, {summary['clamped']} with t clamped to [0, 1].",
        "",
        "| layer | tensors | mean t | min t | max t | mean cos |",
        "|---|---|---|---|---|---|",
        *[f"| {r.layer} | {r.tensors} | {r.t_mean:.4f} | {r.t_min:.4f} | {r.t_max:.4f} | {r.cos_mean:.4f} |" for r in rows],
    ]
    if report.get("recipe"):
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(report["recipe"], sort_keys=False).rstrip(), "```"]
    lines += [
        "",
        "## Reproducibility",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| {name} | `{digest}` |" for name, digest in sorted(report["shards"].items())],
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
