"""How much slower the decode step's selects and a memory round trip get while other kernels stream (GPU).

Every attempt to fill a select's window with streaming has slowed the select by about what it streamed: the adapter
beside the select (v16, v29), the L2 prefetch above 8 MiB (v23, v29), the guessed rows (v31) and the input prefix
loaded before the wait (v32: the norm + select 5.3 -> 8.1 us). This separates the two ways that can happen:

* the select's SM is shared with the streaming programs (issue slots, the load/store queue), or
* every memory round trip of the select is slower while DRAM is busy (loaded latency), on any SM.

A "hog" kernel streams a large buffer on a second stream with a chosen grid: from a few programs (DRAM partly busy,
most SMs free) to several per SM (every SM shared). On the first stream a CUDA graph replays the engine's selects at
the LLaMA2-7B widths and keep counts of p = 0.5 (the o and down compacting selects, the norm + select before q/k/v),
and a one-warp pointer chase that times one dependent load: through DRAM (a 256 MiB cycle, each call walking on
from where the one before stopped) and through L2 (the same lines at every call). Each
kernel's duration comes from the CUPTI trace (torch.profiler); only the kernels that ran wholly inside the hog's run
count. Medians are printed per load level beside the hog's achieved bandwidth.

    PYTHONPATH=src python3 benchmarks/select_under_load.py --out benchmarks/results/select-under-load-h200.json
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

D, DFF = 4096, 11008  # LLaMA2-7B widths
K_O, K_DOWN, K_QKV = 1638, 4403, 2457  # kept at p = 0.5, 0.8 / 1.2 split (SparsityPlan.from_nominal(0.5))


@triton.jit
def hog_kernel(src_ptr, out_ptr, n_per_prog, reps, BLOCK: tl.constexpr):
    """Program i sums src[i * n_per_prog : (i + 1) * n_per_prog] `reps` times (streaming reads), writes the sum."""
    base = tl.program_id(0).to(tl.int64) * n_per_prog
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(reps):
        for i in range(0, n_per_prog, BLOCK):
            acc += tl.load(src_ptr + base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


@triton.jit
def chase_kernel(nxt_ptr, out_ptr, start, steps, ADVANCE: tl.constexpr = False):
    """One dependent load after another: j = nxt[j], `steps` times from `start` (ADVANCE: from the j the call before
    wrote, so that calls walk on along the cycle instead of through the same lines); writes the last j."""
    j = start
    if ADVANCE:
        j = tl.load(out_ptr)
    for _ in range(steps):
        j = tl.load(nxt_ptr + j)
    tl.store(out_ptr, j)


def hog(src: torch.Tensor, out: torch.Tensor, programs: int, reps: int, block: int = 4096) -> int:
    """`hog_kernel` over whole blocks of src split among `programs`; returns the bytes it reads."""
    n_per = src.numel() // programs // block * block
    if n_per < block:
        raise ValueError(f"{src.numel()} elements are too few for {programs} programs of {block}")
    hog_kernel[(programs,)](src, out, n_per, reps, BLOCK=block, num_warps=4, num_stages=4)
    return programs * n_per * src.element_size() * reps


def chase(nxt: torch.Tensor, out: torch.Tensor, steps: int, start: int = 0, advance: bool = False) -> None:
    """`chase_kernel` from `start`, or (advance) from the position in out[0] that the call before left there."""
    chase_kernel[(1,)](nxt, out, start, steps, ADVANCE=advance, num_warps=1)


def cycle(n: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """int32 next-index array of one random cycle through all n slots (a chase visits every slot once)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed), device="cpu")
    nxt = torch.empty(n, dtype=torch.int32, device="cpu")
    nxt[perm] = perm.roll(-1).to(torch.int32)
    return nxt.to(device)


def inside(events: list[dict], name_part: str, lo: float, hi: float) -> list[float]:
    """Durations (us) of the kernel events whose name contains name_part and that ran wholly within [lo, hi]."""
    return [e["dur"] for e in events if name_part in e["name"] and e["ts"] >= lo and e["ts"] + e["dur"] <= hi]


def kernels(trace: dict) -> list[dict]:
    return [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", default="0,16,33,66,99,132,264", help="hog grids (0: no hog)")
    ap.add_argument("--hog-gib", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=40, help="each select (and chase) per graph replay")
    ap.add_argument("--chase-steps", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("select_under_load.py times kernels on a GPU")
    from graph_timeline import kernel_trace
    from larosa.kernels import triton_gemv as tg

    dev = "cuda"
    torch.manual_seed(0)
    x_o = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    x_down = torch.randn(1, DFF, device=dev, dtype=torch.bfloat16)
    x_res = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    res = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    g = torch.ones(D, device=dev, dtype=torch.bfloat16)
    hints = torch.zeros(2, dtype=torch.int32, device=dev)
    nxt_dram = cycle(64 << 20, 1, dev)  # 256 MiB, walked on from call to call: every step misses L2
    nxt_l2 = cycle(1 << 20, 2, dev)  # the same `--chase-steps` lines from slot 0 at every call: L2 hits once warm
    chase_out = torch.zeros(1, dtype=torch.int32, device=dev)
    walk = torch.zeros(1, dtype=torch.int32, device=dev)
    src = torch.randn(int(a.hog_gib * (1 << 30)) // 2, device=dev, dtype=torch.bfloat16)
    hog_out = torch.zeros(4096, device=dev)

    probes = {  # label: (one call, kernel name part)
        "o select (4096, k 1638, hinted)": (lambda: tg.select(x_o, K_O, hint=hints[:1], compact=True, pack_x=True),
                                            "select_packed"),
        "down select (11008, k 4403)": (lambda: tg.select(x_down, K_DOWN, compact=True, pack_x=True), "select_packed"),
        "norm + select (4096, k 2457, hinted)": (
            lambda: tg.rmsnorm_select(x_res, res, g, 1e-6, K_QKV, hint=hints[1:], compact=True, pack_x=True),
            "rmsnorm_select"),
        "DRAM chase": (lambda: chase(nxt_dram, walk, a.chase_steps, advance=True), "chase"),
        "L2 chase": (lambda: chase(nxt_l2, chase_out, a.chase_steps), "chase"),
    }
    graphs = {}
    for label, (call, _) in probes.items():
        for _ in range(2):  # compile and warm
            call()
        torch.cuda.synchronize()
        graphs[label] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[label]):
            for _ in range(a.repeats):
                call()
    side = torch.cuda.Stream()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def elapsed_ms(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t0.record()
        fn()
        t1.record()
        torch.cuda.synchronize()
        return t0.elapsed_time(t1)

    rows = []
    for programs in (int(v) for v in a.programs.split(",")):
        row = {"hog_programs": programs}
        one = elapsed_ms(lambda: hog(src, hog_out, programs, 1)) if programs else 0.0
        for label, (_, part) in probes.items():
            if label.startswith("down") and programs >= sms:  # its 8 warps x 255 registers need a whole SM
                row[label] = {"n": 0, "median_us": None, "note": "needs a whole SM: waits for the hog"}
                continue
            graph = graphs[label]
            reps = max(1, int(3 * elapsed_ms(graph.replay) / one) + 1) if programs else 0

            hog_bytes = []

            def run() -> None:
                if programs:
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        hog_bytes.append(hog(src, hog_out, programs, reps))
                graph.replay()
                torch.cuda.current_stream().wait_stream(side)

            run()
            torch.cuda.synchronize()
            ev = kernels(kernel_trace(run, 1))
            hogs = [e for e in ev if "hog_kernel" in e["name"]]
            lo, hi = (hogs[0]["ts"], hogs[0]["ts"] + hogs[0]["dur"]) if hogs else (float("-inf"), float("inf"))
            durs = inside(ev, part, lo, hi)
            row[label] = {"n": len(durs), "median_us": round(statistics.median(durs), 3) if durs else None}
            if "chase" in label and durs:
                row[label]["per_load_ns"] = round(statistics.median(durs) * 1000 / a.chase_steps, 1)
            if hogs and "hog_tb_s" not in row:
                row["hog_tb_s"] = round(hog_bytes[-1] / (hogs[0]["dur"] * 1e-6) / 1e12, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    props = torch.cuda.get_device_properties(0)
    print(f"\n{props.name} | bf16 | batch 1 | LLaMA2-7B widths, p = 0.5 keep counts | medians of {a.repeats} per "
          f"level, only kernels wholly inside the hog's run | chase: {a.chase_steps} dependent loads")
    print("| hog programs | hog TB/s | o select (us) | down select (us) | norm + select (us) | DRAM load (ns) | "
          "L2 load (ns) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        labels = list(probes)
        print(f"| {r['hog_programs'] or 'none'} | {r.get('hog_tb_s', '-')} | "
              + " | ".join(str(r[lb]["median_us"]) for lb in labels[:3])
              + f" | {r['DRAM chase'].get('per_load_ns')} | {r['L2 chase'].get('per_load_ns')} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                                 "triton": triton.__version__, "dtype": "bfloat16", "batch": 1,
                                 "widths": [D, DFF], "k": {"o": K_O, "down": K_DOWN, "qkv": K_QKV},
                                 "repeats": a.repeats, "chase_steps": a.chase_steps, "hog_gib": a.hog_gib,
                                 "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
