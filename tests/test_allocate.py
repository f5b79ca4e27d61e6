"""TEAL's block-wise greedy allocation (for TEAL thresholds and for Top-K)."""

import copy

import pytest
import torch

from larosa import LarosaConfig, SparsityPlan, apply
from larosa.allocate import greedy_allocation, teal_setter, topk_setter
from larosa.arch import projection_shapes, spec_for
from larosa.baselines import apply_teal, collect_thresholds
from larosa.calibrate import calibrate
from larosa.errors import LarosaError
from larosa.sparsity import SITES

from tiny import tiny_model


def _layer_pw(sites, row):
    w = {s: row[s][0] * row[s][1] for s in SITES}
    return sum(sites[s] * w[s] for s in SITES) / sum(w.values())


def _teal(model, s=0.0):
    thr = collect_thresholds(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    return thr, apply_teal(copy.deepcopy(model), thr, {site: s for site in SITES})


@pytest.mark.parametrize("target", [0.25, 0.5])
def test_teal_greedy_meets_target_per_layer_and_sets_thresholds(target):
    model = tiny_model("llama", seed=0)
    thr, teal = _teal(model)
    batches = torch.randint(0, model.config.vocab_size, (2, 16))
    alloc = greedy_allocation(teal, batches, target, teal_setter(thr), progress=False)
    shapes = projection_shapes(teal, spec_for(teal))
    assert sorted(alloc) == list(range(model.config.num_hidden_layers))
    for i, sites in alloc.items():
        assert _layer_pw(sites, shapes[i]) == pytest.approx(target, abs=1e-9)
        got = teal.model.layers[i].mlp.down_proj.sparsifier.threshold.item()
        assert got == pytest.approx(thr.threshold(i, "mlp_out", sites["mlp_out"]), rel=1e-6)
    # not uniform: the greedy moved budget between sites
    assert any(len({round(v, 6) for v in sites.values()}) > 1 for sites in alloc.values())


def _silence_attention(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return model


def test_greedy_spends_budget_where_it_costs_nothing():
    # with o_proj zeroed, attention contributes nothing: sparsifying its inputs is free, so a correct
    # greedy takes the whole budget from attn_in/attn_out and leaves the MLP dense
    model = _silence_attention(tiny_model("llama", seed=1))
    thr, teal = _teal(model)
    alloc = greedy_allocation(teal, torch.randint(0, model.config.vocab_size, (2, 16)), 0.3, teal_setter(thr),
                              progress=False)
    for sites in alloc.values():
        assert sites["mlp_in"] == 0.0 and sites["mlp_out"] == 0.0, sites


def test_topk_greedy_on_fused_model():
    model = _silence_attention(tiny_model("llama", seed=2))
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    fused = apply(copy.deepcopy(model), LarosaConfig("fused", "layer", SparsityPlan.from_nominal(0.3)), rot)
    alloc = greedy_allocation(fused, torch.randint(0, model.config.vocab_size, (2, 16)), 0.3, topk_setter(),
                              progress=False)
    body = fused.model.layers[0].inner
    assert body.self_attn.o_proj.sparsifier.k < body.self_attn.o_proj.sparsifier.d
    assert body.mlp.down_proj.sparsifier.k == body.mlp.down_proj.sparsifier.d
    assert all(sites["mlp_in"] == 0.0 for sites in alloc.values())


def test_greedy_reaches_high_targets_with_capped_sites():
    model = tiny_model("llama", seed=3)
    thr, teal = _teal(model)
    alloc = greedy_allocation(teal, torch.randint(0, model.config.vocab_size, (1, 8)), 0.9, teal_setter(thr),
                              step=0.1, max_site=0.95, progress=False)
    shapes = projection_shapes(teal, spec_for(teal))
    for i, sites in alloc.items():
        assert max(sites.values()) <= 0.95 + 1e-12
        assert _layer_pw(sites, shapes[i]) == pytest.approx(0.9, abs=1e-9)
    with pytest.raises(LarosaError, match="not reachable"):
        greedy_allocation(teal, torch.randint(0, model.config.vocab_size, (1, 8)), 0.97, teal_setter(thr),
                          step=0.1, max_site=0.95, progress=False)


def test_greedy_errors():
    model = tiny_model("llama")
    thr, teal = _teal(model)
    with pytest.raises(LarosaError):
        greedy_allocation(teal, torch.ones(1, 4, dtype=torch.long), 0.3, teal_setter(thr), step=0.0)
    with pytest.raises(LarosaError, match="not a Top-K"):
        greedy_allocation(teal, torch.ones(1, 4, dtype=torch.long), 0.3, topk_setter())
