"""Periodic Model Stock during training: real Trainer runs of a tiny Llama on the CPU, each merge
checked against a float64 reference of the formula written here."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_model_stock.analysis.training import (
    PeriodicModelStock,
    merge_checkpoints,
    train_in_lockstep,
)
from hf_model_stock.errors import ModelStockError

VOCAB, SEQ = 48, 12


def reference(w0: torch.Tensor, ws: list[torch.Tensor], eps: float = 1e-8) -> tuple[torch.Tensor, float]:
    """Model Stock in float64, from the paper's formula: w0 + t * mean(w_i - w0), t clamped to [0, 1]."""
    d = [w.double().flatten() - w0.double().flatten() for w in ws]
    n = len(d)
    cos = [float(d[i] @ d[j]) / (float(d[i].norm()) * float(d[j].norm()) + eps)
           for i, j in itertools.combinations(range(n), 2)]
    c = min(1.0, max(-1.0, sum(cos) / len(cos)))
    t = min(1.0, max(0.0, n * c / (1 + (n - 1) * c)))
    return w0.double() + t * torch.stack(d).mean(0).reshape(w0.shape), t


class Tokens(Dataset):
    """Sequences x, x+s, x+2s, ... (mod VOCAB): one task, so the runs' updates share a direction."""

    def __init__(self, seed: int, size: int = 64):
        gen = torch.Generator().manual_seed(seed)
        start, step = torch.randint(0, VOCAB, (size, 1), generator=gen), torch.randint(1, 6, (size, 1), generator=gen)
        self.ids = (start + step * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[k], "labels": self.ids[k]}


class Snapshots(TrainerCallback):
    """Copies the run's parameters at the end of every step (float64)."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step] = {k: v.detach().double().clone() for k, v in model.named_parameters()}


class Before(Snapshots):
    """Placed before the Model Stock callback: the weights just before a merge."""


class After(Snapshots):
    """Placed after it: the weights just after a merge."""


class FirstWeights(TrainerCallback):
    """The parameters when the first step of a (resumed) run begins."""

    step: int
    weights: dict[str, torch.Tensor]

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not hasattr(self, "weights"):
            self.step = state.global_step
            self.weights = {k: v.detach().clone() for k, v in model.named_parameters()}


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
                                        tie_word_embeddings=tied))


def trainer(model, seed: int, out: Path, steps: int, callbacks: list, **kw) -> Trainer:
    options = {"save_strategy": "no", **kw}
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
                             seed=seed, data_seed=seed, report_to="none", disable_tqdm=True, use_cpu=True,
                             logging_strategy="no", **options)
    t = Trainer(model=model, args=args, train_dataset=Tokens(seed), callbacks=callbacks)
    t.remove_callback(PrinterCallback)
    return t


@pytest.mark.parametrize("n, tied", [(2, True), (3, False)])
def test_periodic_merge_equals_float64_reference(tmp_path, n, tied):
    pretrained = tiny_llama(tied)
    w0 = {k: v.detach().clone() for k, v in pretrained.named_parameters()}
    stock = PeriodicModelStock(pretrained, n_runs=n, every=2)
    before, after = [Before() for _ in range(n)], [After() for _ in range(n)]
    models = [copy.deepcopy(pretrained) for _ in range(n)]
    trainers = [trainer(models[k], 10 + k, tmp_path / f"run{k}", 5, [before[k], stock.callback(), after[k]])
                for k in range(n)]
    train_in_lockstep(trainers, stock)

    # steps 2 and 4 (every 2) and 5 (the last step): merged; steps 1 and 3: not
    assert [e.step for e in stock.history] == [2, 4, 5]
    for step, event in zip([2, 4, 5], stock.history):
        assert set(event.t) == set(w0)
        for name, w in w0.items():
            pre = [before[k].by_step[step][name] for k in range(n)]
            assert not all(torch.equal(pre[0], p) for p in pre[1:]), f"{name}: runs did not diverge"
            ref, t = reference(w, pre)
            assert event.t[name] == pytest.approx(t, abs=1e-12)
            got = after[0].by_step[step][name]
            ulp = torch.finfo(torch.float32).eps * ref.abs()
            assert ((got - ref).abs() <= ulp).all(), f"step {step} {name}: off the float64 reference"
            assert (got == ref.float().double()).double().mean() > 0.99
            for k in range(1, n):
                assert torch.equal(after[k].by_step[step][name], got), f"run {k} differs after the merge"
        assert sum(0 < t < 1 for t in event.t.values()) > len(w0) // 2  # mostly a real interpolation
    for step in (1, 3):  # no merge: the runs differ
        assert not torch.equal(after[0].by_step[step]["model.norm.weight"], after[1].by_step[step]["model.norm.weight"])
    # after a merge, training continues from the merged weights
    assert not torch.equal(before[0].by_step[4]["model.norm.weight"], after[0].by_step[2]["model.norm.weight"])
    if tied:
        assert all(m.lm_head.weight is m.model.embed_tokens.weight for m in models)


def test_mismatched_model_is_refused():
    stock = PeriodicModelStock(tiny_llama(False), n_runs=2, every=1)
    cb = stock.callback()
    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ModelStockError, match=r"model.embed_tokens.weight.*\[49, 16\] vs pre-trained: shape \[48, 16\]"):
        cb.on_train_begin(None, None, None, model=other)
    stock.callback()
    with pytest.raises(ModelStockError, match="already have a callback"):
        stock.callback()


def test_a_failing_run_releases_the_others():
    stock = PeriodicModelStock(tiny_llama(False), n_runs=2, every=1, timeout=60)

    class Fails:
        def train(self):
            raise RuntimeError("boom")

    class Waits:
        error = None

        def train(self):
            try:
                stock.arrive(1, 1)
            except ModelStockError as exc:
                Waits.error = exc
                raise

    with pytest.raises(RuntimeError, match="boom"):
        train_in_lockstep([Fails(), Waits()], stock)  # returns only once the waiting run was released
    assert "did not reach step 1" in str(Waits.error)


def test_alone_at_the_barrier_times_out():
    stock = PeriodicModelStock(tiny_llama(False), n_runs=2, every=1, timeout=0.2)
    with pytest.raises(ModelStockError, match="did not reach step 3"):
        stock.arrive(0, 3)


def test_merge_checkpoints_then_resume(tmp_path):
    pretrained = tiny_llama(False)
    pretrained.save_pretrained(tmp_path / "pretrained")
    ckpts = []
    for k in range(3):
        t = trainer(copy.deepcopy(pretrained), 20 + k, tmp_path / f"run{k}", 2, [], save_strategy="steps", save_steps=2)
        t.train()
        ckpts.append(tmp_path / f"run{k}" / "checkpoint-2")
    trained = [load_file(c / "model.safetensors") for c in ckpts]
    w0 = load_file(tmp_path / "pretrained" / "model.safetensors")

    report = merge_checkpoints(tmp_path / "pretrained", ckpts)

    merged = [load_file(c / "model.safetensors") for c in ckpts]
    assert set(merged[0]) == set(w0)
    by_name = {r.name: r for r in report.tensors}
    for name, w in w0.items():
        ref, t = reference(w, [m[name] for m in trained])
        assert by_name[name].t == pytest.approx(t, abs=1e-5)
        got = merged[0][name]
        assert got.dtype == torch.float32
        # the merger evaluates w0 + t/N * sum_i d_i in float32: its error is a few eps of those terms
        terms = w.double().abs() + sum((m[name].double() - w.double()).abs() for m in trained)
        bound = 2 * torch.finfo(torch.float32).eps * terms
        assert ((got.double() - ref).abs() <= bound).all(), name
        assert all(torch.equal(m[name], got) for m in merged[1:])
        assert not torch.equal(got, trained[0][name]) and not torch.equal(got, trained[1][name])
    for c in ckpts:
        assert (c / "optimizer.pt").is_file() and not list(c.glob("*.tmp"))

    # the run resumes from the merged weights: step 3 starts where the merge left it
    first = FirstWeights()
    t = trainer(copy.deepcopy(pretrained), 20, tmp_path / "run0", 3, [first])
    t.train(resume_from_checkpoint=str(ckpts[0]))
    assert first.step == 2  # the resumed run starts at step 3
    assert first.weights.keys() == merged[0].keys()
    assert all(torch.equal(first.weights[n], merged[0][n]) for n in merged[0])
