"""The selects' L2 prefetch (v23, `triton_prefetch`) per op: select (+ prefetch) + gathered GEMV, by budget.

    PYTHONPATH=src python3 benchmarks/prefetch_ab.py --out benchmarks/results/prefetch-ab-h200.json

The four Top-K sites of a LLaMA2-7B layer (batch 1, bf16, random Gaussian x and weights) at the sparsities the
paper's 0.8 / 1.2 split gives them at p = 0.4 / 0.5 / 0.75, each as the decode engine runs it: q/k/v and gate/up
as the norm + select kernel then the GEMV (`larosa::rmsnorm_topk`), o and down as select then GEMV
(`larosa::topk_linear`), the gathered-rows GEMV (`impl="gtile"`), a hint slot carrying the threshold from call to
call. Every call of the timed CUDA graph takes another x and another weight copy (> 4x the L2 in all), so a call
finds none of its weights in L2 but what its own prefetch brought. Budgets (`LAROSA_PREFETCH_MB`, per launch) in
columns; then the op with one weight copy for every call and no prefetch ("hot": as much of it in L2 as fits,
what a perfect prefetch could reach), and the kept-bytes ideal at this run's copy bandwidth. Medians.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv import copy_bandwidth, graph_time_us, n_copies  # noqa: E402
from larosa.kernels import ops, topk_gemv_ref  # noqa: E402

# (site, d_in, d_out, gated, share of p); LLaMA2-7B
SITES = [("qkv", 4096, 12288, False, 0.8), ("o", 4096, 4096, False, 0.8), ("gate_up", 4096, 11008, True, 1.2),
         ("down", 11008, 4096, False, 1.2)]
P = (0.4, 0.5, 0.75)
BUDGETS = (0, 4, 8, 16, 32)


def bench_site(site, d_in, d_out, gated, share, budgets):
    n_mats = 2 if gated else 1
    copies = n_copies(d_in * d_out * 2 * n_mats)
    wts = [torch.randn(d_in, d_out, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies * n_mats)]
    xs = [torch.randn(1, d_in, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    res = torch.randn(1, d_in, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.ones(d_in, device="cuda", dtype=torch.bfloat16)
    cnt = torch.zeros(1 << 20, dtype=torch.int32, device="cuda")
    norm = site in ("qkv", "gate_up")

    def calls(k, hot=False):
        hint = torch.zeros(1, dtype=torch.int32, device="cuda")

        def call(i):
            j = 0 if hot else i  # hot: one weight copy for every call (L2-resident where it fits), no prefetch
            w1, w2 = wts[n_mats * j], (wts[n_mats * j + 1] if gated else None)
            if norm:
                return ops.rmsnorm_topk(xs[i], res, norm_w, 1e-5, w1, w2, k, None, cnt, hint, "gtile")[1]
            return ops.topk_linear(xs[i], w1, k, None, cnt, None, hint, "gtile")
        return call, [(lambda i=i: call(i)) for i in range(copies)]

    rows = []
    for p in P:
        s = min(0.95, share * p)
        k = max(1, int((1 - s) * d_in))
        row = {"site": site, "d_in": d_in, "d_out": d_out, "gated": gated, "p": p, "sparsity": s, "k": k,
               "ideal_bytes": k * d_out * 2 * n_mats, "us": {}}
        for mb in budgets:
            os.environ["LAROSA_PREFETCH_MB"] = str(mb)  # read by the launches, i.e. when the graph is captured
            call, timed = calls(k)
            if mb == budgets[-1] and not norm:  # the result is the Top-K product with the prefetch on
                for i in range(2):
                    y = call(i)
                ref = topk_gemv_ref(xs[1], wts[n_mats], k)
                rel = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
                assert rel < 1e-2, rel
            row["us"][str(mb)] = graph_time_us(timed, reps=30)
        os.environ["LAROSA_PREFETCH_MB"] = "0"
        row["hot_us"] = graph_time_us(calls(k, hot=True)[1], reps=30)
        rows.append(row)
        print(f"# {site} p={p} k={k}: " + ", ".join(f"{mb} MiB {row['us'][str(mb)]:.2f}" for mb in budgets)
              + f" us; hot weights {row['hot_us']:.2f} us", flush=True)
    os.environ.pop("LAROSA_PREFETCH_MB", None)
    wts.clear()
    xs.clear()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="MiB per launch, comma-separated")
    ap.add_argument("--sites", default=",".join(s[0] for s in SITES))
    ap.add_argument("--out", default="benchmarks/results/prefetch-ab-h200.json")
    args = ap.parse_args()
    import triton
    budgets = tuple(float(v) for v in args.budgets.split(","))
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, copy bandwidth "
          f"{bw / 1e12:.2f} TB/s, bf16, batch 1, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    result = {"gpu": props.name, "sms": props.multi_processor_count, "l2_bytes": l2, "copy_bw_Bps": bw,
              "dtype": "bf16", "batch": 1, "shape": "llama2-7b", "activations": "random normal, a new x per call",
              "kernel": "gtile", "torch": torch.__version__, "triton": triton.__version__, "rows": []}
    for site, d_in, d_out, gated, share in SITES:
        if site in args.sites.split(","):
            result["rows"] += bench_site(site, d_in, d_out, gated, share, budgets)
    print("\n| site | p | sparsity | " + " | ".join(f"{b:g} MiB us" for b in budgets) + " | hot weights us | ideal us |"
          "\n|" + "---|" * (len(budgets) + 5))
    for r in result["rows"]:
        r["ideal_us"] = r["ideal_bytes"] / bw * 1e6
        print(f"| {r['site']} | {r['p']} | {r['sparsity']:.2f} | " + " | ".join(f"{v:.2f}" for v in r["us"].values())
              + f" | {r['hot_us']:.2f} | {r['ideal_us']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
