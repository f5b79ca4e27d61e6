"""Gathered-rows Top-K GEMV (v15, `impl="gtile"`) against the masked tile kernel (v11/v12, `impl="tile"`).

    PYTHONPATH=src python3 benchmarks/gtile_ab.py --out benchmarks/results/gtile-ab-h200.json

Why: at high sparsity the masked kernel's time hardly falls (benchmarks/NOTES.md v15): its grid covers all
d_in rows whatever k is, so the per-program latency of thousands of mostly-idle programs sets the time.
The gathered kernel's select also writes the k kept positions; its programs walk only those rows, so the
grid shrinks with k and every loaded weight row is a kept one.

Per op of the LLaMA2-7B and LLaMA3-8B decoder layers (batch 1, bf16, random Gaussian x and weights, each op
with its own select as in `launch`), at each sparsity: the masked kernel at its default tiles, the
gathered kernel at its default tiles and over a small tile grid (best kept), the kept-bytes ideal at the
copy bandwidth measured in this run, and cuBLAS dense; the per-layer sums; and the select alone with and
without the compaction. CUDA graphs cycling over weight copies (> 4x L2), medians.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv import copy_bandwidth, graph_time_us, n_copies, triton_gemv_call  # noqa: E402
from larosa.kernels import triton_gemv  # noqa: E402

OPS = {  # model: [(op, d_in, d_out, gated)]
    "llama2-7b": [("qkv", 4096, 12288, False), ("o", 4096, 4096, False), ("gate+up", 4096, 11008, True),
                  ("down", 11008, 4096, False)],
    "llama3-8b": [("qkv", 4096, 6144, False), ("o", 4096, 4096, False), ("gate+up", 4096, 14336, True),
                  ("down", 14336, 4096, False)],
}


def gtile_grid(gated: bool):
    for bm, bn, nw in itertools.product((32, 64, 128), (64, 128) if gated else (128, 256), (2, 4)):
        yield {"impl": "gtile", "block_m": bm, "block_n": bn, "num_warps": nw}


def bench_op(op, d_in, d_out, gated, sparsities, grid: bool):
    n_mats = 2 if gated else 1
    copies = n_copies(d_in * d_out * 2 * n_mats)
    wts = [torch.randn(d_in, d_out, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies * n_mats)]
    x = torch.randn(1, d_in, device="cuda", dtype=torch.bfloat16)

    def timed(cfg, k):
        if gated:
            calls = [(lambda i=i: triton_gemv_call(x, wts[2 * i], k, cfg, wt2=wts[2 * i + 1])) for i in range(copies)]
        else:
            calls = [(lambda i=i: triton_gemv_call(x, wts[i], k, cfg)) for i in range(copies)]
        return graph_time_us(calls, reps=30)

    if gated:
        cat = [torch.cat([wts[2 * i], wts[2 * i + 1]], 1).t().contiguous() for i in range(copies)]
        dense = [(lambda i=i: (lambda gu: F.silu(gu[:, :d_out]) * gu[:, d_out:])(F.linear(x, cat[i])))
                 for i in range(copies)]
    else:
        lin = [w.t().contiguous() for w in wts]
        dense = [(lambda i=i: F.linear(x, lin[i])) for i in range(copies)]
    t_dense = graph_time_us(dense, reps=30)
    del dense
    rows = []
    for s in sparsities:
        k = max(1, int((1 - s) * d_in))
        row = {"op": op, "d_in": d_in, "d_out": d_out, "gated": gated, "sparsity": s, "k": k,
               "cublas_us": t_dense, "tile_us": timed({"impl": "tile"}, k),
               "gtile_default_us": timed({"impl": "gtile"}, k),
               "ideal_bytes": k * d_out * 2 * n_mats}
        if grid:
            sweep = []
            for cfg in gtile_grid(gated):
                try:
                    sweep.append({**cfg, "us": timed(cfg, k)})
                except Exception as exc:  # a tiling that does not compile (resources): recorded, skipped
                    sweep.append({**cfg, "error": type(exc).__name__})
            ok = [r for r in sweep if "us" in r]
            best = min(ok, key=lambda r: r["us"])
            row.update(gtile_best_us=best["us"], gtile_best=best, gtile_sweep=sweep)
        rows.append(row)
        print(f"# {op} s={s}: tile {row['tile_us']:.2f} gtile {row['gtile_default_us']:.2f}"
              + (f" best {row['gtile_best_us']:.2f} {row['gtile_best']}" if grid else "") + " us", flush=True)
    del wts, x
    torch.cuda.empty_cache()
    return rows


def select_ab(widths=(4096, 11008, 14336)):
    out = []
    for d in widths:
        xs = [torch.randn(1, d, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        k = d // 2
        plain = graph_time_us([(lambda x=x: triton_gemv.select(x, k)) for x in xs])
        comp = graph_time_us([(lambda x=x: triton_gemv.select(x, k, compact=True)) for x in xs])
        out.append({"d_in": d, "k": k, "select_us": plain, "select_compact_us": comp})
        print(f"# select d={d}: {plain:.2f} us, compacting {comp:.2f} us", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.75,0.9")
    ap.add_argument("--no-grid", action="store_true", help="default tiles only")
    ap.add_argument("--out", default="benchmarks/results/gtile-ab-h200.json")
    args = ap.parse_args()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, copy bandwidth {bw / 1e12:.2f} TB/s, bf16, batch 1, "
          f"torch {torch.__version__}, triton {triton_version()}", flush=True)
    result = {"gpu": props.name, "sms": props.multi_processor_count, "copy_bw_Bps": bw, "dtype": "bf16", "batch": 1,
              "activations": "random normal", "torch": torch.__version__, "triton": triton_version(),
              "tile_default": {"gated": triton_gemv.tile_config(4096, 4096, True),
                               "ungated": triton_gemv.tile_config(4096, 4096, False)},
              "gtile_default": {"gated": triton_gemv.gtile_config(4096, 4096, True),
                                "ungated": triton_gemv.gtile_config(4096, 4096, False)},
              "select": select_ab(), "models": {}}
    for model in args.models.split(","):
        rows = []
        for op, d_in, d_out, gated in OPS[model]:
            rows += bench_op(op, d_in, d_out, gated, sparsities, not args.no_grid)
        for r in rows:
            r["ideal_us"] = r["ideal_bytes"] / bw * 1e6
        result["models"][model] = rows
        print(f"\n## {model}\n| op | s | cuBLAS us | tile us | gtile us (default) | gtile us (best tiles) | ideal us |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['op']} | {r['sparsity']:.2f} | {r['cublas_us']:.2f} | {r['tile_us']:.2f} | "
                  f"{r['gtile_default_us']:.2f} | {r.get('gtile_best_us', float('nan')):.2f} | {r['ideal_us']:.2f} |")
        print("\n| s | layer: cuBLAS us | tile us | gtile us (default) | gtile us (best) | ideal us |\n|---|---|---|---|---|---|")
        for s in sparsities:
            rs = [r for r in rows if r["sparsity"] == s]
            tot = {key: sum(r.get(key, float("nan")) for r in rs)
                   for key in ("cublas_us", "tile_us", "gtile_default_us", "gtile_best_us", "ideal_us")}
            print(f"| {s:.2f} | {tot['cublas_us']:.1f} | {tot['tile_us']:.1f} | {tot['gtile_default_us']:.1f} | "
                  f"{tot['gtile_best_us']:.1f} | {tot['ideal_us']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def triton_version() -> str:
    import triton
    return triton.__version__


if __name__ == "__main__":
    main()
