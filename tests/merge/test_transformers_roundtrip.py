"""A merged tiny Llama loads with AutoModelForCausalLM and computes the logits of the reference merge."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_model_stock.cli import main
from tests.reference import reference_merge


def tiny_llama(path: Path, seed: int, base_state=None, scale: float = 0.02) -> dict[str, torch.Tensor]:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if base_state is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                b = base_state[name].float()
                p.copy_((b + scale * b.std() * torch.randn(b.shape, generator=gen)).to(p.dtype))
    model.save_pretrained(path, max_shard_size="200KB")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_merged_model_loads_and_matches_in_memory_merge(tmp_path, capsys):
    base = tiny_llama(tmp_path / "base", 0)
    fts = [tiny_llama(tmp_path / f"ft{i}", i + 1, base) for i in range(3)]
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 1  # sharded input
    code = main(["merge", "--base", str(tmp_path / "base"), *sum([["--model", str(tmp_path / f"ft{i}")]
                 for i in range(3)], []), "--out", str(tmp_path / "merged"), "-q", "--shard-size", "300KB"])
    assert code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16

    reference = LlamaForCausalLM(merged.config).to(torch.bfloat16)
    state = {name: reference_merge(b, [f[name] for f in fts])[0].to(b.dtype) for name, b in base.items()}
    reference.load_state_dict(state)
    ids = torch.tensor([[1, 5, 17, 42, 99, 250]])
    with torch.no_grad():
        got, want = merged(ids).logits, reference(ids).logits
    assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=0)
    same = sum(torch.equal(merged.state_dict()[k], state[k]) for k in state)
    assert same >= len(state) - 2  # at most a couple of tensors differ, each by single-ulp roundings
