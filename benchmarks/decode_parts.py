"""Decode-step parts on the GPU (H200): the attention kernel and the adapter side stream, each A/B.

    PYTHONPATH=src python3 benchmarks/decode_parts.py --out benchmarks/results/decode-parts-h200.json

1. Attention of one decode position (bf16, batch 1) over a static cache of L positions filled up to
   `pos`: PyTorch's SDPA with a position mask (the engine's path before, reads all L positions) vs
   `larosa::decode_attention` (split-cache Triton kernel, reads positions 0..pos). 32 layers' caches
   cycled in one CUDA graph; median per call; bytes = K and V of the positions read.
2. The whole decode engine (LLaMA2-7B shape, random weights, prompt 128, 128 new tokens): dense and
   LaRoSA at p = 0.5 with the attention kernel on/off and the adapter GEMVs on the side stream on/off
   (and on with the capture stream at default priority). tok/s and p50 from `larosa.bench`.
4. `--parts adapter_modes` (v16): LaRoSA with its adapter GEMVs in the MLP selects' launches, on the side
   stream, or in order, alternating, at p = 0.25 / 0.4 / 0.5 / 0.75, beside un-rotated Top-K.
3. `--parts fusions`: (a) the block input's RMSNorm with the Top-K select folded in (`larosa::rmsnorm_topk`)
   vs the compiled norm, the select kernel and the GEMV, and (b) the residual add in the GEMV epilogue
   (`topk_linear(..., residual=)`) vs the GEMV then a compiled add: per op (q/k/v, gate+up, o and down of
   the shape, 32 layers' weights cycled in one CUDA graph, both sides compiled), and the whole engine
   (LaRoSA at 0.4 / 0.5 / 0.75 and un-rotated Top-K at 0.5, each with no fusion, each one and both, in
   turn).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gemv import env_set, graph_time_us  # noqa: E402

from larosa.bench import _measure, _plan_pw, copy_bandwidth  # noqa: E402
from larosa.kernels import ops  # noqa: E402
from larosa.shapes import get_shape, random_base, sparse_variant, teal_thresholds  # noqa: E402

ATTN_SHAPES = {"llama2-7b": (32, 1, 128), "llama3-8b": (8, 4, 128)}  # KV heads, query heads per KV head, hd


def attention_rows(layers: int = 32) -> list[dict]:
    rows = []
    for name, (kvh, g, hd) in ATTN_SHAPES.items():
        for L, pos in ((320, 200), (2176, 2047), (2176, 255)):
            qs = [torch.randn(1, kvh, g, hd, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
            kc = [torch.randn(1, kvh, L, hd, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
            vc = [torch.randn(1, kvh, L, hd, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
            p = torch.tensor([pos], device="cuda")
            mask = (torch.arange(L, device="cuda") <= p).expand(g, L)[None, None]

            def sdpa(i, q=qs, k=kc, v=vc, m=mask, s=hd ** -0.5):
                return lambda: F.scaled_dot_product_attention(q[i], k[i], v[i], attn_mask=m, scale=s)

            def split(i, q=qs, k=kc, v=vc, p=p, s=hd ** -0.5):
                return lambda: ops.triton_attention.decode_attention(q[i], k[i], v[i], p, s)

            err = (split(0)().float() - sdpa(0)().float()).abs().max().item()
            t_sdpa = graph_time_us([sdpa(i) for i in range(layers)])
            t_split = graph_time_us([split(i) for i in range(layers)])
            read = 2 * kvh * (pos + 1) * hd * 2
            rows.append({"shape": name, "L": L, "pos": pos, "sdpa_us": t_sdpa, "split_us": t_split,
                         "speedup": t_sdpa / t_split, "bytes_read_split": read,
                         "split_GBps": read / t_split / 1e3, "max_abs_diff": err})
            print(f"attention {name:10s} L={L:5d} pos={pos:5d}: sdpa {t_sdpa:6.2f} us  split {t_split:6.2f} us "
                  f"({t_sdpa / t_split:.2f}x, {read / t_split / 1e3:.0f} GB/s)  max|diff| {err:.1e}", flush=True)
    return rows


DENSE_SHAPES = {"qkv 4096->12288": (4096, 12288), "o 4096->4096": (4096, 4096),
                "gate+up 4096->22016": (4096, 22016), "down 11008->4096": (11008, 4096),
                "head 4096->32000": (4096, 32000), "qkv 4096->6144": (4096, 6144),
                "gate+up 4096->28672": (4096, 28672), "down 14336->4096": (14336, 4096)}


def dense_layout_rows() -> list[dict]:
    """cuBLAS at batch 1 on the two weight layouts: F.linear(x, W) with W (d_out, d_in) ("TN", the
    engine's dense layout) vs x @ Wt with Wt (d_in, d_out) contiguous ("NN")."""
    from gemv import L2_BYTES

    rows = []
    for name, (d_in, d_out) in DENSE_SHAPES.items():
        nbytes = d_in * d_out * 2
        copies = max(3, -(-4 * L2_BYTES // nbytes))
        ws = [torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        x = torch.randn(1, d_in, device="cuda", dtype=torch.bfloat16)
        t_tn = graph_time_us([(lambda w=w: F.linear(x, w)) for w in ws])
        t_nn = graph_time_us([(lambda w=w: x @ w) for w in wts])
        t_mv = graph_time_us([(lambda w=w: torch.mv(w, x[0])) for w in ws])
        bw_tn = nbytes / t_tn / 1e3
        rows.append({"shape": name, "d_in": d_in, "d_out": d_out, "linear_TN_us": t_tn, "matmul_NN_us": t_nn,
                     "mv_us": t_mv, "TN_GBps": bw_tn})
        print(f"dense {name:22s}: F.linear {t_tn:6.2f} us ({bw_tn:.0f} GB/s)  x @ Wt {t_nn:6.2f} us  "
              f"mv {t_mv:6.2f} us", flush=True)
        del ws, wts
    return rows


def _engine_setup(shape: str):
    """Copy bandwidth, random bf16 weights of the shape, a 128-token prompt."""
    return (copy_bandwidth(torch.device("cuda")), random_base(get_shape(shape), torch.bfloat16, "cuda", 0),
            torch.randint(0, 1000, (1, 128), device="cuda"))


def engine_rows(shape: str, gen_len: int) -> list[dict]:
    bw, base, prompt = _engine_setup(shape)
    lar = sparse_variant(base, "larosa", 0.5)
    rows = []
    configs = [("dense", base, "sdpa", {}), ("dense", base, "split", {}),
               ("larosa", lar, "sdpa", {"overlap_adapters": False}), ("larosa", lar, "split", {"overlap_adapters": False}),
               ("larosa", lar, "split", {"overlap_adapters": True}), ("larosa", lar, "split", {"overlap_adapters": True,
                                                                                            "capture_priority": 0})]
    for method, w, attn, kw in configs:
        os.environ["LAROSA_ATTENTION"] = attn
        r = _measure(w, prompt, gen_len, bw, **kw)
        prio = kw.get("capture_priority")
        side = method == "larosa" and kw.get("overlap_adapters")  # the engine raises the priority only then
        row = {"shape": shape, "method": method, "attention": attn, "overlap_adapters": kw.get("overlap_adapters"),
               "capture_priority": "high" if side and prio is None else "default", "tok_s": r["tok_s"],
               "p50_ms": r["p50_ms"], "p99_over_p50": r["p99_over_p50"], "bandwidth_fraction": r["bandwidth_fraction"]}
        rows.append(row)
        print(f"engine {shape} {method:6s} attn={attn:5s} overlap={row['overlap_adapters']} prio={row['capture_priority']}: "
              f"{r['tok_s']:.1f} tok/s  p50 {r['p50_ms']:.3f} ms  p99/p50 {r['p99_over_p50']:.3f}", flush=True)
    os.environ.pop("LAROSA_ATTENTION", None)
    return rows


def residual_op_rows(shape: str, p: float = 0.5, layers: int = 32) -> list[dict]:
    """GEMV then the residual add (compiled, as in the engine) vs the add in the GEMV's epilogue."""
    from larosa.sparsity import SparsityPlan, k_for

    sh = get_shape(shape)
    plan = SparsityPlan.from_nominal(p)
    rows = []
    for site, d_in in (("attn_out", sh.hidden), ("mlp_out", sh.intermediate)):
        d_out = sh.hidden
        k = k_for(plan.sites[site], d_in)
        ws = [torch.randn(d_in, d_out, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        x = torch.randn(1, 1, d_in, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(1, 1, d_out, device="cuda", dtype=torch.bfloat16)
        buf = ops.counter_workspace(1, d_out, "cuda")
        plain = torch.compile(lambda x, r, wt: r + torch.ops.larosa.topk_linear(x, wt, k, None, buf),
                              fullgraph=True, dynamic=False)
        fused = torch.compile(lambda x, r, wt: torch.ops.larosa.topk_linear(x, wt, k, None, buf, r),
                              fullgraph=True, dynamic=False)
        want = plain(x, r, ws[0]).float()
        err = ((fused(x, r, ws[0]).float() - want).norm() / want.norm()).item()
        t_plain = graph_time_us([(lambda a=a: plain(x, r, a)) for a in ws])
        t_fused = graph_time_us([(lambda a=a: fused(x, r, a)) for a in ws])
        rows.append({"shape": shape, "site": site, "d_in": d_in, "d_out": d_out, "k": k, "plain_us": t_plain,
                     "fused_us": t_fused, "saved_us": t_plain - t_fused, "rel_diff": err})
        print(f"residual {shape} {site:8s} {d_in}->{d_out} k={k}: GEMV, add {t_plain:6.2f} us  GEMV with the add "
              f"{t_fused:6.2f} us  (saved {t_plain - t_fused:5.2f} us, rel diff {err:.1e})", flush=True)
        del ws
    return rows


def fused_norm_op_rows(shape: str, p: float = 0.5, layers: int = 32) -> list[dict]:
    """Norm (+ residual add) -> select -> GEMV, compiled as the engine compiles it, vs the one-kernel norm +
    select followed by the GEMV; weights of `layers` layers cycled so they stream from DRAM."""
    from larosa.engine import _rms
    from larosa.sparsity import SparsityPlan, k_for

    sh = get_shape(shape)
    d = sh.hidden
    plan = SparsityPlan.from_nominal(p)
    qkv_out = sh.hidden + 2 * sh.kv_heads * sh.head_dim
    rows = []
    for site, wide, gated in (("attn_in", qkv_out, False), ("mlp_in", sh.intermediate, True)):
        k = k_for(plan.sites[site], d)
        ws = [torch.randn(d, wide, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        wu = [torch.randn(d, wide, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)] if gated \
            else [None] * layers
        x = torch.randn(1, 1, d, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(1, 1, d, device="cuda", dtype=torch.bfloat16)
        g = torch.ones(d, device="cuda", dtype=torch.bfloat16)
        buf = ops.counter_workspace(1, wide, "cuda")

        def plain_fn(x, r, wt, wt_up):
            h = _rms(x + r, g, 1e-5)
            if wt_up is None:
                return torch.ops.larosa.topk_linear(h, wt, k, None, buf)
            return torch.ops.larosa.topk_gate_up(h, wt, wt_up, k, buf)

        def fused_fn(x, r, wt, wt_up):
            return torch.ops.larosa.rmsnorm_topk(x, r, g, 1e-5, wt, wt_up, k, None, buf)

        plain = torch.compile(plain_fn, fullgraph=True, dynamic=False)
        fused = torch.compile(fused_fn, fullgraph=True, dynamic=False)
        err = ((fused(x, r, ws[0], wu[0])[1].float() - plain(x, r, ws[0], wu[0]).float()).norm()
               / plain(x, r, ws[0], wu[0]).float().norm()).item()
        t_plain = graph_time_us([(lambda a=a, b=b: plain(x, r, a, b)) for a, b in zip(ws, wu)])
        t_fused = graph_time_us([(lambda a=a, b=b: fused(x, r, a, b)) for a, b in zip(ws, wu)])
        rows.append({"shape": shape, "site": site, "d_in": d, "d_out": wide, "gated": gated, "k": k,
                     "plain_us": t_plain, "fused_us": t_fused, "saved_us": t_plain - t_fused, "rel_diff": err})
        print(f"norm+select {shape} {site:7s} {d}->{wide}{' x2' if gated else ''} k={k}: norm, select, GEMV "
              f"{t_plain:6.2f} us  fused norm+select, GEMV {t_fused:6.2f} us  (saved {t_plain - t_fused:5.2f} us, "
              f"rel diff {err:.1e})", flush=True)
        del ws, wu
    return rows


def _engine_row(rows: list, w, prompt, gen_len: int, bw: float, label: str, row: dict, **engine_kw) -> None:
    """One end-to-end measurement (`larosa.bench._measure` with `engine_kw`): `row` plus tok/s, p50 and
    p99/p50 appended to `rows`, and a log line `engine <label>: ...`."""
    r = _measure(w, prompt, gen_len, bw, **engine_kw)
    rows.append({**row, "tok_s": r["tok_s"], "p50_ms": r["p50_ms"], "p99_over_p50": r["p99_over_p50"],
                 "distinct_tokens": r["distinct_tokens"]})
    print(f"engine {label}: {r['tok_s']:.1f} tok/s  p50 {r['p50_ms']:.3f} ms  p99/p50 {r['p99_over_p50']:.3f}  "
          f"{r['distinct_tokens']} distinct tokens", flush=True)


def fusion_engine_rows(shape: str, gen_len: int) -> list[dict]:
    from larosa.bench import fusion_kwargs

    bw, base, prompt = _engine_setup(shape)
    rows = []
    for method, p in (("larosa", 0.4), ("larosa", 0.5), ("larosa", 0.75), ("topk", 0.5)):
        w = sparse_variant(base, method, p)
        for fuse in ((), ("norm",), ("residual",), ("norm", "residual")):
            label = f"{shape} {method:6s} p={p:.2f} fuse={'+'.join(fuse) or 'none':13s}"
            _engine_row(rows, w, prompt, gen_len, bw, label,
                        {"shape": shape, "method": method, "nominal": p, "fuse": list(fuse)}, **fusion_kwargs(fuse))
        del w
        torch.cuda.empty_cache()
    return rows


def hint_sites_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """LaRoSA with the adapters overlapped: select hints at no site, at the norm + select sites only (q/k/v,
    gate/up: v19's profile has these kernels 16 % faster with hints and the stand-alone o / down selects 15 %
    slower, `results/profile-decode-llama2-7b.json` vs `profile-asm32-llama2-7b-p0.5.json`) or at all four,
    alternating (v14 tried the attention half's sites, q/k/v and o, instead of the norm + select ones)."""
    bw, base, prompt = _engine_setup(shape)
    rows = []
    for p in (0.4, 0.5, 0.75):
        w = sparse_variant(base, "larosa", p)
        for rep in range(repeats):
            for sites in ((), (0, 2), (0, 1, 2, 3)):
                label = f"{shape} larosa p={p:.2f} hint sites {str(list(sites)):12s} #{rep}"
                row = {"shape": shape, "method": "larosa", "nominal": p, "hint_sites": list(sites), "repeat": rep}
                _engine_row(rows, w, prompt, gen_len, bw, label, row, select_hints=bool(sites),
                            hint_sites=sites or None)
        del w
        torch.cuda.empty_cache()
    return rows


SPARSE_AB = (("larosa", 0.4), ("larosa", 0.5), ("larosa", 0.75), ("topk", 0.5))
DENSE_SPARSE_AB = (("dense", 0.0), ("larosa", 0.5), ("larosa", 0.75), ("topk", 0.5))


def variant_ab_rows(shape: str, gen_len: int, var: str | None, variants, repeats: int = 2,
                    methods=SPARSE_AB, setup=None) -> list[dict]:
    """End-to-end A/B of `variants` ((label, value of the environment switch `var`, which the kernel launches
    read while the engine captures its step, engine keyword arguments); `var` None: the value is None
    (keyword arguments only) or a dict of several switches), with the default fusions, alternating `repeats`
    times per (method, nominal sparsity). `setup`: an `_engine_setup(shape)` to reuse."""
    bw, base, prompt = setup or _engine_setup(shape)
    rows = []
    for method, p in methods:
        if method == "teal":  # LaRoSA's parameter-weighted sparsity for nominal p, as `larosa bench decode` runs it
            pw = _plan_pw(base, p, (0.8, 1.2))
            w = sparse_variant(base, "teal", pw, thresholds=teal_thresholds(base, pw, prompt))
        else:
            w = base if method == "dense" else sparse_variant(base, method, p)
        for rep in range(repeats):
            for label, val, kw in variants:
                envs = {var: val} if var else dict(val or {})
                with contextlib.ExitStack() as stack:
                    for name, value in envs.items():
                        stack.enter_context(env_set(name, value))
                    _engine_row(rows, w, prompt, gen_len, bw, f"{shape} {method:6s} p={p:.2f} {label} #{rep}",
                                {"shape": shape, "method": method, "nominal": p, "variant": label,
                                 **envs, "repeat": rep, **kw}, **kw)
        if w is not base:
            del w
        torch.cuda.empty_cache()
    return rows


def env_ab_rows(shape: str, gen_len: int, var: str, on: str, off: str, repeats: int = 2, **engine_kw) -> list[dict]:
    """`variant_ab_rows` of one environment switch, on / off, with the same `engine_kw`."""
    return variant_ab_rows(shape, gen_len, var, [(f"{var}={v}", v, engine_kw) for v in (on, off)], repeats)


def hints_overlap_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """LaRoSA p = 0.5: select hints on/off x adapters on the side stream or in order, in one run (v13 found
    hints +3.5 % without adapters but -2.3 % with the overlapped ones: is it the overlap?)."""
    bw, base, prompt = _engine_setup(shape)
    w = sparse_variant(base, "larosa", 0.5)
    rows = []
    for rep in range(repeats):
        for overlap in (True, False):
            for hints in (True, False):
                label = f"{shape} larosa p=0.50 overlap={overlap!s:5s} hints={hints!s:5s} #{rep}"
                row = {"shape": shape, "method": "larosa", "nominal": 0.5, "overlap_adapters": overlap,
                       "select_hints": hints, "repeat": rep}
                _engine_row(rows, w, prompt, gen_len, bw, label, row, overlap_adapters=overlap, select_hints=hints)
    return rows


def adapter_mode_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v16, LaRoSA: the adapter GEMVs inside the MLP selects' launches ("select", hints on, at the default split
    (0 since v16's run: every output in the down select; that run's "select" rows used 0.375 and its
    "select-split0" rows 0) and with 37.5 % of the outputs in the gate/up select) vs on the side stream (hints off: v13-v15's default) vs in order
    (hints on), alternating; un-rotated Top-K (no adapters, hints on) as the ceiling."""
    bw, base, prompt = _engine_setup(shape)
    rows = []
    variants = (("select", {"overlap_adapters": "select"}),
                ("select-split0.375", {"overlap_adapters": "select", "adapter_split": 0.375}),
                ("stream", {"overlap_adapters": "stream"}), ("inline", {"overlap_adapters": "inline"}))
    for p in (0.25, 0.4, 0.5, 0.75):
        w = sparse_variant(base, "larosa", p)
        for rep in range(repeats):
            for name, kw in variants:
                _engine_row(rows, w, prompt, gen_len, bw, f"{shape} larosa p={p:.2f} adapters={name:13s} #{rep}",
                            {"shape": shape, "method": "larosa", "nominal": p, "adapters": name, "repeat": rep}, **kw)
        del w
        w = sparse_variant(base, "topk", p)
        _engine_row(rows, w, prompt, gen_len, bw, f"{shape} topk   p={p:.2f} (no adapters)",
                    {"shape": shape, "method": "topk", "nominal": p, "adapters": None, "repeat": 0})
        del w
        torch.cuda.empty_cache()
    return rows


def compact_store_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v16 experiment: the gathered kernel everywhere with the compacting select's list stored by `tl.store`
    or by inline PTX (`LAROSA_COMPACT_STORE`), beside the engine's default kernel choice, alternating: does
    a cheaper compaction let the gathered kernel win at p <= 0.5 too?"""
    gtile = {"kernel": "gtile"}
    return variant_ab_rows(shape, gen_len, "LAROSA_COMPACT_STORE",
                           [("gtile+ptx", "asm", gtile), ("gtile+tl", "tl", gtile), ("default", "tl", {})], repeats)


def rope_fusion_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v17: RoPE and the K/V cache write inside the attention launch (`fuse_rope`) vs the two inductor
    kernels before it."""
    return variant_ab_rows(shape, gen_len, None, [(f"fuse_rope={f!s:5s}", None, {"fuse_rope": f})
                                                  for f in (True, False)], repeats, DENSE_SPARSE_AB)


def attn_combine_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v17 experiment: the attention's cache splits combined by the last split program (`attn_combine="last"`)
    vs a second launch."""
    return variant_ab_rows(shape, gen_len, None, [(f"attn_combine={c:6s}", None,
                                                   {"fuse_rope": True, "attn_combine": c})
                                                  for c in ("last", "launch")], repeats, DENSE_SPARSE_AB)


def side_in_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v18: LaRoSA's adapter programs in the select launches (v16) or in the GEMV launches after them
    (`LAROSA_SIDE_IN=gemv`: four 2-warp programs per SM instead of one per SM beside a select that holds the
    whole register file), at two side tilings and with 37.5 % of the adapter in the gate/up launch; un-rotated
    Top-K (no adapters) as the ceiling."""
    variants = [("select", {"LAROSA_SIDE_IN": "select", "LAROSA_SIDE_TILES": None}, {}),
                ("gemv 8x512x2", {"LAROSA_SIDE_IN": "gemv", "LAROSA_SIDE_TILES": "8,512,2"}, {}),
                ("gemv 4x1024x2", {"LAROSA_SIDE_IN": "gemv", "LAROSA_SIDE_TILES": "4,1024,2"}, {}),
                ("gemv 8x512x2 split.375", {"LAROSA_SIDE_IN": "gemv", "LAROSA_SIDE_TILES": "8,512,2"},
                 {"adapter_split": 0.375})]
    methods = (("larosa", 0.25), ("larosa", 0.4), ("larosa", 0.5), ("larosa", 0.75))
    setup = _engine_setup(shape)  # one base model for both calls
    rows = variant_ab_rows(shape, gen_len, None, variants, repeats, methods, setup)
    return rows + variant_ab_rows(shape, gen_len, None, [("no adapters", None, {})], 1,
                                  (("topk", 0.4), ("topk", 0.5), ("topk", 0.75)), setup)


def side_tiles_gemv_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v18: tilings of the adapter programs in the GEMV launches (A_BN outputs, A_BK inputs per step, stages),
    LaRoSA, end to end."""
    tiles = ("4,1024,2", "2,2048,2", "4,2048,1", "8,1024,1", "4,512,2")
    variants = [(f"gemv {t}", {"LAROSA_SIDE_IN": "gemv", "LAROSA_SIDE_TILES": t}, {}) for t in tiles]
    return variant_ab_rows(shape, gen_len, None, variants, repeats,
                           (("larosa", 0.4), ("larosa", 0.5), ("larosa", 0.75)))


def compact_store32_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v19: the compacting selects' list stored by inline PTX from 32-bit offsets (`LAROSA_COMPACT_STORE=asm32`,
    now the default: 24 B of spills instead of 200 at BLOCK_D 16384 in the sm_90 compile,
    `benchmarks/kernel_resources.py`) vs from 64-bit pointers (v16-v18), each with the select hints at all four
    sites (v18's default) and off."""
    variants = [(f"store={v} hints={h}", v, {"select_hints": h}) for h in (True, False) for v in ("asm32", "asm")]
    return variant_ab_rows(shape, gen_len, "LAROSA_COMPACT_STORE", variants, repeats)


def dense_kernel_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v20: the dense sites and the head in `larosa::dense_linear` (PDL-chained, first weight tiles loaded before
    the wait; `LAROSA_DENSE_TILES`) vs cuBLAS and compiled glue, the attention launched as a programmatic
    dependent or not (`LAROSA_ATTN_PDL`); dense model."""
    # (the v20 runs also toggled the attention's PDL by a LAROSA_ATTN_PDL switch, since replaced by the engine's
    # rule: results/chains-h200.json)
    cublas = {"dense_kernel": False}
    ours = {"dense_kernel": True}
    variants = [("cuBLAS", {"LAROSA_DENSE_TILES": None}, cublas)] + [
        (f"ours {t}", {"LAROSA_DENSE_TILES": t}, ours) for t in ("4,1024,2,4", "8,512,2,4", "2,2048,2,2", "4,1024,2,2")]
    return variant_ab_rows(shape, gen_len, None, variants, repeats, (("dense", 0.0),))


def sparse_chain_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v20: the Top-K step as a PDL chain: the selects launched as programmatic dependents of the GEMV before
    (which lets them launch at its start; they wait, `LAROSA_SELECT_WAIT`), the attention likewise (then
    `LAROSA_ATTN_PDL`, since replaced by the engine's rule: only before a dense o projection), and the head
    in `larosa::dense_linear` or cuBLAS (`dense_kernel`). results/chains-h200.json came from an earlier set
    of these variants, which also toggled the attention's PDL."""
    variants = [("v19: no waits, cuBLAS head", {"LAROSA_SELECT_WAIT": "0"}, {"dense_kernel": False}),
                ("select waits, cuBLAS head", {"LAROSA_SELECT_WAIT": "1"}, {"dense_kernel": False}),
                ("no waits, our head (v20 default)", {"LAROSA_SELECT_WAIT": "0"}, {"dense_kernel": True})]
    return variant_ab_rows(shape, gen_len, None, variants, repeats,
                           (("larosa", 0.5), ("larosa", 0.75), ("topk", 0.5)))


# (BN, BK, STAGES, WARPS) per site; gate/up's BN is per matrix. The first round (v21, results/dense-sites-h200.json)
# from v20's one tiling; `--site-candidates` for another
SITE_CANDIDATES = {
    "gate_up": ("4,512,2,4", "8,256,2,4", "4,512,2,8", "8,512,2,8", "2,1024,2,2", "4,256,2,2", "8,256,2,8"),
    "down": ("8,512,2,4", "16,256,2,4", "16,512,2,8", "8,512,2,8", "4,1024,2,4", "8,256,2,2", "4,512,2,2"),
    "qkv": ("8,512,2,4", "16,256,2,4", "16,512,2,8", "8,512,2,8", "4,1024,2,2", "8,256,2,2", "4,512,2,2"),
    "o": ("8,512,2,4", "16,256,2,4", "16,512,2,8", "8,512,2,8", "4,1024,2,2", "8,256,2,2", "4,512,2,2"),
    "head": ("8,512,2,4", "16,256,2,4", "16,512,2,8", "8,512,2,8", "4,1024,2,2"),
}


def parse_site_candidates(spec: str) -> dict[str, tuple[str, ...]]:
    """"site=BN,BK,STAGES,WARPS/BN,...;site=..." -> {site: tilings} (the sites in the order given)."""
    out = {}
    for item in filter(None, (v.strip() for v in spec.split(";"))):
        site, _, tilings = item.partition("=")
        out[site.strip()] = tuple(t.strip() for t in tilings.split("/") if t.strip())
    return out


def site_sweep_rows(shape: str, gen_len: int, var: str, candidates: dict, defaults: dict, checks,
                    method: str = "dense", p: float = 0.0, repeats: int = 2, **engine_kw) -> list[dict]:
    """v21: a kernel's tiles per decode-step site (`triton_gemv.decode_site`) in the step, greedy: site after site,
    each candidate (a spec of the environment switch `var`, "default" = the site's default: `defaults`) with the
    sites before at their best so far (`method` at sparsity `p` on `shape`, one pass each: v20's tile A/B
    repeated within 0.1 tok/s); then the best per site against the defaults, alternating `repeats` times, at
    each (shape, method, p) of `checks`."""
    bw, base, prompt = _engine_setup(shape)
    rows = []
    best = {}

    def spec(tiles: dict) -> str:
        return ";".join(f"{k}={v}" for k, v in tiles.items())

    def measure(w, shp: str, meth: str, nominal: float, tiles: dict, label: str, **row) -> float:
        with env_set(var, spec(tiles) or None):
            _engine_row(rows, w, prompt, gen_len, bw, f"{shp} {meth} p={nominal:.2f} {label}",
                        {"shape": shp, "method": meth, "nominal": nominal, "tiles": dict(tiles), **row}, **engine_kw)
        return rows[-1]["tok_s"]

    w = base if method == "dense" else sparse_variant(base, method, p)
    for site, cands in candidates.items():
        scores = {c: measure(w, shape, method, p, {**best, **({} if c == "default" else {site: c})},
                             f"{site}={c}", site=site, candidate=c) for c in cands}
        top = max(scores, key=scores.get)
        if top not in ("default", defaults.get(site)):
            best[site] = top
        print(f"site {site}: best {top} ({scores[top]:.1f} tok/s)", flush=True)
    print(f"best per site: {spec(best) or 'the defaults'}", flush=True)
    for shp, meth, nominal in checks:
        if shp != shape:  # the same tilings on another shape (its own sizes, same sites)
            del w, base
            torch.cuda.empty_cache()
            bw, base, prompt = _engine_setup(shp)
            shape = shp
        w = base if meth == "dense" else sparse_variant(base, meth, nominal)
        for rep in range(repeats):
            for label, tiles in (("default", {}), ("best per site", best)):
                measure(w, shp, meth, nominal, tiles, f"{label} {spec(tiles)} #{rep}", final=label, repeat=rep)
    return rows


def dense_site_rows(shape: str, gen_len: int, repeats: int = 2, candidates: dict | None = None) -> list[dict]:
    """v21: the dense GEMV's tiles per site (`LAROSA_DENSE_TILES`), dense model, then checked on both shapes."""
    from larosa.kernels import triton_dense

    defaults = {s: ",".join(map(str, t)) for s, t in triton_dense.SITE_TILES.items()}
    return site_sweep_rows(shape, gen_len, "LAROSA_DENSE_TILES", candidates or SITE_CANDIDATES, defaults,
                           ((shape, "dense", 0.0), ("llama3-8b", "dense", 0.0)), repeats=repeats, dense_kernel=True)


# (BLOCK_M kept rows, BLOCK_N columns, warps) per site; "default" = `gtile_config`'s rule (128 x 128 on q/k/v and
# down at p = 0.5, 64 x 256 on o, 64 x 64 gated, all 2 warps: 344 / 64 / 96 B of spills in the sm_90 compile). The
# candidates do not spill (`benchmarks/kernel_resources.py --v21-candidates`,
# results/kernel-resources-v21-candidates-sm90.json): e.g. 128 x 128 at 4 warps 162 registers,
# 64 x 256 at 4 warps 218, gated 64 x 64 at 4 warps 128
GTILE_CANDIDATES = {
    "down": ("default", "128,128,4", "64,256,4", "64,128,2", "128,64,2", "32,256,2"),
    "gate_up": ("default", "64,64,4", "32,128,2", "32,128,4", "64,32,2", "32,64,2"),
    "qkv": ("default", "128,128,4", "64,256,4", "64,128,2", "128,64,2", "32,256,4"),
    "o": ("default", "64,256,4", "128,128,4", "32,256,2", "64,128,2", "32,256,4"),
}


def gtile_site_rows(shape: str, gen_len: int, repeats: int = 2, candidates: dict | None = None) -> list[dict]:
    """v21: the gathered-rows GEMV's tiles per site (`LAROSA_GTILE_TILES`) in LaRoSA's step at p = 0.5 (the v15 tiles
    came from a per-op sweep, and the dense one's per-op ranking was not the step's), then checked at p = 0.4,
    0.5 and 0.75."""
    return site_sweep_rows(shape, gen_len, "LAROSA_GTILE_TILES", candidates or GTILE_CANDIDATES, {},
                           tuple((shape, "larosa", q) for q in (0.4, 0.5, 0.75)), method="larosa", p=0.5,
                           repeats=repeats)


def _head_kw(dense: bool) -> dict:
    """The head as v20-v27 switched it: in `dense_linear` as a programmatic dependent (since v28 the engine launches
    it in order beside Top-K sites unless asked), or on cuBLAS."""
    return {"dense_head": True, "head_pdl": True} if dense else {"dense_head": False}


def dense_head_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v21: the head (with the final norm) in `larosa::dense_linear` or on cuBLAS where LaRoSA's adapters are split
    off the layers (`DecodeEngine(dense_head=)`; v20 measured -11 to -13 tok/s with it at p = 0.5 in two runs,
    +0.2 in a third), beside un-rotated Top-K (no adapters: its default is the dense head). Prints whether LaRoSA
    gained at both sparsities (the `densehead` stage then runs its later stages with LAROSA_DENSE_HEAD=1)."""
    variants = [(f"dense_head={h}", None, _head_kw(h)) for h in (False, True)]
    rows = variant_ab_rows(shape, gen_len, None, variants, repeats, (("larosa", 0.5), ("larosa", 0.75), ("topk", 0.5)))
    gains = {p: _mean_tok_s(rows, method="larosa", nominal=p, dense_head=True)
             / _mean_tok_s(rows, method="larosa", nominal=p, dense_head=False) - 1 for p in (0.5, 0.75)}
    print("dense head gain for LaRoSA: " + ", ".join(f"p = {p}: {100 * g:+.1f} %" for p, g in gains.items()))
    print(f"dense head for LaRoSA: {'on' if min(gains.values()) > 0.005 else 'off'}", flush=True)
    return rows


def head_cause_rows(shape: str, gen_len: int, repeats: int = 1, hints_off: bool = False) -> list[dict]:
    """v21: what makes the head in `dense_linear` slow for LaRoSA (`dense_head_rows`): the same switch with the
    adapters in order (one compiled layer, like Top-K's step) and with select hints at all four sites (Top-K's
    default), LaRoSA p = 0.5; `hints_off`: the switch with the select hints off instead (the rows count the
    distinct generated tokens: the hints' hit rate depends on the token sequence)."""
    cases = ((("(default)", {}), ("hints off", {"select_hints": False})) if hints_off else
             (("(default)", {}), ("hints at all four", {"hint_sites": (0, 1, 2, 3)}),
              ("adapters in order", {"overlap_adapters": False})))
    variants = [(f"dense_head={h} {label}", None, {**_head_kw(h), **kw})
                for label, kw in cases for h in (False, True)]
    return variant_ab_rows(shape, gen_len, None, variants, repeats, (("larosa", 0.5),))


def head_pdl_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v27: is the head in `dense_linear` slow for LaRoSA (-9 % at p = 0.5 with hints, `head_hints`) because of
    programmatic dependent launch? The same switch with PDL on (default) and off everywhere (`LAROSA_KERNEL_PDL=0`:
    no kernel launches early), LaRoSA p = 0.5, alternating."""
    variants = [(f"dense_head={h} pdl={'off' if env else 'on'}", env, _head_kw(h))
                for env in (None, {"LAROSA_KERNEL_PDL": "0"}) for h in (False, True)]
    return variant_ab_rows(shape, gen_len, None, variants, repeats, (("larosa", 0.5),))


def _mean_tok_s(rows: list[dict], **match) -> float:
    """Mean tok/s of the rows whose fields equal `match`."""
    r = [x["tok_s"] for x in rows if all(x.get(k) == v for k, v in match.items())]
    return sum(r) / len(r)


def head_default_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v28: the head on cuBLAS, in `dense_linear` as a programmatic dependent (PDL), or in `dense_linear` launched in
    order (`head_pdl=False`), for each method. (The committed v28 run, `results/head-default-h200.*`, made the third
    variant with `LAROSA_DENSE_PDL=0`, which for the dense model turns PDL off in every dense GEMV, not the head
    alone; for the sparse methods only the head is a dense GEMV, so there it is the same variant.) The v28 graph
    timeline found LaRoSA's o and down GEMVs 5-6.5 us slower in every layer when the head is a programmatic
    dependent, and un-rotated Top-K's step 2 % faster with the cuBLAS head than with its default then (the PDL
    head)."""
    variants = [("head=cublas", None, {"dense_head": False}), ("head=dense pdl", None, _head_kw(True)),
                ("head=dense nopdl", None, {"dense_head": True, "head_pdl": False})]
    rows = variant_ab_rows(shape, gen_len, None, variants, repeats,
                           (("dense", 0.0), ("larosa", 0.5), ("topk", 0.5), ("teal", 0.5)))
    for method in ("dense", "larosa", "topk", "teal"):
        means = {label: _mean_tok_s(rows, method=method, variant=label) for label, _, _ in variants}
        print(f"{method:6s} " + "  ".join(f"{k}: {v:.1f}" for k, v in means.items()) + " tok/s (mean)", flush=True)
    return rows


def head_rule_rows(shape: str, gen_len: int, repeats: int = 2) -> list[dict]:
    """v28: the engine's head rule (in `dense_linear`, launched in order beside Top-K sites) against the head on
    cuBLAS (LaRoSA's default before v28), for LaRoSA at p = 0.4 / 0.5 / 0.75 and un-rotated Top-K at 0.5."""
    variants = [("head=cublas", None, {"dense_head": False}), ("head=default", None, {})]
    rows = variant_ab_rows(shape, gen_len, None, variants, repeats,
                           (("larosa", 0.4), ("larosa", 0.5), ("larosa", 0.75), ("topk", 0.5)))
    for method, p in (("larosa", 0.4), ("larosa", 0.5), ("larosa", 0.75), ("topk", 0.5)):
        mean = {label: _mean_tok_s(rows, method=method, nominal=p, variant=label) for label, _, _ in variants}
        print(f"{shape} {method:6s} p={p:.2f} " + "  ".join(f"{k}: {v:.1f}" for k, v in mean.items())
              + f" tok/s (mean; default/cublas {mean['head=default'] / mean['head=cublas']:.4f})", flush=True)
    return rows


AB_PARTS = {"hints_overlap": hints_overlap_rows, "hint_sites": hint_sites_rows, "adapter_modes": adapter_mode_rows,
            "compact_store": compact_store_rows, "rope_fusion": rope_fusion_rows, "attn_combine": attn_combine_rows,
            "side_in": side_in_rows, "side_tiles_gemv": side_tiles_gemv_rows, "compact_store32": compact_store32_rows,
            "dense_kernel": dense_kernel_rows, "sparse_chain": sparse_chain_rows,
            "dense_sites": dense_site_rows, "gtile_sites": gtile_site_rows, "dense_head": dense_head_rows,
            "head_cause": head_cause_rows, "head_hints": functools.partial(head_cause_rows, hints_off=True),
            "head_pdl": head_pdl_rows, "head_default": head_default_rows,
            "head_rule": head_rule_rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="attention,engine")
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None, help="alternations of an A/B part (its default if unset)")
    ap.add_argument("--site-candidates", default=None,
                    help='dense_sites, gtile_sites: "site=TILES/TILES/...;site=..." instead of their candidates')
    a = ap.parse_args()
    parts = a.parts.split(",")  # attention, engine, dense_layout, fusions, select_window, side_tiles, or AB_PARTS
    unknown = set(parts) - {"attention", "engine", "dense_layout", "fusions", "select_window", "side_tiles",
                            *AB_PARTS}
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    res = {"device": torch.cuda.get_device_name(), "dtype": "bfloat16", "batch": 1, "torch": torch.__version__}
    if "attention" in parts:
        res["attention"] = attention_rows()
    if "dense_layout" in parts:
        res["dense_layout"] = dense_layout_rows()
    if "engine" in parts:
        res["engine"] = engine_rows(a.shape, a.gen_len)
    if "fusions" in parts:
        res["fused_norm_ops"] = fused_norm_op_rows(a.shape)
        res["residual_ops"] = residual_op_rows(a.shape)
        res["fusion_engine"] = fusion_engine_rows(a.shape, a.gen_len)
    if "select_window" in parts:
        # v13: the select searches near the previous token's threshold first (window 2^6 patterns) vs not
        # (hints forced on: the engine's default leaves them off where the adapters overlap)
        res["select_window"] = env_ab_rows(a.shape, a.gen_len, "LAROSA_SELECT_WINDOW", "6", "0", select_hints=True)
    if "side_tiles" in parts:
        # v16: the side programs' best per-op tiles (results/side-h200.json) vs the default, end to end
        res["side_tiles"] = env_ab_rows(a.shape, a.gen_len, "LAROSA_SIDE_TILES", "8,1024,4", "16,512,2")
    for name, rows_fn in AB_PARTS.items():  # the end-to-end A/Bs that take only (shape, gen_len)
        if name in parts:
            kw = {"repeats": a.repeats} if a.repeats else {}
            if name in ("dense_sites", "gtile_sites") and a.site_candidates:
                kw["candidates"] = parse_site_candidates(a.site_candidates)
            res[name] = rows_fn(a.shape, a.gen_len, **kw)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
