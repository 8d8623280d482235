"""Whether fine-tunes can be merged with their base: the rules on configs and tensor headers that
pre-flight (headers fetched before any download) and the merge plan (local headers) both apply."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hf_model_stock.io.dtypes import is_floating
from hf_model_stock.io.reader import Checkpoint

TIED_OUTPUT_EMBEDDING = "lm_head.weight"
CONFIG_KEYS = ("model_type", "architectures")  # keys whose difference means another architecture

Shape = tuple[int, ...]
Headers = Mapping[str, tuple[str, Shape]]  # tensor name -> (safetensors dtype, shape)


@dataclass
class TensorCheck:
    """The tensors to merge, every mismatch found (one line each) and notes for the report."""

    names: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def headers_of(ckpt: Checkpoint) -> dict[str, tuple[str, Shape]]:
    """A checkpoint's tensor headers as the checks take them."""
    return {name: (t.dtype, t.shape) for name, t in ckpt.tensors.items()}


def is_tied(config: Mapping[str, Any]) -> bool:
    """Whether a config ties the output embeddings to the input ones."""
    # PretrainedConfig defaults tie_word_embeddings to True; most configs state it explicitly.
    return bool(config.get("tie_word_embeddings", True))


def config_problems(base: Mapping[str, Any], models: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """Architecture-level mismatches between each (label, config.json) and the base's config."""
    return [
        f"config {key}: {cfg[key]!r} in {label} vs {base[key]!r} in base"
        for label, cfg in models
        for key in CONFIG_KEYS
        if key in base and key in cfg and cfg[key] != base[key]
    ]


def check_tensors(base_config: Mapping[str, Any], base: Headers, models: Sequence[tuple[str, Headers]],
                  resizable: Collection[str] = ()) -> TensorCheck:
    """Compare each (label, headers) with the base's: missing or extra names, shapes, floating vs not.
    Tensors in ``resizable`` (one row per token: ``sources.vocab``) may differ in their number of rows.

    A tied ``lm_head.weight`` stored by only some models is left out (transformers ties it on load)."""
    out = TensorCheck(names=set(base))
    if is_tied(base_config):
        holders = [h for h in [base, *(h for _, h in models)] if TIED_OUTPUT_EMBEDDING in h]
        if holders and len(holders) < len(models) + 1:
            out.names.discard(TIED_OUTPUT_EMBEDDING)
            out.notes.append(f"{TIED_OUTPUT_EMBEDDING} is tied to the input embeddings (tie_word_embeddings) and "
                             "stored by only some models: it is left out, transformers ties it on load")
    for label, theirs_headers in models:
        theirs = set(theirs_headers) - ({TIED_OUTPUT_EMBEDDING} if TIED_OUTPUT_EMBEDDING not in out.names else set())
        out.problems += [f"tensor {name!r}: missing in {label}" for name in sorted(out.names - theirs)]
        out.problems += [f"tensor {name!r}: in {label} but not in the base" for name in sorted(theirs - out.names)]
        float_dtypes: set[str] = set()
        for name in sorted(out.names & theirs):
            b_dtype, b_shape = base[name]
            dtype, shape = theirs_headers[name]
            if shape != b_shape and not (name in resizable and len(shape) == len(b_shape) and shape[1:] == b_shape[1:]):
                out.problems.append(f"tensor {name!r}: shape {list(shape)} in {label} vs {list(b_shape)} in base")
            elif is_floating(dtype) != is_floating(b_dtype):
                out.problems.append(f"tensor {name!r}: dtype {dtype} in {label} vs {b_dtype} in base")
            elif dtype != b_dtype:
                float_dtypes.add(f"{dtype} vs {b_dtype}")
        if float_dtypes:
            out.notes.append(f"{label}: floating dtypes differ from the base ({', '.join(sorted(float_dtypes))}); "
                             "merged in float32")
    return out


MAX_LISTED_PROBLEMS = 100  # in one error line; `hf-model-stock validate` lists them all


def listed_problems(problems: list[str]) -> str:
    """Problems joined into one line, the first ``MAX_LISTED_PROBLEMS`` of them (pre-flight and the plan alike)."""
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    return "; ".join(shown) + (f"; and {more} more (run `hf-model-stock validate` to list them)" if more else "")
