"""An independent float64 reference of Model Stock, written straight from the paper's formula.

Deliberately naive (explicit pairwise loops, whole tensors in float64) and sharing no code with the
package, so that the tests compare two independent implementations.
"""

from __future__ import annotations

import itertools

import torch


def reference_ratio(base: torch.Tensor, models: list[torch.Tensor], eps: float = 1e-8, clamp_t: bool = True) -> float:
    """t for one tensor, in float64."""
    w0 = base.double().flatten()
    deltas = [m.double().flatten() - w0 for m in models]
    n = len(deltas)
    cosines = []
    for a, b in itertools.combinations(range(n), 2):
        na, nb = deltas[a].norm().item(), deltas[b].norm().item()
        denom = na * nb + eps
        cosines.append(0.0 if denom == 0 else torch.dot(deltas[a], deltas[b]).item() / denom)
    cos = min(1.0, max(-1.0, sum(cosines) / len(cosines)))
    denom = 1 + (n - 1) * cos
    t = n * cos / denom if denom != 0 else float("-inf")
    if clamp_t:
        t = min(1.0, max(0.0, t))
    return t


def reference_merge(
    base: torch.Tensor,
    models: list[torch.Tensor],
    eps: float = 1e-8,
    clamp_t: bool = True,
    filter_wise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged tensor in float64 and the t used (a scalar, or one per row for filter-wise 2-D+)."""
    if filter_wise and base.dim() >= 2:
        rows = [reference_merge(base[r], [m[r] for m in models], eps, clamp_t) for r in range(base.shape[0])]
        return torch.stack([r[0] for r in rows]), torch.tensor([float(r[1]) for r in rows], dtype=torch.float64)
    t = reference_ratio(base, models, eps, clamp_t)
    mean = torch.stack([m.double() for m in models]).mean(0)
    return t * mean + (1 - t) * base.double(), torch.tensor(t, dtype=torch.float64)
