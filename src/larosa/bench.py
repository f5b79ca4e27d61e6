"""`larosa bench decode`: end-to-end decode speed of dense vs LaRoSA vs TEAL in the decode engine.

For each (method, sparsity, generation length): build the model (random weights at a real shape, or a
real model), prefill a random prompt, compile + capture the decode step (excluded from timing), then
time every decode step with CUDA events. Reported: tokens/s (1 / mean step), per-token latency p50 and
p99, bytes read per token and the achieved GB/s against the copy bandwidth measured in the same run,
the byte-model speed-up limit (dense bytes / method bytes: kept weight rows + adapters + head + norms,
same efficiency as dense), peak memory and prefill time. Medians and percentiles are over the timed
steps of one generation.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from types import MappingProxyType

import torch
from tqdm.auto import tqdm

from .engine import DecodeEngine, ModelWeights
from .errors import LarosaError
from .kernels.ops import (attention_balanced, attention_impl, attention_programs, attention_v_early, compact_store,
                          dense_tiles, gather_x, select_loop_from, side_placement)
from .record import run_record, write_json
from .report import markdown_table
from .sparsity import SparsityPlan

BENCH_METHODS = ("dense", "larosa", "topk", "teal")


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted), median of `reps`."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(nbytes // 2, dtype=torch.int16, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(reps + 2):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1000)
    del a, b
    return 2 * nbytes / statistics.median(times[2:])


def param_weighted(w: ModelWeights) -> float:
    """Parameter-weighted sparsity of an engine model (projections only)."""
    kept = total = 0
    for lw, st in zip(w.layers, w.statics):
        for site, ws in ((st.attn_in, [lw.wqkv]), (st.attn_out, [lw.wo]), (st.mlp_in, [lw.wgate, lw.wup]),
                         (st.mlp_out, [lw.wdown])):
            full = sum(x.numel() for x in ws)
            d_in = ws[0].shape[0] if site.mode != "dense" else ws[0].shape[1]
            kept += full * (site.k / d_in if site.mode == "topk" else 1.0)
            total += full
    return 1 - kept / total


def _plan_pw(base: ModelWeights, p: float, split) -> float:
    """Parameter-weighted sparsity of the paper-split plan at nominal p on `base`'s shapes."""
    from .sparsity import parameter_weighted as pw

    lw, st = base.layers[0], base.statics[0]
    d = base.embed.shape[1]
    f = lw.wdown.shape[1] if st.mlp_out.mode == "dense" else lw.wdown.shape[0]
    row = {"attn_in": (d, st.q_size + 2 * st.kv_size), "attn_out": (st.q_size, d), "mlp_in": (d, 2 * f),
           "mlp_out": (f, d)}
    return pw(SparsityPlan.from_nominal(p, split), [row] * len(base.layers))


def _pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def detrended_spread(steps: list[float]) -> float:
    """p99 / p50 of the step times divided by their least-squares line over the step index: the jitter
    without the steady growth of the attention's reads with the context (over 2048 generated tokens the last
    steps read ~15x the positions of the first, which alone puts the raw p99 / p50 above 1.02)."""
    n = len(steps)
    if n < 3:
        return 1.0
    mx, my = (n - 1) / 2, statistics.fmean(steps)
    slope = sum((i - mx) * (v - my) for i, v in enumerate(steps)) / sum((i - mx) ** 2 for i in range(n))
    line = [my + slope * (i - mx) for i in range(n)]
    if min(line) <= 0:  # a trend that falls through zero is no model of step times
        return float("nan")
    ratio = [v / f for v, f in zip(steps, line)]
    return _pct(ratio, 0.99) / statistics.median(ratio)


def kv_positions_read(prompt_len: int, gen_len: int, max_len: int) -> int:
    """Cache positions one timed decode step reads per KV head, averaged over the steps. The timed steps
    are the gen_len - 1 after the prefill's token, at positions pos = prompt_len .. prompt_len + gen_len - 2;
    the decode attention kernel reads positions 0..pos (mean prompt_len + gen_len / 2), SDPA
    (`LAROSA_ATTENTION=sdpa`) reads all max_len of them with a mask."""
    if attention_impl() == "sdpa":
        return max_len
    return round(prompt_len + gen_len / 2)


FUSIONS = MappingProxyType({"norm": "fuse_norm_select", "residual": "fuse_residual"})  # CLI name -> engine keyword


def fusion_kwargs(fuse) -> dict:
    """`DecodeEngine` keyword arguments that turn on exactly the named fusions ("norm", "residual") and
    turn off the others; None = the engine's defaults (on with CUDA)."""
    if fuse is None:
        return {}
    unknown = set(fuse) - set(FUSIONS)
    if unknown:
        raise LarosaError(f"unknown fusion {', '.join(sorted(unknown))}; choose from {', '.join(FUSIONS)}, "
                          f"auto or none")
    return {kw: name in fuse for name, kw in FUSIONS.items()}


def parse_fuse(text: str):
    """The CLI's `--fuse`: "auto" (None: the engine's defaults), "none" (), or a comma list of fusions."""
    text = text.strip()
    if text == "auto":
        return None
    if text in ("none", ""):
        return ()
    return tuple(f.strip() for f in text.split(",") if f.strip())


def _measure(w: ModelWeights, prompt: torch.Tensor, gen_len: int, bw: float, warmup: int = 8,
             **engine_kw) -> dict:
    dev = w.device
    max_len = int(math.ceil((prompt.shape[1] + gen_len + 1) / 64) * 64)
    held = 0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        held = torch.cuda.memory_allocated(dev)  # this model's weights and whatever else the benchmark holds
    eng = DecodeEngine(w, max_len=max_len, batch=prompt.shape[0], **engine_kw)
    t0 = time.perf_counter()
    eng.generate(prompt, min(warmup, gen_len))  # compile + graph capture + warm-up: not timed
    setup_s = time.perf_counter() - t0
    res = eng.generate(prompt, gen_len, timing=True)
    steps = res.step_ms
    mean = statistics.fmean(steps)
    tok_s = 1000.0 / mean * prompt.shape[0]
    kv_read = kv_positions_read(prompt.shape[1], gen_len, max_len)
    nb = w.bytes_per_token(context=kv_read, batch=prompt.shape[0])
    steps_s = tok_s / prompt.shape[0]  # decode steps per second
    out = {"tok_s": tok_s, "step_ms_mean": mean, "p50_ms": statistics.median(steps), "p99_ms": _pct(steps, 0.99),
           "max_ms": max(steps), "steps_timed": len(steps), "prefill_ms": 1000 * res.prefill_s,
           "setup_s": round(setup_s, 1), "bytes_per_token": nb, "max_len": max_len,
           "kv_positions_read": kv_read,
           "achieved_GBps": nb["total"] * steps_s / 1e9 if nb["total"] is not None else None,
           "bandwidth_fraction": nb["total"] * steps_s / bw if nb["total"] is not None and bw == bw else None}
    out["p99_over_p50"] = out["p99_ms"] / out["p50_ms"]
    # how varied the decoded inputs were: the hinted selects search near the previous token's threshold first, so
    # a run that repeats a few tokens would flatter them (random weights do not: benchmarks/NOTES.md v21)
    out["distinct_tokens"] = int(torch.unique(res.tokens).numel())
    out["p99_over_p50_detrended"] = detrended_spread(steps)
    if dev.type == "cuda":
        # the engine's own peak: this model's weights + what generation allocated on top (KV cache,
        # workspaces, graphs); other models the benchmark keeps alive (the dense base) are not counted
        out["peak_mem_GiB"] = (w.nbytes() + torch.cuda.max_memory_allocated(dev) - held) / 2 ** 30
    out["fuse"] = [name for name, flag in FUSIONS.items() if getattr(eng, flag)]  # what the engine ran
    out["kernel"] = eng.kernel or os.environ.get("LAROSA_KERNEL_IMPL")  # the Top-K GEMV (None: dense / default)
    out["adapters"] = eng.adapter_mode  # where the residual adapter GEMVs ran ("inline" without adapters)
    out["fuse_rope"] = eng.fuse_rope  # RoPE and the cache write inside the attention launch
    out["attn_combine"] = eng.attn_combine  # who combines the attention's cache splits ("launch" / "last")
    out["attn_programs"] = attention_programs()  # programs the split-cache attention aims at (its splits)
    out["attn_balanced"] = attention_balanced()  # v24: its splits divide the filled positions, not the cache
    out["attn_v_early"] = attention_v_early()  # v31: its value loads issued with the key loads
    out["select_hints"] = list(eng.hint_sites)  # sites whose selects kept hints
    out["dense_kernel"] = eng.dense_kernel  # dense sites and head in `larosa::dense_linear` (v20), at these tiles
    out["dense_head"] = eng.dense_head  # the head (and final norm) in `larosa::dense_linear`
    out["head_pdl"] = eng.dense_head and eng.head_pdl  # v28: that head launched as a programmatic dependent
    out["prefetch_mb"] = eng.prefetch_mb  # v23: L2 prefetch budget of the hinted selects (`triton_prefetch`)
    out["prefetch_mb_env"] = os.environ.get("LAROSA_PREFETCH_MB")  # v31: as set, per-site budgets included
    out["guess_env"] = os.environ.get("LAROSA_GUESS")  # v31 A/B: sites whose GEMV guessed rows before its wait
    out["spec"] = eng.spec  # the o projections in the speculative GEMV (v22, `triton_spec`)
    out["down_hist"] = any(st.down_hist for st in eng._statics)  # v30: down selects from gate/up's histogram
    if eng.dense_kernel:
        out["dense_tiles"] = dense_tiles()
    if out["kernel"] == "gtile":  # how the compacting selects stored the kept list (and whether x rode in it)
        out["compact_store"] = compact_store()
        out["gather_x"] = gather_x()
        out["select_loop_from"] = select_loop_from()  # v30: selects this wide and wider search in a run-time loop
    if eng.adapter_mode == "select":  # which launches carried the adapter programs, at which tiles
        out["adapter_side"] = side_placement(out["kernel"])
    del eng
    return out


BENCH_DTYPES = MappingProxyType({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32})


def _check_bench_args(sparsities, prompt_len: int, gen_lens, batch: int, dtype: str) -> None:
    """Refuse bad benchmark arguments before any model is built (a bad one would fail minutes in)."""
    if dtype not in BENCH_DTYPES:
        raise LarosaError(f"unknown dtype {dtype!r}; choose from {', '.join(BENCH_DTYPES)}")
    if prompt_len < 1 or batch < 1:
        raise LarosaError(f"prompt length and batch must be >= 1, got {prompt_len} and {batch}")
    if not gen_lens or any(g < 2 for g in gen_lens):
        raise LarosaError(f"generation lengths must be >= 2 (the first token comes from the prefill, the rest "
                          f"are the timed steps), got {list(gen_lens)}")
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise LarosaError(f"sparsities must lie in [0, 1), got {bad}")


def bench_decode(shape: str | None = None, model: str | None = None, methods=("dense", "larosa", "teal"),
                 sparsities=(0.25, 0.4, 0.5, 0.75), prompt_len: int = 128, gen_lens=(128,), batch: int = 1,
                 dtype: str = "bfloat16", device: str = "auto", out: str | Path | None = None, seed: int = 0,
                 split=(0.8, 1.2), progress: bool = True, fuse=None) -> dict:
    """Run the benchmark; returns {"rows", "table", "record"} and writes JSON/markdown/PNG to `out`.
    `fuse`: engine fusions for Top-K sites, any of "norm" (the norm + select kernel) and "residual" (the
    residual add in the GEMV epilogue); None = the engine's defaults (both on with CUDA); see `DecodeEngine`."""
    from .shapes import get_shape, random_base, sparse_variant, teal_thresholds

    if (shape is None) == (model is None):
        raise LarosaError("give exactly one of --shape or --model")
    _check_bench_args(sparsities, prompt_len, gen_lens, batch, dtype)
    if isinstance(fuse, str):
        fuse = parse_fuse(fuse)
    engine_kw = fusion_kwargs(fuse)
    for m in methods:
        if m not in BENCH_METHODS:
            raise LarosaError(f"unknown method {m!r}; choose from {', '.join(BENCH_METHODS)}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dt = BENCH_DTYPES[dtype]
    bw = copy_bandwidth(dev)
    gen = torch.Generator().manual_seed(seed)
    if shape is not None:
        sh = get_shape(shape)
        base = random_base(sh, dt, dev, seed)
        vocab = sh.vocab
        variant = lambda m, s, thr: sparse_variant(base, m, s, split, thresholds=thr)  # noqa: E731
    else:
        base, vocab, variant = _real_model(model, dt, dev, split, seed)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(dev)
    configs = [("dense", 0.0)] + [(m, s) for m in methods if m != "dense" for s in sparsities]
    rows, raw = [], []
    dense_by_len: dict[int, dict] = {}
    bar = tqdm(total=len(configs) * len(gen_lens), desc="bench decode", disable=not progress)
    for gen_len in gen_lens:
        for m, s in configs:
            pw = None
            if m == "dense":
                w = base
            elif m == "teal":
                # TEAL at the same parameter-weighted sparsity as LaRoSA's plan at nominal s
                pw = _plan_pw(base, s, split)
                w = variant("teal", pw, teal_thresholds(base, pw, prompt) if shape else None)
            else:
                w = variant(m, s, None)
            r = _measure(w, prompt, gen_len, bw, **engine_kw)
            if m == "dense":
                r["kernel"] = None  # no Top-K GEMV ran, whatever LAROSA_KERNEL_IMPL says
            r.update({"method": m, "nominal": s, "param_weighted": param_weighted(w) if m != "teal" else pw,
                      "gen_len": gen_len, "prompt_len": prompt_len, "batch": batch})
            if m == "dense":
                dense_by_len[gen_len] = r
            d = dense_by_len[gen_len]
            r["speedup"] = r["tok_s"] / d["tok_s"]
            dw = d["bytes_per_token"]["weights"]
            r["byte_model_limit"] = (dw / r["bytes_per_token"]["weights"]
                                     if m != "teal" and batch == 1 else None)
            raw.append(r)
            rows.append({"method": m, "nominal p": s, "pw": round(r["param_weighted"], 3), "gen": gen_len,
                         "tok/s": round(r["tok_s"], 1), "speed-up": f"{r['speedup']:.2f}x",
                         "byte-model limit": f"{r['byte_model_limit']:.2f}x" if r["byte_model_limit"] else "-",
                         "p50 ms": round(r["p50_ms"], 3), "p99 ms": round(r["p99_ms"], 3),
                         "p99/p50": round(r["p99_over_p50"], 3),
                         "detrended": round(r["p99_over_p50_detrended"], 3),
                         # TEAL's bytes per token vary with its realised sparsity: not counted
                         "GB/s": round(r["achieved_GBps"], 0) if r["achieved_GBps"] is not None else "-",
                         "of copy BW": f"{100 * r['bandwidth_fraction']:.0f}%" if r["bandwidth_fraction"] else "-",
                         "peak GiB": round(r.get("peak_mem_GiB", float("nan")), 1),
                         "prefill ms": round(r["prefill_ms"], 1)})
            if w is not base:
                del w
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            bar.update()
    bar.close()
    hw = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    setup = {"shape": shape, "model": model, "dtype": dtype, "device": hw, "batch": batch, "prompt_len": prompt_len,
             "gen_lens": list(gen_lens), "methods": list(methods), "sparsities": list(sparsities),
             "split": list(split), "copy_bandwidth_TBps": bw / 1e12,
             "weights": "random (Gaussian-like activations)" if shape else "real",
             "kernel_impl": _kernel_impl(),
             "fuse": raw[0]["fuse"]}
    dense_bytes = dense_by_len[gen_lens[0]]["bytes_per_token"]["total"]
    # bytes_per_token is what one decode step reads (weights once, KV per row): a step yields `batch` tokens
    setup["dense_roofline_tok_s"] = bw / dense_bytes * batch if bw == bw else None
    table = markdown_table(rows)
    record = run_record("bench-decode", setup, rows=raw)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", record)
        (out / "table.md").write_text(_header(setup) + "\n\n" + table + "\n")
        plot(raw, out / "decode.png", setup)
    return {"rows": rows, "table": table, "record": record, "setup": setup}


def _kernel_impl() -> str | None:
    from .kernels import ops

    if not ops.HAVE_TRITON:
        return None
    return f"{ops.triton_gemv.default_impl(0)} (Top-K), {ops.triton_gemv.default_impl(1)} (threshold)"


def _header(setup: dict) -> str:
    bw = setup["copy_bandwidth_TBps"]
    roof = setup.get("dense_roofline_tok_s")
    fused = f" | fused: {', '.join(setup['fuse'])}" if setup.get("fuse") else ""
    return (f"{setup['shape'] or setup['model']} | {setup['device']} | {setup['dtype']} | batch {setup['batch']} | "
            f"prompt {setup['prompt_len']} | copy BW {bw:.2f} TB/s | dense roofline "
            f"{roof:.0f} tok/s (weights + KV read per token){fused}" if roof else f"{setup['device']}{fused}")


def _real_model(name: str, dt, dev, split, seed):
    """(dense engine weights, vocab, variant builder) for a real model (CPU-sized models)."""
    import copy

    from .api import cached_rotations
    from .baselines import apply_teal
    from .compare import _thresholds
    from .engine import from_hf
    from .models import load_model
    from .transform import LarosaConfig, apply

    lm = load_model(name, device=str(dev), dtype={torch.bfloat16: "bfloat16", torch.float16: "float16",
                                                 torch.float32: "float32"}[dt])
    state = {}

    def variant(m, s, _thr):
        if m in ("larosa", "topk"):
            if "rot" not in state and m == "larosa":
                state["rot"] = cached_rotations(lm, 4, 512, seed)
            cfg = LarosaConfig("fused" if m == "larosa" else "topk", "layer", SparsityPlan.from_nominal(s, split))
            return from_hf(apply(copy.deepcopy(lm.model), cfg, state.get("rot")))
        if "thr" not in state:
            state["thr"] = _thresholds(lm, 4, 512, seed, None, False)
        net = apply_teal(copy.deepcopy(lm.model), state["thr"], {k: s for k in
                                                                  ("attn_in", "attn_out", "mlp_in", "mlp_out")})
        return from_hf(net)

    return from_hf(lm.model), lm.model.config.vocab_size, variant


def plot(raw: list[dict], path: Path, setup: dict):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    gen = raw[0]["gen_len"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    dense = next(r for r in raw if r["method"] == "dense" and r["gen_len"] == gen)
    ax.axhline(dense["tok_s"], color="k", ls="--", label=f"dense {dense['tok_s']:.0f} tok/s")
    if setup.get("dense_roofline_tok_s"):
        ax.axhline(setup["dense_roofline_tok_s"], color="gray", ls=":", label="dense roofline")
    for m in ("larosa", "topk", "teal"):
        pts = sorted((r["param_weighted"], r["tok_s"]) for r in raw if r["method"] == m and r["gen_len"] == gen)
        if pts:
            ax.plot(*zip(*pts), "o-", label=m)
    lim = sorted((r["param_weighted"], dense["tok_s"] * r["byte_model_limit"]) for r in raw
                 if r["method"] == "larosa" and r["gen_len"] == gen and r["byte_model_limit"])
    if lim:
        ax.plot(*zip(*lim), "x:", color="C0", alpha=0.6, label="larosa byte-model limit")
    ax.set_xlabel("parameter-weighted sparsity")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{setup['shape'] or setup['model']}, {setup['device']}, {setup['dtype']}, batch {setup['batch']}, "
                 f"gen {gen}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
