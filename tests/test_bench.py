"""`larosa bench decode` and the random-shape models on the CPU (tiny shape; the numbers are meaningless
here, the arithmetic is not)."""

import json
import math

import pytest
import torch

from larosa.bench import bench_decode, detrended_spread, kv_positions_read, param_weighted
from larosa.engine import DecodeEngine
from larosa.errors import LarosaError
from larosa.shapes import SHAPES, random_base, sparse_variant, teal_thresholds
from larosa.sparsity import SparsityPlan, k_for


def test_sparse_variant_k_and_adapters():
    base = random_base("tiny", torch.float32)
    w = sparse_variant(base, "larosa", 0.5)
    sh = SHAPES["tiny"]
    plan = SparsityPlan.from_nominal(0.5)
    st = w.statics[0]
    assert st.attn_in.k == k_for(plan.sites["attn_in"], sh.hidden)
    assert st.mlp_out.k == k_for(plan.sites["mlp_out"], sh.intermediate)
    assert [lw.adapter is not None for lw in w.layers] == [True] * (sh.layers - 1) + [False]
    a = w.layers[0].adapter
    torch.testing.assert_close(a @ a.T, torch.eye(sh.hidden), atol=1e-5, rtol=0)
    # input-major copies: a kept input channel is one contiguous row
    assert w.layers[0].wqkv.shape == (sh.hidden, base.layers[0].wqkv.shape[0])
    assert sparse_variant(base, "topk", 0.5).layers[0].adapter is None


def test_param_weighted_matches_plan_arithmetic():
    base = random_base("tiny", torch.float32)
    assert param_weighted(base) == 0.0
    sh = SHAPES["tiny"]
    d, f, q, kv = sh.hidden, sh.intermediate, sh.hidden, sh.kv_heads * sh.head_dim
    plan = SparsityPlan.from_nominal(0.4)
    sizes = {"attn_in": d * (q + 2 * kv), "attn_out": q * d, "mlp_in": 2 * d * f, "mlp_out": f * d}
    dims = {"attn_in": d, "attn_out": q, "mlp_in": d, "mlp_out": f}
    kept = sum(sizes[s] * k_for(plan.sites[s], dims[s]) / dims[s] for s in sizes)
    assert param_weighted(sparse_variant(base, "larosa", 0.4)) == pytest.approx(1 - kept / sum(sizes.values()))


def test_teal_thresholds_hit_their_sparsity_on_the_calibration_prompt():
    base = random_base("tiny", torch.float32)
    prompt = torch.randint(0, SHAPES["tiny"].vocab, (1, 64))
    thr = teal_thresholds(base, 0.5, prompt)
    w = sparse_variant(base, "teal", 0.5, thresholds=thr)
    assert torch.equal(w.layers[1].thresholds, thr[1])
    seen = []
    eng = DecodeEngine(base, max_len=80, compile=False)
    # on the dense model's activations (what they were computed from) each threshold cuts exactly half
    eng.prefill(prompt, probe=lambda i, s, x: seen.append((x.abs() <= thr[i, s]).float().mean().item()))
    assert len(seen) == 4 * SHAPES["tiny"].layers
    assert all(abs(v - 0.5) < 0.005 for v in seen), seen


def test_bench_decode_cpu_tiny_writes_outputs(tmp_path):
    res = bench_decode(shape="tiny", methods=("dense", "larosa", "teal"), sparsities=(0.5,), prompt_len=8,
                       gen_lens=(12,), dtype="float32", device="cpu", out=tmp_path, progress=False)
    rec = json.loads((tmp_path / "results.json").read_text())
    rows = rec["rows"]
    assert [r["method"] for r in rows] == ["dense", "larosa", "teal"]
    dense, lar, teal = rows
    assert lar["steps_timed"] == 11 and dense["steps_timed"] == 11
    # the Top-K kernel the engine chose by the model's kept share (p = 0.5 keeps about half: gathered rows)
    assert (dense["kernel"], lar["kernel"], teal["kernel"]) == (None, "gtile", None)
    assert all(r["fuse_rope"] is False and r["attn_combine"] == "launch" for r in rows)  # the CPU defaults
    # in order on the CPU (no graphs): LaRoSA's selects keep hints at all four sites; its list store is recorded
    assert lar["select_hints"] == [0, 1, 2, 3] and lar["compact_store"] == "asm32" and "compact_store" not in dense
    assert lar["gather_x"] is True and "gather_x" not in dense  # the list carries x with each position (v24 default)
    # v30: the 16384-lane (11008-16384-wide) selects search in a run-time loop; no down histogram by default
    assert lar["select_loop_from"] == 16384 and "select_loop_from" not in dense
    assert all(r["down_hist"] is False for r in rows)
    # no L2 prefetch off the GPU; the split attention's program target (the default) on every row
    assert all(r["prefetch_mb"] == 0 and r["attn_programs"] == 256 and r["attn_balanced"] is True for r in rows)
    # no dense_linear head off the GPU (no PDL there), so no programmatic head either
    assert all(r["dense_head"] is False and r["head_pdl"] is False for r in rows)
    # bytes per token counted independently: every weight entry once (fp32), one embedding row, the head,
    # unit norms; LaRoSA reads k of d_in rows per projection plus its adapters
    sh = SHAPES["tiny"]
    d, f, q, kv = sh.hidden, sh.intermediate, sh.hidden, sh.kv_heads * sh.head_dim
    proj = {"attn_in": (d, q + 2 * kv), "attn_out": (q, d), "mlp_in": (d, 2 * f), "mlp_out": (f, d)}
    norms = 2 * d * sh.layers
    head = sh.vocab * d
    dense_w = 4 * (sh.layers * sum(a * b for a, b in proj.values()) + norms + head + d)
    assert dense["bytes_per_token"]["weights"] == dense_w
    plan = SparsityPlan.from_nominal(0.5)
    kept = sh.layers * sum(k_for(plan.sites[s], a) * b for s, (a, b) in proj.items())
    adapters = (sh.layers - 1) * d * d
    lar_w = 4 * (kept + norms + head + d + adapters)
    assert lar["bytes_per_token"]["weights"] == lar_w
    assert lar["byte_model_limit"] == pytest.approx(dense_w / lar_w)
    # KV bytes: the 11 timed steps sit at positions 8..18 and read pos + 1 cache positions, mean 14
    assert dense["kv_positions_read"] == 14 and dense["max_len"] == 64
    assert dense["bytes_per_token"]["kv"] == 4 * 2 * sh.layers * kv * 14
    assert dense["bytes_per_token"]["total"] == dense_w + dense["bytes_per_token"]["kv"]
    # TEAL sits at LaRoSA's parameter-weighted sparsity; its bytes vary per token and are not claimed
    assert teal["param_weighted"] == pytest.approx(lar["param_weighted"])
    assert teal["achieved_GBps"] is None and teal["byte_model_limit"] is None
    assert (tmp_path / "table.md").is_file() and (tmp_path / "decode.png").is_file()
    assert "larosa" in res["table"]


def test_detrended_spread_removes_the_context_growth_only():
    """A steady ramp (the attention reading more positions each step) has no jitter once detrended, though
    its raw p99 / p50 is far above 1; spikes on a ramp still show, at their size."""
    ramp = [4.0 + 0.002 * i for i in range(2000)]
    assert detrended_spread(ramp) == pytest.approx(1.0, abs=1e-9)
    assert max(ramp) / sorted(ramp)[1000] > 1.2
    spiky = [v * (1.1 if i % 50 == 7 else 1.0) for i, v in enumerate(ramp)]  # 2 % of the steps 10 % slower
    assert detrended_spread(spiky) == pytest.approx(1.1, abs=0.01)
    assert detrended_spread([3.0, 4.0]) == 1.0
    assert math.isnan(detrended_spread([5.0, 3.0, 1.0, 0.1]))  # a fitted line through zero: no ratio


def test_registered_shapes_have_consistent_head_dims():
    for name, sh in SHAPES.items():
        assert sh.hidden % sh.heads == 0 and sh.heads % sh.kv_heads == 0, name
        assert sh.head_dim % 2 == 0, name


def test_bench_decode_argument_errors():
    with pytest.raises(LarosaError, match="exactly one"):
        bench_decode(progress=False)
    with pytest.raises(LarosaError, match="unknown shape"):
        bench_decode(shape="gpt5", progress=False, device="cpu")
    with pytest.raises(LarosaError, match="unknown method"):
        bench_decode(shape="tiny", methods=("cats",), progress=False, device="cpu")
    # refused before any model is built
    for kw, msg in (({"dtype": "int8"}, "unknown dtype"), ({"gen_lens": (1,)}, "generation lengths"),
                    ({"gen_lens": ()}, "generation lengths"), ({"prompt_len": 0}, "prompt length"),
                    ({"batch": 0}, "batch"), ({"sparsities": (0.5, 1.0)}, r"\[0, 1\)")):
        with pytest.raises(LarosaError, match=msg):
            bench_decode(shape="tiny", progress=False, device="cpu", **kw)


def test_bench_decode_batch2_roofline_per_token_and_plot(tmp_path, monkeypatch):
    """At batch 2 one step reads the weights once and yields two tokens: the dense roofline in tok/s is twice
    bandwidth / bytes per step. The byte-model limit is not claimed there (the rows' kept sets differ) and the
    plot skips it. Dense rows never name a Top-K kernel, even with LAROSA_KERNEL_IMPL set."""
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", "tile")
    monkeypatch.setattr("larosa.bench.copy_bandwidth", lambda dev: 1e11)  # the CPU's is not measured (NaN)
    res = bench_decode(shape="tiny", methods=("dense", "larosa"), sparsities=(0.5,), prompt_len=4, gen_lens=(4,),
                       batch=2, dtype="float32", device="cpu", out=tmp_path, progress=False)
    dense, lar = res["record"]["rows"]
    setup = res["setup"]
    assert setup["dense_roofline_tok_s"] == pytest.approx(2 * 1e11 / dense["bytes_per_token"]["total"])
    assert dense["achieved_GBps"] == pytest.approx(dense["bytes_per_token"]["total"] * dense["tok_s"] / 2 / 1e9)
    assert dense["bytes_per_token"]["kv"] == 2 * dense["kv_positions_read"] * 4 * 2 * SHAPES["tiny"].layers * \
        SHAPES["tiny"].kv_heads * SHAPES["tiny"].head_dim
    assert lar["byte_model_limit"] is None and (tmp_path / "decode.png").stat().st_size > 0
    assert dense["kernel"] is None and lar["kernel"] == "tile"


def test_kv_positions_read_follows_the_attention_impl(monkeypatch):
    monkeypatch.delenv("LAROSA_ATTENTION", raising=False)
    # timed steps at positions 128..254 read 129..255 positions: mean 192
    assert kv_positions_read(128, 128, 320) == sum(range(129, 256)) / 127
    monkeypatch.setenv("LAROSA_ATTENTION", "sdpa")  # masked SDPA reads the whole static cache
    assert kv_positions_read(128, 128, 320) == 320


def test_cli_bench_decode_tiny_with_fusions(tmp_path):
    """`larosa bench decode --fuse norm,residual` on the CPU: the setup records the fusions, the header says
    so, and the rows are those of the plain run (same methods, bytes and steps; the engines' equality is
    tested in tests/test_engine.py). An unknown fusion is a one-line error."""
    from typer.testing import CliRunner

    from larosa.cli import app

    args = ["bench", "decode", "--shape", "tiny", "--methods", "dense,larosa", "--sparsities", "0.5",
            "--prompt-len", "8", "--gen-lens", "6", "--dtype", "float32", "--device", "cpu"]
    res = CliRunner().invoke(app, args + ["--fuse", "residual,norm", "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert "fused: norm, residual" in res.output
    fused = json.loads((tmp_path / "f" / "results.json").read_text())
    assert fused["config"]["fuse"] == ["norm", "residual"]
    plain = bench_decode(shape="tiny", methods=("dense", "larosa"), sparsities=(0.5,), prompt_len=8, gen_lens=(6,),
                         dtype="float32", device="cpu", progress=False)
    assert plain["setup"]["fuse"] == []
    for a, b in zip(fused["rows"], plain["record"]["rows"]):
        assert a["method"] == b["method"] and a["bytes_per_token"] == b["bytes_per_token"]
        assert a["steps_timed"] == b["steps_timed"] == 5
    res = CliRunner().invoke(app, args + ["--fuse", "attention"])
    assert res.exit_code != 0 and "unknown fusion attention" in res.output


def test_fuse_option_resolves_to_engine_flags():
    """`--fuse auto` leaves the engine's defaults (both on with CUDA, off on the CPU), `none` turns both
    off, a list turns on exactly those."""
    from larosa.bench import fusion_kwargs, parse_fuse
    from larosa.shapes import get_shape

    assert parse_fuse("auto") is None and fusion_kwargs(None) == {}
    assert fusion_kwargs(parse_fuse("none")) == {"fuse_norm_select": False, "fuse_residual": False}
    assert fusion_kwargs(parse_fuse(" residual ")) == {"fuse_norm_select": False, "fuse_residual": True}
    assert fusion_kwargs(parse_fuse("norm,residual")) == {"fuse_norm_select": True, "fuse_residual": True}
    with pytest.raises(LarosaError, match="unknown fusion all"):
        fusion_kwargs(parse_fuse("all"))
    eng = DecodeEngine(random_base(get_shape("tiny"), torch.float32, "cpu"), max_len=8)
    assert not eng.fuse_norm_select and not eng.fuse_residual  # CPU default
