"""The Model Stock ratio t from a Gram matrix, against hand-computed values and the reference."""

import itertools
import math

import pytest
import torch

from hf_model_stock.methods import fused_cpu
from hf_model_stock.methods.model_stock import ModelStockParams, ratio_from_gram
from hf_model_stock.methods.torch_kernels import BlockKernel, ParallelKernel
from tests.reference import reference_ratio


def gram_of(deltas):
    d = torch.stack([x.double().flatten() for x in deltas])
    return d @ d.T


def test_two_models_cos_half_gives_two_thirds():
    g = torch.tensor([[4.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # norms 2, cos 0.5
    r = ratio_from_gram(g, ModelStockParams(eps=0.0))
    assert r.cos.item() == pytest.approx(0.5, abs=1e-15)
    assert r.t.item() == pytest.approx(2 / 3, abs=1e-15)
    assert r.norms.tolist() == [2.0, 2.0]
    assert not r.clamped


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_generalised_formula_for_n_models(n):
    gen = torch.Generator().manual_seed(n)
    common = torch.randn(500, generator=gen, dtype=torch.float64)
    deltas = [common + torch.randn(500, generator=gen, dtype=torch.float64) for _ in range(n)]
    cosines = [torch.dot(a, b).item() / (a.norm().item() * b.norm().item() + 1e-8)
               for a, b in itertools.combinations(deltas, 2)]
    cos = sum(cosines) / len(cosines)
    r = ratio_from_gram(gram_of(deltas), ModelStockParams())
    assert r.t.item() == pytest.approx(n * cos / (1 + (n - 1) * cos), rel=1e-12)


def test_negative_cosine_is_clamped_to_zero_or_kept():
    g = torch.tensor([[1.0, -0.3], [-0.3, 1.0]], dtype=torch.float64)
    clamped = ratio_from_gram(g, ModelStockParams(eps=0.0))
    raw = ratio_from_gram(g, ModelStockParams(eps=0.0, clamp_t=False))
    assert clamped.t.item() == 0.0 and bool(clamped.clamped)
    assert raw.t.item() == pytest.approx(2 * -0.3 / (1 - 0.3), rel=1e-12)  # -0.857...
    assert bool(raw.clamped)


def test_opposite_deltas_hit_the_pole_and_clamp_to_zero():
    g = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    assert ratio_from_gram(g, ModelStockParams(eps=0.0)).t.item() == 0.0
    assert ratio_from_gram(g, ModelStockParams(eps=0.0, clamp_t=False)).t.item() == -math.inf


def test_all_zero_deltas_give_t_zero_with_and_without_eps():
    g = torch.zeros(3, 3, dtype=torch.float64)
    for eps in (1e-8, 0.0):
        r = ratio_from_gram(g, ModelStockParams(eps=eps))
        assert r.t.item() == 0.0 and r.cos.item() == 0.0


def test_fewer_than_two_models_is_refused():
    with pytest.raises(ValueError, match="at least 2 fine-tuned models, got 1"):
        ratio_from_gram(torch.ones(1, 1, dtype=torch.float64), ModelStockParams())


def test_tiny_deltas_follow_the_authors_epsilon_not_a_norm_clamp():
    # Delta norms ~1e-4: the authors add 1e-8 to the norm product (here ~1e-8 too), a 1e-6 clamp
    # on the product (mergekit's) would change the cosine far more.
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(10000, generator=gen, dtype=torch.float64)
    deltas = [common + torch.randn(10000, generator=gen, dtype=torch.float64) for _ in range(2)]
    deltas = [d / d.norm() * 1e-4 for d in deltas]
    true_cos = torch.dot(deltas[0], deltas[1]).item() / (1e-4 * 1e-4)
    assert true_cos == pytest.approx(0.5, abs=0.02)
    ours = ratio_from_gram(gram_of(deltas), ModelStockParams())
    assert ours.cos.item() == pytest.approx(true_cos / (1 + 1e-8 / 1e-8), rel=1e-9)  # eps halves it here
    exact = ratio_from_gram(gram_of(deltas), ModelStockParams(eps=0.0))
    assert exact.cos.item() == pytest.approx(true_cos, rel=1e-12)
    clamped_norm_cos = torch.dot(deltas[0], deltas[1]).item() / max(1e-8, 1e-6)
    assert abs(clamped_norm_cos - true_cos) > 0.4  # what a 1e-6 clamp would have produced
    assert ours.t.item() == pytest.approx(reference_ratio(torch.zeros(10000), deltas), rel=1e-9)


@pytest.mark.parametrize("workers, fused", [(1, False), (2, False), (2, True)])
def test_blocked_gram_of_a_big_tensor_matches_float64(workers, fused):
    """65.5M elements: float32 reductions drift here; blocked float32 dots summed in float64 do not.
    Both the torch kernel and the fused CPU kernel."""
    n_el = 65_536_000
    gen = torch.Generator().manual_seed(1)
    rows = torch.empty(3, n_el, dtype=torch.bfloat16)
    rows[0] = torch.randn(n_el, generator=gen)
    common = torch.randn(n_el, generator=gen) * 0.01
    for i in (1, 2):
        rows[i] = rows[0].float() + common + torch.randn(n_el, generator=gen) * 0.01
    base, *models = rows
    if fused:
        kernel = fused_cpu.FusedKernel(workers)
        g = torch.from_numpy(kernel.gram([r.view(torch.uint16).numpy() for r in rows]))
    else:
        kernel = ParallelKernel(2, workers=workers)
        g = torch.from_numpy(kernel.gram([base, *models]))
    kernel.close()
    d = [m.double() - base.double() for m in models]
    ref = torch.tensor([[torch.dot(a, b).item() for b in d] for a in d], dtype=torch.float64)
    assert torch.allclose(g, ref, rtol=2e-6, atol=0)
    t_ours = ratio_from_gram(g, ModelStockParams()).t.item()
    t_ref = ratio_from_gram(ref, ModelStockParams()).t.item()
    assert abs(t_ours - t_ref) < 1e-6
    # the naive float32 whole-tensor norm the design notes warn about is measurably worse
    naive = torch.linalg.vector_norm(models[0].float() - base.float()).item() ** 2
    assert abs(naive - ref[0, 0].item()) / ref[0, 0].item() > abs(g[0, 0] - ref[0, 0]).item() / ref[0, 0].item()


def test_block_kernel_sum_and_recompute_paths_agree_bitwise():
    gen = torch.Generator().manual_seed(2)
    src = [torch.randn(300_001, generator=gen).to(torch.bfloat16) for _ in range(4)]
    k = BlockKernel(3, block=4096)
    sums = torch.empty(300_001)
    k.gram(src, 0, 300_001, sums)
    a = torch.empty(300_001, dtype=torch.bfloat16)
    b = torch.empty(300_001, dtype=torch.bfloat16)
    k.merge_from_sum(src[0], sums, 0.37, a, 0, 300_001)
    k.merge_recompute(src, 0.37, b, 0, 300_001)
    assert torch.equal(a, b)
