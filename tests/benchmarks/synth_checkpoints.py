"""Synthetic Llama-shaped checkpoints for merge benchmarks.

Builds a base model and N "fine-tunes" as sharded bf16 safetensors with a
``model.safetensors.index.json`` and a real ``LlamaConfig`` ``config.json``, without ever
instantiating a torch model. The fine-tune deltas have a controlled pairwise cosine::

    d_i = s * (sqrt(c) * common + sqrt(1 - c) * noise_i)      =>  cos(d_i, d_j) ~= c

with ``s = delta_rel * rms(w_0)`` so that ``||d_i|| ~= delta_rel * ||w_0||``. Rounding the
fine-tunes to bf16 adds a little independent noise, so the realised cosine is slightly lower
than ``c`` (the benchmark reports the realised value).

Speed: random numbers come from one seeded standard-normal pool (2**25 float32); every chunk of
every tensor/role reads a slice of the pool at a pseudo-random offset derived from
(seed, tensor name, chunk, role). Slices at different offsets are uncorrelated, so the cosines
hold, and generation runs at memory speed instead of ``torch.randn`` speed (~100 M/s here).
Memory: one output shard plus a few float32 chunk buffers; models are written one at a time,
regenerating the shared base/common parts (cheap) instead of holding N+1 shards.

Example::

    spec = ModelSpec.for_size(size_gib=0.92)
    paths = build_models(spec, n_models=3, cosine=0.3, workdir=Path("/tmp/hfms-bench"))
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

GENERATOR_VERSION = 1  # bump when the generated values change, to invalidate caches
POOL_ELEMS = 1 << 25  # 128 MiB of float32
CHUNK_ELEMS = 1 << 22  # elements generated per step
BF16_BYTES = 2


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a Llama-style decoder (TinyLlama-like defaults: GQA 32/4 heads)."""

    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 8
    vocab_size: int = 32000
    num_attention_heads: int = 32
    num_key_value_heads: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @staticmethod
    def layer_params(hidden: int, inter: int, heads: int, kv_heads: int) -> int:
        """Parameters of one decoder layer (attention + MLP + two RMSNorms)."""
        kv_dim = kv_heads * (hidden // heads)
        return 2 * hidden * hidden + 2 * kv_dim * hidden + 3 * hidden * inter + 2 * hidden

    @classmethod
    def for_size(
        cls,
        size_gib: float,
        embedding_gib: float | None = None,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        vocab_size: int = 32000,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 4,
    ) -> ModelSpec:
        """Pick the layer count (and vocab, if ``embedding_gib``) that best matches ``size_gib``.

        ``embedding_gib`` sets the size of ``embed_tokens`` (and of the untied ``lm_head``,
        which has the same shape) by growing the vocabulary. For small sizes the hidden and
        intermediate sizes are halved until at least two layers fit; at least one layer is kept.
        """
        if embedding_gib is not None:
            rows = embedding_gib * 2**30 / (hidden_size * BF16_BYTES)
            vocab_size = max(64, int(round(rows / 64)) * 64)
        target = size_gib * 2**30 / BF16_BYTES
        while True:
            per_layer = cls.layer_params(
                hidden_size, intermediate_size, num_attention_heads, num_key_value_heads
            )
            fixed = 2 * vocab_size * hidden_size + hidden_size  # embed + lm_head + final norm
            layers = int(round((target - fixed) / per_layer))
            if layers >= 2 or embedding_gib is not None or hidden_size <= 256:
                break
            hidden_size, intermediate_size = hidden_size // 2, intermediate_size // 2
        return cls(
            hidden_size, intermediate_size, max(1, layers), vocab_size,
            num_attention_heads, num_key_value_heads,
        )

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in Hugging Face state-dict order."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def llama_config(self) -> dict:
        """A real ``transformers.LlamaConfig`` as a dict (so transformers can load the model)."""
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
            dtype="bfloat16",
        )
        return cfg.to_dict()


@dataclass(frozen=True)
class BuildParams:
    """Everything that determines the generated bytes (the cache key)."""

    spec: ModelSpec
    n_models: int
    cosine: float
    delta_rel: float = 0.01
    shard_mb: int = 500
    seed: int = 0
    version: int = GENERATOR_VERSION

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class BuiltModels:
    """Paths of a built (or cached) set of checkpoints."""

    root: Path
    base: Path
    finetunes: list[Path]
    params: BuildParams
    build_seconds: float | None  # None when reused from the cache

    @property
    def all_models(self) -> list[Path]:
        return [self.base, *self.finetunes]

    def input_files(self) -> list[Path]:
        """Every file a merge reads: shards, index and config of base + fine-tunes."""
        files: list[Path] = []
        for model in self.all_models:
            files += sorted(model.glob("*.safetensors"))
            files += [model / "model.safetensors.index.json", model / "config.json"]
        return files

    def input_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.input_files())


def _offset(seed: int, name: str, chunk: int, role: str, n: int) -> int:
    """Deterministic pseudo-random start of a pool slice of length ``n``."""
    digest = hashlib.blake2b(f"{seed}|{name}|{chunk}|{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (POOL_ELEMS - n + 1)


def _base_stats(name: str) -> tuple[float, float]:
    """(mean, std) of the base weights: RMSNorm weights near 1, matrices N(0, 0.02)."""
    return (1.0, 0.05) if name.endswith("norm.weight") else (0.0, 0.02)


def _fill_tensor(
    out: torch.Tensor, name: str, model_idx: int, pool: torch.Tensor, p: BuildParams
) -> None:
    """Write the values of tensor ``name`` for model ``model_idx`` (0 = base) into ``out``."""
    flat = out.view(-1)
    mean, std = _base_stats(name)
    scale = p.delta_rel * math.sqrt(mean * mean + std * std)
    a, b = scale * math.sqrt(p.cosine), scale * math.sqrt(1.0 - p.cosine)
    for c, start in enumerate(range(0, flat.numel(), CHUNK_ELEMS)):
        n = min(CHUNK_ELEMS, flat.numel() - start)
        sl = lambda role, c=c, n=n: pool.narrow(0, _offset(p.seed, name, c, role, n), n)  # noqa: E731
        w0 = (sl("base") * std + mean).to(torch.bfloat16)
        if model_idx == 0:
            flat[start : start + n] = w0
            continue
        w = w0.float()
        w.add_(sl("common"), alpha=a).add_(sl(f"noise{model_idx}"), alpha=b)
        flat[start : start + n] = w.to(torch.bfloat16)


def plan_shards(spec: ModelSpec, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy, in-order packing of tensors into shards of at most ``shard_bytes`` (a larger
    tensor gets a shard of its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in spec.tensors():
        nbytes = math.prod(shape) * BF16_BYTES
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    return shards


def _write_model(out_dir: Path, model_idx: int, pool: torch.Tensor, p: BuildParams) -> None:
    """Write one checkpoint (shards, index, config) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(p.spec, p.shard_mb * 10**6)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in shard:
            t = torch.empty(shape, dtype=torch.bfloat16)
            _fill_tensor(t, name, model_idx, pool, p)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * BF16_BYTES
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(p.spec.llama_config(), indent=2))


def build_models(
    spec: ModelSpec,
    n_models: int,
    cosine: float,
    workdir: Path,
    delta_rel: float = 0.01,
    shard_mb: int = 500,
    seed: int = 0,
    log=print,
) -> BuiltModels:
    """Build base + ``n_models`` fine-tunes under ``workdir/models/<key>`` or reuse the cache.

    A finished build is marked by ``build.json``; a partial one is deleted and rebuilt.
    """
    if not 0.0 <= cosine < 1.0:
        raise ValueError(f"--cosine must be in [0, 1) for this generator, got {cosine}")
    p = BuildParams(spec, n_models, cosine, delta_rel, shard_mb, seed)
    root = workdir / "models" / p.key()
    names = ["base"] + [f"ft{i}" for i in range(1, n_models + 1)]
    built = BuiltModels(root, root / "base", [root / n for n in names[1:]], p, None)
    if (root / "build.json").exists():
        log(f"reusing cached models in {root}")
        return built
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_ELEMS, generator=gen, dtype=torch.float32)
    for idx, name in enumerate(names):
        log(f"building {name} ({spec.num_params() * BF16_BYTES / 2**30:.2f} GiB) in {root / name}")
        _write_model(root / name, idx, pool, p)
    built.build_seconds = time.perf_counter() - t0
    (root / "build.json").write_text(
        json.dumps({"params": asdict(p), "build_seconds": built.build_seconds}, indent=2)
    )
    return built
