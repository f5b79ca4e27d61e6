"""The decode engine against the HF model it was read from (CPU, eager: the plain PyTorch path)."""

import copy

import pytest
import torch

from larosa import LarosaConfig, SparsityPlan, apply
from larosa.baselines import apply_cats, apply_teal, collect_thresholds
from larosa.calibrate import calibrate
from larosa.engine import DecodeEngine, from_hf
from larosa.kernels import ops as _ops
from larosa.errors import LarosaError

from tiny import tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def _hf_greedy(model, ids, n):
    """HF's own greedy generate (no EOS: a tiny random model may emit token 2 at any point)."""
    saved = model.generation_config.eos_token_id, model.config.eos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        model.generation_config.eos_token_id, model.config.eos_token_id = saved
    assert out.shape[1] == ids.shape[1] + n
    return out[:, ids.shape[1]:]


def _hf_logits(model, seq):
    with torch.no_grad():
        return model(seq).logits.float()


def _check_against(model, ids, n=8, atol=1e-4):
    """Engine greedy tokens == HF greedy tokens, and every step's logits match HF's full forward."""
    eng = DecodeEngine(from_hf(model), max_len=ids.shape[1] + n + 3, batch=ids.shape[0])
    res = eng.generate(ids, n)
    ref = _hf_greedy(model, ids, n)
    assert torch.equal(res.tokens, ref), (res.tokens, ref)
    full = _hf_logits(model, torch.cat([ids, ref], 1))
    # prefill logits, then the logits of each decode step
    torch.testing.assert_close(eng.prefill(ids), full[:, ids.shape[1] - 1], atol=atol, rtol=1e-4)
    eng.tok.copy_(ref[:, :1])
    for j in range(1, n):
        eng.step()
        torch.testing.assert_close(eng.logits, full[:, ids.shape[1] + j - 1], atol=atol, rtol=1e-4)
    return eng


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_engine_reproduces_hf_greedy(arch):
    model = tiny_model(arch, seed=1, tie_word_embeddings=arch == "qwen2")
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    _check_against(model, ids)


@pytest.mark.parametrize("level", ["layer", "block", "model"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_larosa_engine_matches_sparse_reference(arch, level):
    model = tiny_model(arch, seed=2)
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    fused = apply(copy.deepcopy(model), LarosaConfig("fused", level, SparsityPlan.from_nominal(0.4)), rot)
    ids = torch.randint(3, model.config.vocab_size, (1, 7))
    eng = _check_against(fused, ids)
    w = eng.w
    assert all(st.attn_in.mode == "topk" and st.mlp_out.mode == "topk" for st in w.statics)
    assert sum(lw.adapter is not None for lw in w.layers) == (0 if level == "model" else len(w.layers) - 1)
    assert all((lw.rotate_mlp is not None) == (level == "block") for lw in w.layers)


def test_weighted_selection_and_topk_form_in_engine():
    model = tiny_model("llama", seed=3)
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    for cfg in (LarosaConfig("fused", "layer", SparsityPlan.from_nominal(0.5), selection="weighted"),
                LarosaConfig("fused", "block", SparsityPlan.from_nominal(0.5), selection="weighted"),
                LarosaConfig("topk", "layer", SparsityPlan.from_nominal(0.5))):
        net = apply(copy.deepcopy(model), cfg, rot)
        _check_against(net, ids, atol=2e-4)


def test_teal_engine_matches_threshold_reference():
    model = tiny_model("llama", seed=4)
    thr = collect_thresholds(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    teal = apply_teal(copy.deepcopy(model), thr, {s: 0.4 for s in ("attn_in", "attn_out", "mlp_in", "mlp_out")})
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    eng = _check_against(teal, ids)
    assert all(st.mlp_in.mode == "threshold" for st in eng.w.statics)
    assert eng.w.layers[0].thresholds is not None


def test_dense_prefill_plan_runs_prompt_dense():
    model = tiny_model("llama", seed=5)
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    plan = SparsityPlan.from_nominal(0.5, dense_prefill=True)
    net = apply(copy.deepcopy(model), LarosaConfig("fused", "layer", plan), rot)
    ids = torch.randint(3, model.config.vocab_size, (1, 8))
    eng = DecodeEngine(from_hf(net), max_len=16)
    assert eng.w.meta["dense_prefill"]
    with torch.no_grad():
        ref = net(ids).logits[:, -1]  # HF with dense_prefill: a multi-token call is dense
    torch.testing.assert_close(eng.prefill(ids), ref, atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny_model("llama", seed=6)
    ids = torch.randint(3, model.config.vocab_size, (1, 5))
    eng = DecodeEngine(from_hf(model), max_len=32)
    a = eng.generate(ids, 12, temperature=1.0, seed=7).tokens
    b = eng.generate(ids, 12, temperature=1.0, seed=7).tokens
    c = eng.generate(ids, 12, temperature=1.0, seed=8).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = eng.generate(ids, 12).tokens
    assert torch.equal(eng.generate(ids, 12, temperature=0.7, top_k=1, seed=3).tokens, greedy)


def test_streaming_callback_and_early_stop():
    model = tiny_model("llama", seed=6)
    ids = torch.randint(3, model.config.vocab_size, (1, 5))
    eng = DecodeEngine(from_hf(model), max_len=32)
    seen = []
    res = eng.generate(ids, 10, on_tokens=lambda t: seen.append(t) or len(seen) == 4)
    assert res.tokens.shape == (1, 4) and torch.equal(torch.cat(seen, 1), res.tokens)
    assert torch.equal(res.tokens, eng.generate(ids, 10).tokens[:, :4])


def test_engine_refuses_what_it_cannot_run():
    model = tiny_model("llama", seed=0)
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (2, 16)), progress=False)
    off = apply(copy.deepcopy(model), LarosaConfig("official", "layer", SparsityPlan.from_nominal(0.4)), rot)
    with pytest.raises(LarosaError, match="official form"):
        from_hf(off)
    thr = collect_thresholds(model, torch.randint(0, model.config.vocab_size, (2, 16)), progress=False)
    with pytest.raises(LarosaError, match="CATS"):
        from_hf(apply_cats(copy.deepcopy(model), thr, 0.3))
    eng = DecodeEngine(from_hf(model), max_len=8)
    with pytest.raises(LarosaError, match="exceed max_len"):
        eng.generate(torch.ones(1, 6, dtype=torch.long), 4)
    with pytest.raises(LarosaError, match="CUDA graphs"):
        DecodeEngine(from_hf(model), max_len=8, graphs=True)
    assert eng.captured_graph is None  # no graphs on the CPU
    with pytest.raises(LarosaError, match="dump_graph needs"):
        eng.dump_graph("step.dot")
    ids = torch.ones(1, 3, dtype=torch.long)
    for kw, msg in (({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                    ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"chunk": 0}, "chunk")):
        with pytest.raises(LarosaError, match=msg):
            eng.generate(ids, 2, **kw)
    for bad, msg in ((torch.ones(3, dtype=torch.long), "batch, T"), (torch.ones(1, 0, dtype=torch.long), "T >= 1"),
                     (torch.ones(1, 3), "integer token ids")):
        with pytest.raises(LarosaError, match=msg):
            eng.generate(bad, 2)
    # step() by hand: the prompt fills positions 0..5, each step writes out[:, pos + 1]; the cache holds 8
    eng.prefill(torch.ones(1, 6, dtype=torch.long))
    with pytest.raises(LarosaError, match="top_k"):
        eng.step(top_k=-3)
    eng.step()  # decodes position 6, writes out[:, 7]
    with pytest.raises(LarosaError, match="cache is full"):
        eng.step()
    assert int(eng.pos) == 7  # the refused steps changed nothing


def test_env_flags_are_checked(monkeypatch):
    model = tiny_model("llama", seed=0)
    monkeypatch.setenv("LAROSA_SPEC", "yes")
    with pytest.raises(LarosaError, match="LAROSA_SPEC"):
        DecodeEngine(from_hf(model), max_len=8)
    monkeypatch.delenv("LAROSA_SPEC")
    monkeypatch.setenv("LAROSA_DENSE_HEAD", "true")
    with pytest.raises(LarosaError, match="LAROSA_DENSE_HEAD"):
        DecodeEngine(from_hf(model), max_len=8)
    monkeypatch.setenv("LAROSA_KERNEL_MAX_ROWS", "two")
    with pytest.raises(ValueError, match="LAROSA_KERNEL_MAX_ROWS"):
        _ops.max_kernel_rows()
    monkeypatch.setenv("LAROSA_KERNEL_MAX_ROWS", "3")
    assert _ops.max_kernel_rows() == 3


def test_model_weights_nbytes_counts_every_tensor_once_per_holder():
    model = tiny_model("llama", seed=4, tie_word_embeddings=False)
    w = from_hf(model)
    want = sum(p.numel() * p.element_size() for p in model.parameters())  # projections, norms, embed, head
    want += w.inv_freq.numel() * w.inv_freq.element_size()
    assert w.nbytes() == want
    w.layers[0].add_counters(rows=2)
    assert w.nbytes() == want + w.layers[0].counters.numel() * 4


@pytest.mark.parametrize("mode", ["dense", "topk"])
def test_fold_adapter_is_down_then_adapter(mode):
    from larosa.engine import Site, fold_adapter

    g = torch.Generator().manual_seed(0)
    d_in, d_out = 12, 8
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)  # HF layout
    r = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0]
    m = torch.randn(3, d_in, generator=g, dtype=torch.float64)
    site = Site(mode, 0 if mode == "dense" else 6)
    layout = w if mode == "dense" else w.t().contiguous()
    folded = fold_adapter(layout, r, site)
    got = m @ folded.t() if mode == "dense" else m @ folded
    torch.testing.assert_close(got, (m @ w.t()) @ r, atol=1e-12, rtol=0)
    assert folded.shape == layout.shape


@pytest.mark.parametrize("mode", [True, "stream", "select"])
def test_overlapped_adapter_step_matches_plain_step(mode):
    """The decode step with x_mid R_l split off (on the side stream's path or in the MLP selects' launches,
    run in order with the reference ops on the CPU) equals the plain layer."""
    model = tiny_model("llama", seed=7)
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    fused = apply(copy.deepcopy(model), LarosaConfig("fused", "layer", SparsityPlan.from_nominal(0.5)), rot)
    w = from_hf(fused)
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    plain = DecodeEngine(w, max_len=16, batch=2)
    split = DecodeEngine(w, max_len=16, batch=2, overlap_adapters=mode)
    assert split.overlap and not plain.overlap and plain.adapter_mode == "inline"
    assert split.adapter_mode == ("stream" if mode is True else mode)
    ref = _hf_greedy(fused, ids, 5)
    for eng in (plain, split):
        eng.prefill(ids)
        eng.tok.copy_(ref[:, :1])
    for j in range(1, 5):
        plain.step()
        split.step()
        torch.testing.assert_close(split.logits, plain.logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(split.tok, plain.tok)
        plain.tok.copy_(ref[:, j:j + 1])
        split.tok.copy_(ref[:, j:j + 1])
    # no adapters (model-level Q): nothing to overlap
    mono = apply(copy.deepcopy(model), LarosaConfig("fused", "model", SparsityPlan.from_nominal(0.5)), rot)
    assert not DecodeEngine(from_hf(mono), max_len=16, overlap_adapters=mode).overlap
    with pytest.raises(LarosaError, match="overlap_adapters"):
        DecodeEngine(w, max_len=16, overlap_adapters="sideways")
    with pytest.raises(LarosaError, match="adapter_split"):
        DecodeEngine(w, max_len=16, adapter_split=1.5)


def _larosa_tiny(seed=7, level="layer", p=0.5):
    model = tiny_model("llama", seed=seed)
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    return model, apply(copy.deepcopy(model), LarosaConfig("fused", level, SparsityPlan.from_nominal(p)), rot)


def _bf16_larosa(seed: int):
    """A tiny fused LaRoSA model and its engine weights in bf16 where the kernels run: the GPU if there is one, else
    the CPU (the Triton interpreter)."""
    _, fused = _larosa_tiny(seed=seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return fused, from_hf(fused).to(device=dev, dtype=torch.bfloat16)


FUSIONS = [{"fuse_norm_select": True}, {"fuse_residual": True}, {"fuse_norm_select": True, "fuse_residual": True}]


@pytest.mark.parametrize("fusion", FUSIONS, ids=["norm", "residual", "both"])
@pytest.mark.parametrize("overlap", [False, True, "select"])
def test_fused_engine_equals_plain_engine_fp32(overlap, fusion):
    """fp32 (reference ops): the norm + select op and the residual in the GEMV are the same arithmetic as the
    plain layer, so the logits are identical, with the adapters in the layer or split off (the adapter
    residual then added inside the norm op)."""
    model, fused = _larosa_tiny()
    w = from_hf(fused)
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    plain = DecodeEngine(w, max_len=16, batch=2, overlap_adapters=overlap)
    fns = DecodeEngine(w, max_len=16, batch=2, overlap_adapters=overlap, **fusion)
    assert fns.overlap == bool(overlap)
    assert all(st.fused_norm == fusion.get("fuse_norm_select", False)
               and st.fused_residual == fusion.get("fuse_residual", False) for st in fns._statics)
    assert not any(st.fused_norm or st.fused_residual for st in plain._statics)
    for e in (plain, fns):
        e.prefill(ids)
    torch.testing.assert_close(fns.out, plain.out, rtol=0, atol=0)
    for _ in range(4):
        plain.step()
        fns.step()
        torch.testing.assert_close(fns.logits, plain.logits, rtol=0, atol=0)


@pytest.mark.parametrize("fusion", FUSIONS, ids=["norm", "residual", "both"])
@pytest.mark.parametrize("overlap", [False, True, "select"])
def test_fused_engine_runs_the_kernels_bf16(monkeypatch, overlap, fusion):
    """bf16, batch 1: the decode step runs the Triton norm + select kernel (interpreted on the CPU, compiled
    on a GPU, eager either way) for the q/k/v and gate/up sites of every layer and/or the GEMVs with the
    residual in their epilogue (o of every layer, down where no adapter follows), and its logits follow
    the plain kernel engine's."""
    fused, w = _bf16_larosa(3)
    norms, residuals = [], []
    real_norm, real_launch = _ops.triton_gemv.rmsnorm_select, _ops.triton_gemv.launch
    sides = []
    monkeypatch.setattr(_ops.triton_gemv, "rmsnorm_select",
                        lambda *a, **k: (norms.append(1), sides.append(k.get("side")), real_norm(*a, **k))[2])
    monkeypatch.setattr(_ops.triton_gemv, "launch",
                        lambda *a, **k: (residuals.append(k.get("residual") is not None), sides.append(k.get("side")),
                                         real_launch(*a, **k))[2])
    ids = torch.randint(3, fused.config.vocab_size, (1, 6))
    off = {"fuse_norm_select": False, "fuse_residual": False}  # explicit: CUDA's default is both on
    # with the adapters in the selects, against the plain F.linear adapter in order (a fault common to the side
    # programs would otherwise pass unseen)
    plain = DecodeEngine(w, max_len=16, overlap_adapters=False if overlap == "select" else overlap, compile=False,
                         graphs=False, **off)
    split = {"adapter_split": 0.5} if overlap == "select" else {}  # part of each adapter in the norm + select
    fns = DecodeEngine(w, max_len=16, overlap_adapters=overlap, compile=False, graphs=False, **{**off, **fusion},
                       **split)
    for e in (plain, fns):
        e.prefill(ids)  # 6 rows: the reference path, no kernel
    assert not norms and not residuals
    for _ in range(3):
        plain.step()
        fns.step()
        cos = torch.nn.functional.cosine_similarity(fns.logits, plain.logits, dim=-1).item()
        assert cos > 0.999, cos
        fns.tok.copy_(plain.tok)
    per_step_norms = 2 * len(w.layers) if fusion.get("fuse_norm_select") else 0
    per_step_res = sum(1 + (not st.adapter) for st in w.statics) if fusion.get("fuse_residual") else 0
    assert len(norms) == 3 * per_step_norms
    assert sum(residuals) == 3 * per_step_res
    # adapters in the selects (`fns` only): every adapter's columns ride in the down select, the first ones in
    # the norm + gate/up select where that is fused
    n_adapt = sum(st.adapter for st in w.statics)
    assert n_adapt and fns.adapter_mode == {False: "inline", True: "stream", "select": "select"}[overlap]
    sides = [s for s in sides if s is not None]
    in_norm = bool(fusion.get("fuse_norm_select"))
    assert fns._statics[0].adapter_cols == (w.embed.shape[1] // 2 if overlap == "select" else 0)
    per_step_sides = n_adapt * (1 + in_norm) if overlap == "select" else 0
    assert len(sides) == 3 * per_step_sides
    assert all(s.c1 == w.embed.shape[1] for s in sides if s.c0 > 0)


@pytest.mark.parametrize("fuse", [False, True])
def test_select_hints_change_nothing_but_are_kept(monkeypatch, fuse):
    """bf16 kernels, batch 1: each layer's four Top-K selects keep their row's threshold in the engine's
    hint slots (searched near first at the next token), and the logits are those of the engine with the
    hinted search off (LAROSA_SELECT_WINDOW=0), bit for bit (split-K GEMV: it sums in a fixed order)."""
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", "split")
    monkeypatch.setenv("LAROSA_KERNEL_MAX_ROWS", "8")  # the 6-row prefill runs the kernels too: hints unused
    monkeypatch.setenv("LAROSA_PREFETCH_MB", "0")  # the v19 default sites (the prefetch adds o's on a GPU)
    fused, w = _bf16_larosa(5)
    ids = torch.randint(3, fused.config.vocab_size, (1, 6))
    kw = {"max_len": 16, "compile": False, "graphs": False, "overlap_adapters": False, "fuse_norm_select": fuse,
          "fuse_residual": fuse}
    hinted = DecodeEngine(w, **kw)
    assert hinted.select_hints  # the default without overlapped adapters
    hints = hinted.hint_buffers
    assert all(h is not None and h.shape == (4, 1) and not h.any() for h in hints)
    overlapped = DecodeEngine(w, **{**kw, "overlap_adapters": True})
    assert hinted.hint_sites == (0, 1, 2, 3)
    # v19: with overlapped adapters only the norm + select sites (q/k/v, gate/up) keep hints
    assert overlapped.select_hints and overlapped.hint_sites == (0, 2)
    assert DecodeEngine(w, **{**kw, "overlap_adapters": "select"}).hint_sites == (0, 2)
    off = DecodeEngine(w, **{**kw, "overlap_adapters": True}, select_hints=False)
    assert all(h is None for h in off.hint_buffers)
    monkeypatch.setenv("LAROSA_SELECT_WINDOW", "0")
    plain = DecodeEngine(w, **kw)
    plain.prefill(ids)
    logits = []
    for _ in range(3):
        plain.step()
        logits.append(plain.logits.clone())
    assert not any(h.any() for h in plain.hint_buffers)  # window off: hints untouched
    monkeypatch.delenv("LAROSA_SELECT_WINDOW")
    hinted.prefill(ids)  # 6 rows, one hint slot per layer site: the selects leave the hints alone
    assert not any(h.any() for h in hints)
    for want in logits:
        hinted.step()
        assert torch.equal(hinted.logits, want)
    assert all(h.all() for h in hints)  # every site's select left its threshold
    overlapped.prefill(ids)
    for _ in range(3):
        overlapped.step()
    assert all(h[[0, 2]].all() and not h[[1, 3]].any() for h in overlapped.hint_buffers)  # only its sites


@pytest.mark.parametrize("overlap", [False, "select"])
def test_down_histograms_change_nothing_and_are_used_up(monkeypatch, overlap):
    """v30, bf16 kernels, batch 1: with down_hist every layer's down select starts from the histogram its gate/up
    GEMV counted (a select launched with `hist`), which it leaves zeroed for the next step, and picks what the
    select without it picks (the same (t, cutoff) on the same input); the logits match the engine without it
    (the gathered GEMV's atomics sum in a varying order, so to rounding). LAROSA_DOWN_HIST switches the default."""
    monkeypatch.setenv("LAROSA_PREFETCH_MB", "0")
    fused, w = _bf16_larosa(5)
    ids = torch.randint(3, fused.config.vocab_size, (1, 6))
    kw = {"max_len": 16, "compile": False, "graphs": False, "overlap_adapters": overlap, "fuse_norm_select": True,
          "fuse_residual": True}
    assert not DecodeEngine(w, **kw).down_hist  # the default (v30: measured no faster end to end)
    on, off = DecodeEngine(w, **kw, down_hist=True), DecodeEngine(w, **kw, down_hist=False)
    assert all(st.down_hist for st in on._statics) and not any(st.down_hist for st in off._statics)
    assert all(h is not None and h.shape == (_ops.triton_gemv.hist_bins(),) for h in on.hist_buffers)
    assert all(h is None for h in off.hist_buffers)
    monkeypatch.setenv("LAROSA_DOWN_HIST", "1")
    assert DecodeEngine(w, **kw).down_hist and not DecodeEngine(w, **kw, down_hist=False).down_hist
    monkeypatch.setenv("LAROSA_DOWN_HIST", "yes")
    with pytest.raises(LarosaError, match="LAROSA_DOWN_HIST"):
        DecodeEngine(w, **kw)
    monkeypatch.delenv("LAROSA_DOWN_HIST")
    real = _ops.triton_gemv.select
    hist_sels = []

    def spy(x, k, *a, **kws):
        if kws.get("hist") is None:
            return real(x, k, *a, **kws)
        counted = kws["hist"].clone()
        assert counted.sum().item() == x.numel()  # the gate/up output, every entry counted once
        sel = real(x, k, *a, **kws)
        assert torch.equal(sel, real(x, k, *a, **{**kws, "hist": None}))
        hist_sels.append(sel)
        return sel

    monkeypatch.setattr(_ops.triton_gemv, "select", spy)
    for e in (off, on):
        e.prefill(ids)  # 6 rows: the reference path, the histograms untouched
    assert not any(h.any() for h in on.hist_buffers)
    for _ in range(3):
        off.step()
        on.step()
        assert not any(h.any() for h in on.hist_buffers)
        cos = torch.nn.functional.cosine_similarity(on.logits, off.logits, dim=-1).item()
        assert cos > 0.999, cos
        on.tok.copy_(off.tok)
    assert len(hist_sels) == 3 * len(w.layers)  # every layer's down select, every step


def test_kernel_choice_by_kept_share_reaches_every_topk_launch(monkeypatch):
    """kernel=None: one Top-K kernel for the whole model, "gtile" where it keeps at most
    GTILE_MODEL_MAX_KEEP of its Top-K weight bytes, else "tile"; None (the ops' default) for a dense model
    or with LAROSA_KERNEL_IMPL set. An explicit kernel reaches every Top-K launch of the decode step (the
    fused norm + select ones included), and gathered and masked rows give the same logits (bf16 kernels)."""
    from larosa import engine as eng_mod

    monkeypatch.delenv("LAROSA_KERNEL_IMPL", raising=False)
    model, fused = _larosa_tiny(seed=3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels under the interpreter
    w = from_hf(fused).to(device=dev, dtype=torch.bfloat16)
    share = eng_mod.kept_share(w)
    assert 0.4 < share < 0.6  # nominal p = 0.5
    kw = {"max_len": 16, "compile": False, "graphs": False, "overlap_adapters": False,
          "fuse_norm_select": True, "fuse_residual": True}
    assert DecodeEngine(w, **kw).kernel == "gtile"
    monkeypatch.setattr(eng_mod, "GTILE_MODEL_MAX_KEEP", share - 1e-3)
    assert DecodeEngine(w, **kw).kernel == "tile"
    monkeypatch.setattr(eng_mod, "GTILE_MODEL_MAX_KEEP", share)
    assert DecodeEngine(w, **kw).kernel == "gtile"
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", "split")
    assert DecodeEngine(w, **kw).kernel is None
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", "auto")  # the default spelled out: the engine's own choice
    assert DecodeEngine(w, **kw).kernel == "gtile"
    monkeypatch.delenv("LAROSA_KERNEL_IMPL")
    assert eng_mod.kept_share(from_hf(model)) is None and DecodeEngine(from_hf(model), max_len=8).kernel is None
    with pytest.raises(LarosaError, match="kernel"):
        DecodeEngine(w, **kw, kernel="bogus")
    impls = []
    real = _ops.triton_gemv.launch
    monkeypatch.setattr(_ops.triton_gemv, "launch", lambda *a, **k: (impls.append(k.get("impl")), real(*a, **k))[1])
    ids = torch.randint(3, fused.config.vocab_size, (1, 6))
    logits = {}
    for kernel in ("tile", "gtile"):
        e = DecodeEngine(w, **kw, kernel=kernel)
        e.prefill(ids)  # 6 rows: the reference path, no kernel
        impls.clear()
        e.step()
        assert len(impls) == 4 * len(w.layers) and set(impls) == {kernel}
        logits[kernel] = e.logits.float()
    cos = torch.nn.functional.cosine_similarity(logits["tile"], logits["gtile"], dim=-1).item()
    assert cos > 0.999, cos


@pytest.mark.parametrize("p,kernel", [(0.25, "gtile"), (0.75, "gtile"), (0.1, "tile")])
def test_default_kernel_by_sparsity(p, kernel, monkeypatch):
    """The measured choice (v26): gathered rows from nominal p = 0.25 up (kept share ~0.77 <= 0.8), the masked
    kernel below the measured range (p = 0.1 keeps ~0.9 of the Top-K weight bytes)."""
    from larosa import engine as eng_mod

    monkeypatch.delenv("LAROSA_KERNEL_IMPL", raising=False)
    _, fused = _larosa_tiny(seed=3, p=p)
    w = from_hf(fused).to(dtype=torch.bfloat16)
    share = eng_mod.kept_share(w)
    assert (share <= eng_mod.GTILE_MODEL_MAX_KEEP) == (kernel == "gtile")
    assert eng_mod.topk_kernel(w) == kernel


@pytest.mark.parametrize("sites", [(0, 1), (3,)])
def test_hint_sites_limit_the_hinted_selects(sites):
    """hint_sites: only those sites' selects keep hints (the others' slots stay zero), same logits. (The down
    histograms, which take the down select's hint's place, are off here.)"""
    fused, w = _bf16_larosa(5)
    ids = torch.randint(3, fused.config.vocab_size, (1, 6))
    kw = {"max_len": 16, "compile": False, "graphs": False, "overlap_adapters": True, "select_hints": True,
          "down_hist": False}
    eng = DecodeEngine(w, **kw, hint_sites=sites)
    assert eng.hint_sites == sites and all(st.hint_sites == sum(1 << i for i in sites) for st in eng._statics)
    eng.prefill(ids)
    for _ in range(2):
        eng.step()
    for h in eng.hint_buffers:
        assert all(bool(h[i].all()) == (i in sites) for i in range(4))
    with pytest.raises(LarosaError, match="hint_sites"):
        DecodeEngine(w, **kw, hint_sites=(4,))


def test_hint_sites_from_the_environment(monkeypatch):
    """LAROSA_HINT_SITES (A/B runs) stands in for hint_sites=None: a list of sites, or none; an explicit
    hint_sites wins over it; malformed values are refused."""
    _, fused = _larosa_tiny(seed=5)
    w = from_hf(fused).to(dtype=torch.bfloat16)
    kw = {"max_len": 16, "compile": False, "graphs": False, "overlap_adapters": True}
    assert DecodeEngine(w, **kw).hint_sites == (0, 2)  # the default with overlapped adapters (CPU: no prefetch)
    monkeypatch.setenv("LAROSA_HINT_SITES", "3,0,1")
    assert DecodeEngine(w, **kw).hint_sites == (0, 1, 3)
    assert DecodeEngine(w, **kw, hint_sites=(2,)).hint_sites == (2,)
    assert DecodeEngine(w, **kw, select_hints=False).hint_sites == ()
    monkeypatch.setenv("LAROSA_HINT_SITES", "none")
    eng = DecodeEngine(w, **kw)
    assert eng.hint_sites == () and all(st.hint_sites == 0 for st in eng._statics)
    for bad in ("4", "0,x", "1,,2"):
        monkeypatch.setenv("LAROSA_HINT_SITES", bad)
        with pytest.raises(LarosaError, match="LAROSA_HINT_SITES"):
            DecodeEngine(w, **kw)
    monkeypatch.setenv("LAROSA_HINT_SITES", "")  # empty: as if unset
    assert DecodeEngine(w, **kw).hint_sites == (0, 2)


def test_prefetch_budget_adds_the_o_hint(monkeypatch):
    """v23: with an L2 prefetch budget (LAROSA_PREFETCH_MB) on a GPU that can prefetch (compute capability 9+),
    the o select keeps a hint too (the prefetch guesses from it), and the engine records the budget; elsewhere
    (the CPU) and without select hints there is no prefetch and no extra hint; the steps' logits are those of
    the engine without it; a malformed budget is refused everywhere."""
    fused, w = _bf16_larosa(5)
    dev = w.layers[0].wqkv.device.type
    ids = torch.randint(3, fused.config.vocab_size, (1, 6))
    kw = {"max_len": 16, "compile": False, "graphs": False, "overlap_adapters": True}
    monkeypatch.setenv("LAROSA_PREFETCH_MB", "0")
    plain = DecodeEngine(w, **kw)
    assert plain.prefetch_mb == 0 and plain.hint_sites == (0, 2)
    monkeypatch.setenv("LAROSA_PREFETCH_MB", "16")
    pf = DecodeEngine(w, **kw)
    can = dev == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    assert (pf.prefetch_mb, pf.hint_sites) == ((16, (0, 1, 2)) if can else (0, (0, 2)))
    off = DecodeEngine(w, **kw, select_hints=False)
    assert off.prefetch_mb == 0 and off.hint_sites == ()
    for e in (plain, pf):
        e.prefill(ids)
    for _ in range(3):
        for e in (plain, pf):
            e.step()
        torch.testing.assert_close(pf.logits.float(), plain.logits.float(), atol=0.05, rtol=0.05)
    assert all(bool(h[1].all()) == can for h in pf.hint_buffers)
    monkeypatch.setenv("LAROSA_PREFETCH_MB", "lots")
    with pytest.raises(ValueError, match="LAROSA_PREFETCH_MB"):
        DecodeEngine(w, **kw)


def _count_calls(monkeypatch, owner, name: str) -> list:
    """A list that gets one entry per call of owner.name (which still runs)."""
    calls, real = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a: (calls.append(1), real(*a))[1])
    return calls


def _follow(ref: DecodeEngine, eng: DecodeEngine, steps: int) -> None:
    """Step both engines (prefilled) `steps` times, `eng` on `ref`'s tokens; its logits within bf16 rounding of
    `ref`'s (cosine > 0.999) at every step."""
    for _ in range(steps):
        ref.step()
        eng.step()
        cos = torch.nn.functional.cosine_similarity(eng.logits.float(), ref.logits.float(), dim=-1).item()
        assert cos > 0.999, cos
        eng.tok.copy_(ref.tok)


def _bf16_tiny_hd16(seed: int):
    """A tiny Llama with head size 16 (the attention kernel's smallest), its bf16 engine weights on the GPU
    if there is one (else the CPU, where the kernels run under the interpreter), and a 5-token prompt."""
    model = tiny_model("llama", seed=seed, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return model, from_hf(model).to(device=dev, dtype=torch.bfloat16), torch.randint(3, model.config.vocab_size, (1, 5))


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_rope_step_equals_plain_step(monkeypatch, arch):
    """fuse_rope: the decode step's RoPE, cache write and attention in one op. In fp32 (the op's reference)
    the logits and the KV caches equal the plain step's, for dense and LaRoSA models; layers with q/k norms
    (Qwen3) keep the plain path."""
    from larosa.kernels import reference as _ref

    calls = _count_calls(monkeypatch, _ref, "rope_decode_attention_ref")
    model = tiny_model(arch, seed=5)
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (4, 24)), progress=False)
    fused = apply(copy.deepcopy(model), LarosaConfig("fused", "layer", SparsityPlan.from_nominal(0.5)), rot)
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    for m in (model, fused):
        w = from_hf(m)
        plain, fr = (DecodeEngine(w, max_len=12, batch=2, fuse_rope=f) for f in (False, True))
        assert not plain._statics[0].fused_rope and fr._statics[0].fused_rope
        before = len(calls)
        for e in (plain, fr):
            e.prefill(ids)
        assert len(calls) == before  # prefill keeps the plain path
        for _ in range(3):
            plain.step()
            fr.step()
            torch.testing.assert_close(fr.logits, plain.logits, rtol=0, atol=1e-6)
        for a, b in zip(fr.k_cache + fr.v_cache, plain.k_cache + plain.v_cache):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert len(calls) == (0 if arch == "qwen3" else 2 * 3 * model.config.num_hidden_layers)


def test_fused_rope_runs_the_kernel_bf16(monkeypatch):
    """bf16, head size 16: the fused step runs the split-cache kernel with RoPE (interpreted on the CPU,
    compiled on a GPU) once per layer and step, and its logits follow the plain step's."""
    calls = _count_calls(monkeypatch, _ops.triton_attention, "rope_decode_attention")
    model, w, ids = _bf16_tiny_hd16(seed=2)
    kw = {"max_len": 12, "compile": False, "graphs": False}
    plain, fr = DecodeEngine(w, fuse_rope=False, **kw), DecodeEngine(w, fuse_rope=True, **kw)
    for e in (plain, fr):
        e.prefill(ids)
    _follow(plain, fr, 3)
    assert len(calls) == 3 * model.config.num_hidden_layers


def test_attention_combine_by_last_program_in_the_engine(monkeypatch):
    """attn_combine="last" (with fuse_rope): the engine gives each layer a zeroed counter slot per KV head,
    the attention kernel's last split program combines (no combine launch), the logits equal the
    two-launch step's, and the counters are left zeroed; a bad value is refused."""
    combines = _count_calls(monkeypatch, _ops.triton_attention, "_combine")
    model, w, ids = _bf16_tiny_hd16(seed=4)
    kw = {"max_len": 12, "compile": False, "graphs": False, "fuse_rope": True}
    two, last = DecodeEngine(w, attn_combine="launch", **kw), DecodeEngine(w, **kw)  # "last": the default
    assert last.attn_combine == "last" and all(c is None for c in two.attn_counters)
    assert all(c is not None and c.shape == (2,) for c in last.attn_counters)
    for e in (two, last):
        e.prefill(ids)
    for _ in range(3):
        n = len(combines)
        two.step()
        assert len(combines) == n + model.config.num_hidden_layers
        last.step()
        assert len(combines) == n + model.config.num_hidden_layers  # none in the "last" step
        assert torch.equal(last.logits, two.logits)
        last.tok.copy_(two.tok)
        assert not any(c.any() for c in last.attn_counters)
    assert DecodeEngine(w, **{**kw, "fuse_rope": False}, attn_combine="last").attn_combine == "launch"
    with pytest.raises(LarosaError, match="attn_combine"):
        DecodeEngine(w, **kw, attn_combine="bogus")


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_kernel_engine_equals_plain_engine_fp32(monkeypatch, arch):
    """dense_kernel: every dense site and the head go through `larosa::dense_linear` (prefill rows too: the
    op's reference there). In fp32 that is HF's arithmetic, so tokens and logits equal the plain engine's,
    for dense models (biases: Qwen2; q/k norms: Qwen3) and LaRoSA ones (only the head is dense). The CPU's
    default is off."""
    from larosa.kernels import reference as _ref

    calls = _count_calls(monkeypatch, _ref, "dense_linear_ref")
    model, fused = _larosa_tiny(seed=6) if arch == "llama" else (tiny_model(arch, seed=6), None)
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    layers = model.config.num_hidden_layers
    for m, per_pass in ((model, 4 * layers + 1), (fused, 1)):
        if m is None:
            continue
        w = from_hf(m)
        plain, dk = DecodeEngine(w, max_len=12, batch=2), DecodeEngine(w, max_len=12, batch=2, dense_kernel=True)
        assert not plain.dense_kernel and not any(st.dense_kernel for st in plain._statics)
        assert all(st.dense_kernel for st in dk._statics)
        # tiny models have random norm scales; LaRoSA's fused form folds them (ones: the rms scaling alone)
        assert all(st.unit_norms == (m is fused) for st in dk._statics) and dk._unit_final_norm == (m is fused)
        before = len(calls)
        torch.testing.assert_close(dk.prefill(ids), plain.prefill(ids), rtol=0, atol=0)
        for _ in range(3):
            plain.step()
            dk.step()
            torch.testing.assert_close(dk.logits, plain.logits, rtol=0, atol=0)
        assert torch.equal(dk.out, plain.out)
        assert len(calls) - before == 4 * per_pass  # prefill and three steps


def test_dense_head_rule_and_switch(monkeypatch):
    """The head takes `dense_linear` with dense_kernel, adapters split off or not (v28), launched as a programmatic
    dependent only without Top-K sites; `dense_head=` / `head_pdl=` or LAROSA_DENSE_HEAD override that, and the
    logits stay the plain engine's (fp32: the op's reference is HF's arithmetic)."""
    from larosa.kernels import reference as _ref

    calls = _count_calls(monkeypatch, _ref, "dense_linear_ref")
    monkeypatch.delenv("LAROSA_DENSE_HEAD", raising=False)
    dense_model, fused = _larosa_tiny(seed=6)
    w = from_hf(fused)
    kw = {"max_len": 12, "compile": False, "graphs": False, "dense_kernel": True}
    inline = DecodeEngine(w, **kw)
    assert inline.dense_head and not inline.head_pdl  # Top-K sites: the head launches in order
    split = DecodeEngine(w, **kw, overlap_adapters="select")
    assert split.adapter_mode == "select" and split.dense_head and not split.head_pdl
    assert DecodeEngine(w, **kw, head_pdl=True).head_pdl
    dense = DecodeEngine(from_hf(dense_model), **kw)
    assert dense.dense_head and dense.head_pdl
    assert not DecodeEngine(from_hf(dense_model), **kw, head_pdl=False).head_pdl
    assert not DecodeEngine(w, **kw, overlap_adapters="select", dense_head=False).dense_head
    assert not DecodeEngine(w, **{**kw, "dense_kernel": False}).dense_head
    monkeypatch.setenv("LAROSA_DENSE_HEAD", "1")
    forced = DecodeEngine(w, **kw, overlap_adapters="select")
    assert forced.dense_head and not DecodeEngine(w, **kw, overlap_adapters="select", dense_head=False).dense_head
    monkeypatch.setenv("LAROSA_DENSE_HEAD", "0")
    assert not DecodeEngine(w, **kw).dense_head
    plain = DecodeEngine(w, max_len=12, compile=False, graphs=False)
    ids = torch.randint(3, fused.config.vocab_size, (1, 5))
    before = len(calls)
    torch.testing.assert_close(forced.prefill(ids), plain.prefill(ids), rtol=0, atol=0)
    forced.step()
    plain.step()
    torch.testing.assert_close(forced.logits, plain.logits, rtol=0, atol=0)
    assert len(calls) - before == 2  # the head of the prefill and of the step


@pytest.mark.parametrize("unit", [False, True])
def test_dense_kernel_engine_runs_the_kernel_bf16(monkeypatch, unit):
    """bf16, batch 1: each decode step runs the dense GEMV kernel (interpreted on the CPU, compiled on a GPU)
    four times per layer (q/k/v with the norm, o with the residual, gate/up with the norm, down with the
    residual) and once for the head, and its logits follow the plain engine's. Norm weights of ones (`unit`)
    are not loaded: the kernel scales by the rms alone."""
    from larosa.kernels import triton_dense

    launches, pdl = [], []
    real = triton_dense.dense_gemv
    monkeypatch.setattr(triton_dense, "dense_gemv",
                        lambda *a, **k: (launches.append(tuple(n for n in ("w_up", "bias", "residual", "norm_w")
                                                                   if k.get(n) is not None) + ("rms",) * k["rms"]),
                                         pdl.append(k.get("pdl")), real(*a, **k))[2])
    attn_pdl = []
    real_attn = _ops.triton_attention.rope_decode_attention
    monkeypatch.setattr(_ops.triton_attention, "rope_decode_attention",
                        lambda *a: (attn_pdl.append(a[-1]), real_attn(*a))[1])
    model, w, ids = _bf16_tiny_hd16(seed=8)
    if unit:
        for t in [w.final_norm] + [n for lw in w.layers for n in (lw.attn_norm, lw.mlp_norm)]:
            t.fill_(1.0)
    kw = {"max_len": 12, "compile": False, "graphs": False, "fuse_rope": True}
    plain, dk = DecodeEngine(w, dense_kernel=False, **kw), DecodeEngine(w, dense_kernel=True, **kw)
    for e in (plain, dk):
        e.prefill(ids)
    g = () if unit else ("norm_w",)
    assert launches == [g + ("rms",)]  # the prompt's rows take the reference, its last position's head the kernel
    assert pdl == [None]  # a dense model's head: a programmatic dependent where possible (v28 rule)
    DecodeEngine(w, dense_kernel=True, head_pdl=False, **kw).prefill(ids)
    assert pdl == [None, False]  # asked to launch in order, it tells the kernel so
    launches.clear()
    _follow(plain, dk, 3)
    # the attention asks to launch as a programmatic dependent in the dense-kernel step only (its o projection
    # loads weights meanwhile)
    n = model.config.num_hidden_layers
    assert attn_pdl == ([False] * n + [True] * n) * 3
    layer = [g + ("rms",), ("residual",), ("w_up",) + g + ("rms",), ("residual",)]
    assert launches == (layer * model.config.num_hidden_layers + [g + ("rms",)]) * 3


@pytest.mark.parametrize("overlap", [False, "select"])
def test_spec_engine_runs_the_speculative_gemv_at_o(monkeypatch, overlap):
    """spec=True (v22): every layer's Top-K o projection runs the speculative GEMV (`larosa::spec_linear` on a
    blocked copy of the weight, `triton_spec.launch_spec`), its hint slot is kept (the guess), the model's own
    weights are left input-major, and the logits follow the engine without it (bf16 kernels, interpreted on the
    CPU); the 6-row prefill takes the reference on the unblocked weight."""
    from larosa.kernels import triton_spec

    monkeypatch.delenv("LAROSA_SPEC", raising=False)
    fused, w = _bf16_larosa(3)
    dev = w.layers[0].wqkv.device.type
    kw = {"max_len": 16, "compile": False, "graphs": False, "overlap_adapters": overlap,
          "fuse_norm_select": True, "fuse_residual": True}
    assert not DecodeEngine(w, **kw).spec  # off by default
    monkeypatch.setenv("LAROSA_SPEC", "1")
    assert DecodeEngine(w, **kw).spec
    monkeypatch.delenv("LAROSA_SPEC")
    plain, spec = DecodeEngine(w, **kw), DecodeEngine(w, **kw, spec=True)
    assert 1 in spec.hint_sites
    assert DecodeEngine(w, **kw, spec=True, select_hints=False).hint_sites == (1,)
    bn = triton_spec.spec_tiles()[0]
    for lw, t in zip(w.layers, spec._tensors):
        assert lw.wo.dim() == 2 and torch.equal(t[3], triton_spec.spec_layout(lw.wo, bn))
    launches = []
    real = triton_spec.launch_spec
    monkeypatch.setattr(triton_spec, "launch_spec", lambda *a, **k: (launches.append(a[1].dim()), real(*a, **k))[1])
    # the plain reference: the same model in fp32 through the engine's reference ops (plain PyTorch)
    ref = DecodeEngine(from_hf(fused), max_len=16)
    ids = torch.randint(3, fused.config.vocab_size, (1, 6))
    # prefill() returns the last position's logits (`e.logits` is only written by step())
    want = ref.prefill(ids)
    got_plain, got_spec = plain.prefill(ids), spec.prefill(ids)
    assert not launches
    # the prompt takes the reference ops on the unblocked weight: the same arithmetic, bitwise on the CPU; on a
    # GPU spec's reference multiplies by its un-blocked weight copy (`ops._unblock`), whose layout takes cuBLAS to
    # another kernel than plain's, so the bf16 results may differ in the last bit (v28 H200 run: ~1e-3; a wrong o
    # projection is ~0.1)
    if dev == "cpu":
        assert torch.equal(got_spec, got_plain)
    else:
        torch.testing.assert_close(got_spec, got_plain, atol=4e-3, rtol=0)
    # logits here are ~0.3 at most; bf16 vs fp32 differs by ~0.003, a wrong o projection by far more
    torch.testing.assert_close(got_spec.float().cpu(), want, atol=1e-2, rtol=0)
    for e in (plain, spec, ref):  # decode from the reference's next token, not the reset slot's
        e.tok.copy_(want.argmax(-1, keepdim=True))
    for _ in range(2):
        ref.step()
        plain.step()
        spec.step()
        assert launches == [3] * len(w.layers)
        launches.clear()
        cos = torch.nn.functional.cosine_similarity(spec.logits.float(), plain.logits.float(), dim=-1).item()
        assert cos > 0.999, cos
        torch.testing.assert_close(spec.logits.float().cpu(), ref.logits, atol=1e-2, rtol=0)
        torch.testing.assert_close(plain.logits.float().cpu(), ref.logits, atol=1e-2, rtol=0)
        spec.tok.copy_(ref.tok)
        plain.tok.copy_(ref.tok)
    assert all(h[1].all() for h in spec.hint_buffers)


def test_spec_linear_op_paths(monkeypatch):
    """`larosa::spec_linear`: the kernel (one row, a hint) and the reference (rows > 1, no hint, k = d_in) give
    residual + TopK_k(x) @ W^T + bias; malformed weights are refused."""
    from larosa.kernels import reference as ref

    torch.manual_seed(0)
    x = torch.randn(1, 1, 192).to(torch.bfloat16)
    wt = (torch.randn(192, 80) * 0.05).to(torch.bfloat16)
    r = torch.randn(1, 1, 80).to(torch.bfloat16)
    b = torch.randn(80).to(torch.bfloat16)
    blk = _ops.triton_spec.spec_layout(wt)
    for k in (50, 192):
        want = ref.topk_gemv_ref(x.view(1, -1), wt, k, b, r.view(1, -1)).view(1, 1, 80).float()
        for hint in (torch.zeros(1, dtype=torch.int32), None):
            y = torch.ops.larosa.spec_linear(x, blk, k, r, b, hint)
            assert y.shape == r.shape
            torch.testing.assert_close(y.float(), want, atol=0.05, rtol=0.02)
    x3 = torch.randn(3, 192).to(torch.bfloat16)
    r3 = torch.randn(3, 80).to(torch.bfloat16)
    torch.testing.assert_close(torch.ops.larosa.spec_linear(x3, blk, 60, r3).float(),
                               ref.topk_gemv_ref(x3, wt, 60, None, r3).float())
    with pytest.raises(ValueError, match="blocked"):
        torch.ops.larosa.spec_linear(x, wt, 50, r)
