"""Does the gathered GEMV's weight layout limit its streaming rate? (H200, v28)

v28 read the graph timeline (`results/timeline-llama2-7b.*`) as LaRoSA's gathered gate/up GEMV at ~2.3 TB/s of kept
bytes inside the step (31 us for 72 MB at p = 0.5) against ~4.1 TB/s for the dense gate/up GEMV. (v29: gate/up keeps
60 %, 2457 rows, 108 MB: 3.5 TB/s in the step; v28's counts here had o's and gate/up's swapped.) In the
input-major layout W^T (d_in, d_out) a program of the gathered kernel reads BLOCK_N columns of each of BLOCK_M
kept rows: BLOCK_N * 2 bytes per row, d_out * 2 bytes apart, so every piece lands in another DRAM page. In a
column-blocked layout (d_out / BLOCK_N, d_in, BLOCK_N) the same pieces of consecutive rows are adjacent, and at
40-60 % kept most of a program's reads fall in a few contiguous stretches.

This measures the gathered tile alone (kept positions ascending, x gathered, one BLOCK_M x BLOCK_N tile per
program, fp32 atomic adds, no finisher), in both layouts (and, gated, with gate and up interleaved per block),
at the LLaMA2-7B shapes and LaRoSA's p = 0.5 keep counts, against a dense cuBLAS GEMV of the same full matrix.

    PYTHONPATH=src python3 benchmarks/layout_ab.py --out benchmarks/results/layout-ab-h200.json

v28's run timed one weight copy per site: q/k/v's, o's and down's kept rows (20-60 MB) then sit partly or wholly in
L2. `--cold` (v29) cycles over enough copies (> 4x L2, as `gemv.py` does) that every call reads DRAM, as in the step:
    PYTHONPATH=src python3 benchmarks/layout_ab.py --cold --out benchmarks/results/layout-ab-cold-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gemv import graph_time_us, n_copies  # noqa: E402
from larosa.sparsity import SparsityPlan  # noqa: E402


@triton.jit
def gathered_tile_kernel(idx_ptr, x_ptr, w_ptr, w2_ptr, acc_ptr, k, d_in, d_out,
                         LAYOUT: tl.constexpr, GATED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """LAYOUT 0: W^T (d_in, d_out); 1: (d_out / BN, d_in, BN) (w2 alike); 2 (GATED): (d_out / BN, d_in, 2 BN),
    gate then up per row of each block."""
    pid_n = tl.program_id(0)
    j = tl.program_id(1) * BM + tl.arange(0, BM)
    jm = j < k
    idx = tl.load(idx_ptr + j, mask=jm, other=0)
    xf = tl.load(x_ptr + idx, mask=jm, other=0.0).to(tl.float32)
    cols = tl.arange(0, BN)
    rn = pid_n * BN + cols
    rows = idx.to(tl.int64)[:, None]
    if LAYOUT == 0:
        off = rows * d_out + rn[None, :]
    elif LAYOUT == 1:
        off = pid_n.to(tl.int64) * d_in * BN + rows * BN + cols[None, :]
    else:
        off = pid_n.to(tl.int64) * d_in * 2 * BN + rows * (2 * BN) + cols[None, :]
    w = tl.load(w_ptr + off, mask=jm[:, None], other=0.0, eviction_policy="evict_first")
    tl.atomic_add(acc_ptr + rn, tl.sum(w.to(tl.float32) * xf[:, None], 0), sem="relaxed")
    if GATED:
        if LAYOUT == 2:
            w2 = tl.load(w_ptr + off + BN, mask=jm[:, None], other=0.0, eviction_policy="evict_first")
        else:
            w2 = tl.load(w2_ptr + off, mask=jm[:, None], other=0.0, eviction_policy="evict_first")
        tl.atomic_add(acc_ptr + d_out + rn, tl.sum(w2.to(tl.float32) * xf[:, None], 0), sem="relaxed")


def blocked(wt: torch.Tensor, bn: int) -> torch.Tensor:
    d_in, d_out = wt.shape
    return wt.view(d_in, d_out // bn, bn).permute(1, 0, 2).contiguous()


def interleaved(wt: torch.Tensor, wt2: torch.Tensor, bn: int) -> torch.Tensor:
    d_in, d_out = wt.shape
    return torch.cat((wt.view(d_in, d_out // bn, bn), wt2.view(d_in, d_out // bn, bn)), 2).permute(1, 0, 2).contiguous()


def time_us(fn, iters: int = 100, reps: int = 7, copies: int = 1) -> float:
    """Median over reps of the mean time per call of `iters` calls captured in one CUDA graph; fn(i) takes weight
    copy i % copies."""
    return graph_time_us([lambda i=i: fn(i % copies) for i in range(iters)], reps=reps)


# v29: the keep counts from the plan itself (LaRoSA's 0.8 / 1.2 split at p = 0.5: q/k/v and gate/up keep 60 %, o and
# down 40 %). v28's `layout_ab.py` had o's and gate/up's counts swapped (o 2458, gate/up 1638 kept rows).
_PLAN = SparsityPlan.from_nominal(0.5)
SHAPES = {  # name: (d_in, d_out, gated, kept rows)
    "qkv": (4096, 12288, False, _PLAN.k("attn_in", 4096)), "o": (4096, 4096, False, _PLAN.k("attn_out", 4096)),
    "gate_up": (4096, 11008, True, _PLAN.k("mlp_in", 4096)), "down": (11008, 4096, False, _PLAN.k("mlp_out", 11008)),
}
TILES = {"qkv": [(128, 128), (64, 256), (64, 128), (128, 64)], "o": [(64, 256), (128, 128), (64, 128), (128, 64)],
         "gate_up": [(64, 64), (128, 64), (64, 128), (128, 32), (256, 32)],
         "down": [(64, 256), (128, 128), (128, 64), (256, 64)]}


def pair_rows(res: dict, name: str, wts: list, wt2s: list, x2: torch.Tensor, k: int, kept_bytes: int, nc: int) -> None:
    """The gate/up GEMV after its norm + select (`larosa::rmsnorm_topk`, PDL and the select hint with its L2 prefetch
    as in the engine's step), weights cold, against the norm + select alone: the GEMV's share of the pair is the
    difference (v28's timeline: 31 us in the step, 26.5 us alone)."""
    from larosa.kernels import ops, triton_gemv  # noqa: F401 (ops registers torch.ops.larosa)

    d_in = x2.shape[1]
    g = torch.ones(d_in, device=x2.device, dtype=torch.bfloat16)
    cnt = torch.zeros(triton_gemv.tile_workspace_needed(1, wts[0].shape[1], True, 32), dtype=torch.int32,
                      device=x2.device)
    for hinted in (False, True):
        hint = torch.zeros(1, dtype=torch.int32, device=x2.device) if hinted else None
        pair = time_us(lambda i: torch.ops.larosa.rmsnorm_topk(x2, None, g, 1e-5, wts[i], wt2s[i], k, None, cnt, hint,
                                                               "gtile"), copies=nc)
        sel = time_us(lambda i: triton_gemv.rmsnorm_select(x2, None, g, 1e-5, k, hint=hint, compact=True, pack_x=True))
        res["rows"].append({"site": name, "k": k, "layout": "norm + select, then the product kernel (PDL)",
                            "hint": hinted, "pair_us": round(pair, 2), "select_us": round(sel, 2),
                            "us": round(pair - sel, 2), "tb_s": round(kept_bytes / (pair - sel) / 1e6, 3)})
        print(f"  norm + select + gtile{' (hint)' if hinted else ''}: {pair:6.2f} us, norm + select alone {sel:5.2f} "
              f"us: the GEMV's share {pair - sel:6.2f} us ({kept_bytes / (pair - sel) / 1e6:.2f} TB/s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cold", action="store_true", help="cycle over weight copies (> 4x L2): every call reads DRAM")
    args = ap.parse_args()
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "dtype": "bfloat16", "batch": 1, "weights": "cold (copies cycled)" if args.cold else "one copy", "rows": []}
    print(f"{res['device']} | bf16 | batch 1 | gathered tile alone (no select, no finisher), median us per call, "
          f"{res['weights']}")
    for name, (d_in, d_out, gated, k) in SHAPES.items():
        nc = n_copies(d_in * d_out * 2 * (2 if gated else 1)) if args.cold else 1
        wts = [torch.randn(d_in, d_out, device=dev, dtype=torch.bfloat16, generator=gen) * d_in ** -0.5
               for _ in range(nc)]
        wt2s = [torch.randn(d_in, d_out, device=dev, dtype=torch.bfloat16, generator=gen) * d_in ** -0.5
                for _ in range(nc)] if gated else [None] * nc
        wt, wt2 = wts[0], wt2s[0]
        x = torch.randn(d_in, device=dev, dtype=torch.bfloat16, generator=gen)
        idx = torch.randperm(d_in, device=dev, generator=gen)[:k].sort().values.to(torch.int32)
        acc = torch.zeros(2 * d_out if gated else d_out, device=dev, dtype=torch.float32)
        xs = torch.zeros(d_in, device=dev, dtype=torch.float32)
        xs[idx.long()] = x[idx.long()].float()
        want = xs @ wt.float()
        want2 = xs @ wt2.float() if gated else None
        # the dense GEMV over the whole matrix (cuBLAS, output-major as F.linear takes it)
        w_oms = [torch.cat((a, b), 1).t().contiguous() if gated else a.t().contiguous() for a, b in zip(wts, wt2s)]
        dense_us = time_us(lambda i: torch.nn.functional.linear(x[None], w_oms[i]), copies=nc)
        kept_bytes = k * d_out * 2 * (2 if gated else 1)
        full_bytes = d_in * d_out * 2 * (2 if gated else 1)
        print(f"{name}: {d_in} -> {d_out}{' x2 (gate, up)' if gated else ''}, k = {k}: cuBLAS dense {dense_us:.2f} us "
              f"({full_bytes / dense_us / 1e6:.2f} TB/s); kept bytes {kept_bytes / 1e6:.1f} MB")
        res["rows"].append({"site": name, "d_in": d_in, "d_out": d_out, "gated": gated, "k": k, "layout": "cuBLAS dense",
                            "us": round(dense_us, 2), "tb_s": round(full_bytes / dense_us / 1e6, 3)})
        del w_oms
        # the product's gathered GEMV (`launch_gtile`: the list from a compacting select made once, counters, the
        # finisher, x in the list) at its default tiles and at each tiling below, input-major, no PDL
        from larosa.kernels import triton_gemv

        x2 = x[None]
        sel = triton_gemv.select(x2, k, None, "packed", compact=True, pack_x=True)
        y = torch.empty(1, d_out, device=dev, dtype=torch.bfloat16)
        cfg = triton_gemv.gtile_config(d_in, d_out, gated, k)
        for bm, bn in [(cfg["block_m"], cfg["block_n"])] + TILES[name]:
            cnt = torch.zeros(triton_gemv.tile_workspace_needed(1, d_out, gated, bn), dtype=torch.int32, device=dev)

            def prod(i, bm=bm, bn=bn, cnt=cnt):  # the counters and sums zeroed once (the kernel leaves them zero)
                triton_gemv.launch_gtile(x2, wts[i], y, k, wt2=wt2s[i], sel=sel, pdl=False, pack_x=True, block_m=bm,
                                         block_n=bn, counters=cnt)
            us = time_us(prod, copies=nc)
            res["rows"].append({"site": name, "d_in": d_in, "d_out": d_out, "gated": gated, "k": k,
                                "layout": "input-major, product kernel (finisher)", "block_m": bm, "block_n": bn,
                                "us": round(us, 2), "tb_s": round(kept_bytes / us / 1e6, 3)})
            print(f"  product gtile {bm:3d} x {bn:3d}: {us:6.2f} us ({kept_bytes / us / 1e6:.2f} TB/s)", flush=True)
        if gated and args.cold:  # v29: the MLP half's norm + select and this GEMV as the step launches them
            pair_rows(res, name, wts, wt2s, x2, k, kept_bytes, nc)
        for bm, bn in TILES[name]:
            layouts = [(0, wts, wt2s), (1, [blocked(a, bn) for a in wts],
                                            [blocked(b, bn) for b in wt2s] if gated else [None] * nc)]
            if gated:
                layouts.append((2, [interleaved(a, b, bn) for a, b in zip(wts, wt2s)], [None] * nc))
            line = []
            for lay, a, b in layouts:
                grid = (d_out // bn, triton.cdiv(k, bm))

                def run(i=0, a=a, b=b, lay=lay, grid=grid):
                    gathered_tile_kernel[grid](idx, x, a[i], a[i] if b[i] is None else b[i], acc, k, d_in, d_out,
                                               LAYOUT=lay, GATED=gated, BM=bm, BN=bn, num_warps=2)
                acc.zero_()
                run()
                torch.cuda.synchronize()
                err = (acc[:d_out] - want).abs().max().item() / want.abs().max().item()
                if gated:
                    err = max(err, (acc[d_out:] - want2).abs().max().item() / want2.abs().max().item())
                if err > 1e-2:
                    raise RuntimeError(f"{name} layout {lay} tiles {bm}x{bn}: wrong sums (rel err {err:.3g})")
                us = time_us(lambda i, run=run: (acc.zero_(), run(i)), copies=nc)
                zero_us = time_us(lambda i: acc.zero_())
                us -= zero_us
                res["rows"].append({"site": name, "d_in": d_in, "d_out": d_out, "gated": gated, "k": k,
                                    "layout": ["input-major", "blocked", "blocked, gate/up interleaved"][lay],
                                    "block_m": bm, "block_n": bn, "us": round(us, 2),
                                    "tb_s": round(kept_bytes / us / 1e6, 3)})
                line.append(f"{['rows', 'blocked', 'interleaved'][lay]} {us:6.2f} us ({kept_bytes / us / 1e6:.2f} TB/s)")
                del a, b
            print(f"  {bm:3d} x {bn:3d}: " + " | ".join(line), flush=True)
        del wt, wt2, wts, wt2s
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
