"""The residual adapter GEMV inside the MLP half's launches (v16: the select launches; since v18 by default the
GEMV launches, `LAROSA_SIDE_IN`), per op on the GPU.

    PYTHONPATH=src python3 benchmarks/side_bench.py --out benchmarks/results/side-h200.json

LaRoSA's MLP half of one layer (bf16, batch 1, the paper's 0.8/1.2 split at nominal p; `layers` layers'
weights cycled in one CUDA graph so nothing stays in L2; median per layer):

  mlp             norm + select -> gate/up GEMV -> select -> down GEMV (the adapter not computed)
  mlp+mm          the same, then the adapter x_mid R_l as a cuBLAS GEMV (the engine's "inline" order)
  mlp+side        the adapter's columns computed by extra programs of the two select launches
                  (`rmsnorm_topk_side` takes `split` of them, `topk_linear_side` the rest)
  mm              the adapter GEMV alone (cuBLAS)

A sweep of the side programs' tiles (A_BN output columns, A_BK inputs per step, A_STAGES) and of the
split comes first at p = 0.5, then every p at the best tiles. The tile sweep and the "default" rows run at
the engine's `ADAPTER_SPLIT` (v16's committed run, `results/side-h200.json`, used 0.375, the default then).
Prints tables, writes JSON; the copy bandwidth and the adapter's bytes at that bandwidth are recorded
beside the times.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv import env_set, graph_time_us  # noqa: E402
from larosa.bench import copy_bandwidth  # noqa: E402
from larosa.engine import ADAPTER_SPLIT, topk_kernel  # noqa: E402
from larosa.kernels import triton_gemv  # noqa: E402
from larosa.shapes import get_shape, random_base, sparse_variant  # noqa: E402


def mlp_calls(w, split: float, variant: str):
    """One call per layer of the MLP half in `variant` (mlp / mlp+mm / mlp+side / mm)."""
    calls = []
    d = w.embed.shape[1]
    cols = int(round(split * d / 8)) * 8
    kernel = topk_kernel(w)
    for lw, st in zip(w.layers, w.statics):
        x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
        ki, ko = st.mlp_in.k, st.mlp_out.k

        def call(lw=lw, x=x, ki=ki, ko=ko):
            if variant == "mm":
                return F.linear(x, lw.adapter)
            if variant == "mlp+side":
                act, r = torch.ops.larosa.rmsnorm_topk_side(x, lw.mlp_norm, 1e-5, lw.wgate, lw.wup, ki, lw.adapter,
                                                            cols, lw.counters, None, kernel)
                return torch.ops.larosa.topk_linear_side(act, lw.wdown, ko, x, lw.adapter, r if cols else None,
                                                         lw.counters, None, kernel)
            act = torch.ops.larosa.rmsnorm_topk(x, None, lw.mlp_norm, 1e-5, lw.wgate, lw.wup, ki, None, lw.counters,
                                                None, kernel)[1]
            y = torch.ops.larosa.topk_linear(act, lw.wdown, ko, None, lw.counters, None, None, kernel)
            return (y, F.linear(x, lw.adapter)) if variant == "mlp+mm" else y
        calls.append(call)
    return calls


def timed(w, split, tiles, variant) -> float:
    """Median us per layer; `tiles` (A_BN, A_BK, A_STAGES) or None for the default, through LAROSA_SIDE_TILES
    (read at each launch, i.e. while the graph is captured)."""
    with env_set("LAROSA_SIDE_TILES", None if tiles is None else ",".join(str(v) for v in tiles)):
        return graph_time_us(mlp_calls(w, split, variant), reps=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.75")
    ap.add_argument("--no-sweep", action="store_true")
    a = ap.parse_args()
    shape = dataclasses.replace(get_shape(a.shape), layers=a.layers)
    bw = copy_bandwidth(torch.device("cuda"))
    base = random_base(shape, torch.bfloat16, "cuda", seed=0)
    d = base.embed.shape[1]
    adapter_us = d * d * 2 / bw * 1e6
    rows = []
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; the adapter's {d * d * 2 / 2 ** 20:.0f} MiB at it: {adapter_us:.1f} us")
    w = sparse_variant(base, "larosa", 0.5)
    w.layers, w.statics = w.layers[:-1], w.statics[:-1]  # the last layer has no adapter
    best = (None, ADAPTER_SPLIT)
    if not a.no_sweep:
        ref = {v: timed(w, ADAPTER_SPLIT, None, v) for v in ("mlp", "mlp+mm", "mm")}
        print(f"p=0.50 mlp {ref['mlp']:.2f} us  mlp+mm {ref['mlp+mm']:.2f}  mm {ref['mm']:.2f}")
        with env_set("LAROSA_KERNEL_PDL", "0"):  # the same without programmatic dependent launches
            nopdl = {v: timed(w, ADAPTER_SPLIT, None, v) for v in ("mlp", "mlp+side")}
        print(f"p=0.50 without PDL: mlp {nopdl['mlp']:.2f} us  mlp+side {nopdl['mlp+side']:.2f} us", flush=True)
        ref.update({f"{k}_nopdl": v for k, v in nopdl.items()})
        print("| A_BN | A_BK | A_STAGES | split | mlp+side us | - mlp us |\n|---|---|---|---|---|---|")
        dflt = triton_gemv.SIDE_TILES
        grid = list(itertools.product((8, 16, 32), (256, 512, 1024), (1, 2, 4), (ADAPTER_SPLIT,))) + \
            [(*dflt, s) for s in (0.0, 0.25, 0.375, 0.5, 0.625) if s != ADAPTER_SPLIT]
        best_t = float("inf")
        for bn, bk, stg, split in grid:
            tiles = (bn, bk, stg)
            try:
                t = timed(w, split, tiles, "mlp+side")
            except Exception as e:  # a tiling that does not compile (registers)
                print(f"| {bn} | {bk} | {stg} | {split} | failed: {type(e).__name__} | |", flush=True)
                continue
            rows.append({"p": 0.5, "tiles": list(tiles), "split": split, "mlp_side_us": t, **{f"{k}_us": v for k, v in ref.items()}})
            print(f"| {bn} | {bk} | {stg} | {split} | {t:.2f} | {t - ref['mlp']:+.2f} |", flush=True)
            if t < best_t:
                best_t, best = t, (tiles, split)
        print(f"best: {best}")
    per_p = []
    print("| p | mlp us | mlp+mm us | mlp+side us (best tiles) | mlp+side us (default) | mm us |\n|---|---|---|---|---|---|")
    for p in [float(s) for s in a.sparsities.split(",")]:
        w = sparse_variant(base, "larosa", p)
        w.layers, w.statics = w.layers[:-1], w.statics[:-1]
        r = {v: timed(w, ADAPTER_SPLIT, None, v) for v in ("mlp", "mlp+mm", "mm")}
        r["mlp+side_default"] = timed(w, ADAPTER_SPLIT, None, "mlp+side")
        r["mlp+side_best"] = timed(w, best[1], best[0], "mlp+side")
        per_p.append({"p": p, "kernel": topk_kernel(w), **{f"{k}_us": v for k, v in r.items()}})
        print(f"| {p} | {r['mlp']:.2f} | {r['mlp+mm']:.2f} | {r['mlp+side_best']:.2f} | {r['mlp+side_default']:.2f} | "
              f"{r['mm']:.2f} |", flush=True)
        del w
    props = torch.cuda.get_device_properties(0)
    rec = {"gpu": props.name, "dtype": "bf16", "batch": 1, "shape": a.shape, "layers_cycled": a.layers - 1,
           "copy_bandwidth_Bps": bw, "adapter_us_at_copy_bw": adapter_us, "default_tiles": triton_gemv.side_config(),
           "best": {"tiles": best[0], "split": best[1]}, "sweep": rows, "per_p": per_p,
           "timing": "CUDA graph replay, median per layer", "torch": torch.__version__,
           "triton": __import__("triton").__version__, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
