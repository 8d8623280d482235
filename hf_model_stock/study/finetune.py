"""Seeded fine-tuning: the same base, data and hyperparameters for every run; only the seed differs,
and the seed only sets the order in which the training items are drawn (nothing else is random: the
weights start from the base and SmolLM2 has no dropout).

Full fine-tuning with AdamW (constant learning rate after a short linear warm-up, gradient clipping at
1.0), loss on the solution tokens only (the question is context, as in the evaluation), float32
weights, saved as float32 safetensors: the deltas of a short fine-tune are below bf16's resolution.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hf_model_stock.study.data import Item, token_ids

SETTINGS_FILE = "study-finetune.json"


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters shared by every fine-tune of the study."""

    steps: int = 6
    batch_size: int = 8
    max_length: int = 192  # training items longer than this (question + solution tokens) are not used
    learning_rate: float = 1e-4
    warmup_steps: int = 2
    max_grad_norm: float = 1.0

    def describe(self) -> str:
        return (f"{self.steps} AdamW steps x {self.batch_size} items (<= {self.max_length} tokens each), "
                f"lr {self.learning_rate:g} ({self.warmup_steps} warm-up steps), clip {self.max_grad_norm:g}")


@dataclass
class FinetuneResult:
    """One fine-tune: where it is, its seed, the loss at each step, and whether it was reused."""

    path: Path
    seed: int
    losses: list[float]
    seconds: float
    reused: bool = False


def usable_items(tokenizer: Any, items: Sequence[Item], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, solution ids) of the items that fit in ``max_length`` tokens, in their order."""
    out = []
    for item in items:
        context, solution = token_ids(tokenizer, item)
        if len(context) + len(solution) <= max_length:
            out.append((context, solution))
    return out


def data_order(n_items: int, seed: int, count: int) -> list[int]:
    """``count`` indices into the training items: a permutation drawn from ``seed``, a fresh one each
    pass over the data."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < count:
        order += torch.randperm(n_items, generator=generator).tolist()
    return order[:count]


def _batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded input ids, attention mask, and labels on the solution tokens only."""
    import torch

    width = max(len(c) + len(s) for c, s in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (context, solution) in enumerate(examples):
        n = len(context) + len(solution)
        ids[row, :n] = torch.tensor(context + solution)
        labels[row, len(context):n] = torch.tensor(solution)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fingerprint(base_dir: Path, settings: TrainSettings, seed: int, n_train: int) -> dict[str, Any]:
    """What a saved fine-tune was made from; a fine-tune with another fingerprint is made again."""
    source = base_dir / "demo-source.txt"
    return {"base": str(base_dir.resolve()), "base_source": source.read_text().strip() if source.is_file() else "",
            "settings": asdict(settings), "seed": seed, "train_items": n_train, "format": 1}


def finetune(base_dir: Path, out_dir: Path, examples: Sequence[tuple[list[int], list[int]]], seed: int,
             settings: TrainSettings, device: str = "cpu", log: Any | None = None) -> FinetuneResult:
    """Fine-tune ``base_dir`` on ``examples`` (from ``usable_items``) in the order ``seed`` draws;
    save it (float32, with the base's tokenizer) to ``out_dir``. A fine-tune already there with the
    same fingerprint is reused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stamp = fingerprint(base_dir, settings, seed, len(examples))
    saved = out_dir / SETTINGS_FILE
    if saved.is_file() and any(out_dir.glob("*.safetensors")):
        record = json.loads(saved.read_text(encoding="utf-8"))
        if record.get("fingerprint") == stamp:
            return FinetuneResult(out_dir, seed, record["losses"], record["seconds"], reused=True)
    start = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = model.to(device)  # type: ignore[arg-type]  # transformers' decorator hides .to's signature
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(settings.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    order = data_order(len(examples), seed, settings.steps * settings.batch_size)
    losses = []
    for step in range(settings.steps):
        picked = [examples[i] for i in order[step * settings.batch_size:(step + 1) * settings.batch_size]]
        batch = {k: v.to(device) for k, v in _batch(picked, pad_id).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log is not None:
            print(f"      seed {seed} step {step + 1}/{settings.steps}: loss {losses[-1]:.4f}", file=log, flush=True)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    seconds = time.perf_counter() - start
    saved.write_text(json.dumps({"fingerprint": stamp, "losses": losses, "seconds": seconds}, indent=1) + "\n",
                     encoding="utf-8")
    return FinetuneResult(out_dir, seed, losses, seconds)
