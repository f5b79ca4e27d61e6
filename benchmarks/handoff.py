"""What one launch boundary costs, against a grid barrier inside one kernel (GPU, %globaltimer stamps).

The decode step is a chain of launches, eight per layer (norm + select, q/k/v, attention, o select, o, norm + select,
gate/up, down select, down...), each a programmatic dependent (PDL) of the one before. A persistent design (one launch
per layer or per half-layer, NOTES "Next steps") would pass from site to site through flags in memory instead. Its
prize per boundary is the difference between the two handoffs, which this times directly:

* `pdl`: a producer grid (each program streams a tile and stamps its end) and a consumer grid launched as its
  programmatic dependent (each program stamps when its `gdc_wait` returns). Handoff = first consumer release minus
  last producer end.
* `stream`: the same pair in plain stream order (the consumer stamps its start).
* `barrier`: one grid of co-resident programs; each stamps, adds one to a counter and spins until every program of
  its launch has arrived. Handoff = first release minus last arrival.
* `flag`: one grid; program 0 stamps and sets a flag (release), the others spin on it (acquire) and stamp when they
  see it. Handoff = first sighting minus the store's stamp.

Each is timed idle and beside a kernel that streams (`select_under_load.hog`), which makes every L2 round trip
2.3-2.6x slower (v32). Medians and means over the iterations of a CUDA graph, with %globaltimer's step (should
it be coarse, the means are the figures to read).

    PYTHONPATH=src python3 benchmarks/handoff.py --out benchmarks/results/handoff-h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from larosa.kernels.triton_gemv import gdc_launch_dependents, gdc_wait  # noqa: E402

TILE = 4096  # bf16 elements each producer program streams (8 KiB)


@triton.jit
def _now():
    """%globaltimer (ns) as an int64 scalar."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def producer_kernel(buf_ptr, stamp_ptr, PDL: tl.constexpr, TILE: tl.constexpr):
    """Streams its tile of buf (adds one, as a GEMV program writes its sums) and stamps its end."""
    if PDL:
        gdc_launch_dependents()
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    tl.store(buf_ptr + offs, tl.load(buf_ptr + offs) + 1.0)
    tl.debug_barrier()
    tl.store(stamp_ptr + tl.program_id(0), _now())


@triton.jit
def consumer_kernel(stamp_ptr, PDL: tl.constexpr):
    """Stamps when it may read what the producer wrote: after `gdc_wait` (PDL), else at its start."""
    if PDL:
        gdc_wait()
    tl.store(stamp_ptr + tl.program_id(0), _now())


@triton.jit
def barrier_kernel(cnt_ptr, arrive_ptr, release_ptr, n):
    """Every program stamps its arrival, adds one to a counter that is never reset, and spins until the counter
    reaches the end of its launch's group of n (all n programs must be resident together)."""
    tl.store(arrive_ptr + tl.program_id(0), _now())
    old = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    target = (old // n + 1) * n
    seen = old + 1
    while seen < target:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
    tl.store(release_ptr + tl.program_id(0), _now())


@triton.jit
def flag_kernel(flag_ptr, set_ptr, seen_ptr, epoch):
    """Program 0 stamps and stores `epoch` into the flag (release); the others spin until they read it (acquire)
    and stamp into their slot of seen (slot 0 stays unwritten)."""
    if tl.program_id(0) == 0:
        tl.store(set_ptr, _now())
        tl.atomic_xchg(flag_ptr, epoch, sem="release")
    else:
        v = tl.atomic_add(flag_ptr, 0, sem="acquire")
        while v != epoch:
            v = tl.atomic_add(flag_ptr, 0, sem="acquire")
        tl.store(seen_ptr + tl.program_id(0), _now())


def handoffs(first: torch.Tensor, second: torch.Tensor) -> list[float]:
    """Per iteration (rows): the earliest stamp of `second` minus the latest of `first`, in us (ns stamps)."""
    return ((second.min(dim=1).values - first.max(dim=1).values).double() / 1000).tolist()


def timer_step_ns(stamps: torch.Tensor) -> int:
    """The smallest positive difference between any two stamps: an upper bound on %globaltimer's step."""
    v = stamps.flatten().unique()
    d = v[1:] - v[:-1]
    d = d[d > 0]
    return int(d.min()) if d.numel() else 0


def summary(vals: list[float]) -> dict:
    """Median, mean, 10th and 90th percentile (nearest rank below) of handoffs in us, and their count."""
    ranked = sorted(vals)
    return {"median_us": round(statistics.median(vals), 3), "mean_us": round(statistics.fmean(vals), 3),
            "p10_us": round(ranked[len(vals) // 10], 3), "p90_us": round(ranked[(9 * len(vals)) // 10], 3),
            "n": len(vals)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--producers", type=int, default=416, help="producer programs (the o GEMV's gathered launch: 416)")
    ap.add_argument("--consumers", type=int, default=132)
    ap.add_argument("--hog-programs", type=int, default=264, help="the streaming kernel beside the 'loaded' runs")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("handoff.py stamps kernels on a GPU")
    from select_under_load import hog

    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n_iter, n_p, n_c = a.iters, a.producers, a.consumers
    buf = torch.zeros(n_p * TILE, device=dev, dtype=torch.bfloat16)
    st = {k: torch.zeros(n_iter, n, dtype=torch.int64, device=dev)
          for k, n in (("pdl_p", n_p), ("pdl_c", n_c), ("str_p", n_p), ("str_c", n_c), ("bar_a", sms),
                       ("bar_r", sms), ("flag_set", 1), ("flag_seen", sms))}
    cnt = torch.zeros(1, dtype=torch.int32, device=dev)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)

    def pdl(i: int) -> None:
        producer_kernel[(n_p,)](buf, st["pdl_p"][i], PDL=True, TILE=TILE, num_warps=4)
        consumer_kernel[(n_c,)](st["pdl_c"][i], PDL=True, num_warps=1, launch_pdl=True)

    def stream(i: int) -> None:
        producer_kernel[(n_p,)](buf, st["str_p"][i], PDL=False, TILE=TILE, num_warps=4)
        consumer_kernel[(n_c,)](st["str_c"][i], PDL=False, num_warps=1)

    def barrier(i: int) -> None:
        barrier_kernel[(sms,)](cnt, st["bar_a"][i], st["bar_r"][i], sms, num_warps=1)

    def flagged(i: int) -> None:
        flag_kernel[(sms,)](flag, st["flag_set"][i], st["flag_seen"][i], i + 1, num_warps=1)

    patterns = {"pdl": (pdl, "pdl_p", "pdl_c"), "stream": (stream, "str_p", "str_c"),
                "barrier": (barrier, "bar_a", "bar_r"), "flag": (flagged, "flag_set", "flag_seen")}
    graphs = {}
    for name, (fn, _, _) in patterns.items():
        fn(0)  # compile
        torch.cuda.synchronize()
        graphs[name] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[name]):
            for i in range(n_iter):
                fn(i)
    side = torch.cuda.Stream()
    src = torch.randn(1 << 30, device=dev, dtype=torch.bfloat16)
    hog_out = torch.zeros(4096, device=dev)
    rows = {}
    for load in ("idle", "beside a streaming kernel"):
        for name, (_, first, second) in patterns.items():
            g = graphs[name]
            flag.zero_()
            torch.cuda.synchronize()
            if load != "idle":
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    hog(src, hog_out, a.hog_programs, 10)
            g.replay()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            f, s = st[first], st[second]
            if name == "flag":
                s = s[:, 1:]
            vals = handoffs(f, s)[1:]  # the first iteration pays the graph's start
            rows.setdefault(load, {})[name] = {**summary(vals), "timer_step_ns": timer_step_ns(torch.cat(
                [f.flatten(), s.flatten()]))}
            print(load, name, json.dumps(rows[load][name]), flush=True)
    props = torch.cuda.get_device_properties(0)
    print(f"\n{props.name} | {n_iter} iterations per graph | producers {n_p} x {TILE} bf16, consumers {n_c}, "
          f"barrier / flag grids {sms} | beside: {a.hog_programs} hog programs")
    print("| handoff (us, median [p10, p90]) | idle | beside a streaming kernel |")
    print("|---|---|---|")
    for name in patterns:
        cells = [f"{rows[ld][name]['median_us']} [{rows[ld][name]['p10_us']}, {rows[ld][name]['p90_us']}]"
                 for ld in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"device": props.name, "sms": sms, "torch": torch.__version__,
                                 "triton": triton.__version__, "iters": n_iter, "producers": n_p, "consumers": n_c,
                                 "tile_bf16": TILE, "hog_programs": a.hog_programs, "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
