"""Sparse GEMV benchmark (GPU): our Top-K kernel vs cuBLAS dense vs a TEAL-style threshold kernel vs ideal.

    PYTHONPATH=src python3 benchmarks/gemv.py --out benchmarks/results/gemv-h200.json

Batch 1 decode, bf16 (or --dtype fp16), random Gaussian activations and weights (speed depends only on
shapes). Every op is captured in a CUDA graph that cycles through enough weight copies that the L2
never holds them; the time per call is the median over graph replays. The ideal line is the kept
weight bytes over the device-to-device copy bandwidth measured in the same run (bytes read + written).
`--tune` first picks the best tile configuration per shape (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from larosa.kernels import ops  # noqa: E402
from larosa.kernels import triton_gemv  # noqa: E402

SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.75, 0.9)
SHAPES = {  # name: (d_in, d_out, kind)
    "q/o 4096x4096 (llama2-7b, llama3-8b)": (4096, 4096, "linear"),
    "qkv 4096->12288 (llama2-7b)": (4096, 12288, "linear"),
    "qkv 4096->6144 (llama3-8b)": (4096, 6144, "linear"),
    "gate|up 4096->11008 (llama2-7b)": (4096, 11008, "linear"),
    "gate|up 4096->14336 (llama3-8b)": (4096, 14336, "linear"),
    "gate+up fused 4096->2x11008 (llama2-7b)": (4096, 11008, "gate_up"),
    "gate+up fused 4096->2x14336 (llama3-8b)": (4096, 14336, "gate_up"),
    "down 11008->4096 (llama2-7b)": (11008, 4096, "linear"),
    "down 14336->4096 (llama3-8b)": (14336, 4096, "linear"),
    "adapter 4096x4096 (dense)": (4096, 4096, "adapter"),
}
L2_BYTES = 60 * 2**20


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write), median of 20."""
    n = 2**30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_()
    times = []
    for _ in range(23):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n / statistics.median(times[3:])


@contextlib.contextmanager
def env_set(name: str, value: str | None):
    """Environment variable `name` set to `value` (None: unset) inside the block, restored after it (the
    package reads its kernel switches at each launch, so a captured graph keeps what was set at capture)."""
    before = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if before is not None:
            os.environ[name] = before


def graph_time_us(calls, reps: int = 50, priority: int | None = None) -> float:
    """Median per-call time (us) of a CUDA graph replaying `calls` back to back. `priority`: warm up and
    capture on a stream of that priority (as the decode engine captures its step), else on fresh
    default-priority streams."""
    s = torch.cuda.Stream() if priority is None else torch.cuda.Stream(priority=priority)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=None if priority is None else s):
        for c in calls:
            c()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        torch.cuda.synchronize()
        times.append(st.elapsed_time(en) * 1e3 / len(calls))
    del g
    return statistics.median(times)


def n_copies(nbytes: int) -> int:
    return max(3, math.ceil(4 * L2_BYTES / nbytes))


def bench_shape(name, d_in, d_out, kind, dtype, bw, cfg, rows=1, sparsities=SPARSITIES):
    n_mats = 2 if kind == "gate_up" else 1
    mat_bytes = d_in * d_out * 2 * n_mats
    copies = n_copies(mat_bytes)
    wts = [torch.randn(d_in, d_out, device="cuda", dtype=dtype) * 0.02 for _ in range(copies * n_mats)]
    ws = [w.t().contiguous() for w in wts]  # (d_out, d_in) for cuBLAS F.linear
    x = torch.randn(rows, d_in, device="cuda", dtype=dtype)
    out = []
    if kind == "gate_up":
        wcat = [torch.cat([ws[2 * i], ws[2 * i + 1]], 0) for i in range(copies)]

        def dense_call(i):
            def f():
                gu = F.linear(x, wcat[i])
                return F.silu(gu[:, :d_out]) * gu[:, d_out:]
            return f
    else:
        def dense_call(i):
            return lambda: F.linear(x, ws[i])
    t_dense = graph_time_us([dense_call(i) for i in range(copies)])
    if kind == "adapter":
        t_kernel_dense = graph_time_us([(lambda i=i: triton_gemv_call(x, wts[i], d_in, cfg, mode=2))
                                        for i in range(copies)])
        ideal = mat_bytes / bw * 1e6
        return [{"shape": name, "d_in": d_in, "d_out": d_out, "rows": rows, "sparsity": 0.0, "k": d_in,
                 "cublas_us": t_dense, "ours_us": t_kernel_dense, "teal_us": None, "ideal_us": ideal}]
    del ws
    for s in sparsities:
        k = max(1, int((1 - s) * d_in))
        kept_bytes = k * d_out * 2 * n_mats
        ideal = kept_bytes / bw * 1e6
        thr = torch.quantile(x.float().abs().flatten(), s).item() if s > 0 else -1.0
        if kind == "gate_up":
            ours = [(lambda i=i: triton_gemv_call(x, wts[2 * i], k, cfg, mode=0 if s > 0 else 2,
                                                  wt2=wts[2 * i + 1])) for i in range(copies)]
            teal = teal_f = None
        else:
            if s == 0:  # dispatch at sparsity 0: the raw kernel (selection off) and the op (cuBLAS)
                ours = [(lambda i=i: triton_gemv_call(x, wts[i], d_in, cfg, mode=2)) for i in range(copies)]
            else:
                ours = [(lambda i=i: triton_gemv_call(x, wts[i], k, cfg)) for i in range(copies)]
            fused = (cfg or {}).get("impl") == "fused"
            teal = [(lambda i=i: teal_call(x, wts[i], thr, None if fused else cfg)) for i in range(copies)]
            teal_f = [(lambda i=i: teal_call(x, wts[i], thr, cfg)) for i in range(copies)] if fused else None
        t_ours = graph_time_us(ours)
        t_teal = graph_time_us(teal) if teal else None
        t_teal_f = graph_time_us(teal_f) if teal_f else None
        out.append({"shape": name, "d_in": d_in, "d_out": d_out, "rows": rows, "sparsity": s, "k": k,
                    "cublas_us": t_dense, "ours_us": t_ours, "teal_us": t_teal, "teal_fused_us": t_teal_f,
                    "ideal_us": ideal})
    del wts, x
    torch.cuda.empty_cache()
    return out


_COUNTERS: dict = {}


def _counters(x):
    # one persistent zeroed counter buffer, as a decode engine would own it (the kernel re-zeroes it)
    key = x.device
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(1 << 22, dtype=torch.int32, device=x.device)
    return _COUNTERS[key]


def _for_mode(cfg, mode):
    """The gathered kernel is exact Top-K only: its threshold and dense modes are the tile kernel's."""
    if mode != 0 and (cfg or {}).get("impl") == "gtile":
        return {**cfg, "impl": "tile"}
    return cfg


def triton_gemv_call(x, wt, k, cfg, mode=0, wt2=None):
    y = torch.empty(x.shape[0], wt.shape[1], device=x.device, dtype=x.dtype)
    triton_gemv.launch(x, wt, y, k, mode=mode, wt2=wt2, counters=_counters(x), **(_for_mode(cfg, mode) or {}))
    return y


def teal_call(x, wt, thr, cfg):
    """TEAL-style threshold kernel: the same kernel family as 'ours' (cfg's impl; split-K if none given)."""
    y = torch.empty(x.shape[0], wt.shape[1], device=x.device, dtype=x.dtype)
    cfg = {"impl": "split", **(_for_mode(cfg, 1) or {})}
    triton_gemv.launch(x, wt, y, 1, threshold=thr, mode=1, counters=_counters(x), **cfg)  # select args unused
    return y


def _tile_grid(impl):
    if impl == "fused":  # one launch, column-complete programs
        for bn, bk, nw, ns in itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3, 4)):
            if bn * bk <= 64 * 256:
                yield {"impl": "fused", "block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns}
        return
    if impl in ("tile", "gtile"):  # v11 / v15: one weight tile per program, fp32 atomics, counter finisher
        for bm, bn, nw in itertools.product((32, 64, 128, 256), (64, 128, 256), (2, 4, 8)):
            if bm * bn <= 32768:
                yield {"impl": impl, "block_m": bm, "block_n": bn, "num_warps": nw}
        return
    for bn, bk, rps, nw in itertools.product((64, 128, 256, 512), (8, 16, 32, 64, 128), (32, 64, 128, 256, 512), (4, 8)):
        # rps == bk: one tile per program (v9: every weight load of a program in flight at once)
        if bn * bk > 256 * 32 or rps < bk or (rps < 128 and rps != bk):
            continue
        yield {"block_n": bn, "block_k": bk, "rows_per_split": rps, "num_warps": nw, "num_stages": 3}


def tune(d_in, d_out, dtype, s=0.5, sel=None, impl="split", gated=False):
    n_mats = 2 if gated else 1
    copies = n_copies(d_in * d_out * 2 * n_mats)
    wts = [torch.randn(d_in, d_out, device="cuda", dtype=dtype) for _ in range(copies * n_mats)]
    x = torch.randn(1, d_in, device="cuda", dtype=dtype)
    k = int((1 - s) * d_in)
    best = None
    results = []
    for tile in _tile_grid(impl):
        cfg = {**tile, **(sel or {}), "impl": impl} if impl not in ("fused", "tile", "gtile") else tile
        call = ((lambda i: triton_gemv_call(x, wts[2 * i], k, cfg, wt2=wts[2 * i + 1])) if gated
                else (lambda i: triton_gemv_call(x, wts[i], k, cfg)))
        try:
            t = graph_time_us([(lambda i=i: call(i)) for i in range(copies)], reps=20)
        except Exception as exc:  # a config that does not compile (resources): skip it
            results.append({**cfg, "error": type(exc).__name__})
            continue
        results.append({**cfg, "us": t})
        if best is None or t < best[1]:
            best = (cfg, t)
    del wts
    torch.cuda.empty_cache()
    return best, results


def batch_crossover(dtype, d_in=4096, d_out=11008, s=0.5):
    """Per-row kernel vs PyTorch selection + cuBLAS for growing row counts."""
    copies = n_copies(d_in * d_out * 2)
    wts = [torch.randn(d_in, d_out, device="cuda", dtype=dtype) for _ in range(copies)]
    k = int((1 - s) * d_in)
    rows_out = []
    for rows in (1, 2, 3, 4, 6, 8, 16, 32):
        x = torch.randn(rows, d_in, device="cuda", dtype=dtype)
        t_k = graph_time_us([(lambda i=i: triton_gemv_call(x, wts[i], k, None)) for i in range(copies)], reps=20)
        t_f = graph_time_us([(lambda i=i: ops._dense_fallback(x, wts[i], k, None)) for i in range(copies)], reps=20)
        t_d = graph_time_us([(lambda i=i: x @ wts[i]) for i in range(copies)], reps=20)
        rows_out.append({"rows": rows, "kernel_us": t_k, "select_plus_cublas_us": t_f, "dense_cublas_us": t_d})
    del wts
    torch.cuda.empty_cache()
    return rows_out


def select_sweep(dtype, widths=(4096, 11008, 14336), impls=None, warps=(4, 8, 16)):
    """Time the select kernel alone for each d_in, implementation and warp count (k = d_in / 2); best per
    d_in. 1 and 2 warps were 1.3-11x slower than 4 (results/history/gemv-v9-tuned.log)."""
    out, best = [], {}
    for d_in in widths:
        xs = [torch.randn(1, d_in, device="cuda", dtype=dtype) for _ in range(8)]
        k = d_in // 2
        for impl in impls or triton_gemv.SELECT_IMPLS:
            for nw in warps:
                try:
                    t = graph_time_us([(lambda x=x: triton_gemv.select(x, k, nw, impl)) for x in xs], reps=20)
                except Exception as exc:  # too few warps for the row (resources): skip
                    print(f"# select d_in={d_in} {impl} warps={nw}: {type(exc).__name__}", flush=True)
                    continue
                out.append({"d_in": d_in, "impl": impl, "num_warps": nw, "us": t})
                print(f"# select d_in={d_in} {impl} warps={nw}: {t:.2f} us", flush=True)
                if d_in not in best or t < best[d_in][1]:
                    best[d_in] = ({"select_impl": impl, "select_num_warps": nw}, t)
    return out, {d: b[0] for d, b in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--out", default="benchmarks/results/gemv.json")
    ap.add_argument("--tune", action="store_true", help="pick the best tile config per shape first")
    ap.add_argument("--shapes", default="all", help="comma list of shape-name prefixes, or all")
    ap.add_argument("--no-crossover", action="store_true")
    ap.add_argument("--gather", type=int, choices=[0, 1], default=None,
                    help="1: compact the kept rows first (v6), 0: masked loads (v4); default: the package default")
    ap.add_argument("--impl", choices=list(triton_gemv.IMPLS), default=None,
                    help="kernel implementation for 'ours' (default: the package default)")
    ap.add_argument("--sparsities", default=None, help="comma list (default 0,0.25,0.4,0.5,0.75,0.9)")
    ap.add_argument("--no-select-sweep", action="store_true")
    args = ap.parse_args()
    gather = triton_gemv.GATHER if args.gather is None else bool(args.gather)
    impl = args.impl or triton_gemv.IMPL
    sparsities = tuple(float(v) for v in args.sparsities.split(",")) if args.sparsities else SPARSITIES
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gemv.py needs a CUDA GPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    torch.manual_seed(0)
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, copy bandwidth {bw / 1e12:.2f} TB/s, "
          f"{args.dtype}, batch 1, CUDA graphs, torch {torch.__version__}, triton {__import__('triton').__version__}")
    sel_sweep, sel_best = ([], {}) if args.no_select_sweep else select_sweep(dtype)
    shapes = {n: v for n, v in SHAPES.items()
              if args.shapes == "all" or any(n.startswith(p) for p in args.shapes.split(","))}
    tuned = {}
    tune_log = {}
    if args.tune:
        for name, (d_in, d_out, kind) in shapes.items():
            if kind not in ("linear", "gate_up") or (d_in, d_out, kind) in tuned:
                continue
            if kind == "gate_up" and impl not in ("fused", "tile", "gtile"):
                continue
            t0 = time.time()
            best, log = tune(d_in, d_out, dtype, sel={**sel_best.get(d_in, {}), "gather": gather}, impl=impl,
                             gated=kind == "gate_up")
            tuned[(d_in, d_out, kind)] = best[0]
            tune_log[f"{kind} {d_in}x{d_out}"] = {"best": best[0], "best_us": best[1], "all": log}
            print(f"# tuned {kind} {d_in}->{d_out}: {best[0]} {best[1]:.2f} us ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for name, (d_in, d_out, kind) in shapes.items():
        cfg = (tuned.get((d_in, d_out, kind)) or tuned.get((d_in, d_out, "linear"))
               or ({"impl": "fused"} if impl == "fused" else {**sel_best.get(d_in, {}), "gather": gather, "impl": impl}))
        rows += bench_shape(name, d_in, d_out, kind, dtype, bw, cfg, sparsities=sparsities)
        print(f"# done {name}", flush=True)
    cross = [] if args.no_crossover else batch_crossover(dtype)
    hdr = ("| shape | s | k | cuBLAS us | ours us | TEAL-style us (same kernel, threshold mode) | TEAL-style us (one launch) | "
           "ideal us | ours/ideal | speed-up vs cuBLAS |")
    print(hdr)
    print("|" + "---|" * 10)
    fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    for r in rows:
        print(f"| {r['shape']} | {r['sparsity']:.2f} | {r['k']} | {r['cublas_us']:.2f} | {r['ours_us']:.2f} | "
              f"{fmt(r['teal_us'])} | {fmt(r.get('teal_fused_us'))} | {r['ideal_us']:.2f} | {r['ours_us'] / r['ideal_us']:.2f} | "
              f"{r['cublas_us'] / r['ours_us']:.2f}x |")
    if cross:
        print("\n| rows (4096->11008, s=0.5) | per-row kernel us | selection + cuBLAS us | dense cuBLAS us |")
        print("|---|---|---|---|")
        for c in cross:
            print(f"| {c['rows']} | {c['kernel_us']:.2f} | {c['select_plus_cublas_us']:.2f} | {c['dense_cublas_us']:.2f} |")
    rec = {"gpu": props.name, "sms": props.multi_processor_count, "copy_bandwidth_Bps": bw, "dtype": args.dtype,
           "batch": 1, "timing": "CUDA graph replay, median per call, weights cycled over copies > 4x L2",
           "activations": "random normal", "torch": torch.__version__, "gather": gather, "impl": impl,
           "triton": __import__("triton").__version__, "rows": rows, "batch_crossover": cross,
           "tuning": tune_log, "select_sweep": sel_sweep, "select_best": {str(k): v for k, v in sel_best.items()}, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
