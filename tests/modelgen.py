"""Build small checkpoints for tests: tensors written with the safetensors library itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_checkpoint(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    config: dict | None = None,
) -> Path:
    """Save ``tensors`` as ``shards`` safetensors files (+ index when > 1) and an optional config."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        groups = [names[i::shards] for i in range(shards)]
        weight_map = {}
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k].contiguous() for k in group}, str(directory / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in group})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def finetunes(
    base: dict[str, torch.Tensor],
    n: int,
    *,
    scale: float = 0.01,
    shared: float = 0.5,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``n`` fine-tunes: base + scale*|w|*(sqrt(shared)*common + sqrt(1-shared)*own) per floating tensor,
    so pairwise delta cosines are about ``shared``. Non-floating tensors are copied."""
    gen = torch.Generator().manual_seed(seed)
    common = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()
              if v.is_floating_point()}
    out = []
    for _ in range(n):
        model = {}
        for k, v in base.items():
            if not v.is_floating_point():
                model[k] = v.clone()
                continue
            own = torch.randn(v.shape, generator=gen, dtype=torch.float64)
            size = scale * (v.double().abs().mean() + 1e-3)
            delta = size * (shared**0.5 * common[k] + (1 - shared) ** 0.5 * own)
            model[k] = (v.double() + delta).to(v.dtype)
        out.append(model)
    return out
