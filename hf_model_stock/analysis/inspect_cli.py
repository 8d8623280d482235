"""The ``inspect`` command: its arguments and the table it prints."""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_model_stock.analysis.inspect import (
    INSPECT_NAME,
    InspectReport,
    inspect_models,
    inspect_recipe,
    write_inspect_outputs,
)
from hf_model_stock.errors import ModelStockError, RecipeError


def format_report(report: InspectReport, max_warnings: int = 20) -> str:
    """Per-layer table and the warnings, as printed by the command."""
    n = len(report.models)
    lines = [f"base: {report.base}", *[f"model {i}: {m}" for i, m in enumerate(report.models)]]
    head = " ".join(f"{'|d' + str(i) + '|':>10}" for i in range(n))
    lines.append(f"{'layer':>6} {'tensors':>7} {head} {'min ang':>8} {'max ang':>8} {'mean t':>7} {'min t':>7} {'max t':>7}")
    for r in report.layers:
        angles = [a for a in r.stats.angles if a is not None]
        lo, hi = (f"{min(angles):8.2f}", f"{max(angles):8.2f}") if angles else (f"{'-':>8}", f"{'-':>8}")
        norms = " ".join(f"{x:10.4g}" for x in r.stats.norms)
        lines.append(f"{r.layer:>6} {r.tensors:>7} {norms} {lo} {hi} {r.t_mean:7.4f} {r.t_min:7.4f} {r.t_max:7.4f}")
    lines += [f"note: {x}" for x in report.notes]
    counts: dict[str, int] = {}
    for w in report.warnings:
        counts[w.kind] = counts.get(w.kind, 0) + 1
    if counts:
        lines.append("warnings: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        lines += [f"  {w.message}" for w in report.warnings[:max_warnings]]
        if len(report.warnings) > max_warnings:
            lines.append(f"  ... and {len(report.warnings) - max_warnings} more (see {INSPECT_NAME})")
    else:
        lines.append("warnings: none")
    return "\n".join(lines)


def add_inspect_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``inspect RECIPE | --base B --model M ...`` to the command line."""
    p = subparsers.add_parser("inspect", help="per-layer delta norms, pairwise angles and t; assumption checks")
    p.add_argument("recipe", nargs="?", type=Path, help="a recipe (or give --base and --model)")
    p.add_argument("--base", help="pre-trained model: local dir or org/name[@rev]")
    p.add_argument("--model", action="append", dest="models", help="a fine-tune (repeat)")
    p.add_argument("--out", type=Path, help="write inspect.json and PNG plots into this directory")
    p.add_argument("--chunk-size", help="input bytes per read, e.g. 128MiB (default: recipe's, else 128MiB)")
    p.add_argument("--max-warnings", type=int, default=20, help="warnings printed (all go to inspect.json)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_inspect)
    return p


def _chunk_size(text: str) -> int:
    from hf_model_stock.recipe import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise RecipeError(f"--chunk-size: {exc}") from None


def _cmd_inspect(args: argparse.Namespace) -> int:
    if (args.recipe is None) == (args.base is None):
        raise ModelStockError("inspect: give either a recipe or --base with --model (at least two)")
    if args.base is not None and len(args.models or []) < 2:
        raise ModelStockError("inspect: Model Stock needs at least 2 fine-tuned models (repeat --model)")
    if args.recipe is not None and args.models:
        raise ModelStockError("inspect: --model goes with --base, not with a recipe")
    from hf_model_stock.recipe import load_recipe

    progress = not args.quiet
    if args.recipe is not None:
        recipe = load_recipe(args.recipe)
        if args.chunk_size:
            compute = recipe.compute.model_copy(update={"chunk_size": _chunk_size(args.chunk_size)})
            recipe = recipe.model_copy(update={"compute": compute})
        report = inspect_recipe(recipe, progress=progress)
    else:
        chunk = _chunk_size(args.chunk_size) if args.chunk_size else 128 << 20
        report = inspect_models(args.base, args.models, chunk_bytes=chunk, progress=progress)
    print(format_report(report, args.max_warnings))
    if args.out is not None:
        for path in write_inspect_outputs(report, args.out):
            print(f"wrote {path}")
    return 0
