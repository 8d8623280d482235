"""High-level API: resolve sources, plan, merge into a temporary directory, report, card, rename.

>>> from hf_model_stock.pipeline import merge_models  # doctest: +SKIP
>>> merge_models("base-dir", ["ft-a", "ft-b", "ft-c"], "merged")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hf_model_stock.errors import ModelStockError, NetworkError
from hf_model_stock.io.index import INDEX_NAME
from hf_model_stock.io.writer import write_index
from hf_model_stock.merge.executor import execute
from hf_model_stock.merge.journal import (
    JOURNAL_NAME,
    Journal,
    plan_fingerprint,
    verified_tensors,
)
from hf_model_stock.merge.plan import MergeOptions, MergePlan, build_plan
from hf_model_stock.merge.stats import ExecutionResult, TensorStats
from hf_model_stock.methods.devices import resolve_device
from hf_model_stock.publish import output_dir
from hf_model_stock.publish.chat import add_union_tokens, finish_tokenizer
from hf_model_stock.publish.report import (
    REPORT_NAME,
    MergeReport,
    build_report,
    write_report,
)
from hf_model_stock.recipe import ModelEntry, Recipe
from hf_model_stock.sources.remote_code import code_files, copy_code_files
from hf_model_stock.sources.resolve import ResolvedModel, resolve

T_PLOT_NAME = "t_by_layer.png"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeOutcome:
    """Where the merged model was written, and its report."""

    path: Path
    report: MergeReport


def options_from_recipe(recipe: Recipe, device: str | None = None) -> MergeOptions:
    """Merge options from a recipe, with an optional device override."""
    return MergeOptions(
        params=recipe.parameters,
        method=recipe.method,
        dtype=recipe.dtype,
        device=resolve_device(device or recipe.compute.device),
        chunk_bytes=recipe.compute.chunk_size,
        prefetch=recipe.compute.prefetch,
        shard_bytes=recipe.output.shard_size,
        on_nonfinite=recipe.on_nonfinite,
        fsync=recipe.output.fsync,
        output_format=recipe.output.format,
        adapter_base_mismatch=recipe.adapter_base_mismatch,
        tokenizer_source=recipe.tokenizer_source,
        chat_template=recipe.chat_template,
    )


def plan_merge(base: ResolvedModel, models: Sequence[ResolvedModel], options: MergeOptions) -> MergePlan:
    """Check compatibility and plan, from headers only (what ``--dry-run`` prints)."""
    for m in models:
        if m.path == base.path:
            raise ModelStockError(f"{m.label}: is the base model; list only fine-tunes")
    paths = [m.path for m in models]
    for i, m in enumerate(models):
        if m.path in paths[:i]:
            raise ModelStockError(f"{m.label}: listed twice among the fine-tunes")
    if base.path.is_dir():
        code_files(base.path, ("config.json",))  # a module its auto_map names but lacks: say so before merging
    return build_plan(base, list(models), options)


def execute_plan(
    plan: MergePlan,
    out_dir: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    keep_partial: bool = True,
    recipe: Recipe | None = None,
    progress: bool = True,
) -> MergeOutcome:
    """Run a plan into ``out_dir`` atomically: nothing appears there unless the merge completes.

    An interrupted merge (Ctrl-C, SIGTERM, a crash) leaves its partial output and journal beside
    ``out_dir`` (unless ``keep_partial`` is False: then Ctrl-C and SIGTERM remove it; a crash cannot);
    with ``resume`` the journalled tensors whose bytes still check out are kept and only the others
    are merged. A merge stopped by an error removes its partial output, except when the network
    failed for good while streaming from the Hub: that is an interruption too. ``recipe``, when the
    merge came from one, is recorded in the report and the card."""
    out_dir = Path(out_dir).expanduser().absolute()
    for m in [plan.base, *plan.models]:
        if m.path.resolve() == out_dir.resolve():
            raise ModelStockError(f"{out_dir}: output directory is also an input model ({m.label})")
    output_dir.check_destination(out_dir, overwrite)
    if plan.options.output_format == "adapter":
        return _execute_adapter_plan(plan, out_dir, overwrite, recipe)
    tmp, lock, resuming = output_dir.claim_partial(out_dir, resume)
    try:
        done = _resumable(plan, tmp) if resuming else {}
        journal = Journal(tmp / JOURNAL_NAME, plan_fingerprint(plan))
    except BaseException:
        lock.release()
        raise
    try:
        started = time.perf_counter()
        result = execute(plan, tmp, progress=progress, journal=journal, done=done)
        with _writing(journal.path):
            journal.close()
        journal.path.unlink()
        report = _write_metadata(plan, result, tmp, recipe, started)
        output_dir.commit_dir(tmp, out_dir, overwrite)
    except NetworkError as exc:  # streaming from the Hub failed after its retries: keep what was merged
        if keep_partial and journal.path.is_file():
            raise NetworkError(f"{exc}; the tensors merged so far are kept in {tmp}: run the same command with "
                               "--resume to continue") from None
        output_dir.remove_dir(tmp)
        raise
    except ModelStockError:
        output_dir.remove_dir(tmp)  # the inputs or the destination are at fault: nothing worth resuming
        raise
    except OSError as exc:  # an input that vanished mid-merge, a failed rename
        output_dir.remove_dir(tmp)
        raise ModelStockError(f"{exc.filename or tmp}: {exc.strerror or exc}") from None
    except BaseException:
        if not keep_partial:
            output_dir.remove_dir(tmp)
        elif journal.path.is_file():
            logger.warning("partial output kept in %s: run the same command with --resume to continue", tmp)
        raise
    finally:
        journal.close()
        lock.release()
    return MergeOutcome(path=out_dir, report=report)


def _execute_adapter_plan(plan: MergePlan, out_dir: Path, overwrite: bool, recipe: Recipe | None) -> MergeOutcome:
    """Merge LoRA adapters into one LoRA adapter in ``out_dir`` (temp dir + rename, like a full merge)."""
    from hf_model_stock.merge.adapter_out import check_adapter_output, merge_adapters
    from hf_model_stock.publish.adapter_output import write_adapter

    check_adapter_output(plan)
    tmp, lock, _ = output_dir.claim_partial(out_dir, False)
    try:
        started = time.perf_counter()
        merged = merge_adapters(plan)
        with _writing(tmp):
            shas = write_adapter(merged, tmp)
        result = ExecutionResult(tensors=merged.stats, shard_sha256=shas)
        report = _write_metadata(plan, result, tmp, recipe, started)
        output_dir.commit_dir(tmp, out_dir, overwrite)
    except BaseException:
        output_dir.remove_dir(tmp)
        raise
    finally:
        lock.release()
    return MergeOutcome(path=out_dir, report=report)


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Report an OSError while ``path`` is written (a full disk, say) as one line naming the file."""
    try:
        yield
    except OSError as exc:
        raise ModelStockError(f"{exc.filename or path}: cannot write output ({exc.strerror or exc})") from None


def _write_metadata(plan: MergePlan, result: ExecutionResult, tmp: Path, recipe: Recipe | None,
                    started: float) -> MergeReport:
    """Index, config, tokenizer, merge_report.json, t plot and model card beside the merged shards
    (an adapter output has no index and no config.json)."""
    tokenizer_dir = plan.tokenizer_dir()
    if plan.options.output_format != "adapter":
        with _writing(tmp / INDEX_NAME):
            write_index(tmp, plan.shards)
        with _writing(tmp / "config.json"):
            output_dir.write_config(plan.base.path, tmp, plan.options.dtype)
            if plan.vocab is not None and (tmp / "config.json").is_file():  # the tokenizer source's vocabulary
                config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
                config["vocab_size"] = plan.vocab.rows
                (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with _writing(tmp):
        tokenizer_files = output_dir.copy_tokenizer(tokenizer_dir, tmp)
        copy_code_files(plan.base.path, tokenizer_dir, tmp)  # the *.py files an auto_map names
        if plan.vocab is not None:
            add_union_tokens(tmp, plan.vocab.added_tokens)
        chat = finish_tokenizer(tmp, base=("base", plan.base.path), models=[(m.entry.model, m.path) for m in plan.models],
                                tokenizer_dir=tokenizer_dir, spec=plan.options.chat_template)
        plan.notes.extend(n for n in chat.notes if n not in plan.notes)
        tokenizer_files = sorted(set(tokenizer_files) | {p.name for p in tmp.glob("chat_template.jinja")})
    report = build_report(
        plan, result, seconds=time.perf_counter() - started, tokenizer_files=tokenizer_files,
        recipe=None if recipe is None else recipe.model_dump(mode="json", exclude_none=True),
    )
    with _writing(tmp / REPORT_NAME):
        write_report(tmp, report)
    with _writing(tmp / T_PLOT_NAME):
        plot = _t_plot(report, tmp)
    from hf_model_stock.publish.card import (
        card_text,  # the Hub client's card data: imported while the merge runs (cli)
    )

    with _writing(tmp / "README.md"):
        (tmp / "README.md").write_text(card_text(report, t_plot=plot), encoding="utf-8")
    return report


def _resumable(plan: MergePlan, partial: Path) -> dict[str, TensorStats]:
    """The tensors of an interrupted merge that need not be merged again (their bytes are verified)."""
    if not (partial / JOURNAL_NAME).is_file():
        return {}
    done = verified_tensors(plan, partial)
    logger.warning("resuming %s: %d of %d tensors already written and verified", partial, len(done), len(plan.tasks))
    return done


def _t_plot(report: MergeReport, directory: Path) -> str | None:
    """Draw t by layer for the model card; None when matplotlib is not installed."""
    try:
        from hf_model_stock.publish.plots import t_plot_png
    except ImportError:
        return None
    try:
        t_plot_png(report.tensors, directory / T_PLOT_NAME)
    except ImportError:
        return None
    return T_PLOT_NAME


def merge_models(
    base: str | Path,
    models: Sequence[str | Path],
    out_dir: str | Path,
    options: MergeOptions | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> MergeOutcome:
    """Merge fine-tunes of ``base`` (local dirs or Hub ids) with Model Stock into ``out_dir``."""
    resolved_base = resolve(ModelEntry.model_validate(str(base)))
    resolved = [resolve(ModelEntry.model_validate(str(m))) for m in models]
    plan = plan_merge(resolved_base, resolved, options or MergeOptions())
    return execute_plan(plan, Path(out_dir), overwrite=overwrite, progress=progress)
