import copy

import pytest
import torch

from larosa import LarosaConfig, SparsityPlan, apply, load, save
from larosa.arch import REGISTRY, spec_for
from larosa.calibrate import calibrate
from larosa.errors import LarosaError
from larosa.modules import OfficialSite, SiteInput, SparseLinear
from larosa.sparsity import topk
from larosa.transform import set_plan

from tiny import tiny_model, tiny_tokenizer

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def _setup(arch="llama", tie=False, seed=0):
    model = tiny_model(arch, seed=seed, tie_word_embeddings=tie)
    ids = torch.randint(0, model.config.vocab_size, (4, 24))
    return model, ids, calibrate(model, ids, progress=False)


def test_all_registered_invariant_archs_are_tested():
    names = {s.name for s in REGISTRY.values() if s.rotation_invariant}
    assert names <= set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("level", ["layer", "block", "model"])
@pytest.mark.parametrize("tie", [False, True])
def test_fused_at_sparsity_zero_is_the_dense_model(arch, level, tie):
    model, ids, rot = _setup(arch, tie)
    ref = model(ids).logits
    fused = apply(copy.deepcopy(model), LarosaConfig("fused", level, SparsityPlan.dense()), rot)
    out = fused(ids).logits
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5
    # the weights really changed: this is not the dense model in disguise
    assert not torch.allclose(fused.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("arch", ARCHS)
def test_official_at_sparsity_zero_is_exact(arch):
    model, ids, rot = _setup(arch)
    off = apply(copy.deepcopy(model), LarosaConfig("official", "layer", SparsityPlan.dense()), rot)
    torch.testing.assert_close(off(ids).logits, model(ids).logits, rtol=0, atol=0)


def _capture_inputs(module, ids, model):
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(ids)
    h.remove()
    return seen[0]


def test_fused_sparsifies_every_projection_input_exactly():
    model, ids, rot = _setup()
    plan = SparsityPlan({"attn_in": 0.5, "attn_out": 0.25, "mlp_in": 0.5, "mlp_out": 0.75})
    fused = apply(copy.deepcopy(model), LarosaConfig("fused", "layer", plan), rot)
    layer = fused.model.layers[0].inner
    for lin, k in ((layer.self_attn.q_proj, 16), (layer.self_attn.k_proj, 16), (layer.self_attn.v_proj, 16),
                   (layer.self_attn.o_proj.inner, 24), (layer.mlp.gate_proj, 16), (layer.mlp.up_proj, 16),
                   (layer.mlp.down_proj.inner, 12)):
        x = _capture_inputs(lin, ids, fused)
        assert ((x != 0).sum(-1) == k).all(), lin


def test_official_form_matches_released_arithmetic():
    model, ids, rot = _setup()
    plan = SparsityPlan.from_nominal(0.4, tie_rule="ge")
    off = apply(copy.deepcopy(model), LarosaConfig("official", "layer", plan), rot)
    site = off.model.layers[1].input_layernorm
    assert isinstance(site, OfficialSite)
    x = torch.randn(2, 5, 32)
    q = rot.get(1, "attn_in", "gamma").double()
    h = model.model.layers[1].input_layernorm(x)
    ref = (topk(h.double() @ q, plan.k("attn_in", 32), "ge") @ q.T).float()
    torch.testing.assert_close(site(x), ref)
    # the MLP input reuses the attention Q (released code)
    assert torch.equal(off.model.layers[1].post_attention_layernorm.q, site.q)


def test_sparse_fused_matches_manual_reference():
    """Fused at p>0 equals an explicit computation in the rotated basis on the first layer's q_proj."""
    model, ids, rot = _setup()
    plan = SparsityPlan.from_nominal(0.5)
    fused = apply(copy.deepcopy(model), LarosaConfig("fused", "layer", plan), rot)
    x = torch.randn(3, 32)
    q0 = rot.get(0, "attn_in", "free").double()
    norm = model.model.layers[0].input_layernorm
    free = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    z = topk(free.double() @ q0, plan.k("attn_in", 32))
    ref = (z @ q0.T * norm.weight.double()) @ model.model.layers[0].self_attn.q_proj.weight.double().T
    xr = (x.double() @ q0).float()  # residual stream in the Q_0 basis
    site = fused.model.layers[0].inner.input_layernorm
    out = fused.model.layers[0].inner.self_attn.q_proj(site(xr))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_set_plan_and_dense_prefill():
    model, ids, rot = _setup()
    fused = apply(copy.deepcopy(model), LarosaConfig("fused", "layer", SparsityPlan.from_nominal(0.5)), rot)
    sparse = fused(ids).logits
    set_plan(fused, SparsityPlan.dense())
    torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    set_plan(fused, SparsityPlan.from_nominal(0.5, dense_prefill=True))
    torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)  # all prefill
    set_plan(fused, SparsityPlan.from_nominal(0.5))
    torch.testing.assert_close(fused(ids).logits, sparse)


def test_unrotated_topk_form():
    model, ids, _ = _setup()
    t = apply(copy.deepcopy(model), LarosaConfig("topk", "layer", SparsityPlan.from_nominal(0.4)), None)
    assert isinstance(t.model.layers[0].input_layernorm, SiteInput)
    assert isinstance(t.model.layers[0].mlp.down_proj, SparseLinear)
    assert not torch.allclose(t(ids).logits, model(ids).logits)


def test_gemma_fused_refused_official_allowed():
    model = tiny_model("gemma3_text", head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"])
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    assert not spec_for(model).rotation_invariant
    rot = calibrate(model, ids, progress=False)
    with pytest.raises(LarosaError, match="invariance.*official"):
        apply(copy.deepcopy(model), LarosaConfig("fused", "layer", SparsityPlan.dense()), rot)
    off = apply(copy.deepcopy(model), LarosaConfig("official", "layer", SparsityPlan.dense()), rot)
    torch.testing.assert_close(off(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_unsupported_architecture_error():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    with pytest.raises(LarosaError, match="unsupported architecture GPT2LMHeadModel"):
        spec_for(AutoModelForCausalLM.from_config(cfg))


@pytest.mark.parametrize("form,level", [("fused", "layer"), ("fused", "block"), ("official", "layer")])
def test_save_load_roundtrip_identical_logits(tmp_path, form, level):
    model, ids, rot = _setup(tie=True)
    cfg = LarosaConfig(form, level, SparsityPlan.from_nominal(0.4, tie_rule="ge" if form == "official" else "exact"))
    net = apply(copy.deepcopy(model), cfg, rot)
    out = save(net, tiny_tokenizer(), tmp_path / "m", cfg)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    lm = load(out)
    assert lm.info["larosa"]["plan"]["sites"] == cfg.plan.to_dict()["sites"]
    torch.testing.assert_close(lm.model(ids).logits, net(ids).logits, rtol=0, atol=0)
    # the generic loader recognises the folder too
    from larosa.models import load_model

    lm2 = load_model(str(out), device="cpu", dtype="float32")
    torch.testing.assert_close(lm2.model(ids).logits, net(ids).logits, rtol=0, atol=0)


def test_load_rejects_mismatched_weights(tmp_path):
    model, ids, rot = _setup()
    cfg = LarosaConfig("fused", "layer", SparsityPlan.from_nominal(0.4))
    out = save(apply(copy.deepcopy(model), cfg, rot), tiny_tokenizer(), tmp_path / "m", cfg)
    from safetensors.torch import load_file, save_file

    state = load_file(str(out / "model.safetensors"))
    state.pop("model.layers.0.adapter")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(LarosaError, match="does not match"):
        load(out)
    (out / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(LarosaError, match="truncated or corrupted"):
        load(out)


def test_weighted_selection_ranks_by_column_norm(tmp_path):
    model, ids, rot = _setup()
    plan = SparsityPlan.from_nominal(0.5)
    cfg = LarosaConfig("fused", "layer", plan, selection="weighted")
    net = apply(copy.deepcopy(model), cfg, rot)
    body = net.model.layers[0].inner
    site = body.input_layernorm
    w = torch.cat([body.self_attn.q_proj.weight, body.self_attn.k_proj.weight, body.self_attn.v_proj.weight])
    torch.testing.assert_close(site.sparsifier.score_scale, w.norm(dim=0))
    x = torch.randn(4, 32)
    h = site.inner(x)
    k = plan.k("attn_in", 32)
    ref = h * topk_mask_ref(h * w.norm(dim=0), k)
    torch.testing.assert_close(site(x), ref)
    assert not torch.equal(site(x), topk(h, k))  # differs from plain magnitude ranking
    out = save(net, tiny_tokenizer(), tmp_path / "w", cfg)
    torch.testing.assert_close(load(out).model(ids).logits, net(ids).logits, rtol=0, atol=0)
    set_plan(net, SparsityPlan.from_nominal(0.25))
    assert site.sparsifier.score_scale is not None and site.sparsifier.k == 25  # survives a plan change
    with pytest.raises(LarosaError, match="weighted selection"):
        LarosaConfig("official", "layer", plan, selection="weighted")


def test_fused_with_gamma_basis_q_is_still_invariant():
    model, ids, rot = _setup(tie=True)
    net = apply(copy.deepcopy(model), LarosaConfig("fused", "layer", SparsityPlan.dense(), q_basis="gamma"), rot)
    ref = model(ids).logits
    assert (net(ids).logits - ref).abs().max() / ref.abs().max() < 1e-5
    free = apply(copy.deepcopy(model), LarosaConfig("fused", "layer", SparsityPlan.dense()), rot)
    assert not torch.allclose(net.model.embed_tokens.weight, free.model.embed_tokens.weight)


def topk_mask_ref(score, k):
    from larosa.sparsity import topk_mask

    return topk_mask(score, k)
