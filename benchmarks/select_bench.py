"""Time the Top-K select kernels alone (GPU): each implementation x warp count at the model row widths.

    PYTHONPATH=src python3 benchmarks/select_bench.py --out benchmarks/results/select-h200.json

bf16, one row, random normal x, k = d_in / 2; CUDA graph replay, median per call (same harness as
benchmarks/gemv.py). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv import graph_time_us, select_sweep  # noqa: E402
from larosa.kernels import triton_gemv  # noqa: E402


def steps_sweep(widths, steps, out: Path) -> None:
    """The packed select at its default warps with the bisection cut to `steps` steps (0: load, tie prefix
    sum and stores only): the time a narrower search window (fewer steps) could save."""
    import triton

    rows = []
    print("| d_in | bisection steps | us |\n|---|---|---|")
    for d_in in widths:
        xs = [torch.randn(1, d_in, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        sel = torch.empty(1, 2, dtype=torch.int32, device="cuda")
        bd = triton.next_power_of_2(d_in)
        for n in steps:
            def call(x, n=n, sel=sel, d_in=d_in, bd=bd):
                triton_gemv.select_packed_kernel[(1,)](x, sel, sel, d_in, d_in // 2, x.stride(0), BLOCK_D=bd,
                                                       num_warps=triton_gemv.select_warps(bd), FIRST_BIT=n - 1)
            t = graph_time_us([(lambda x=x: call(x)) for x in xs], reps=20)
            rows.append({"d_in": d_in, "steps": n, "us": t})
            print(f"| {d_in} | {n} | {t:.2f} |", flush=True)
        # the real (exact) select with a threshold hint that hits: 2 + WINDOW counts
        for w in (4, 6):
            hints = [triton_gemv.select(x, d_in // 2)[:, 0].contiguous() for x in xs]

            def hinted(x, h, w=w, sel=sel, d_in=d_in, bd=bd):
                triton_gemv.select_packed_kernel[(1,)](x, sel, h, d_in, d_in // 2, x.stride(0), BLOCK_D=bd,
                                                       num_warps=triton_gemv.select_warps(bd), WINDOW=w)
            t = graph_time_us([(lambda x=x, h=h: hinted(x, h)) for x, h in zip(xs, hints)], reps=20)
            rows.append({"d_in": d_in, "steps": 2 + w, "window": w, "hint": "hit", "us": t})
            print(f"| {d_in} | {2 + w} (window {w}, hint hits) | {t:.2f} |", flush=True)
    props = torch.cuda.get_device_properties(0)
    rec = {"gpu": props.name, "dtype": "bf16", "batch": 1, "k": "d_in / 2", "impl": "packed, default warps",
           "timing": "CUDA graph replay, median per call", "torch": torch.__version__,
           "triton": __import__("triton").__version__, "steps_sweep": rows,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {out}")


def compact_sweep(widths, warps, out: Path) -> None:
    """The packed select plain, compacting (COMPACT=1: the kept positions listed for the gathered GEMV), with
    the compacting prefix sum but no list stored (COMPACT=2, timing only) and compacting with the list stored
    by inline PTX (COMPACT=3, v16: no layout conversion before the stores) or from 32-bit offsets (COMPACT=4,
    the compiled default since v19: fewer registers), at each warp count: where the compaction's cost sits (benchmarks/NOTES.md
    v15, v16, v18)."""
    import triton

    rows = []
    print("| d_in | warps | plain us | compacting us | prefix sum only us | compacting, PTX stores us | "
          "PTX stores from 32-bit offsets us |\n|---|---|---|---|---|---|---|")
    for d_in in widths:
        k = d_in // 2
        xs = [torch.randn(1, d_in, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        sel = torch.empty(1, 2 + k, dtype=torch.int32, device="cuda")
        bd = triton.next_power_of_2(d_in)
        for nw in warps:
            t = {}
            for mode in (0, 1, 2, 3, 4):
                def call(x, mode=mode, nw=nw, sel=sel, d_in=d_in, bd=bd, k=k):
                    triton_gemv.select_packed_kernel[(1,)](x, sel, sel, d_in, k, x.stride(0), BLOCK_D=bd,
                                                           num_warps=nw, COMPACT=mode)
                t[mode] = graph_time_us([(lambda x=x: call(x)) for x in xs])
            rows.append({"d_in": d_in, "k": k, "num_warps": nw, "plain_us": t[0], "compact_us": t[1],
                         "prefix_sum_only_us": t[2], "compact_ptx_stores_us": t[3],
                         "compact_ptx_offset_stores_us": t[4]})
            print(f"| {d_in} | {nw} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {t[3]:.2f} | {t[4]:.2f} |", flush=True)
    props = torch.cuda.get_device_properties(0)
    rec = {"gpu": props.name, "dtype": "bf16", "batch": 1, "k": "d_in / 2", "rows": rows,
           "timing": "CUDA graph replay, median per call", "torch": torch.__version__,
           "triton": __import__("triton").__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impls", default=",".join(triton_gemv.SELECT_IMPLS))
    ap.add_argument("--warps", default="4,8,16")
    ap.add_argument("--widths", default="4096,11008,14336")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/select.json, with "
                    "--steps benchmarks/results/select-steps.json)")
    ap.add_argument("--steps", default=None, help="comma list of bisection step counts (15 = the real kernel): "
                    "time the packed select cut short, to see what fewer steps could save (wrong selections)")
    ap.add_argument("--compact", action="store_true", help="the packed select plain vs compacting vs the "
                    "compacting prefix sum without the stored list, at --warps")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/select_bench.py needs a CUDA GPU")
    torch.manual_seed(0)
    args.out = args.out or f"benchmarks/results/select{'-steps' if args.steps else ''}{'-compact' if args.compact else ''}.json"
    if args.compact:
        return compact_sweep([int(v) for v in args.widths.split(",")], [int(v) for v in args.warps.split(",")],
                             Path(args.out))
    if args.steps:
        return steps_sweep([int(v) for v in args.widths.split(",")], [int(v) for v in args.steps.split(",")],
                           Path(args.out))
    rows, _ = select_sweep(torch.bfloat16, widths=[int(v) for v in args.widths.split(",")],
                           impls=args.impls.split(","), warps=[int(v) for v in args.warps.split(",")])
    print("| d_in | impl | warps | us |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['d_in']} | {r['impl']} | {r['num_warps']} | {r['us']:.2f} |")
    props = torch.cuda.get_device_properties(0)
    rec = {"gpu": props.name, "dtype": "bf16", "batch": 1, "k": "d_in / 2",
           "timing": "CUDA graph replay, median per call", "torch": torch.__version__,
           "triton": __import__("triton").__version__, "rows": rows,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
