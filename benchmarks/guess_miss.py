"""How well the previous token's threshold guesses the next token's Top-K set, on a real model (CPU).

The selects are a quarter of LaRoSA's decode step on the H200 and sit on its critical path (benchmarks/NOTES.md v28,
v29). The design that would take them off it (NOTES "Next steps"): the kernel that writes a site's input also lists
the positions at or above a guess threshold (the site's exact threshold at the previous token, lowered by a margin),
the GEMV streams those rows at once, and the exact select, run beside it, yields a fix list: rows the guess missed
(to add) and rows it took that the exact Top-K does not keep (to subtract). The design pays off only if the fix
list is short. Random weights (threshold_drift.py) say little about that; this measures it on a trained model.

A real model (default the embedded smollm2-135m, fp32), LaRoSA fused (layerwise rotations) and un-rotated Top-K at
nominal p (0.8 / 1.2 split), WikiText-2 test text through the engine's prefill (teacher forcing: consecutive tokens,
as decoding that text would see them). Per (layer, site) and token t >= 1, with T_t the site's exact k-th largest |x|
and the guess G_t = {i : |x_t,i| >= (1 - margin) T_(t-1)} against the exact set E_t (k entries):
missed = |E_t - G_t| / k, extra = |G_t - E_t| / k, fix = missed + extra; and how often the hinted select's window
(2^HINT_WINDOW bf16 patterns around the previous threshold, `triton_gemv.select(..., hint=)`) holds T_t. Prints per
site the mean and the 90th
percentile over tokens and layers, for several margins, and writes JSON. `--random 4096,11008,4` instead: the random-
weight model at that width (hidden, intermediate, layers) that the GPU speed runs use (`larosa.shapes`), fed random
tokens, for comparison.

`--static` (v32) asks a different question: is a *fixed* set of input positions kept most of the time, so that a GEMV
could load its rows before the select has run? Positions are ranked by how often the exact Top-K kept them on other
text (the first `--tokens` WikiText-2 validation tokens); printed is the share of the top G ranked positions that the
exact set keeps on the test tokens (mean and worst layer), for G = 0.25 / 0.5 / 0.75 / 1.0 k. On random weights that
share is the keep share itself.

    .venv/bin/python benchmarks/guess_miss.py --out benchmarks/results/guess-miss-smollm2-135m.json \
        | tee benchmarks/results/guess-miss-smollm2-135m.log
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from larosa.api import cached_rotations  # noqa: E402
from larosa.data import load_wikitext, tokenize_source  # noqa: E402
from larosa.engine import DecodeEngine, from_hf  # noqa: E402
from larosa.kernels.triton_gemv import HINT_WINDOW  # noqa: E402
from larosa.models import load_model  # noqa: E402
from larosa.shapes import Shape, random_base, sparse_variant  # noqa: E402
from larosa.sparsity import SparsityPlan  # noqa: E402
from larosa.transform import LarosaConfig, apply  # noqa: E402

SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def site_inputs(weights, ids: torch.Tensor) -> dict:
    """{(layer, site): (T, d) fp32 inputs before sparsification} from one prefill of ids (1, T)."""
    eng = DecodeEngine(weights, max_len=ids.shape[1] + 1, compile=False, graphs=False)
    seen = {}

    def probe(layer: int, site: int, x: torch.Tensor) -> None:
        seen[(layer, site)] = x.reshape(-1, x.shape[-1]).float().clone()

    eng.prefill(ids, probe=probe)
    return seen


def exact_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of each token's exact Top-k |x| entries, each token's k-th largest |x|, T_t)."""
    top = x.abs().topk(k, dim=-1)
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, top.indices, True), top.values[:, -1]


def window_hits(x: torch.Tensor, k: int, window: int = HINT_WINDOW, top=None) -> torch.Tensor:
    """Per token t >= 1: whether the bf16 pattern of T_t lies in [h - 2^(window-1), h + 2^(window-1)), h the pattern
    of T_(t-1) (the hinted select's first search window). `top`: `exact_topk(x, k)` if already made."""
    kth = (top or exact_topk(x, k))[1].to(torch.bfloat16)
    pat = kth.view(torch.int16).to(torch.int32) & 0x7FFF
    d = pat[1:] - pat[:-1]
    half = 1 << (window - 1)
    return (d >= -half) & (d < half)


def guess_stats(x: torch.Tensor, k: int, margin: float, top=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(missed, extra) per token t >= 1 as fractions of k (see the module docstring). `top`: as in `window_hits`."""
    exact, kth = top or exact_topk(x, k)
    guess = x[1:].abs() >= (1 - margin) * kth[:-1, None]
    missed = (exact[1:] & ~guess).sum(-1).float() / k
    extra = (guess & ~exact[1:]).sum(-1).float() / k
    return missed, extra


STATIC_SHARES = (0.25, 0.5, 0.75, 1.0)


def static_precision(x_rank: torch.Tensor, x: torch.Tensor, k: int) -> list[float]:
    """Share of the G positions most often kept on x_rank that the exact Top-k of x keeps, averaged over x's tokens,
    for G = share * k (STATIC_SHARES)."""
    order = exact_topk(x_rank, k)[0].float().mean(0).argsort(descending=True)
    kept = exact_topk(x, k)[0].float()[:, order]
    return [round(float(kept[:, : max(1, int(f * k))].mean()), 4) for f in STATIC_SHARES]


def static_main(a, lm) -> None:
    """`--static`: the fixed-prefix precision per method, site and p (see the module docstring)."""
    rank_ids = tokenize_source(lm.tokenizer, load_wikitext("validation"))[: a.tokens][None]
    ids = tokenize_source(lm.tokenizer, load_wikitext("test"))[: a.tokens][None]
    rot = cached_rotations(lm, 4, 512, 0)
    table = []
    for p in (float(v) for v in a.sparsities.split(",")):
        for method in a.methods.split(","):
            cfg = LarosaConfig("fused" if method == "larosa" else "topk", "layer", SparsityPlan.from_nominal(p))
            w = from_hf(apply(copy.deepcopy(lm.model), cfg, rot if method == "larosa" else None))
            xr, xt = site_inputs(w, rank_ids), site_inputs(w, ids)
            per = {}
            for (layer, site), x in sorted(xt.items()):
                per.setdefault(SITES[site], []).append(
                    static_precision(xr[(layer, site)], x, getattr(w.statics[layer], SITES[site]).k))
            for site, vals in per.items():
                t = torch.tensor(vals)
                table.append({"p": p, "method": method, "site": site, "G_over_k": list(STATIC_SHARES),
                              "kept_share_mean": [round(float(v), 4) for v in t.mean(0)],
                              "kept_share_worst_layer": [round(float(v), 4) for v in t.min(0).values]})
    print(f"{a.model} | fp32 CPU | 0.8 / 1.2 split | positions ranked on {rank_ids.shape[1]} validation tokens, "
          f"measured on {ids.shape[1]} test tokens | share of the top G ranked positions kept (mean / worst layer)")
    print("| p | method | site | " + " | ".join(f"G = {f} k" for f in STATIC_SHARES) + " |")
    print("|---|---|---|" + "---|" * len(STATIC_SHARES))
    for r in table:
        print(f"| {r['p']} | {r['method']} | {r['site']} | " + " | ".join(
            f"{m:.2f} / {w:.2f}" for m, w in zip(r["kept_share_mean"], r["kept_share_worst_layer"])) + " |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "dtype": "float32", "device": "cpu", "split": [0.8, 1.2],
                                 "tokens": int(ids.shape[1]), "rank_data": "WikiText-2 raw validation",
                                 "data": "WikiText-2 raw test", "static": table}, indent=1) + "\n")
    print(f"wrote {a.out}")


def summarize(rows: list[dict], p: float, method: str, margin: float, site: str) -> dict:
    sel = [r for r in rows if (r["p"], r["method"], r["margin"], r["site"]) == (p, method, margin, site)]
    m = torch.cat([r["missed"] for r in sel])
    e = torch.cat([r["extra"] for r in sel])
    f = m + e
    q = lambda t: round(float(t.quantile(0.9)), 4)  # noqa: E731
    return {"p": p, "method": method, "site": site, "margin": margin, "tokens": int(m.numel()),
            "missed_mean": round(float(m.mean()), 4), "missed_p90": q(m), "extra_mean": round(float(e.mean()), 4),
            "extra_p90": q(e), "fix_mean": round(float(f.mean()), 4), "fix_p90": q(f),
            "no_miss_share": round(float((m == 0).float().mean()), 4),
            "window_hit_share": round(float(torch.cat([r["window_hit"] for r in sel]).mean()), 4),
            "window_hit_share_by_log2": {w: round(sum(r["windows"][w] for r in sel) / len(sel), 4)
                                         for w in sel[0]["windows"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsities", default="0.25,0.5,0.75", help="nominal p, comma list")
    ap.add_argument("--tokens", type=int, default=512, help="WikiText-2 test tokens (one window)")
    ap.add_argument("--margins", default="0,0.05,0.1,0.2")
    ap.add_argument("--methods", default="larosa,topk")
    ap.add_argument("--windows", default="4,5,6,7,8", help="log2 window widths whose hit share the JSON records")
    ap.add_argument("--random", default=None, help="hidden,intermediate,layers: random weights at that width instead")
    ap.add_argument("--static", action="store_true", help="the fixed-prefix precision instead (v32)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    t0 = time.time()
    if a.static:
        if a.random:
            ap.error("--static ranks positions on a trained model's text; random weights keep any G at the keep share")
        return static_main(a, load_model(a.model, device="cpu", dtype="float32"))
    if a.random:
        hidden, inter, layers = (int(v) for v in a.random.split(","))
        base = random_base(Shape(hidden, inter, layers, 32, 32, 1000), torch.float32, "cpu", 0)
        ids = torch.randint(0, 1000, (1, a.tokens), generator=torch.Generator().manual_seed(0))
        a.model = f"random weights {hidden}/{inter}, {layers} layers, random tokens"
    else:
        lm = load_model(a.model, device="cpu", dtype="float32")
        ids = tokenize_source(lm.tokenizer, load_wikitext("test"))[: a.tokens][None]
    margins = [float(m) for m in a.margins.split(",")]
    sparsities = [float(p) for p in a.sparsities.split(",")]
    windows = [int(w) for w in a.windows.split(",")]
    methods = a.methods.split(",")
    rot = cached_rotations(lm, 4, 512, 0) if "larosa" in methods and not a.random else None
    rows = []
    for p in sparsities:
        for method in methods:
            if a.random:  # LaRoSA there: random orthogonal adapters, as in the speed runs
                w = sparse_variant(base, method, p)
            else:
                cfg = LarosaConfig("fused" if method == "larosa" else "topk", "layer", SparsityPlan.from_nominal(p))
                w = from_hf(apply(copy.deepcopy(lm.model), cfg, rot if method == "larosa" else None))
            for (layer, site), x in sorted(site_inputs(w, ids).items()):
                k = getattr(w.statics[layer], SITES[site]).k
                top = exact_topk(x, k)  # once per site: every margin and window below reads it
                hits = window_hits(x, k, top=top).float()
                wider = {wd: float(window_hits(x, k, wd, top).float().mean()) for wd in windows}
                for margin in margins:
                    missed, extra = guess_stats(x, k, margin, top)
                    rows.append({"p": p, "method": method, "layer": layer, "site": SITES[site], "margin": margin,
                                 "missed": missed, "extra": extra, "window_hit": hits, "windows": wider})
    table = [summarize(rows, p, meth, m, s) for p in sparsities for meth in methods for s in SITES for m in margins]
    text = "random" if a.random else "WikiText-2 test"
    print(f"{a.model} | fp32 CPU | 0.8 / 1.2 split | {ids.shape[1]} {text} tokens | guess = (1 - margin) x the "
          f"previous token's threshold | fractions of k, mean / p90 over tokens and layers")
    print("| p | method | site | margin | missed | extra | fix list (missed + extra) | tokens with no miss | "
          f"threshold in the hint window (2^{HINT_WINDOW}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['p']} | {r['method']} | {r['site']} | {r['margin']:.2f} | "
              f"{r['missed_mean']:.3f} / {r['missed_p90']:.3f} | "
              f"{r['extra_mean']:.3f} / {r['extra_p90']:.3f} | {r['fix_mean']:.3f} / {r['fix_p90']:.3f} | "
              f"{r['no_miss_share']:.2f} | {r['window_hit_share']:.2f} |")
    print(f"hint window hit share by width (log2 patterns {', '.join(map(str, windows))}), margin {margins[0]} rows:")
    for r in table:
        if r["margin"] == margins[0]:
            print(f"  p = {r['p']} {r['method']:6s} {r['site']:8s} " + " / ".join(
                f"{v:.2f}" for v in r["window_hit_share_by_log2"].values()))
    per_layer = [{k: (round(float(v.mean()), 4) if torch.is_tensor(v) else v) for k, v in r.items()} for r in rows]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "dtype": "float32", "device": "cpu", "sparsities": sparsities,
                                 "split": [0.8, 1.2], "tokens": int(ids.shape[1]),
                                 "data": "random tokens" if a.random else "WikiText-2 raw test",
                                 "summary": table, "per_layer_means": per_layer,
                                 "seconds": round(time.time() - t0, 1)}, indent=1) + "\n")
    print(f"wrote {a.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
