"""Where a decode step's GPU time goes (H200): per-kernel CUDA time of the compiled step, dense vs LaRoSA.

    PYTHONPATH=src python3 benchmarks/profile_decode.py --shape llama2-7b --sparsity 0.5 --out benchmarks/results/profile.json

The step runs compiled but not graph-captured (the profiler cannot see inside a graph replay), so the
total is above the graph-replay time of `larosa bench decode`; the split between kernel kinds is what
this is for. Kernel names are grouped into kinds by substring.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from larosa.engine import DEFAULT_ADAPTERS, DecodeEngine  # noqa: E402
from larosa.bench import _plan_pw  # noqa: E402
from larosa.shapes import random_base, sparse_variant, teal_thresholds  # noqa: E402

KINDS = [("select", "select"), ("sparse GEMV", "sparse_gemv|tile_gemv|spec_gemv"), ("dense GEMV (ours)", "dense_gemv"), ("attention", "attention|attn|flash|fmha|sdpa|softmax"),
         ("cuBLAS GEMV/GEMM", "gemv|gemm|cublas|sm90_xmma|nvjet|cutlass"), ("fused elementwise (inductor)", "triton_"),
         ("copies/other", "")]


def kind_of(name: str) -> str:
    import re

    low = name.lower()
    for kind, pat in KINDS:
        if pat and re.search(pat, low):
            return kind
    return "copies/other"


def profile(w, prompt, steps: int = 8, **engine_kw) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof

    engine_kw.setdefault("overlap_adapters", DEFAULT_ADAPTERS)  # where the graph-captured default engine runs them
    eng = DecodeEngine(w, max_len=256, compile=True, graphs=False, **engine_kw)
    eng.generate(prompt, 4)
    eng.prefill(prompt)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    per_kind: dict[str, float] = {}
    per_kernel: dict[str, float] = {}
    calls: dict[str, float] = {}
    for e in p.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t <= 0 or e.key.startswith("ProfilerStep"):
            continue
        per_kernel[e.key] = per_kernel.get(e.key, 0.0) + t / steps
        calls[e.key] = calls.get(e.key, 0.0) + e.count / steps
        k = kind_of(e.key)
        per_kind[k] = per_kind.get(k, 0.0) + t / steps
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    return {"us_per_step_by_kind": per_kind, "top_kernels_us_per_step": top,
            "launches_per_step": {k: calls[k] for k, _ in top}, "total_us_per_step": sum(per_kind.values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results/profile-decode.json")
    ap.add_argument("--methods", default="dense,larosa", help="comma list of dense, larosa, topk (un-rotated Top-K, "
                    "no adapters: the difference to larosa is what the adapters cost), teal (thresholds at LaRoSA's "
                    "parameter-weighted sparsity, as in `larosa bench decode`)")
    ap.add_argument("--hints-ab", action="store_true", help="instead: LaRoSA with the select hints at no site, at "
                    "the norm + select sites (q/k/v, gate/up) and at all four, and un-rotated Top-K at none and all "
                    "four: the select kernels' time per step")
    ap.add_argument("--dense-kernel-ab", action="store_true", help="each method with the dense sites and head in "
                    "`larosa::dense_linear` and with cuBLAS (v20)")
    ap.add_argument("--dense-head-ab", action="store_true", help="each method with the head in `larosa::dense_linear` "
                    "and with the engine's rule (v21: LaRoSA loses 0.2 ms per token with it, Top-K gains)")
    ap.add_argument("--in-order", action="store_true", help="with --hints-ab: LaRoSA's adapters in order instead "
                    "of where the engine runs them by default")
    args = ap.parse_args()
    base = random_base(args.shape, torch.bfloat16, "cuda")
    prompt = torch.randint(0, 1000, (1, 128), device="cuda")
    if args.hints_ab:
        return hints_ab(base, prompt, args)
    res = {"shape": args.shape, "gpu": torch.cuda.get_device_name(), "dtype": "bf16", "batch": 1,
           "sparsity": args.sparsity, "note": "compiled step without CUDA graphs, torch.profiler CUDA times; LaRoSA's adapter GEMVs "
                   f"where the default engine runs them ({DEFAULT_ADAPTERS!r}: 'select' = extra programs of the down "
                   "projection's launches, since v18 of its GEMV launch and so counted under 'sparse GEMV', "
                   "'stream' = on a side stream), their time counted in full; kernels that overlap (PDL) "
                   "are each counted in full"}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - {"dense", "larosa", "topk", "teal"})
    if bad:
        ap.error(f"unknown methods {bad}: choose among dense, larosa, topk, teal")
    if args.dense_kernel_ab:
        methods = [f"{m}{tag}" for m in methods for tag in ("", "+cuBLAS")]
    if args.dense_head_ab:
        methods = [f"{m}{tag}" for m in methods for tag in ("", "+dense head")]
    for m in methods:
        name = m.removesuffix("+cuBLAS").removesuffix("+dense head")
        kw = ({"dense_kernel": False} if m.endswith("+cuBLAS")
              else {"dense_head": True, "head_pdl": True} if m.endswith("+dense head") else {})
        if name == "teal":  # the same parameter-weighted sparsity as LaRoSA's plan at nominal p (bench decode)
            pw = _plan_pw(base, args.sparsity, (0.8, 1.2))
            w = sparse_variant(base, "teal", pw, (0.8, 1.2), thresholds=teal_thresholds(base, pw, prompt))
            res["teal_param_weighted"] = pw
        else:
            w = base if name == "dense" else sparse_variant(base, name, args.sparsity)
        res[m] = profile(w, prompt, **kw)
        del w
    for m in methods:
        print(f"## {m}: {res[m]['total_us_per_step']:.0f} us of kernels per step")
        for k, v in sorted(res[m]["us_per_step_by_kind"].items(), key=lambda kv: -kv[1]):
            print(f"| {k} | {v:.0f} us |")
        for name, v in res[m]["top_kernels_us_per_step"][:8]:
            print(f"#   {v:8.0f} us  {name[:90]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


def hints_ab(base, prompt, args) -> None:
    """Select kernel time per step by hint sites, LaRoSA (adapters where the engine runs them, or in order) and
    Top-K. (Up to v18 this compared hints off / on at all four sites with LaRoSA's adapters on the side
    stream: `results/profile-hints-llama2-7b.json`.)"""
    res = {"shape": args.shape, "gpu": torch.cuda.get_device_name(), "dtype": "bf16", "batch": 1,
           "sparsity": args.sparsity, "note": "compiled step without CUDA graphs, torch.profiler CUDA times",
           "adapters": "in order" if args.in_order else f"engine default ({DEFAULT_ADAPTERS})", "rows": []}
    print("| method | hint sites | select_packed_kernel us (launches) | rmsnorm_select_kernel us (launches) | "
          "tile / gtile GEMV us | all kernels us |")
    print("|---|---|---|---|---|---|")
    for method, site_sets in (("larosa", ((), (0, 2), (0, 1, 2, 3))), ("topk", ((), (0, 1, 2, 3)))):
        w = sparse_variant(base, method, args.sparsity)
        for sites in site_sets:
            hints = bool(sites)
            r = profile(w, prompt, select_hints=hints, hint_sites=sites or None,
                        overlap_adapters="inline" if args.in_order else DEFAULT_ADAPTERS)
            top = dict(r["top_kernels_us_per_step"])

            def us(name, top=top):
                return sum(v for k, v in top.items() if k.startswith(name))

            def n(name, launches=r["launches_per_step"]):
                return sum(v for k, v in launches.items() if k.startswith(name))
            row = {"method": method, "select_hints": hints, "hint_sites": list(sites),
                   "select_packed_us": us("select_packed_kernel"),
                   "select_packed_launches": n("select_packed_kernel"),
                   "rmsnorm_select_us": us("rmsnorm_select_kernel"),
                   "rmsnorm_select_launches": n("rmsnorm_select_kernel"), "tile_gemv_us": us("tile_gemv_kernel") + us("gtile_gemv_kernel"),
                   "total_us": r["total_us_per_step"]}
            res["rows"].append(row)
            print(f"| {method} | {list(sites)} | {row['select_packed_us']:.0f} ({row['select_packed_launches']:.0f}) | "
                  f"{row['rmsnorm_select_us']:.0f} ({row['rmsnorm_select_launches']:.0f}) | "
                  f"{row['tile_gemv_us']:.0f} | {row['total_us']:.0f} |", flush=True)
        del w
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
