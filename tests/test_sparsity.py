import pytest
import torch

from larosa.errors import LarosaError
from larosa.sparsity import (SparsityPlan, k_for, llama_shapes, parameter_weighted, topk, topk_mask)


def test_topk_keeps_exactly_k_largest_magnitudes():
    x = torch.randn(5, 7, 33)
    for k in (1, 5, 32, 33):
        m = topk_mask(x, k)
        assert (m.sum(-1) == k).all()
        kept_min = torch.where(m, x.abs(), torch.inf).amin(-1)
        dropped_max = torch.where(m, -torch.inf, x.abs()).amax(-1)
        assert (kept_min >= dropped_max).all()
    y = topk(x, 5)
    assert torch.equal(y[topk_mask(x, 5)], x[topk_mask(x, 5)]) and (y[~topk_mask(x, 5)] == 0).all()


def test_tie_rule():
    x = torch.tensor([[3.0, -2.0, 2.0, 2.0, 1.0]])
    assert topk_mask(x, 2, "exact").tolist() == [[True, True, False, False, False]]  # ties: lower index
    assert topk_mask(x, 3, "exact").tolist() == [[True, True, True, False, False]]
    assert topk_mask(x, 2, "ge").tolist() == [[True, True, True, True, False]]  # released code keeps ties


def test_exact_rule_matches_the_kernel_reference_on_heavy_ties():
    from larosa.kernels.reference import topk_keep_mask

    for d, k in ((64, 1), (64, 13), (200, 100), (200, 199), (576, 345)):
        x = (torch.randn(3, 4, d) * 3).round()  # integers: many equal magnitudes
        assert torch.equal(topk_mask(x, k, "exact"), topk_keep_mask(x, k)), (d, k)
        assert (topk_mask(x, k, "exact").sum(-1) == k).all()


def test_k_and_plan_validation():
    assert k_for(0.4, 4096) == 2457 and k_for(0.0, 10) == 10 and k_for(0.999, 10) == 1
    with pytest.raises(LarosaError, match=r"\[0, 1\)"):
        SparsityPlan.from_nominal(1.0)
    with pytest.raises(LarosaError, match=r"\[0, 1\)"):
        SparsityPlan.from_nominal(-0.1)
    with pytest.raises(LarosaError, match="site sparsity >= 1"):
        SparsityPlan.from_nominal(0.9)  # 1.2 * 0.9 >= 1
    with pytest.raises(LarosaError, match="unknown sites"):
        SparsityPlan({"attn": 0.1})


def test_paper_k_for_llama2_7b():
    plan = SparsityPlan.from_nominal(0.4)
    assert plan.k("attn_in", 4096) == 2785 and plan.k("mlp_in", 4096) == 2785
    assert plan.k("attn_out", 4096) == 2129 and plan.k("mlp_out", 11008) == 5724


@pytest.mark.parametrize("p,want", [(0.25, 0.231), (0.40, 0.369), (0.50, 0.461)])
def test_parameter_weighted_llama2_7b(p, want):
    shapes = llama_shapes(4096, 11008, 32, 32, 32)
    plan = SparsityPlan.from_nominal(p)
    assert plan.unweighted() == pytest.approx(p)
    assert parameter_weighted(plan, shapes) == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("p,want", [(0.25, 0.235), (0.40, 0.375), (0.50, 0.469)])
def test_parameter_weighted_14336_wide(p, want):
    shapes = llama_shapes(4096, 14336, 32, 32, 8)
    assert parameter_weighted(SparsityPlan.from_nominal(p), shapes) == pytest.approx(want, abs=1.5e-3)


def test_plan_roundtrip_and_per_layer_override():
    plan = SparsityPlan.from_nominal(0.3, layers={2: {"mlp_out": 0.6}})
    again = SparsityPlan.from_dict(plan.to_dict())
    assert again == plan
    assert again.sparsity("mlp_out", 2) == 0.6 and again.sparsity("mlp_out", 1) == pytest.approx(0.36)


def test_exact_rule_without_ties_and_with_ties_in_some_rows():
    """No ties at the k-th magnitude (the fast path: `>=` already keeps k) and a batch where only one
    row has ties; k on both sides of d / 2 (the k-th largest found from the smaller side)."""
    from larosa.kernels import topk_keep_mask

    for d in (7, 64, 301):
        for k in (1, d // 3, d // 2, d // 2 + 1, d - 1, d):
            x = torch.randn(3, d, dtype=torch.float64)
            x[1] = (x[1] * 2).round()  # ties in this row only
            assert torch.equal(topk_mask(x, k, "exact"), topk_keep_mask(x, k)), (d, k)
            assert (topk_mask(x, k, "exact").sum(-1) == k).all()
            assert torch.equal(topk_mask(x[::2], k, "exact"), topk_keep_mask(x[::2], k)), (d, k)
