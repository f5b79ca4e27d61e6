"""What a stand-alone decode GEMV launch can reach on this GPU (H200), measured in the gemv.py harness.

    PYTHONPATH=src python3 benchmarks/floor.py --out benchmarks/results/floor-h200-bf16.json

Per call, inside CUDA graphs, weights cycled over copies > 4x L2, medians (batch 1, bf16):
- empty kernels (1 and 1024 programs): the launch cost of a graph node;
- a plain streaming read of exactly the kept weight bytes (contiguous, one launch): the floor of any
  kernel that must read them, against the ideal bytes / copy bandwidth;
- our Top-K op and the same kernels in threshold mode, in several variants (VARIANTS: v11 tile kernel
  with/without programmatic dependent launch (PDL), other tiles; v10 split-K);
- a TEAL-design threshold kernel: one weight tile per program, fp32 atomics straight into the output
  (zeroed by a memset node first), no split-K counters: with and without the fp32 -> bf16 conversion.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gemv import copy_bandwidth, graph_time_us, n_copies  # noqa: E402

from larosa.kernels import triton_gemv  # noqa: E402


@triton.jit
def empty_kernel(p):
    pass


@triton.jit
def stream_kernel(src, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Each program sums ITERS contiguous blocks of BLOCK elements (the loads are independent)."""
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out + pid, tl.sum(acc, 0))


@triton.jit
def teal_atomic_kernel(x_ptr, wt_ptr, y_ptr, d_in, d_out, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One BLOCK_M x BLOCK_N weight tile per program, rows loaded only where |x| > threshold, the partial
    sum added into the fp32 output with atomics (fire and forget)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    x = tl.load(x_ptr + rm, mask=rm < d_in, other=0.0)
    keep = (tl.abs(x.to(tl.float32)) > threshold) & (rm < d_in)
    w = tl.load(wt_ptr + rm.to(tl.int64)[:, None] * d_out + rn[None, :], mask=keep[:, None] & (rn < d_out)[None, :],
                other=0.0, eviction_policy="evict_first")
    acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[:, None], 0)
    tl.atomic_add(y_ptr + rn, acc, mask=rn < d_out, sem="relaxed")


VARIANTS = {  # launch() arguments of the op variants timed side by side
    "tile": {"impl": "tile"},  # v11 default: one tile per program, fp32 atomics, counter finisher, PDL
    "tile-no-pdl": {"impl": "tile", "pdl": False},
    "tile-64x64": {"impl": "tile", "block_m": 64, "block_n": 64},
    "split": {"impl": "split"},  # the v10 default kernel (split-K partials, counter finisher), here with PDL
}


def teal_atomic(x, wt, thr, bm, bn, nw, convert):
    """convert: False (fp32 result), True (cast to the 16-bit dtype, one more launch)."""
    d_in, d_out = wt.shape
    y = torch.zeros(d_out, dtype=torch.float32, device=x.device)
    teal_atomic_kernel[(triton.cdiv(d_out, bn), triton.cdiv(d_in, bm))](x, wt, y, d_in, d_out, thr, BLOCK_M=bm,
                                                                       BLOCK_N=bn, num_warps=nw)
    return y.to(x.dtype) if convert else y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/floor.json")
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    dtype = torch.bfloat16
    torch.manual_seed(0)
    bw = copy_bandwidth(torch.device("cuda"))
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, copy bandwidth {bw / 1e12:.2f} TB/s, bf16, batch 1, CUDA graphs, p = {args.sparsity}",
          flush=True)
    rec = {"gpu": props.name, "copy_bandwidth_Bps": bw, "dtype": "bf16", "batch": 1, "sparsity": args.sparsity,
           "torch": torch.__version__, "triton": triton.__version__}
    dummy = torch.zeros(1, device="cuda")
    rec["empty_1_us"] = graph_time_us([lambda: empty_kernel[(1,)](dummy)] * 16)
    rec["empty_1024_us"] = graph_time_us([lambda: empty_kernel[(1024,)](dummy)] * 16)
    print(f"empty kernel: {rec['empty_1_us']:.2f} us (1 program), {rec['empty_1024_us']:.2f} us (1024)", flush=True)
    shapes = {"4096x4096": (4096, 4096), "4096->11008": (4096, 11008), "11008->4096": (11008, 4096),
              "4096->12288": (4096, 12288)}
    rows = []
    for name, (d_in, d_out) in shapes.items():
        k = int((1 - args.sparsity) * d_in)
        kept = k * d_out * 2
        copies = n_copies(d_in * d_out * 2)
        wts = [torch.randn(d_in, d_out, device="cuda", dtype=dtype) for _ in range(copies)]
        x = torch.randn(1, d_in, device="cuda", dtype=dtype)
        thr = torch.quantile(x.float().abs().flatten(), args.sparsity).item()
        r = {"shape": name, "d_in": d_in, "d_out": d_out, "k": k, "ideal_us": kept / bw * 1e6}
        # stream exactly the kept bytes, contiguous, from a cycled buffer
        n = kept // 2
        srcs = [w.view(-1)[:n] for w in wts]
        best = None
        for block, iters, nw in itertools.product((1024, 2048, 4096), (1, 4), (8,)):
            out = torch.empty(triton.cdiv(n, block * iters), device="cuda")
            t = graph_time_us([(lambda s=s: stream_kernel[(triton.cdiv(n, block * iters),)](
                s, out, n, BLOCK=block, ITERS=iters, num_warps=nw)) for s in srcs], reps=20)
            if best is None or t < best[0]:
                best = (t, (block, iters, nw))
        r["stream_us"], r["stream_cfg"] = best
        # our op (Top-K, mode 0) and the same kernel in threshold mode (TEAL-style, mode 1), variants
        cnt = torch.zeros(1 << 20, dtype=torch.int32, device="cuda")
        for mode in (0, 1):
            for vname, kw in VARIANTS.items():
                def op(i, kw=kw, mode=mode):
                    y = torch.empty(1, d_out, device="cuda", dtype=dtype)
                    triton_gemv.launch(x, wts[i], y, k if mode == 0 else 1, mode=mode, threshold=thr, counters=cnt,
                                       **kw)
                    return y
                try:
                    r[f"m{mode}_{vname}_us"] = graph_time_us([(lambda i=i: op(i)) for i in range(copies)], reps=30)
                except Exception as exc:  # a variant this Triton / driver cannot run
                    r[f"m{mode}_{vname}_us"] = None
                    r[f"m{mode}_{vname}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        # TEAL design: memset + one tile per program + fp32 atomics (+ conversion)
        sweep = []
        for bm, bn, nw in itertools.product((32, 64, 128), (64, 128, 256), (2, 4)):  # v11 sweep: best region
            if bm * bn > 16384:
                continue
            for convert in (False, True):
                t = graph_time_us([(lambda i=i: teal_atomic(x[0], wts[i], thr, bm, bn, nw, convert))
                                   for i in range(copies)], reps=20)
                sweep.append({"block_m": bm, "block_n": bn, "num_warps": nw, "convert": convert, "us": t})
        for convert in (False, True):
            b = min((s for s in sweep if s["convert"] == convert), key=lambda s: s["us"])
            r[f"teal_atomic{'_convert' if convert else ''}_us"] = b["us"]
            r[f"teal_atomic{'_convert' if convert else ''}_cfg"] = b
        r["teal_atomic_sweep"] = sweep
        rows.append(r)
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{name}: ideal {r['ideal_us']:.2f} | stream kept bytes {r['stream_us']:.2f} {r['stream_cfg']} | "
              f"TEAL design memset+atomics {r['teal_atomic_us']:.2f} (+convert {r['teal_atomic_convert_us']:.2f}) "
              f"{r['teal_atomic_cfg']}", flush=True)
        for mode in (0, 1):
            print(f"    {'Top-K' if mode == 0 else 'threshold'}: "
                  + " | ".join(f"{v} {fmt(r[f'm{mode}_{v}_us'])}" for v in VARIANTS), flush=True)
        del wts, srcs
        torch.cuda.empty_cache()
    rec["rows"] = rows
    rec["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
