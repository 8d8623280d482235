"""Periodic Model Stock merging during training (paper, section 4), on a CPU in a few seconds.

Three runs of a tiny LlamaForCausalLM (hidden 32, 2 layers) start from one initialisation and train
on the same synthetic task with different seeds and data order. Every ``--every`` steps the three
runs' weights are replaced by their Model Stock merge anchored at the initial weights, and all three
continue from there.

    python examples/periodic_merge.py [--runs 3] [--steps 12] [--every 4]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from torch.utils.data import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_model_stock.analysis.training import PeriodicModelStock, train_in_lockstep

VOCAB, SEQ = 64, 16


class Arithmetic(Dataset):
    """Sequences x, x+s, x+2s, ... (mod VOCAB): the next token follows from the previous two."""

    def __init__(self, size: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (size, 1), generator=gen)
        step = torch.randint(1, 8, (size, 1), generator=gen)
        self.ids = (start + step * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[k], "labels": self.ids[k]}


class LossLog(TrainerCallback):
    """Collect the training loss each run logs."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 (transformers signature)
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


def make_trainer(model: LlamaForCausalLM, seed: int, steps: int, out: str, callbacks: list) -> Trainer:
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-3,
        seed=seed, data_seed=seed, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Arithmetic(512, seed), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # losses are collected by LossLog instead
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()

    pretrained = tiny_llama()
    stock = PeriodicModelStock(pretrained, n_runs=args.runs, every=args.every)
    logs = [LossLog() for _ in range(args.runs)]
    models = [copy.deepcopy(pretrained) for _ in range(args.runs)]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = [make_trainer(m, seed=100 + k, steps=args.steps, out=f"{tmp}/run{k}", callbacks=[logs[k], stock.callback()])
                    for k, m in enumerate(models)]
        train_in_lockstep(trainers, stock)

    for event in stock.history:
        ts = list(event.t.values())
        print(f"step {event.step:3d}: merged {len(ts)} tensors, t mean {sum(ts) / len(ts):.3f} "
              f"min {min(ts):.3f} max {max(ts):.3f}")
    for k, log in enumerate(logs):
        print(f"run {k}: loss {log.losses[0]:.3f} -> {log.losses[-1]:.3f}")
    same = all(torch.equal(p, q) for m in models[1:] for p, q in zip(models[0].parameters(), m.parameters()))
    print(f"runs hold identical weights at the end: {same}")


if __name__ == "__main__":
    main()
