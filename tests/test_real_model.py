"""Real-model tests on the embedded default (smollm2-135m, a PyPI-shipped GGUF).

All but the 8-window perplexity run by default (CI included): the model is small enough for the CPU. They use
a cache of their own (LAROSA_CACHE_DIR under pytest's tmp dir), not the user's ~/.cache/larosa: the
dequantized model is ~0.5 GB, and a fresh cache makes the first load a guaranteed miss."""

import shutil
from pathlib import Path

import pytest

from larosa.data import load_wikitext, tokenize_source
from larosa.evaluate import perplexity_from_ids
from larosa.models import load_model


@pytest.fixture(scope="module")
def larosa_cache(tmp_path_factory):
    """LAROSA_CACHE_DIR set to a fresh temporary directory for the whole module (module-scoped, so not the
    function-scoped monkeypatch fixture); removed afterwards, so pytest's kept tmp dirs don't hold ~0.5 GB each."""
    d = tmp_path_factory.mktemp("larosa-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAROSA_CACHE_DIR", str(d))
        yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def smollm(larosa_cache):
    return load_model("smollm2-135m", device="cpu", dtype="float32")


def test_smoke_load_and_one_short_window(smollm):
    ids = tokenize_source(smollm.tokenizer, load_wikitext("test"))
    res = perplexity_from_ids(smollm.model, ids, seqlen=256, n_windows=1, progress=False)
    assert smollm.model.config.hidden_size == 576 and smollm.model.config.num_hidden_layers == 30
    assert 5.0 < res.ppl < 60.0, res.ppl  # a trained model, not a random one (random: ~49152)


def test_second_load_hits_cache(smollm, larosa_cache):
    """The first load (the fixture, into the empty temporary cache) converts the GGUF; the second reuses it."""
    assert smollm.info["cache_hit"] is False
    assert Path(smollm.info["cache_dir"]).parent.parent == larosa_cache
    again = load_model("smollm2-135m", device="cpu", dtype="float32")
    assert again.info["cache_hit"] is True and again.info["cache_dir"] == smollm.info["cache_dir"]


@pytest.mark.slow
def test_eight_windows_match_reference(smollm):
    ids = tokenize_source(smollm.tokenizer, load_wikitext("test"))
    res = perplexity_from_ids(smollm.model, ids, seqlen=2048, n_windows=8, progress=False)
    assert res.windows_total == 148
    assert res.ppl == pytest.approx(19.134, abs=2e-3)


def test_fused_at_sparsity_zero_reproduces_smollm2_logits(smollm):
    import copy

    import torch

    from larosa import LarosaConfig, SparsityPlan, apply
    from larosa.calibrate import calibrate

    ids = tokenize_source(smollm.tokenizer, load_wikitext("validation"))
    rot = calibrate(smollm.model, ids[:512].view(4, 128), progress=False)
    fused = apply(copy.deepcopy(smollm.model), LarosaConfig("fused", "layer", SparsityPlan.dense()), rot)
    test_ids = tokenize_source(smollm.tokenizer, load_wikitext("test"))[:256][None]
    with torch.no_grad():
        ref, out = smollm.model(test_ids).logits, fused(test_ids).logits
    assert (out - ref).abs().max().item() < 1e-3
    assert fused.lm_head.weight.data_ptr() != fused.model.embed_tokens.weight.data_ptr()  # untied


def _hf_greedy(model, ids, n):
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        import torch

        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    finally:
        model.generation_config.eos_token_id = saved


def test_engine_reproduces_smollm2_greedy_dense_and_fused(smollm):
    """Issue 5's CPU check: the engine's greedy tokens and logits equal HF's on the real model, dense and
    LaRoSA fused (against the plain PyTorch sparse model the transform builds).

    In float64: Top-K is discontinuous, so in fp32 a rounding difference between two correct
    implementations (HF's SDPA picks its kernel by sequence length) can flip a near-tie selection and
    change a token; in fp64 such flips do not happen, so any token difference is a real bug."""
    import copy

    import torch

    from larosa import LarosaConfig, SparsityPlan, apply
    from larosa.calibrate import calibrate
    from larosa.engine import DecodeEngine, from_hf

    ids = smollm.tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids
    n = 16
    cal = tokenize_source(smollm.tokenizer, load_wikitext("validation"))[:1024].view(4, 256)
    dense = copy.deepcopy(smollm.model).double()
    fused = apply(copy.deepcopy(smollm.model), LarosaConfig("fused", "layer", SparsityPlan.from_nominal(0.4)),
                  calibrate(smollm.model, cal, progress=False)).double()
    for net in (dense, fused):
        ref = _hf_greedy(net, ids, n)
        eng = DecodeEngine(from_hf(net), max_len=ids.shape[1] + n + 1)
        assert eng.dtype == torch.float64
        assert torch.equal(eng.generate(ids, n).tokens, ref)
        with torch.no_grad():
            full = net(torch.cat([ids, ref], 1)).logits
        torch.testing.assert_close(eng.prefill(ids), full[:, ids.shape[1] - 1], atol=1e-8, rtol=1e-8)
        eng.tok.copy_(ref[:, :1])
        for j in range(1, n):
            eng.step()
            torch.testing.assert_close(eng.logits, full[:, ids.shape[1] + j - 1], atol=1e-8, rtol=1e-8)
