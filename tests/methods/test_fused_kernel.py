"""The fused C kernels give the same bytes as the torch kernels (and the float64 reference)."""

import numpy as np
import pytest
import torch

from hf_model_stock.methods import fused_cpu
from hf_model_stock.methods.torch_kernels import BlockKernel

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="the C extension was not built")


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
    bits = [s.view(torch.uint16 if dtype == torch.bfloat16 else torch.float32).numpy() for s in src]
    sums_f, sums_t = torch.empty(numel), torch.empty(numel)
    g_fused = torch.from_numpy(fused.gram(bits, sums_f.numpy()))
    g_torch = BlockKernel(n_models).gram(src, 0, numel, sums_t)
    assert torch.equal(sums_f, sums_t)
    sums_only = torch.full((numel,), float("nan"))
    fused.delta_sum(bits, sums_only.numpy())  # the second pass: the sum without the Gram matrix
    assert torch.equal(sums_only, sums_t)
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


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 15, 16, 17, 1023, 1024, 1025, 2047, 2048, 2049, 4096 * 3 + 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_models", [2, 3, 4, 5, 7])  # 2 to 4: the register-blocked kernel; more: rows in L1
def test_rows_anywhere_and_any_length_match_float64(numel, dtype, n_models):
    """Rows in separate buffers at odd element offsets (as mapped shards give them), lengths around the
    8 lanes, the 1024- and 2048-element blocks and the workers' 4096-element slices."""
    gen = torch.Generator().manual_seed(numel)
    base = torch.randn(numel, generator=gen)
    rows = [base] + [base + 0.01 * torch.randn(numel, generator=gen) for _ in range(n_models)]
    lowered = [r.to(dtype) for r in rows]
    storage = [torch.cat([torch.zeros(1 + i, dtype=dtype), r])[1 + i :] for i, r in enumerate(lowered)]
    view = torch.uint16 if dtype == torch.bfloat16 else torch.float32
    bits = [s.view(view).numpy() for s in storage]
    sums = np.empty(numel, np.float32)
    kernel = fused_cpu.FusedKernel(workers=2)
    try:
        g = kernel.gram(bits, sums)
        out = torch.empty(numel, dtype=dtype)
        kernel.finish(bits[0], sums, 0.4, out.view(view).numpy())
    finally:
        kernel.close()
    d = torch.stack([r.double() - lowered[0].double() for r in lowered[1:]])
    ref = (d @ d.T).numpy()
    scale = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))  # errors relative to the norms: the cosine's error
    assert (np.abs(g - ref) <= 1e-6 * scale).all()
    d32 = [r.float() - lowered[0].float() for r in lowered[1:]]  # float32 deltas, summed in model order
    in_order = d32[0].clone()
    for d_i in d32[1:]:
        in_order += d_i
    assert np.array_equal(sums, in_order.numpy())
    np.testing.assert_allclose(sums, d.sum(0).numpy(), rtol=1e-5, atol=1e-9)
    want = (lowered[0].float() + (torch.from_numpy(sums) * np.float32(0.4))).to(dtype)
    assert torch.equal(out.view(view), want.view(view))


def test_short_buffers_and_bad_ranges_are_refused():
    rows = [np.zeros(100, np.uint16) for _ in range(3)]
    with pytest.raises(ValueError, match="an input row holds 200 bytes, the kernel needs 202"):
        fused_cpu.gram(rows, 0, 101, None)
    with pytest.raises(ValueError, match="delta_sum holds 396 bytes"):
        fused_cpu.gram(rows, 0, 100, np.zeros(99, np.float32))
    with pytest.raises(ValueError, match=r"bad element range \[5, 4\)"):
        fused_cpu.finish(rows[0], np.zeros(100, np.float32), 1.0, np.zeros(100, np.uint16), 5, 4)
    with pytest.raises(ValueError, match="rows must hold the base and 1 to 61 fine-tunes"):
        fused_cpu.gram(rows[:1], 0, 10, None)
    with pytest.raises((ValueError, BufferError), match="read-only|not writable"):
        fused_cpu.finish(rows[0], np.zeros(100, np.float32), 1.0, np.frombuffer(bytes(200), np.uint16), 0, 100)
