"""Algorithm 1 (split search): the search machinery, exact plans, round trips."""

import copy

import pytest
import torch

from larosa import LarosaConfig, SparsityPlan, apply, load, save
from larosa.arch import projection_shapes, spec_for
from larosa.calibrate import calibrate
from larosa.errors import LarosaError
from larosa.search import DEFAULT_GRID, coef_sites, grid_search, plan_for_target, search_split
from larosa.sparsity import SITES, k_for, parameter_weighted

from tiny import tiny_model, tiny_tokenizer


def test_k_for_inverts_exact_sparsities():
    for d in (24, 576, 896, 1536, 4864, 11008):
        for k in (1, 7, d // 3, d // 2 + 1, d - 1, d):
            assert k_for(1 - k / d, d) == k, (d, k)


@pytest.mark.parametrize("opt", [0.57, 0.93, 1.31])
def test_grid_search_finds_known_optimum(opt):
    calls = []

    def f(x):
        calls.append(x)
        return (x - opt) ** 2 + 3.0

    best, seen = grid_search(f, DEFAULT_GRID, refine=3)
    assert abs(best - opt) <= 0.1 / 2 ** 3 + 1e-9
    assert len(calls) == len(set(calls))  # nothing evaluated twice
    assert min(v for _, v in seen) == pytest.approx((best - opt) ** 2 + 3.0)


def _shapes(model):
    return projection_shapes(model, spec_for(model))


@pytest.mark.parametrize("target", [0.25, 0.375, 0.47])
@pytest.mark.parametrize("a", [0.5, 0.8, 1.2])
def test_plan_for_target_within_one_channel_per_site(target, a):
    model = tiny_model("llama", hidden_size=96, intermediate_size=160, num_attention_heads=4)
    shapes = _shapes(model)
    plan = plan_for_target(shapes, target, coef_sites(a))
    total = sum(d_in * d_out for row in shapes for d_in, d_out in row.values())
    one_channel = sum(d_out for row in shapes for _, d_out in row.values())  # one input channel per site
    assert abs(parameter_weighted(plan, shapes) - target) <= one_channel / total
    # the stored sparsities are exact kept counts
    for site in SITES:
        d = shapes[0][site][0]
        assert (1 - plan.sites[site]) * d == pytest.approx(round((1 - plan.sites[site]) * d), abs=1e-9)
    # the split is respected (up to one channel)
    p = plan.nominal
    assert plan.sites["attn_in"] == pytest.approx(a * p, abs=1.0 / shapes[0]["attn_in"][0])
    assert plan.sites["mlp_out"] == pytest.approx((2 - a) * p, abs=1.0 / shapes[0]["mlp_out"][0])


def test_plan_for_target_errors():
    shapes = _shapes(tiny_model("llama"))
    with pytest.raises(LarosaError):
        plan_for_target(shapes, 1.2, coef_sites(0.8))
    with pytest.raises(LarosaError):
        plan_for_target(shapes, 0.4, coef_sites(2.0))  # block-internal coefficient 0


def test_search_skips_splits_that_cannot_reach_the_target():
    """At 0.5 on the LLaMA2-7B shape a = 0.4 needs an internal sparsity > 0.999: recorded as infeasible,
    the search goes on."""
    from larosa.sparsity import llama_shapes

    shapes = llama_shapes(4096, 11008, 32, 32, 32)
    with pytest.raises(LarosaError):
        plan_for_target(shapes, 0.5, coef_sites(0.4))
    assert plan_for_target(shapes, 0.5, coef_sites(0.8)).nominal > 0.5


def test_search_on_tiny_model_with_infeasible_grid_points():
    model, fused = _fused(seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    res = search_split(fused, 0.75, ids, grid=(0.1, 0.8, 1.0), refine=0, progress=False,
                       objective=_site_objective(0.8, 0.8))
    bad = [r for r in res.table if r["p"] is None]
    assert [r["a_attn"] for r in bad] == [0.1] and bad[0]["objective"] == float("inf")
    assert res.best == (0.8,)
    with pytest.raises(LarosaError, match="no split"):
        search_split(fused, 0.9, ids, grid=(0.1, 0.2), refine=0, progress=False,
                     objective=_site_objective(0.8, 0.8))


def _site_objective(opt_attn, opt_mlp):
    """A synthetic objective of the model's current Top-K sparsities with a known best split."""
    def score(model, ids):
        body = model.model.layers[0].inner
        s_attn = 1 - body.input_layernorm.sparsifier.k / body.input_layernorm.sparsifier.d
        s_mlp = 1 - body.post_attention_layernorm.sparsifier.k / body.post_attention_layernorm.sparsifier.d
        so = 1 - body.self_attn.o_proj.sparsifier.k / body.self_attn.o_proj.sparsifier.d
        sd = 1 - body.mlp.down_proj.sparsifier.k / body.mlp.down_proj.sparsifier.d
        # ratio of block-input to block-internal sparsity = a / (2 - a)
        ra, rm = s_attn / so, s_mlp / sd
        return (ra - opt_attn / (2 - opt_attn)) ** 2 + (rm - opt_mlp / (2 - opt_mlp)) ** 2
    return score


def _fused(seed=0):
    model = tiny_model("llama", seed=seed, hidden_size=96, intermediate_size=192, num_attention_heads=4)
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    return model, apply(copy.deepcopy(model), LarosaConfig("fused", "layer", SparsityPlan.from_nominal(0.4)), rot)


def test_search_split_finds_synthetic_optimum_and_round_trips(tmp_path):
    model, fused = _fused()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    res = search_split(fused, 0.4, ids, refine=2, progress=False, objective=_site_objective(0.62, 0.62))
    assert abs(res.best[0] - 0.62) <= 0.03
    shapes = _shapes(fused)
    assert abs(parameter_weighted(res.plan, shapes) - 0.4) < 0.01
    # the model is left at the searched plan, and the plan survives save/load
    cfg = LarosaConfig("fused", "layer", res.plan)
    save(fused, tiny_tokenizer(), tmp_path / "m", cfg)
    back = load(tmp_path / "m")
    from larosa.io import read_config

    assert read_config(tmp_path / "m")[1].plan.sites == res.plan.sites
    assert back.info["larosa"]["plan"]["sites"] == res.plan.sites
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back.model(x).logits, fused(x).logits)
    body = back.model.model.layers[0].inner
    assert body.mlp.down_proj.sparsifier.k == res.plan.k("mlp_out", body.mlp.down_proj.sparsifier.d)


def test_search_split_per_block_finds_separate_optima():
    model, fused = _fused(seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    res = search_split(fused, 0.4, ids, per_block=True, refine=2, progress=False,
                       objective=_site_objective(0.55, 1.05))
    assert abs(res.best[0] - 0.55) <= 0.05 and abs(res.best[1] - 1.05) <= 0.05
    assert {"a_attn", "a_mlp", "p", "param_weighted", "objective"} <= set(res.table[0])


def test_search_split_with_perplexity_objective_runs():
    model, fused = _fused(seed=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    res = search_split(fused, 0.3, ids, grid=(0.6, 0.8, 1.0), refine=0, progress=False)
    assert res.best[0] in (0.6, 0.8, 1.0)
    assert res.objective == min(r["objective"] for r in res.table)


def _is_rotated(net) -> bool:
    from larosa.modules import AdaptedLayer

    return any(isinstance(m, AdaptedLayer) for m in net.modules())


@pytest.mark.parametrize("winner", ["fused", "topk"])
def test_choose_form_keeps_the_candidate_with_the_lower_objective(winner):
    from larosa.search import choose_form

    model = tiny_model("llama", seed=5, hidden_size=96, intermediate_size=192, num_attention_heads=4)
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    plan = SparsityPlan.from_nominal(0.5)
    # synthetic objective: which form the model is in decides the score
    score = lambda net, _: 1.0 if _is_rotated(net) == (winner == "fused") else 2.0  # noqa: E731
    net, choice = choose_form(model, plan, rot, ids, progress=False, objective=score)
    assert choice.form == winner and choice.objective == {"fused": 1.0 if winner == "fused" else 2.0,
                                                          "topk": 1.0 if winner == "topk" else 2.0}
    assert _is_rotated(net) == (winner == "fused")
    assert not _is_rotated(model)  # the base model is left untouched


def test_choose_form_with_perplexity_matches_the_forms_built_separately():
    from larosa.search import choose_form, held_out_ppl

    model = tiny_model("llama", seed=6, hidden_size=96, intermediate_size=192, num_attention_heads=4)
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    plan = SparsityPlan.from_nominal(0.6)
    want = {f: held_out_ppl(apply(copy.deepcopy(model), LarosaConfig(f, "layer", plan), rot), ids)
            for f in ("fused", "topk")}
    assert want["fused"] != want["topk"]
    net, choice = choose_form(model, plan, rot, ids, progress=False)
    assert choice.objective == pytest.approx(want)
    assert choice.form == min(want, key=want.get)
    assert held_out_ppl(net, ids) == pytest.approx(min(want.values()))


def test_choose_form_builds_the_candidates_as_they_will_be_deployed():
    """The rotation level, Q basis and selection given to `choose_form` are the ones its candidates use
    (sparsify passes its own, so the choice is made on the model that is saved)."""
    from larosa.search import choose_form, held_out_ppl

    model = tiny_model("llama", seed=7, hidden_size=96, intermediate_size=192, num_attention_heads=4)
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    plan = SparsityPlan.from_nominal(0.6)
    kw = {"selection": "weighted", "q_basis": "gamma"}
    want = {f: held_out_ppl(apply(copy.deepcopy(model), LarosaConfig(f, "block", plan, **kw), rot), ids)
            for f in ("fused", "topk")}
    layer_fused = held_out_ppl(apply(copy.deepcopy(model), LarosaConfig("fused", "layer", plan, **kw), rot), ids)
    assert layer_fused != pytest.approx(want["fused"])  # the rotation level changes the objective
    _, choice = choose_form(model, plan, rot, ids, progress=False, rotation="block", **kw)
    assert choice.objective == pytest.approx(want)
