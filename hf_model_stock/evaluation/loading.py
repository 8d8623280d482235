"""Models for evaluation: resolve ``dir`` or ``org/name[@rev]``, load with transformers, wrap for lm-eval."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_model_stock.evaluation.errors import EvalError

if TYPE_CHECKING:
    from lm_eval.api.model import LM

    from hf_model_stock.eval_spec import EvalSpec
    from hf_model_stock.sources.resolve import ResolvedModel


def resolve_model(model: str) -> ResolvedModel:
    """A local snapshot of ``model`` (a directory, or a Hub repo with an optional ``@revision``)."""
    from hf_model_stock.recipe import ModelEntry
    from hf_model_stock.sources.resolve import resolve

    return resolve(ModelEntry.model_validate(model))


def check_custom_code(path: Path, trust_remote_code: bool) -> None:
    """Refuse, in one line, a model whose config maps its architecture to its own Python code
    (``auto_map``, for a ``model_type`` transformers does not know) unless ``trust_remote_code``.
    When transformers has its own class for the model_type, it uses it and runs no code from the repo."""
    from hf_model_stock.sources.remote_code import CODE_CONFIGS, auto_map_modules, read_auto_map

    if trust_remote_code:
        return
    config = path / "config.json"
    modules = {name: auto_map_modules(read_auto_map(path / name)) for name in CODE_CONFIGS}
    if not any(modules.values()):
        return
    from transformers import CONFIG_MAPPING

    from hf_model_stock.sources.resolve import read_json_object

    model_type = read_json_object(config).get("model_type") if config.is_file() else None
    if modules["config.json"] and model_type not in CONFIG_MAPPING:
        named = ", ".join(f"{m}.py" for m in modules["config.json"])
        raise EvalError(f"{config}: auto_map runs the model's own code ({named}) for model_type {model_type!r}, "
                        "which transformers does not know; pass --trust-remote-code (trust_remote_code: true in "
                        "evals) if you trust it")


def default_device(device: str | None) -> str:
    """``device``, else ``cuda`` when available, else ``cpu``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_causal_lm(path: Path, *, device: str, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer) from a local directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype if dtype == "auto" else getattr(torch, dtype), trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]  # transformers' decorator hides .to's signature


def build_lm(path: Path, spec: EvalSpec) -> LM:
    """The lm-eval model for ``spec.backend``: HFLM around a model we load, or vLLM on ``path``."""
    if spec.backend == "vllm":
        try:
            from lm_eval.models.vllm_causallms import VLLM
        except ImportError:
            raise EvalError("--backend vllm: vllm is not installed (pip install 'lm-eval[vllm]')") from None
        return VLLM(pretrained=str(path), tokenizer=str(path), dtype=spec.dtype, batch_size=spec.batch_size,
                    trust_remote_code=spec.trust_remote_code)
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_causal_lm(path, device=default_device(spec.device), dtype=spec.dtype,
                                      trust_remote_code=spec.trust_remote_code)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
