"""Speculative Top-K GEMV (v22, `impl="spec"`) against the gathered-rows default (`impl="gtile"`), per op.

    PYTHONPATH=src python3 benchmarks/spec_ab.py --out benchmarks/results/spec-ab-h200.json

The o and down projections of the LLaMA2-7B / LLaMA3-8B layers (batch 1, bf16, random Gaussian x and weights)
at the sparsities the paper's 0.8 / 1.2 split gives them at p = 0.25 / 0.4 / 0.5 / 0.75, each op with its own
select as in `launch`. Every call of the timed CUDA graph takes another x (and another weight copy: > 4x the
L2 in all), and one hint slot carries the threshold from call to call, as a decode step's site does from
token to token: the guess of the speculative kernel is the previous x's threshold. Rows: gtile (no hint, the
engine's default at these sites), gtile with the hinted select, spec on input-major weights and on blocked ones
(`spec_layout`) at the default tiles, the kept-bytes ideal at the copy bandwidth of this run, and the mean length
of the fix list (the hint warm). Then a tile sweep of the blocked spec kernel at p = 0.5 (LLaMA2-7B). Medians.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv import copy_bandwidth, graph_time_us, n_copies  # noqa: E402
from larosa.kernels import triton_gemv, triton_spec  # noqa: E402

OPS = {"llama2-7b": [("o", 4096, 4096, 0.8), ("down", 11008, 4096, 1.2)],
       "llama3-8b": [("o", 4096, 4096, 0.8), ("down", 14336, 4096, 1.2)]}
P = (0.25, 0.4, 0.5, 0.75)
BEST_BLOCKED = triton_spec.spec_tiles()  # the tiles of the rows at every p (the sweep: p = 0.5 only)


def sweep_tiles():
    for bn, bk, st, nw in itertools.product((16, 32), (256, 512, 1024), (2, 4), (4, 8)):
        if 16 <= bk * bn // (32 * nw) <= 128:  # elements of one weight tile per thread
            yield (bn, bk, st, nw, 64)


def bench_op(name, d_in, d_out, share, sweep: bool):
    copies = n_copies(d_in * d_out * 2)
    wts = [torch.randn(d_in, d_out, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    xs = [torch.randn(1, d_in, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    cnt = torch.zeros(1 << 20, dtype=torch.int32, device="cuda")

    def gtile(k, hinted):
        hint = torch.zeros(1, dtype=torch.int32, device="cuda") if hinted else None

        def call(i):
            y = torch.empty(1, d_out, device="cuda", dtype=torch.bfloat16)
            triton_gemv.launch(xs[i], wts[i], y, k, impl="gtile", counters=cnt, hint=hint)
        return [(lambda i=i: call(i)) for i in range(copies)]

    blocked = {}

    def spec(k, tiles=None, window=None, sels=None, blk=False):
        hint = torch.zeros(1, dtype=torch.int32, device="cuda")
        bn = (tiles or triton_spec.spec_tiles())[0]
        if blk and bn not in blocked:
            blocked.clear()  # one layout at a time (memory)
            blocked[bn] = [triton_spec.spec_layout(w, bn) for w in wts]
        ws = blocked[bn] if blk else wts

        def call(i):
            y = torch.empty(1, d_out, device="cuda", dtype=torch.bfloat16)
            sel = triton_spec.select_spec(xs[i], k, hint, pdl=True, window=window)
            triton_spec.launch_spec(xs[i], ws[i], y, k, hint=hint, tiles=tiles, sel=sel)
            if sels is not None:
                sels.append((sel, y))
        return [(lambda i=i: call(i)) for i in range(copies)]

    rows = []
    for p in P:
        s = min(0.95, share * p)
        k = max(1, int((1 - s) * d_in))
        sels = []
        calls = spec(k, sels=sels, tiles=BEST_BLOCKED, blk=True)
        for _ in range(3):  # eager, the hint warm from the second pass on: the fix lists, and the results
            for c in calls:
                c()
        torch.cuda.synchronize()
        sels = sels[-copies:]
        n_fix = [sel[0, 3].item() for sel, _ in sels]
        for (sel, y), x, w in zip(sels, xs, wts):
            keep = triton_gemv.select(x, k)
            bits = x.view(torch.int16).to(torch.int32) & 0x7FFF
            idx = torch.arange(d_in, device="cuda")
            m = (bits > keep[:, :1]) | ((bits == keep[:, :1]) & (idx < keep[:, 1:]))
            exact = torch.where(m, x, 0).double() @ w.double()
            rel = ((y.double() - exact).norm() / exact.norm()).item()
            assert rel < 1e-2, rel
        row = {"op": name, "d_in": d_in, "d_out": d_out, "p": p, "sparsity": s, "k": k,
               "ideal_bytes": k * d_out * 2,
               "gtile_us": graph_time_us(gtile(k, False), reps=30),
               "gtile_hint_us": graph_time_us(gtile(k, True), reps=30),
               "spec_us": graph_time_us(spec(k), reps=30),
               "spec_blocked_us": graph_time_us(spec(k, tiles=BEST_BLOCKED, blk=True), reps=30),
               "n_fix_mean": statistics.mean(n_fix), "n_fix_max": max(n_fix)}
        if sweep and p == 0.5:
            sw = []
            for t in sweep_tiles():
                try:
                    sw.append({"tiles": t, "us": graph_time_us(spec(k, tiles=t, blk=True), reps=30)})
                except Exception as exc:  # a tiling that does not compile (resources): recorded, skipped
                    sw.append({"tiles": t, "error": type(exc).__name__})
            ok = sorted((r for r in sw if "us" in r), key=lambda r: r["us"])
            row.update(spec_sweep=sw, spec_best=ok[0])
            print(f"# {name} p={p}: best blocked spec tiles {ok[0]['tiles']} {ok[0]['us']:.2f} us; next "
                  + ", ".join(f"{r['tiles']} {r['us']:.2f}" for r in ok[1:6]), flush=True)
            if name == "o":
                print("best spec tiles for o: " + ",".join(map(str, ok[0]["tiles"])), flush=True)
        rows.append(row)
        print(f"# {name} p={p} k={k}: gtile {row['gtile_us']:.2f} (hint {row['gtile_hint_us']:.2f}) spec "
              f"{row['spec_us']:.2f} (blocked {row['spec_blocked_us']:.2f}) us, fix list {row['n_fix_mean']:.0f} "
              f"mean {row['n_fix_max']} max", flush=True)
    wts.clear()  # (the timed closures hold the lists)
    xs.clear()
    blocked.clear()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/spec-ab-h200.json")
    args = ap.parse_args()
    import triton
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, copy bandwidth {bw / 1e12:.2f} TB/s, bf16, batch 1, "
          f"torch {torch.__version__}, triton {triton.__version__}, spec tiles {triton_spec.spec_tiles()}", flush=True)
    result = {"gpu": props.name, "sms": props.multi_processor_count, "copy_bw_Bps": bw, "dtype": "bf16", "batch": 1,
              "activations": "random normal, a new x per call", "torch": torch.__version__,
              "triton": triton.__version__, "spec_tiles": triton_spec.spec_tiles(),
              "select_window": triton_gemv.select_window(), "models": {}}
    for i, model in enumerate(args.models.split(",")):
        rows = []
        for name, d_in, d_out, share in OPS[model]:
            rows += bench_op(name, d_in, d_out, share, sweep=not args.no_sweep and i == 0)
        for r in rows:
            r["ideal_us"] = r["ideal_bytes"] / bw * 1e6
        result["models"][model] = rows
        print(f"\n## {model}\n| op | p | sparsity | gtile us | gtile+hint us | spec us | spec, blocked us | "
              "ideal us | fix list (mean) |\n|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['op']} | {r['p']} | {r['sparsity']:.2f} | {r['gtile_us']:.2f} | {r['gtile_hint_us']:.2f} | "
                  f"{r['spec_us']:.2f} | {r['spec_blocked_us']:.2f} | {r['ideal_us']:.2f} | {r['n_fix_mean']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
