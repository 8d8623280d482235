"""Command line: a thin layer over the library API.

    hf-model-stock run RECIPE [--dry-run] [--out DIR] [--device cpu|cuda|mps] [--overwrite] [--resume]
    hf-model-stock merge --base B --model M1 --model M2 [...] --out DIR [options]
    hf-model-stock validate RECIPE
    hf-model-stock push DIR --repo org/name [--private] [--revision BRANCH] [--message ...]
    hf-model-stock inspect RECIPE | --base B --model M1 --model M2 [...] [--out DIR]
    hf-model-stock eval MODEL [--tasks gsm8k,math,mmlu_pro,mbpp,harmbench | --suite NAME] [--limit N] [...]
    hf-model-stock leaderboard SPEC [--executor local|ray] [--gpus-per-model N] [--resume] [--output DIR]
    hf-model-stock demo [--workdir DIR] [--study [--steps N] [--items N] [--exact-match]]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_model_stock import __version__
from hf_model_stock.analysis.inspect_cli import add_inspect_parser
from hf_model_stock.errors import ModelStockError
from hf_model_stock.evaluation.cli import add_eval_parser
from hf_model_stock.leaderboard.cli import add_leaderboard_parser
from hf_model_stock.methods.registry import METHODS
from hf_model_stock.publish.hub import add_push_parser


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C (the partial output is kept or removed as asked)


QUIET_ENV = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def silence_progress_bars() -> None:
    """``-q``: no progress bar from any library in this process or its children.

    Every bar we know of (ours, huggingface_hub's "Fetching N files" and downloads, transformers',
    datasets', lm-eval's) is a ``tqdm`` subclass, and several pass ``disable=`` explicitly, which
    overrides ``TQDM_DISABLE``; so ``tqdm.std.tqdm.__init__`` is wrapped to force ``disable=True``.
    The environment variables carry the choice to worker processes.
    """
    for name in QUIET_ENV:
        os.environ[name] = "1"
    import tqdm.std

    original = tqdm.std.tqdm.__init__
    if getattr(original, "hfms_quiet", False):
        return

    @functools.wraps(original)
    def quiet_init(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > 10:  # disable passed positionally (tqdm's 11th parameter)
            args = (*args[:10], True, *args[11:])
        else:
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    quiet_init.hfms_quiet = True  # type: ignore[attr-defined]
    tqdm.std.tqdm.__init__ = quiet_init  # type: ignore[method-assign]


def _add_merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="where to compute (default: recipe's, else auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted merge into the same output (its finished tensors are verified, not redone)")
    p.add_argument("--on-interrupt", choices=["keep", "remove"],
                   help="what Ctrl-C/SIGTERM do with the partial output (default: the recipe's output.on_interrupt, keep)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (from headers only) and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (from any library) and no summary")
    p.add_argument("--stream", action="store_true", default=None,
                   help="read Hub sources' weights over HTTP as the merge goes, without storing them (compute.stream)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-model-stock", description="Merge fine-tuned LLMs with Model Stock.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe: merge, write, (push, evaluate)")
    run.add_argument("recipe", type=Path, help="a recipe, a mergekit config, or a published mergekit merge "
                                               "(a model directory or org/name[@rev]) to re-run")
    run.add_argument("--out", type=Path, help="output directory (overrides output.path)")
    _add_merge_options(run)
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check a recipe and the models' compatibility, print the plan")
    validate.add_argument("recipe", type=Path)
    validate.set_defaults(func=_cmd_validate)

    merge = sub.add_parser("merge", help="merge models named on the command line")
    merge.add_argument("--base", required=True, help="pre-trained model: local dir or org/name[@rev]")
    merge.add_argument("--model", action="append", required=True, dest="models", help="a fine-tune (repeat)")
    merge.add_argument("--out", type=Path, required=True, help="output directory")
    merge.add_argument("--dtype", help="output dtype (default: the base's)")
    merge.add_argument("--method", choices=list(METHODS), default="model_stock",
                       help="linear: the uniform average of the fine-tunes (Model Soup), for comparison")
    merge.add_argument("--granularity", choices=["layer", "filter"], default="layer")
    merge.add_argument("--no-clamp-t", action="store_true", help="do not clamp t to [0, 1] (reference behaviour)")
    merge.add_argument("--eps", type=float, help="added to the product of delta norms (default 1e-8)")
    merge.add_argument("--chunk-size", help="input bytes per unit of work, e.g. 128MiB")
    merge.add_argument("--shard-size", help="max output shard size, e.g. 5GB")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="convert pickle-only models with torch.load(weights_only=True)")
    merge.add_argument("--fsync", action="store_true", help="flush shards to disk before renaming the output")
    merge.add_argument("--tokenizer-source", help="'base' (default), one of the models, or a directory")
    merge.add_argument("--chat-template", help="'base', one of the models, a file or inline Jinja (default: the "
                       "tokenizer source's, else the first fine-tune's)")
    merge.add_argument("--output-format", choices=["model", "adapter"], default="model",
                       help="adapter: write a PEFT LoRA adapter (every --model must be a LoRA adapter)")
    merge.add_argument("--adapter-base-mismatch", choices=["error", "warn"], default="error",
                       help="a LoRA adapter whose base_model_name_or_path is not --base: stop (default) or warn")
    _add_merge_options(merge)
    merge.set_defaults(func=_cmd_merge)

    add_inspect_parser(sub)
    add_push_parser(sub)
    add_eval_parser(sub)
    add_leaderboard_parser(sub)

    demo = sub.add_parser("demo", help="offline demo: 3 GSM8K fine-tunes of SmolLM2, their Model Stock merge, "
                          "t per layer, held-out NLL of each")
    demo.add_argument("--workdir", type=Path, default=Path("hfms-demo"), help="where models are built and merged")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars (from any library)")
    demo.add_argument("--study", action="store_true",
                      help="the paper's experiment, small: 3 seeded fine-tunes on GSM8K, soups and stocks, "
                           "evaluated on held-out items through the leaderboard, inspect plots, study/README.md "
                           "(~10 min on 2 idle cores)")
    demo.add_argument("--steps", type=int, help="--study: AdamW steps per fine-tune (default 6)")
    demo.add_argument("--items", type=int, help="--study: held-out items evaluated (default 40)")
    demo.add_argument("--exact-match", action="store_true",
                      help="--study: also score exact match, teacher-forced (gsm8k_answer) and generative 5-shot "
                           "(gsm8k; slow on a CPU)")
    demo.set_defaults(func=_cmd_demo)

    return parser


def _preload_in_background() -> None:
    """On a background thread: import what only the end of a merge needs, the model card's Hub client
    and matplotlib for the t plot (about 0.6 s of CPU), so that it overlaps the merge (whose kernels
    release the GIL) instead of delaying its start or its end."""

    def load() -> None:
        try:
            import hf_model_stock.publish.card  # noqa: F401
            import hf_model_stock.publish.plots  # noqa: F401
        except Exception:  # only a head start: whatever failed here fails again, reported, where it is used
            pass

    threading.Thread(target=load, name="hfms-preload", daemon=True).start()


def _cmd_run(args: argparse.Namespace) -> int:
    from hf_model_stock.mergekit.published import load_run_target
    from hf_model_stock.mergekit.translate import recipe_yaml

    recipe = load_run_target(args.recipe)  # a recipe, a mergekit config, or a published merge (dir or Hub repo)
    if args.out is not None:
        recipe = recipe.model_copy(update={"output": recipe.output.model_copy(
            update={"path": str(args.out.expanduser().absolute())})})
    if args.stream:
        recipe = recipe.model_copy(update={"compute": recipe.compute.model_copy(update={"stream": True})})
    if args.dry_run and recipe.origin is not None:  # translated: print it as our recipe, to save and edit
        print(recipe_yaml(recipe), end="")
        return 0
    if not args.dry_run:
        _preload_in_background()
    from hf_model_stock.workflow import run_recipe

    run_recipe(recipe, out_dir=args.out, device=args.device, dry_run=args.dry_run,
               overwrite=args.overwrite, resume=args.resume, on_interrupt=args.on_interrupt, progress=not args.quiet)
    args.fast_exit = recipe.evals is None and recipe.output.push_to_hub is None
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from hf_model_stock.recipe import load_recipe
    from hf_model_stock.sources.preflight import preflight

    report = preflight(load_recipe(args.recipe), check=False)
    print(report.describe())
    report.raise_for_problems()
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    if not args.dry_run:
        _preload_in_background()
    from hf_model_stock.recipe import recipe_from_mapping
    from hf_model_stock.workflow import run_recipe

    recipe: dict[str, Any] = {
        "base_model": args.base,
        "models": args.models,
        "method": args.method,
        "parameters": {"granularity": args.granularity, "clamp_t": not args.no_clamp_t},
        "output": {"path": str(args.out)},
    }
    if args.eps is not None:
        recipe["parameters"]["eps"] = args.eps
    if args.dtype:
        recipe["dtype"] = args.dtype
    if args.chunk_size:
        recipe["compute"] = {"chunk_size": args.chunk_size}
    if args.stream:
        recipe.setdefault("compute", {})["stream"] = True
    if args.shard_size:
        recipe["output"]["shard_size"] = args.shard_size
    if args.allow_pickle:
        recipe["allow_pickle"] = True
    if args.fsync:
        recipe["output"]["fsync"] = True
    if args.tokenizer_source:
        recipe["tokenizer_source"] = args.tokenizer_source
    if args.chat_template:
        recipe["chat_template"] = args.chat_template
    if args.output_format != "model":
        recipe["output"]["format"] = args.output_format
    if args.adapter_base_mismatch != "error":
        recipe["adapter_base_mismatch"] = args.adapter_base_mismatch
    run_recipe(recipe_from_mapping(recipe), device=args.device, dry_run=args.dry_run, overwrite=args.overwrite,
               resume=args.resume, on_interrupt=args.on_interrupt, progress=not args.quiet)
    args.fast_exit = True
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.study:
        from hf_model_stock.study.experiment import StudySettings, run_study, with_overrides
        from hf_model_stock.study.report import print_summary

        settings = with_overrides(StudySettings(), steps=args.steps, items=args.items, exact_match=args.exact_match)
        result = run_study(args.workdir, settings)
        print_summary(result)
        return 0
    if args.steps is not None or args.items is not None or args.exact_match:
        raise ModelStockError("demo: --steps, --items and --exact-match go with --study")
    from hf_model_stock.study.demo import run_demo

    run_demo(args.workdir, progress=not args.quiet)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hf-model-stock`` command line; returns the exit code."""
    return _dispatch(argv)[0]


def entry() -> None:
    """The ``hf-model-stock`` console script. After a successful ``merge`` (or a ``run`` that neither
    pushes nor evaluates), whose every output is closed and renamed into place by then, the process
    exits without the interpreter's teardown of numpy, matplotlib and the libraries (about half a second)."""
    code, fast = _dispatch(None)
    if fast:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _dispatch(argv: Sequence[str] | None) -> tuple[int, bool]:
    """The exit code, and whether the command allows a fast exit."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("huggingface_hub").propagate = False  # it has a handler of its own: each line once
    if getattr(args, "quiet", False):
        silence_progress_bars()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        code = int(args.func(args) or 0)
        return code, code == 0 and getattr(args, "fast_exit", False)
    except ModelStockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, False
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130, False
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    entry()
