"""Run a recipe end to end: resolve sources, plan, merge (then evaluate, and push with the scores in the
card, when asked)."""

from __future__ import annotations

from pathlib import Path

from hf_model_stock.errors import RecipeError
from hf_model_stock.merge.stats import layer_summary
from hf_model_stock.pipeline import (
    MergeOutcome,
    execute_plan,
    options_from_recipe,
    plan_merge,
)
from hf_model_stock.publish.hub import push_recipe_output
from hf_model_stock.recipe import Recipe
from hf_model_stock.sources.preflight import preflight
from hf_model_stock.sources.remote import resolve_all_streamed, resolve_streamed
from hf_model_stock.sources.resolve import ResolvedModel, resolve


def run_recipe(
    recipe: Recipe,
    *,
    out_dir: Path | None = None,
    device: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    on_interrupt: str | None = None,
    progress: bool = True,
) -> MergeOutcome | None:
    """Check every source from headers (nothing downloaded yet), then merge as the recipe says, evaluate
    (scores into the card) and push when it asks; with ``dry_run`` print the checks and the plan and stop.
    ``resume`` continues an interrupted merge into the same output; ``on_interrupt`` (default: the
    recipe's ``output.on_interrupt``) says whether Ctrl-C/SIGTERM keep the partial output for it
    (``keep``) or remove it (``remove``)."""
    options = options_from_recipe(recipe, device)
    target = out_dir or (Path(recipe.output.path) if recipe.output.path else None)
    sources = resolve_sources(recipe, target, dry_run)
    if sources is None:
        return None
    plan = plan_merge(*sources, options)
    if dry_run:
        print(plan.describe())
        if target is not None:
            print(f"output: {target}")
        return None
    if target is None:
        raise RecipeError("output.path: no output directory (set output.path or pass --out)")
    outcome = execute_plan(plan, target, overwrite=overwrite or recipe.output.overwrite, resume=resume,
                           keep_partial=(on_interrupt or recipe.output.on_interrupt) == "keep", recipe=recipe,
                           progress=progress)
    if progress:
        print_summary(outcome)
    evaluate_and_push(recipe, outcome.path, progress)
    return outcome


def resolve_sources(recipe: Recipe, target: Path | None,
                    dry_run: bool) -> tuple[ResolvedModel, list[ResolvedModel]] | None:
    """The recipe's base and fine-tunes, resolved. A local or downloading merge is checked by pre-flight
    first, from headers (printed for a dry run, which stops here when the weights are not on disk yet);
    a streamed one resolves every source at once, and its plan checks the headers with the same rules.
    None: a dry run that has printed all it can."""
    entries = [recipe.base_model, *recipe.models]
    if recipe.compute.stream and not dry_run:
        base, *models = resolve_all_streamed(entries, allow_pickle=recipe.allow_pickle)
        return base, models
    checked = preflight(recipe, check=False, output=target)
    if dry_run:
        print(checked.describe())
    checked.raise_for_problems()  # every mismatch, in one line, before any weight is downloaded
    if dry_run and not recipe.compute.stream and (
            checked.download_bytes or any(s.convert_bytes for s in checked.sources)):
        return None  # the full plan needs the weights on disk; do not download them for a dry run
    resolver = resolve_streamed if recipe.compute.stream else resolve  # streamed: weights stay on the Hub
    base, *models = [resolver(e, allow_pickle=recipe.allow_pickle) for e in entries]
    return base, models


def evaluate_and_push(recipe: Recipe, path: Path, progress: bool) -> None:
    """The recipe's evaluations on the merged model (scores into its card), then its push: in that order,
    so that the pushed card carries the scores."""
    if recipe.evals is not None:
        from hf_model_stock.evaluation.card import write_results_to_card
        from hf_model_stock.evaluation.evaluate import evaluate_model
        from hf_model_stock.evaluation.summary import format_table

        summary = evaluate_model(str(path), recipe.evals)
        write_results_to_card(path, summary)
        if progress:
            print(format_table(summary))
    url = push_recipe_output(recipe, path)
    if url and progress:
        print(f"pushed -> {url}")


def print_summary(outcome: MergeOutcome) -> None:
    """Print where the merge went and its per-layer t."""
    s = outcome.report.summary
    print(f"merged {s.merged} tensors, copied {s.copied}, clamped {s.clamped} in {s.seconds:.1f} s -> {outcome.path}")
    rows = layer_summary(outcome.report.tensors)
    print(f"{'layer':>6} {'tensors':>7} {'mean t':>7} {'min t':>7} {'max t':>7} {'cos':>7}")
    for r in rows:
        print(f"{r.layer:>6} {r.tensors:>7} {r.t_mean:7.4f} {r.t_min:7.4f} {r.t_max:7.4f} {r.cos_mean:7.4f}")
