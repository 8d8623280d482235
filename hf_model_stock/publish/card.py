"""The model card (README.md) of a merged model: metadata from ``huggingface_hub.ModelCardData``,
evaluation results edited through ``huggingface_hub.ModelCard``.

Only ``ModelCardData`` is imported up front: ``ModelCard`` brings the Hub client's HTTP stack (half a
second), which writing a fresh card after a merge does not need.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import yaml
from huggingface_hub import EvalResult, ModelCardData

from hf_model_stock.merge.stats import layer_summary
from hf_model_stock.publish.report import MergeReport

if TYPE_CHECKING:
    from huggingface_hub import ModelCard


DEFAULT_TITLE = "Model Stock merge"
EVAL_HEADING = "## Evaluation"


def card_text(report: MergeReport, repo_id: str | None = None, t_plot: str | None = None) -> str:
    """The README.md of a merged model: merge metadata (base_model list, relation, tags) and a reproducible body;
    ``t_plot`` names a picture of t by layer beside the card."""
    sources = [report.sources.base, *report.sources.models]
    # base_model metadata must name Hub repos (the Hub rejects a card naming a local path there);
    # local sources are listed in the body only
    hub_ids = [s.repo_id for s in sources if s.repo_id]
    adapter = report.output_format == "adapter"  # a merged LoRA adapter: an adapter of the base
    if adapter:
        hub_ids = hub_ids[:1] if sources[0].repo_id else []
    origin = (report.recipe or {}).get("origin")  # a translated mergekit config
    data = ModelCardData(
        **({"reruns": origin["reruns"]} if origin and origin.get("reruns") else {}),  # the merge this re-runs
        base_model=(hub_ids[0] if adapter else hub_ids) if hub_ids else None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=["merge", "model-stock", "hf-model-stock", *(["lora"] if adapter else [])],
    )
    if hub_ids:  # a field the Hub reads that ModelCardData keeps as an extra key
        data.base_model_relation = "adapter" if adapter else "merge"  # type: ignore[attr-defined]
    rows = layer_summary(report.tensors)
    summary = report.summary
    lines = [
        f"# {repo_id or DEFAULT_TITLE}",
        "",
        "This model is a merge of fine-tuned models made with hf-model-stock using **Model Stock** "
        "(Jang, Yun, Han, 2024, arXiv:2403.19522).",
        "Model Stock averages the fine-tunes and moves that average back towards the pre-trained weights by a "
        "per-tensor ratio t = N·cos / (1 + (N−1)·cos), where cos is the mean pairwise cosine between the "
        "fine-tunes' weight deltas: the more the fine-tunes agree, the closer the merge stays to their average.",
        *(["", "This is a **LoRA adapter** of the base: the Model Stock merge of LoRA adapters, exactly "
            "(rank Σ r_i per module, t folded into B). Load it with `PeftModel.from_pretrained(base, this)`."]
          if adapter else []),
        *(_origin_lines(origin) if origin else []),
        "",
        "## Sources",
        "",
        "| role | model | revision | commit |",
        "|---|---|---|---|",
    ]
    for role, s in [("base", sources[0])] + [("fine-tune", s) for s in sources[1:]]:
        lines.append(f"| {role} | {s.display_id} | {s.revision or ''} | {s.commit or ''} |")
    params = report.parameters
    lines += [
        "",
        "## Merge",
        "",
        f"method `{report.method}`" + (f", t `{params.t:g}`" if params.t is not None else "")
        + f", granularity `{params.granularity}`, clamp_t `{params.clamp_t}`, eps `{params.eps:g}`, "
        f"output dtype `{report.dtype or 'as base'}`; {summary.merged} tensors merged, "
        f"{summary.copied} copied from the base, {summary.clamped} with t clamped to [0, 1].",
        "",
        "| layer | tensors | mean t | min t | max t | mean cos |",
        "|---|---|---|---|---|---|",
        *[f"| {r.layer} | {r.tensors} | {r.t_mean:.4f} | {r.t_min:.4f} | {r.t_max:.4f} | {r.cos_mean:.4f} |" for r in rows],
        *(["", f"![t by layer]({t_plot})"] if t_plot else []),
    ]
    if report.recipe:
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(report.recipe, sort_keys=False).rstrip(), "```"]
    lines += [
        "",
        "## Reproducibility",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()) + ".",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| {name} | `{digest}` |" for name, digest in sorted(report.shards.items())],
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def _origin_lines(origin: dict[str, Any]) -> list[str]:
    """The card's account of a translated mergekit config: the merge it re-runs, and the notes."""
    reruns, config = origin.get("reruns"), origin["mergekit_config"]
    if reruns and "/" in reruns.split("@")[0]:
        repo, _, commit = reruns.partition("@")
        what = (f"re-runs the published merge [{repo}](https://huggingface.co/{repo}/tree/{commit}) (commit "
                f"`{commit}`) from its mergekit configuration `{config}`,")
    elif reruns:
        what = f"re-runs the merge `{reruns}` from its mergekit configuration `{config}`,"
    else:
        what = f"was translated from the mergekit configuration `{config}` and made"
    lines = ["", "## From mergekit", "", f"This merge {what} with hf-model-stock (float64 arithmetic)."]
    notes = origin.get("notes") or []
    return lines + ([""] + [f"- {n}" for n in notes] if notes else [])


EvalRow = Sequence[Any] | Any  # (task, metric, value[, name]) or an object with .task, .metric, .value


def _eval_row(row: EvalRow) -> tuple[str, str, float, str]:
    """(task, metric, value, metric's display name: the metric unless given, e.g. with its judge)."""
    if isinstance(row, (tuple, list)):
        task, metric, value = row[:3]
        name = row[3] if len(row) > 3 else metric
    elif isinstance(row, dict):
        task, metric, value = row["task"], row["metric"], row["value"]
        name = row.get("name") or metric
    else:
        task, metric, value = getattr(row, "task"), getattr(row, "metric"), getattr(row, "value")  # noqa: B009
        name = getattr(row, "name", None) or metric
    return str(task), str(metric), float(value), str(name)


def card_title(card: ModelCard) -> str | None:
    """The first level-1 heading of the card's body."""
    m = re.search(r"^# (.+)$", card.text, flags=re.MULTILINE)
    return m.group(1).strip() if m else None


def _replace_section(text: str, heading: str, section: str) -> str:
    """Replace the ``heading`` section (up to the next level-2 heading) of ``text``, or append it."""
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", flags=re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"


def card_with_evals(
    card: ModelCard,
    results: Iterable[EvalRow],
    *,
    model_name: str | None = None,
    task_type: str = "text-generation",
) -> ModelCard:
    """A copy of ``card`` with evaluation results: ``model-index`` metadata and an Evaluation table.

    ``results`` holds ``(task, metric, value)`` triples, optionally with a display name for the metric
    as a fourth item (or objects with ``task``, ``metric`` and ``value``, such as
    ``evaluation.summary.Score``). Results for a (task, metric) already on the card
    are replaced; others are kept.

    >>> rows = [("gsm8k", "exact_match,strict-match", 0.41)]
    >>> card = card_with_evals(ModelCard.load("merged/README.md"), rows)  # doctest: +SKIP
    """
    from huggingface_hub import ModelCard

    rows = [_eval_row(r) for r in results]
    data = cast(ModelCardData, ModelCard(str(card)).data)  # a copy
    new_keys = {(task, metric) for task, metric, _, _ in rows}
    kept = [e for e in (data.eval_results or []) if (e.dataset_type, e.metric_type) not in new_keys]
    data.eval_results = kept + [
        EvalResult(task_type=task_type, dataset_type=task, dataset_name=task, metric_type=metric,
                   metric_name=name, metric_value=value)
        for task, metric, value, name in rows
    ]
    data.model_name = model_name or data.model_name or card_title(card) or DEFAULT_TITLE
    table = [
        EVAL_HEADING,
        "",
        "| task | metric | value |",
        "|---|---|---|",
        *[f"| {e.dataset_type} | {e.metric_name or e.metric_type} | {float(e.metric_value):.4f} |"
          for e in data.eval_results],
        "",
    ]
    body = _replace_section(card.text, EVAL_HEADING, "\n".join(table))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def retitle_card(card: ModelCard, repo_id: str) -> ModelCard:
    """``card`` with the default title (written before the repo was known) replaced by ``repo_id``."""
    from huggingface_hub import ModelCard

    if card_title(card) != DEFAULT_TITLE:
        return card
    body = re.sub(rf"^# {re.escape(DEFAULT_TITLE)}$", f"# {repo_id}", card.text, count=1, flags=re.MULTILINE)
    data = cast(ModelCardData, ModelCard(str(card)).data)
    if data.eval_results:
        data.model_name = repo_id
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
