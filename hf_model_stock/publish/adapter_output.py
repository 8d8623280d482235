"""Writing a merged LoRA adapter (``output.format: adapter``): ``adapter_model.safetensors`` and
``adapter_config.json`` as peft writes them, so that ``PeftModel.from_pretrained(base, out)`` loads it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hf_model_stock.merge.adapter_out import AdapterMerge
from hf_model_stock.sources.adapters import ADAPTER_WEIGHTS


def write_adapter(merged: AdapterMerge, directory: Path) -> dict[str, str]:
    """Write the adapter's weights and config into ``directory``; returns {weights file: sha256}."""
    from safetensors.torch import save_file

    path = directory / ADAPTER_WEIGHTS
    save_file(merged.tensors, str(path), metadata={"format": "pt"})
    merged.config.save_pretrained(str(directory))
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return {ADAPTER_WEIGHTS: digest.hexdigest()}
