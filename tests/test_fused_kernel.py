"""The fused numba kernels give the same bytes as the torch kernels (and the float64 reference)."""

import pytest
import torch

from hf_model_stock.compute import stacked
from hf_model_stock.methods import fused_cpu
from hf_model_stock.methods.torch_kernels import BlockKernel

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="numba not installed")


def stacked_inputs(dtype: torch.dtype, n_models: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    """N+1 rows in one buffer at a uniform, padded stride, as the executor's reader lays them out."""
    gen = torch.Generator().manual_seed(seed)
    stride = numel + 37
    buf = torch.zeros((n_models + 1) * stride, dtype=dtype)
    base = torch.randn(numel, generator=gen)
    common = torch.randn(numel, generator=gen) * 0.01
    rows = [base] + [base + common + 0.01 * torch.randn(numel, generator=gen) for _ in range(n_models)]
    for i, row in enumerate(rows):
        buf[i * stride : i * stride + numel] = row.to(dtype)
    return [buf[i * stride : i * stride + numel] for i in range(n_models + 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_models", [2, 3, 5])
def test_fused_equals_torch_kernel(dtype, n_models):
    numel = 1_000_003
    src = stacked_inputs(dtype, n_models, numel, seed=n_models)
    fused = fused_cpu.FusedKernel(workers=2)
    bits = stacked([s.view(torch.uint16 if dtype == torch.bfloat16 else torch.float32).numpy() for s in src])
    assert bits is not None and bits.shape == (n_models + 1, numel)
    sums_f, sums_t = torch.empty(numel), torch.empty(numel)
    g_fused = torch.from_numpy(fused.gram(bits, sums_f.numpy()))
    g_torch = BlockKernel(n_models).gram(src, 0, numel, sums_t)
    assert torch.equal(sums_f, sums_t)
    d = torch.stack([s.double() - src[0].double() for s in src[1:]])
    reference = d @ d.T
    assert ((g_fused - reference).abs() / reference.abs()).max().item() < 1e-7  # 2048-element float32 partials
    assert ((g_torch - reference).abs() / reference.abs()).max().item() < 5e-6  # 256K-element float32 dots
    out_f, out_t = torch.empty(numel, dtype=dtype), torch.empty(numel, dtype=dtype)
    out_bits = out_f.view(torch.uint16 if dtype == torch.bfloat16 else torch.float32).numpy()
    fused.finish(bits[0], sums_f.numpy(), 0.731 / n_models, out_bits)
    BlockKernel(n_models).merge_from_sum(src[0], sums_t, 0.731, out_t, 0, numel)
    assert torch.equal(out_f.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       out_t.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    fused.close()


def test_bf16_rounding_matches_torch_on_ties_nan_and_inf():
    # float32 values exactly halfway between bf16 neighbours (both parities), and specials
    halfway = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 2**-126 * (1 + 2**-8)], dtype=torch.float32)
    values = torch.cat([halfway, torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.0e38])])
    base = torch.zeros(values.numel(), dtype=torch.bfloat16)
    out = torch.empty(values.numel(), dtype=torch.bfloat16)
    fused_cpu.finish(base.view(torch.uint16).numpy(), values.numpy(), 1.0, out.view(torch.uint16).numpy(), 0,
                     values.numel())
    want = (values * 1.0 + 0.0).to(torch.bfloat16)  # finish computes sum * scale + base (base = +0)
    assert torch.equal(out[~want.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))
    assert bool(out[4].isnan())
