"""PEFT LoRA adapters as fine-tunes: each target module's delta is ``scale · B·A``, held in low-rank form.

An adapter (a directory or Hub repo with ``adapter_config.json`` and ``adapter_model.safetensors``)
is small, so it is loaded whole. Its config is read with peft's own ``LoraConfig`` (rank and alpha
patterns, rsLoRA scaling, ``fan_in_fan_out``, ``modules_to_save``), and every module's delta becomes
a ``LowRankDelta`` ``left @ right`` over the base tensor's (rows, cols) view, the scale folded into
``left``, in float64:

- ``nn.Linear``: ``left = s·B`` (out x r), ``right = A`` (r x in);
- ``fan_in_fan_out`` (GPT-2's Conv1D, weight stored in x out) and ``nn.Embedding``
  (``lora_embedding_A`` r x num, ``lora_embedding_B`` dim x r): the delta is ``s·(B·A)ᵀ``, so
  ``left = s·Aᵀ``, ``right = Bᵀ``;
- convolutions: ``left = s·B`` as (out x r), ``right = A`` flattened to (r x in·k...), with 1x1 B.

Tensors the adapter stores whole (``modules_to_save``, trained biases, an embedding's base layer that
differs from the base's) are ``DenseWeight``: that model's full weight for the tensor. Tensors the
adapter does not touch have a zero delta (a rank-0 ``LowRankDelta``).

Only additive LoRA is merged: other PEFT types (LoHa, LoKr, IA3, AdaLoRA, ...) and LoRA variants whose
weight is not ``W0 + s·B·A`` (DoRA, a bias on B, aLoRA, ...) are refused in one line naming the type.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_model_stock.errors import CompatibilityError, SourceError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
ADAPTER_FILE_PATTERNS = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
PEFT_PREFIX = "base_model.model."
# LoRA options whose weight is not W0 + s·B·A, or whose tokens/parameters we cannot place: refused.
_REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora: the weight is rescaled by a learned magnitude, not W0 + s·B·A)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens: active only after its invocation tokens)",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "use_bdlora",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "kasa_config",
    "monteclora_config": "monteclora_config",
    "velora_config": "velora_config",
}

logger = logging.getLogger(__name__)
Shape = tuple[int, ...]


def is_adapter(path: Path) -> bool:
    """Whether a local model directory is a PEFT adapter (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def rows_cols(shape: Shape) -> tuple[int, int]:
    """A tensor as (rows, cols): its first dim by the rest (a 0-d or 1-d tensor: numel rows of 1 col)."""
    numel = math.prod(shape)
    if len(shape) < 2:
        return numel, 1
    return shape[0], (numel // shape[0] if shape[0] else 0)


@dataclass(frozen=True)
class LowRankDelta:
    """A delta ``left @ right`` (float64 torch tensors, (rows x r) and (r x cols), the scale in ``left``)
    over a tensor's (rows, cols) view; rank 0 is a zero delta. ``layout`` says how peft stores it:
    ``linear`` (B = left, A = right), ``transposed`` (fan_in_fan_out) and ``embedding`` (B = rightᵀ,
    A = leftᵀ) or ``conv`` (B = left, A = right, reshaped to ``a_shape`` / ``b_shape``)."""

    left: Any
    right: Any
    layout: str = "linear"
    a_shape: Shape | None = None
    b_shape: Shape | None = None

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])


@dataclass(frozen=True)
class DenseWeight:
    """A model's whole weight for one tensor, held in memory (``modules_to_save``, a trained bias)."""

    weight: Any  # torch tensor of the tensor's shape and the adapter's dtype


InMemoryDelta = LowRankDelta | DenseWeight


def zero_delta(shape: Shape) -> LowRankDelta:
    import torch

    rows, cols = rows_cols(shape)
    return LowRankDelta(torch.zeros(rows, 0, dtype=torch.float64), torch.zeros(0, cols, dtype=torch.float64))


@dataclass
class Adapter:
    """One LoRA adapter, loaded: its deltas by base tensor name."""

    label: str
    path: Path
    config: Any  # peft.LoraConfig
    deltas: dict[str, InMemoryDelta]
    dtype: str  # safetensors code of its LoRA weights
    fan_in_fan_out: bool = False
    notes: list[str] = field(default_factory=list)

    def delta(self, name: str, shape: Shape) -> InMemoryDelta:
        """The delta of tensor ``name`` (zero where the adapter does not touch it)."""
        return self.deltas.get(name) or zero_delta(shape)

    @property
    def files(self) -> list[Path]:
        return [self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS]


def read_adapter_config(path: Path, label: str) -> dict[str, Any]:
    """``adapter_config.json`` (the file, or the adapter's directory) as a dict, refused in one line
    unless it is a plain LoRA."""
    config_path = Path(path) if Path(path).is_file() else Path(path) / ADAPTER_CONFIG
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"{label}: unreadable {ADAPTER_CONFIG} ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{label}: {ADAPTER_CONFIG} is not a JSON object")
    refuse_unsupported(data, label)
    return data


def refuse_unsupported(data: Mapping[str, Any], label: str) -> None:
    """Raise ``SourceError`` (one line naming the type) for an adapter that is not an additive LoRA."""
    peft_type = str(data.get("peft_type") or "?")
    if peft_type.upper() != "LORA":
        raise SourceError(f"{label}: a {peft_type} adapter: only LoRA adapters (additive low-rank deltas W0 + s·B·A) "
                          "can be merged")
    for key, what in _REFUSED_OPTIONS.items():
        if data.get(key):
            raise SourceError(f"{label}: LoRA with {what}: not an additive low-rank delta, cannot be merged")


def missing_weights_message(label: str, has_pickle: bool) -> str:
    if has_pickle:
        return (f"{label}: only pickle adapter weights ({ADAPTER_PICKLE}); save the adapter with "
                f"safe_serialization=True to get {ADAPTER_WEIGHTS}")
    return f"{label}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}"


def check_weights_file(path: Path, label: str) -> Path:
    """The adapter's safetensors weights; ``SourceError`` in one line when there are none."""
    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise SourceError(missing_weights_message(label, (Path(path) / ADAPTER_PICKLE).is_file()))
    return weights


def base_matches(declared: str | None, base_names: list[str], base_path: Path | None) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names the recipe's base (a Hub id, with or
    without a revision, or a local path that is the same directory)."""
    if not declared:
        return True
    declared = declared.strip().rstrip("/")
    names = {n.strip().rstrip("/") for n in base_names if n}
    if declared in names or declared.split("@")[0] in names:
        return True
    candidate = Path(declared).expanduser()
    if base_path is not None and candidate.exists():
        try:
            return candidate.resolve() == Path(base_path).resolve()
        except OSError:
            return False
    return False


def check_base(declared: str | None, base_names: list[str], base_path: Path | None, label: str,
               base_label: str, mismatch: str) -> str | None:
    """Raise (``mismatch == "error"``) or return a warning when the adapter was trained on another base;
    a note when it names none."""
    if not declared:
        return f"{label}: adapter_config.json names no base_model_name_or_path; assumed to be {base_label}"
    if base_matches(declared, base_names, base_path):
        return None
    text = (f"{label}: adapter trained on {declared!r}, not on the base {base_label}")
    if mismatch != "warn":
        raise CompatibilityError(text + " (pass --adapter-base-mismatch warn, or adapter_base_mismatch: warn in "
                                 "the recipe, to merge it anyway)")
    logger.warning("warning: %s", text)
    return text + " (merged anyway: adapter_base_mismatch: warn)"


def _lora_config(path: Path, label: str) -> Any:
    from peft import LoraConfig

    try:
        return LoraConfig.from_pretrained(str(path))
    except Exception as exc:  # a malformed config: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"{label}: {ADAPTER_CONFIG} is not a valid LoraConfig ({first})") from None


def module_scale(config: Any, module: str, rank: int) -> tuple[int, float]:
    """The rank and scale peft gives ``module`` (its name in the base model): rank_pattern and
    alpha_pattern as peft matches them, alpha / r or alpha / sqrt(r) with rsLoRA."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.rank_pattern or {}
    alpha_pattern = config.alpha_pattern or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config.r)
    alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config.lora_alpha))
    if r != rank:
        raise CompatibilityError(f"module {module}: rank {rank} in the weights but {r} in {ADAPTER_CONFIG}")
    return r, (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
_EMB_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")
_BASE_LAYER = ".base_layer."


@dataclass(frozen=True)
class BaseRef:
    """What an adapter is checked and loaded against: the base's tensor headers, a reader of its tensors
    (torch, for a saved base layer), and the names and path it may be given by (``check_base``)."""

    label: str
    headers: Mapping[str, tuple[str, Shape]]
    read: Callable[[str], Any]
    names: list[str]
    path: Path | None = None


@dataclass
class _LoraState:
    """An adapter's state dict, sorted by role (peft prefix removed)."""

    pairs: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> lora_A/B (or embedding A/B)
    base_layers: dict[str, Any] = field(default_factory=dict)  # tensor -> a saved base layer
    whole: dict[str, Any] = field(default_factory=dict)  # modules_to_save and trained biases
    dtype: str = "F32"


def load_adapter(path: Path, label: str, base: BaseRef, mismatch: str = "error") -> tuple[Adapter, list[str]]:
    """Load the adapter at ``path`` against ``base``; returns it and the problems found (tensors the
    base lacks, shapes that disagree, ranks). ``mismatch``: what a ``base_model_name_or_path`` naming
    another base does (``check_base``)."""
    raw_config = read_adapter_config(path, label)
    weights = check_weights_file(path, label)
    config = _lora_config(path, label)
    notes = [n for n in [check_base(raw_config.get("base_model_name_or_path"), base.names, base.path, label,
                                     base.label, mismatch)] if n]
    state = _read_lora_state(weights, label)
    problems: list[str] = []
    fan_in_fan_out = bool(config.fan_in_fan_out)
    deltas = _module_deltas(config, state, base, label, fan_in_fan_out, problems)
    notes += _take_saved_base_layers(state, base, label, deltas, problems)
    _take_whole_tensors(state, base, label, deltas, problems)
    adapter = Adapter(label=label, path=Path(path), config=config, deltas=deltas, dtype=state.dtype,
                      fan_in_fan_out=fan_in_fan_out, notes=notes)
    return adapter, problems


def _read_lora_state(weights: Path, label: str) -> _LoraState:
    import torch
    from safetensors import safe_open

    state = _LoraState()
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(PEFT_PREFIX):
                raise SourceError(f"{label}: {ADAPTER_WEIGHTS} tensor {key!r} does not start with {PEFT_PREFIX!r} "
                                  "(not a PEFT LoRA state dict)")
            name, value = key[len(PEFT_PREFIX):], f.get_tensor(key)
            if (m := _LORA_KEY.match(name)) or (m := _EMB_KEY.match(name)):
                state.pairs.setdefault(m["module"], {})[m["kind"]] = value
                state.dtype = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}.get(value.dtype, "F32")
            elif _BASE_LAYER in name:
                state.base_layers[name.replace(_BASE_LAYER, ".")] = value
            elif "lora_" in name or "magnitude" in name:
                raise SourceError(f"{label}: {ADAPTER_WEIGHTS} tensor {name!r} is not part of a plain LoRA")
            else:
                state.whole[name] = value
    return state


def _module_deltas(config: Any, state: _LoraState, base: BaseRef, label: str, fan_in_fan_out: bool,
                   problems: list[str]) -> dict[str, InMemoryDelta]:
    """Each LoRA module's low-rank delta, over the base tensor it targets."""
    deltas: dict[str, InMemoryDelta] = {}
    for module, parts in sorted(state.pairs.items()):
        name = f"{module}.weight"
        where = f"{label}: module {module}"
        if name not in base.headers:
            problems.append(f"{where}: the base has no tensor {name!r}")
            continue
        try:
            deltas[name] = _low_rank(config, module, parts, base.headers[name][1], fan_in_fan_out)
        except CompatibilityError as exc:
            problems.append(f"{where}: {exc}")
    return deltas


def _take_saved_base_layers(state: _LoraState, base: BaseRef, label: str, deltas: dict[str, InMemoryDelta],
                            problems: list[str]) -> list[str]:
    """A saved base layer that differs from the base's (an embedding trained with the adapter) makes its
    tensor a whole weight (with the module's low-rank delta added); returns the notes saying so."""
    import torch

    notes = []
    for name, value in sorted(state.base_layers.items()):
        if name not in base.headers or tuple(value.shape) != base.headers[name][1]:
            problems.append(f"{label}: tensor {name!r} (saved base layer) has shape {list(value.shape)}, the base "
                            f"{list(base.headers[name][1]) if name in base.headers else 'none'}")
            continue
        if not torch.equal(value.to(torch.float64), base.read(name).to(torch.float64)):
            low = deltas.pop(name, None)
            full = value.to(torch.float64)
            if isinstance(low, LowRankDelta):
                full = full + (low.left @ low.right).reshape(full.shape)
            deltas[name] = DenseWeight(full)
            notes.append(f"{label}: {name} saved base layer differs from the base's: taken whole")
    return notes


def _take_whole_tensors(state: _LoraState, base: BaseRef, label: str, deltas: dict[str, InMemoryDelta],
                        problems: list[str]) -> None:
    """``modules_to_save`` (and trained biases): whole weights of the base's shape."""
    for name, value in sorted(state.whole.items()):
        if name not in base.headers:
            problems.append(f"{label}: tensor {name!r} (modules_to_save) is not in the base")
        elif tuple(value.shape) != base.headers[name][1]:
            problems.append(f"{label}: tensor {name!r} (modules_to_save) has shape {list(value.shape)}, the base "
                            f"{list(base.headers[name][1])}")
        elif name in deltas:
            problems.append(f"{label}: tensor {name!r} is both a LoRA target and stored whole")
        else:
            deltas[name] = DenseWeight(value)


def _low_rank(config: Any, module: str, parts: dict[str, Any], shape: Shape, fan_in_fan_out: bool) -> LowRankDelta:
    """One module's LoRA factors as a ``LowRankDelta`` over the base tensor's (rows, cols) view."""
    import torch

    rows, cols = rows_cols(shape)
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        if set(parts) != {"lora_embedding_A", "lora_embedding_B"}:
            raise CompatibilityError("lora_embedding_A or lora_embedding_B missing")
        a, b = parts["lora_embedding_A"].to(torch.float64), parts["lora_embedding_B"].to(torch.float64)
        r, scale = module_scale(config, module, a.shape[0])
        if a.dim() != 2 or b.dim() != 2 or (a.shape[1], b.shape[0]) != (rows, cols) or b.shape[1] != r:
            raise CompatibilityError(f"embedding LoRA of {list(b.shape[:1]) + list(a.shape[1:])} for a "
                                     f"tensor of shape {list(shape)}")
        return LowRankDelta(a.T.contiguous() * scale, b.T.contiguous(), "embedding")
    if set(parts) != {"lora_A", "lora_B"}:
        raise CompatibilityError("lora_A or lora_B missing")
    a, b = parts["lora_A"].to(torch.float64), parts["lora_B"].to(torch.float64)
    r, scale = module_scale(config, module, a.shape[0])
    if b.shape[1] != r:
        raise CompatibilityError(f"lora_B has {b.shape[1]} columns, lora_A {r} rows")
    if a.dim() > 2 or b.dim() > 2:  # convolutions: B is out x r x 1..., A is r x in x k...
        if any(k != 1 for k in b.shape[2:]) or len(shape) != a.dim():
            raise CompatibilityError(f"convolution LoRA with B of shape {list(b.shape)}: only 1x1 B can be merged")
        left, right = b.reshape(b.shape[0], r) * scale, a.reshape(r, -1)
        if (left.shape[0], right.shape[1]) != (rows, cols):
            raise CompatibilityError(f"LoRA of {[left.shape[0], right.shape[1]]} for a tensor of shape {list(shape)}")
        return LowRankDelta(left, right, "conv", tuple(a.shape), tuple(b.shape))
    if len(shape) != 2:
        raise CompatibilityError(f"linear LoRA for a tensor of shape {list(shape)}")
    if fan_in_fan_out:  # weight stored (in, out): delta = s (B A)^T
        if (a.shape[1], b.shape[0]) != (rows, cols):
            raise CompatibilityError(f"fan_in_fan_out LoRA of {[a.shape[1], b.shape[0]]} for a tensor of shape "
                                     f"{list(shape)}")
        return LowRankDelta(a.T.contiguous() * scale, b.T.contiguous(), "transposed")
    if (b.shape[0], a.shape[1]) != (rows, cols):
        raise CompatibilityError(f"LoRA of {[b.shape[0], a.shape[1]]} for a tensor of shape {list(shape)}")
    return LowRankDelta(b * scale, a, "linear")
