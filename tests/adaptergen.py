"""Tiny transformers models and PEFT LoRA adapters of them, made with peft itself, and an independent
float64 densification of an adapter (B @ A * scale, read straight from its files) for references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."


def tiny_config(tie: bool = False, vocab: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)


def tiny_base(directory: Path, *, tie: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A 2-layer Llama with hidden size 32, saved with save_pretrained."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tie)).to(dtype)
    model.save_pretrained(directory)
    return directory


def make_adapter(base_dir: Path, directory: Path, *, seed: int, scale: float = 0.05, **lora: object) -> Path:
    """A LoRA adapter of ``base_dir`` made with ``peft.get_peft_model``, its factors (and any
    ``modules_to_save`` copies) set to random values so that its delta is not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(directory)
    return directory


def _pattern(patterns: dict, module: str, default: float) -> float:
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return default


def dense_deltas(adapter_dir: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor's float64 delta that the adapter adds to ``base`` (a state dict): s·B@A for LoRA
    modules (transposed for embeddings), the saved weight minus the base's for whole tensors."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    sd = {k[len(PREFIX):]: v.double() for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    out: dict[str, torch.Tensor] = {}
    for key, a in sd.items():
        emb = key.endswith(".lora_embedding_A")
        if not (key.endswith(".lora_A.weight") or emb):
            continue
        module = key[: -len(".lora_embedding_A")] if emb else key[: -len(".lora_A.weight")]
        b = sd[module + (".lora_embedding_B" if emb else ".lora_B.weight")]
        r = a.shape[0]
        assert r == _pattern(cfg.get("rank_pattern"), module, cfg["r"])
        alpha = _pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        delta = b @ a * s
        out[module + ".weight"] = delta.T if emb else delta
    for key, w in sd.items():
        if "lora_" not in key and ".base_layer." not in key:
            out[key] = w - base[key].double()
    return out


def densified(adapter_dir: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fine-tune an adapter stands for, in float64: base + its deltas."""
    deltas = dense_deltas(adapter_dir, base)
    return {k: v.double() + deltas[k] if k in deltas else v.double() for k, v in base.items()}


def peft_merged(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """peft's own ``merge_and_unload`` of an adapter onto the base (float32)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
