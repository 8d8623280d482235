"""Fixtures for the Hub tests: the fake Hub (a test double on 127.0.0.1), huggingface_hub pointed at
it with a private cache, and tiny Llama-shaped models built here.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_CACHE and HF_HUB_DISABLE_XET once, at
import, into ``huggingface_hub.constants`` (ENDPOINT and the /resolve URL template
HUGGINGFACE_CO_URL_TEMPLATE derived from it); functions read those attributes at call time, and a new
``HfApi()`` takes ``constants.ENDPOINT`` when built. So the fixture sets the environment variables
(for anything reading them later) and patches the constants (for this already-imported library).
HF_TOKEN is read from the environment at call time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.fake_hub import FakeHub
from tests.modelgen import finetunes, write_checkpoint

CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "tie_word_embeddings": False,
}


def tiny_llama(seed: int = 0, *, vocab: int = 64, hidden: int = 16, inter: int = 32, layers: int = 2) -> dict[str, torch.Tensor]:
    """Tensors named and shaped like a Llama checkpoint (small), float32."""
    gen = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=gen)
        t[p + "self_attn.k_proj.weight"] = torch.randn(hidden, hidden, generator=gen)
        t[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=gen)
        t[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=gen)
        t[p + "input_layernorm.weight"] = torch.ones(hidden)
    t["model.norm.weight"] = torch.ones(hidden)
    t["lm_head.weight"] = torch.randn(vocab, hidden, generator=gen)
    return t


def set_hub_env(monkeypatch: pytest.MonkeyPatch, url: str, root: Path, *, offline: bool = False,
                token: str | None = None) -> None:
    """Point the already-imported huggingface_hub at ``url`` with caches under ``root``; no waits
    between retries."""
    from huggingface_hub import constants

    from hf_model_stock.hub import retry

    monkeypatch.setattr(retry, "_backoff", lambda s: None)

    cache = root / "hf-cache"
    env = {"HF_ENDPOINT": url, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_OFFLINE": "1" if offline else "0", "HF_MODEL_STOCK_CACHE": str(root / "hfms-cache"),
           "HF_TOKEN_PATH": str(root / "no-token"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(root / "no-token"))


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fresh fake Hub with huggingface_hub pointed at it (online, empty cache, no token)."""
    with FakeHub() as fake:
        set_hub_env(monkeypatch, fake.url, tmp_path)
        yield fake


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """A base and three fine-tunes on disk (two shards each), with a Llama config."""
    base = tiny_llama(0)
    out = {"base": write_checkpoint(tmp_path / "src" / "base", base, shards=2, config=CONFIG)}
    for i, ft in enumerate(finetunes(base, 3, seed=1)):
        out[f"ft{i}"] = write_checkpoint(tmp_path / "src" / f"ft{i}", ft, shards=2, config=CONFIG)
    return out
