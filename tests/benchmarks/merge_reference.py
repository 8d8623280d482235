"""Independent float64 reference of Model Stock and output comparison, streamed in row chunks.

Per tensor (Jang et al. 2024, authors' formula)::

    d_i = w_i - w_0                                     (float64)
    cos = mean_{i<j} <d_i, d_j> / (||d_i|| ||d_j|| + eps)
    t   = clamp(N cos / (1 + (N - 1) cos), 0, 1)
    w_H = t * mean_i(w_i) + (1 - t) * w_0

Pass 1 accumulates the Gram matrix of the deltas in float64 over row chunks; pass 2 rebuilds the
reference chunk by chunk and compares every candidate output against it, so tensors of any size
fit in a few hundred MB.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

CHUNK_ELEMS = 1 << 22


class TensorLocator:
    """Find which ``.safetensors`` file of a model directory holds a tensor (headers only)."""

    def __init__(self, model_dir: Path, stack: ExitStack):
        self.handles: dict[str, object] = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            h = stack.enter_context(safe_open(str(f), framework="pt"))
            for key in h.keys():
                self.handles[key] = h

    def shape(self, name: str) -> list[int]:
        return list(self.handles[name].get_slice(name).get_shape())

    def shapes(self) -> dict[str, list[int]]:
        return {k: self.shape(k) for k in self.handles}

    def dtype(self, name: str) -> str:
        return self.handles[name].get_slice(name).get_dtype()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (a 1-D tensor is one 'row' of all its elements)."""
        sl = self.handles[name].get_slice(name)
        if len(sl.get_shape()) <= 1:
            return sl[:]
        return sl[start:stop]


def _row_chunks(shape: list[int], chunk_elems: int) -> list[tuple[int, int]]:
    if len(shape) <= 1:
        return [(0, 1)]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, chunk_elems // per_row)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def bf16_ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 ulps between two bf16 tensors (+0 and -0 are equal)."""

    def key(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (key(a) - key(b)).abs()


@dataclass
class Comparison:
    """How far one output tensor is from the float64 reference."""

    max_abs_err: float = 0.0
    mismatch_vs_ref_bf16: int = 0  # elements != bf16(reference)
    over_1ulp: int = 0  # elements more than 1 bf16 ulp from bf16(reference)
    max_ulp: int = 0  # dominated by elements near 0, where bf16 ulps are tiny
    numel: int = 0
    sq_err: float = 0.0  # sum of squared errors (float64)
    _dot: float = 0.0  # <out - w0, mean - w0>, for the implied t
    _dot_ref: float = 0.0  # <bf16(ref) - w0, mean - w0>
    t_ref: float = 0.0
    dtype: str = ""

    def as_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "max_abs_err": self.max_abs_err,
            "rms_err": math.sqrt(self.sq_err / max(1, self.numel)),
            "frac_mismatch_vs_ref_bf16": self.mismatch_vs_ref_bf16 / max(1, self.numel),
            "frac_over_1ulp": self.over_1ulp / max(1, self.numel),
            "max_ulp": self.max_ulp,
            # t scaled by how far the output moved along mean - w0, relative to bf16(reference)
            # (comparing with bf16(ref), not ref, cancels the shrinkage of rounding small deltas)
            "implied_t": self.t_ref * self._dot / self._dot_ref if self._dot_ref else None,
        }


@dataclass
class TensorReport:
    name: str
    shape: list[int]
    t: float
    cos: float
    pairwise_cos: list[float]
    delta_rel_norm: float  # mean ||d_i|| / ||w_0||
    ref_bf16_max_abs_err: float = 0.0  # rounding floor: max |bf16(ref) - ref|
    outputs: dict[str, Comparison] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": self.shape,
            "t_ref": self.t,
            "cos_ref": self.cos,
            "pairwise_cos": self.pairwise_cos,
            "delta_rel_norm": self.delta_rel_norm,
            "ref_bf16_max_abs_err": self.ref_bf16_max_abs_err,
            "outputs": {k: v.as_dict() for k, v in self.outputs.items()},
        }


def model_stock_t(gram: torch.Tensor, eps: float = 1e-8) -> tuple[float, float, list[float]]:
    """(t, mean cosine, pairwise cosines) from the float64 Gram matrix of the N deltas."""
    n = gram.shape[0]
    norms = gram.diagonal().sqrt()
    pair = [
        float(gram[i, j] / (norms[i] * norms[j] + eps)) for i in range(n) for j in range(i + 1, n)
    ]
    cos = sum(pair) / len(pair)
    t = n * cos / (1 + (n - 1) * cos) if (1 + (n - 1) * cos) != 0 else 0.0
    return min(1.0, max(0.0, t)), cos, pair


def compare_tensor(
    name: str,
    base: TensorLocator,
    finetunes: list[TensorLocator],
    outputs: dict[str, TensorLocator],
    eps: float = 1e-8,
    chunk_elems: int = CHUNK_ELEMS,
) -> TensorReport:
    """Reference Model Stock for ``name`` and its comparison with each output."""
    shape = base.shape(name)
    chunks = _row_chunks(shape, chunk_elems)
    n = len(finetunes)
    gram = torch.zeros(n, n, dtype=torch.float64)
    base_sq = 0.0
    for r0, r1 in chunks:  # pass 1: Gram matrix of the deltas
        w0 = base.rows(name, r0, r1).double().reshape(-1)
        d = torch.stack([ft.rows(name, r0, r1).double().reshape(-1) - w0 for ft in finetunes])
        gram += d @ d.T
        base_sq += float(w0 @ w0)
    t, cos, pair = model_stock_t(gram, eps)
    rel = float(gram.diagonal().sqrt().mean()) / math.sqrt(base_sq) if base_sq > 0 else 0.0
    rep = TensorReport(name, shape, t, cos, pair, rel)
    rep.outputs = {k: Comparison(dtype=loc.dtype(name), t_ref=t) for k, loc in outputs.items()}
    for r0, r1 in chunks:  # pass 2: reference chunk by chunk, compare
        w0 = base.rows(name, r0, r1).double()
        mean = sum(ft.rows(name, r0, r1).double() for ft in finetunes) / n
        ref = t * mean + (1 - t) * w0
        ref_bf16 = ref.to(torch.bfloat16)
        rep.ref_bf16_max_abs_err = max(
            rep.ref_bf16_max_abs_err, float((ref_bf16.double() - ref).abs().max())
        )
        dm = (mean - w0).reshape(-1)
        dot_ref = float((ref_bf16.double() - w0).reshape(-1) @ dm)
        for key, loc in outputs.items():
            out = loc.rows(name, r0, r1)
            cmp_ = rep.outputs[key]
            cmp_.numel += out.numel()
            err = out.double() - ref
            cmp_.max_abs_err = max(cmp_.max_abs_err, float(err.abs().max()))
            cmp_.sq_err += float((err * err).sum())
            out_bf16 = out.to(torch.bfloat16)
            ulp = bf16_ulp_distance(out_bf16, ref_bf16)
            cmp_.mismatch_vs_ref_bf16 += int((ulp > 0).sum())
            cmp_.over_1ulp += int((ulp > 1).sum())
            cmp_.max_ulp = max(cmp_.max_ulp, int(ulp.max()))
            cmp_._dot += float((out.double() - w0).reshape(-1) @ dm)
            cmp_._dot_ref += dot_ref
    return rep


def pick_sample(shapes: dict[str, list[int]], n_large: int = 3) -> list[str]:
    """The ``n_large`` largest tensors plus a few small, representative ones."""
    by_size = sorted(shapes, key=lambda k: (-math.prod(shapes[k]), k))
    picks = by_size[:n_large]
    layer_ids = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("model.layers.")})
    wanted = ["model.norm.weight"]
    if layer_ids:
        first, last = f"model.layers.{layer_ids[0]}.", f"model.layers.{layer_ids[-1]}."
        wanted += [
            first + "input_layernorm.weight",
            first + "self_attn.k_proj.weight",
            last + "self_attn.q_proj.weight",
        ]
    picks += [w for w in wanted if w in shapes and w not in picks]
    return picks


def compare_models(
    base_dir: Path,
    finetune_dirs: list[Path],
    output_dirs: dict[str, Path],
    names: list[str] | None = None,
    eps: float = 1e-8,
    log=None,
) -> list[TensorReport]:
    """Compare each output model with the float64 reference on a sample of tensors."""
    with ExitStack() as stack:
        base = TensorLocator(base_dir, stack)
        fts = [TensorLocator(d, stack) for d in finetune_dirs]
        outs = {k: TensorLocator(d, stack) for k, d in output_dirs.items()}
        names = names or pick_sample(base.shapes())
        reports = []
        for name in names:
            if log:
                log(f"reference for {name} {base.shape(name)}")
            present = {k: loc for k, loc in outs.items() if name in loc.handles}
            reports.append(compare_tensor(name, base, fts, present, eps))
        return reports
