"""A Model Stock merge of LoRA adapters that stays a LoRA adapter.

With every fine-tune an adapter, the merge ``w0 + t/N Σ_i s_i B_i A_i`` is exactly a LoRA of rank
``Σ r_i`` per module: ``B = [t/N s_1 B_1 | ... | t/N s_N B_N]`` and ``A = [A_1; ...; A_N]`` (t folded
into B, per row for a filter-wise merge), with scale 1 (``lora_alpha = r`` for every module). Tensors
that some adapter stores whole (``modules_to_save``) are merged densely (from the base's tensor, read
whole) and saved as the output's ``modules_to_save``. Tensors no adapter touches stay the base's: the
adapter does not carry them. Nothing is streamed; only the base tensors of whole-stored modules are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_model_stock.errors import ModelStockError
from hf_model_stock.io.dtypes import storage_dtype, torch_dtype
from hf_model_stock.merge.executor import tensor_stats
from hf_model_stock.merge.lowrank import LowRankCompute
from hf_model_stock.merge.plan import MergePlan
from hf_model_stock.merge.stats import TensorStats
from hf_model_stock.methods.registry import METHODS
from hf_model_stock.sources.adapters import PEFT_PREFIX, DenseWeight, LowRankDelta


@dataclass
class AdapterMerge:
    """The merged adapter: its safetensors state dict (peft's key names), its LoraConfig, the stats."""

    tensors: dict[str, Any]
    config: Any  # peft.LoraConfig
    stats: list[TensorStats]


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def check_adapter_output(plan: MergePlan) -> None:
    """Refuse an adapter output unless every fine-tune is a LoRA adapter."""
    full = [m.label for i, m in enumerate(plan.models) if i not in plan.adapters]
    if full:
        raise ModelStockError(f"output format adapter: every fine-tune must be a LoRA adapter; {', '.join(full)} "
                              f"{'is a full model' if len(full) == 1 else 'are full models'} (write a full model instead)")


def merge_adapters(plan: MergePlan) -> AdapterMerge:
    """Merge the plan's adapters into one LoRA adapter (see the module docstring)."""
    import torch
    from peft import LoraConfig
    from safetensors import safe_open

    check_adapter_output(plan)
    opts = plan.options
    n = len(plan.models)
    ratio_fn = METHODS[opts.method]
    first = plan.adapters[min(plan.adapters)]
    lora_dtype = torch_dtype(opts.dtype or first.dtype)
    compute = LowRankCompute()
    tasks = [t for t in plan.tasks if t.merge]
    dense_modules = {_module(t.name) for t in tasks if any(isinstance(d, DenseWeight) for d in t.deltas)}
    out: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    stats: dict[str, TensorStats] = {}
    for task in plan.tasks:
        if not task.merge:
            stats[task.name] = TensorStats(task.name, list(task.shape), [task.inputs[0].dtype], task.out_dtype, "copy")
            continue
        granularity = "filter" if task.filter_wise else "layer"
        if _module(task.name) in dense_modules:
            base = task.inputs[0]
            with safe_open(str(base.path), framework="pt") as f:
                w0 = f.get_tensor(task.name).contiguous()
            view = w0.reshape(-1).view(torch.uint8).numpy().view(storage_dtype(base.dtype))
            merged = np.empty(task.numel, storage_dtype(task.out_dtype))
            ratio = compute.merge(task, [view], 0, task.numel, merged, ratio_fn, opts.params)
            out[PEFT_PREFIX + task.name] = torch.from_numpy(merged).view(torch_dtype(task.out_dtype)).reshape(task.shape)
            stats[task.name] = tensor_stats(task, ratio, granularity)
            continue
        lows: list[LowRankDelta] = list(task.deltas)  # type: ignore[arg-type]
        g = compute.parts_gram(task, [d.left for d in lows])
        ratio = ratio_fn(g if task.filter_wise else g.sum(0), opts.params)
        stats[task.name] = tensor_stats(task, ratio, granularity)
        used = [d for d in lows if d.rank]
        if not used:
            continue
        scale = torch.as_tensor(np.asarray(ratio.t, dtype=np.float64) / n)
        scale = scale.reshape(-1, 1) if scale.ndim else scale
        left = torch.cat([scale * d.left for d in used], dim=1)
        right = torch.cat([d.right for d in used], dim=0)
        module = _module(task.name)
        ranks[module] = left.shape[1]
        out.update(_peft_factors(PEFT_PREFIX + module, used, left, right, lora_dtype))
    if not ranks and not dense_modules:
        raise ModelStockError("the merged adapter would be empty: no adapter changes any tensor of the base")
    r = max(ranks.values(), default=1)
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks) or None,
        rank_pattern={m: k for m, k in ranks.items() if k != r},
        alpha_pattern={m: k for m, k in ranks.items() if k != r},
        modules_to_save=sorted(dense_modules) or None,
        fan_in_fan_out=first.fan_in_fan_out,
        task_type=first.config.task_type,
        base_model_name_or_path=plan.base.repo_id or str(plan.base.path),
        revision=plan.base.commit,
        bias="none",
        use_rslora=False,
        inference_mode=True,
    )
    order = [t.name for t in plan.tasks]
    return AdapterMerge(tensors=out, config=config, stats=[stats[k] for k in order])


def _peft_factors(prefix: str, used: list[LowRankDelta], left: Any, right: Any, dtype: Any) -> dict[str, Any]:
    """``left @ right`` as peft stores the module's factors (see ``sources.adapters.LowRankDelta``)."""
    layout = used[0].layout
    rank = left.shape[1]
    if layout == "embedding":
        return {f"{prefix}.lora_embedding_A": left.T.contiguous().to(dtype),
                f"{prefix}.lora_embedding_B": right.T.contiguous().to(dtype)}
    if layout == "transposed":
        a, b = left.T, right.T
    elif layout == "conv":
        b_shape, a_shape = used[0].b_shape or (), used[0].a_shape or ()
        b = left.reshape(left.shape[0], rank, *b_shape[2:])
        a = right.reshape(rank, *a_shape[1:])
    else:
        a, b = right, left
    return {f"{prefix}.lora_A.weight": a.contiguous().to(dtype), f"{prefix}.lora_B.weight": b.contiguous().to(dtype)}

