"""Where the captured decode step's time goes *inside the graph replay* (H200): each kernel's start and end as
CUPTI records them for graph-launched kernels (torch.profiler), turned into the step's critical path.

    PYTHONPATH=src python3 benchmarks/graph_timeline.py --out /tmp/timeline.json [--steps 20]

`profile_decode.py` profiles the compiled step without the graph, so it cannot show overlaps (PDL, the adapters'
side programs) or the gaps between launches. Here, per replayed step, the kernels are walked in start order:
a kernel's *exposed* time is the part of it that ends after every kernel before it has ended (what it adds to
the step), its *gap* the idle time before it (no kernel running). Exposed + gaps sum to the step's span. A kernel
launched early as a programmatic dependent starts (is resident) before its input is ready, so its duration
includes its wait; its exposed time does not.

Variants (LLaMA2-7B shape, random bf16 weights, batch 1): LaRoSA p = 0.5 (paper split) as the engine runs it,
with the head on cuBLAS, with the head in `dense_linear` as a programmatic dependent (v27: -9.4 %; also without
its early weight loads, or after a plain norm kernel), with PDL off everywhere; un-rotated Top-K, TEAL and dense,
each with its default head and another. The un-profiled
step time is measured beside each, so the tracer's own cost is visible.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv import env_set  # noqa: E402
from larosa.bench import _plan_pw  # noqa: E402
from larosa.engine import DecodeEngine, _rms  # noqa: E402
from larosa.shapes import get_shape, random_base, sparse_variant, teal_thresholds  # noqa: E402
from profile_decode import kind_of  # noqa: E402

class NormThenDenseHead(DecodeEngine):
    """The head as a plain RMSNorm (PyTorch's kernels, launched in order) followed by `dense_linear` without its
    norm: the head is still a programmatic dependent, but of a norm kernel instead of the last down GEMV."""

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        h = _rms(x[:, -1:], self.w.final_norm, self.w.final_eps)
        y = torch.ops.larosa.dense_linear(h, self.w.head, None, None, None, None, 0.0, False)
        return y[:, 0].to(self.logits_dtype)


class HintMissEngine(DecodeEngine):
    """Every select hint pushed 32 binades above the last threshold before each step, so every hinted select misses
    its window and falls back (v29: on SmolLM2-135M the next threshold is in a 2^5-pattern window for only 24-43 %
    of tokens, against 80-100 % on random weights, `guess_miss.py`). The push is one small kernel before each graph
    replay; it falls into the step's first position of the timeline."""

    def step(self, temperature: float = 0.0, top_k: int = 0) -> None:
        hints = [h for h in self.hint_buffers if h is not None]
        if hints:
            torch._foreach_add_(hints, 4096)
        super().step(temperature, top_k)


# Labels as of v28's code, where LaRoSA's and Top-K's default head is `dense_linear` launched in order. The
# committed results/timeline-llama2-7b.* and timeline2-* came from the session's start, where "larosa" and "topk"
# were the defaults then (cuBLAS head for LaRoSA, the programmatic dense head for Top-K) and "larosa-dense-head"
# was today's "larosa-pdl-head".
VARIANTS = {  # label -> (method, environment, engine keyword arguments[, engine class])
    "larosa": ("larosa", {}, {}),
    "larosa-cublas-head": ("larosa", {}, {"dense_head": False}),
    "larosa-pdl-head": ("larosa", {}, {"dense_head": True, "head_pdl": True}),
    "larosa-pdl-head-noprefetch": ("larosa", {"LAROSA_DENSE_PDL": "noprefetch"}, {"dense_head": True, "head_pdl": True}),
    "larosa-norm-then-pdl-head": ("larosa", {}, {}, NormThenDenseHead),
    "larosa-pdl-off": ("larosa", {"LAROSA_KERNEL_PDL": "0"}, {}),
    # v28's next steps (NOTES): what the step adds to the gate/up GEMV and the down select
    "larosa-prefetch-off": ("larosa", {"LAROSA_PREFETCH_MB": "0"}, {}),
    "larosa-hints-off": ("larosa", {}, {"select_hints": False}),
    "larosa-hint-miss": ("larosa", {}, {}, HintMissEngine),
    # v29: hint windows (SmolLM2's thresholds stay within 2^7 / 2^8 patterns for 73-83 / 90-98 % of tokens at p = 0.5,
    # within 2^5 for 27-35 %), each when the window holds the threshold (random weights) and when it never does. The
    # v29 run of these had 2^5 as the default ("larosa" then); since, 2^7 is (`triton_gemv.HINT_WINDOW`)
    "larosa-window-5": ("larosa", {"LAROSA_SELECT_WINDOW": "5"}, {}),
    "larosa-window-5-miss": ("larosa", {"LAROSA_SELECT_WINDOW": "5"}, {}, HintMissEngine),
    "larosa-window-7": ("larosa", {"LAROSA_SELECT_WINDOW": "7"}, {}),
    "larosa-window-7-miss": ("larosa", {"LAROSA_SELECT_WINDOW": "7"}, {}, HintMissEngine),
    "larosa-window-8": ("larosa", {"LAROSA_SELECT_WINDOW": "8"}, {}),
    "larosa-window-8-miss": ("larosa", {"LAROSA_SELECT_WINDOW": "8"}, {}, HintMissEngine),
    "larosa-adapter-split-0.5": ("larosa", {}, {"adapter_split": 0.5}),
    "larosa-adapter-split-1": ("larosa", {}, {"adapter_split": 1.0}),
    # v29: the down select hinted too (its window, and the L2 prefetch it then runs), and the prefetch budget
    "larosa-hint-down": ("larosa", {"LAROSA_HINT_SITES": "0,1,2,3"}, {}),
    "larosa-prefetch-4": ("larosa", {"LAROSA_PREFETCH_MB": "4"}, {}),
    "larosa-prefetch-16": ("larosa", {"LAROSA_PREFETCH_MB": "16"}, {}),
    "larosa-prefetch-32": ("larosa", {"LAROSA_PREFETCH_MB": "32"}, {}),
    # v30: the down select from the gate/up output's histogram and its bins' width (2^4 patterns by default). The
    # histogram was the default in v30's first runs (there "larosa" was today's larosa-hist), and the down select's
    # loop search was not (in history/v30-histab, "larosa-no-hist" is today's larosa-no-dyn, "larosa-no-hist-dyn" today's
    # larosa); since, the histogram is off and the loop on
    "larosa-hist": ("larosa", {}, {"down_hist": True}),
    "larosa-no-hist": ("larosa", {}, {"down_hist": False}),
    "larosa-hist-3": ("larosa", {"LAROSA_HIST_BITS": "3"}, {"down_hist": True}),
    "larosa-hist-5": ("larosa", {"LAROSA_HIST_BITS": "5"}, {"down_hist": True}),
    "larosa-hist-trust": ("larosa", {"LAROSA_HIST_TRUST": "1"}, {"down_hist": True}),
    "larosa-hist-xdown": ("larosa", {"LAROSA_GATHER_X": "8192"}, {"down_hist": True}),
    "larosa-no-hist-xdown": ("larosa", {"LAROSA_GATHER_X": "8192"}, {"down_hist": False}),
    "larosa-no-hist-dyn": ("larosa", {"LAROSA_SELECT_DYN": "16384"}, {"down_hist": False}),
    "topk-hist": ("topk", {}, {"down_hist": True}),
    "topk-no-hist": ("topk", {}, {"down_hist": False}),
    "topk-no-dyn": ("topk", {"LAROSA_SELECT_DYN": "0"}, {}),
    "larosa-no-dyn": ("larosa", {"LAROSA_SELECT_DYN": "0"}, {}),
    # v31: the o select's hint without its prefetch / without a hint; per-site prefetch budgets; the loop search at
    # 4096 lanes (the o select); the adapter split again now that the down select is fast; the attention's value
    # loads with its key loads, and fewer attention programs
    "larosa-no-hint-o": ("larosa", {"LAROSA_HINT_SITES": "0,2"}, {}),
    "larosa-pf-o-0": ("larosa", {"LAROSA_PREFETCH_MB": "8,o=0"}, {}),
    "larosa-pf-o-4": ("larosa", {"LAROSA_PREFETCH_MB": "8,o=4"}, {}),
    "larosa-pf-qkv-4": ("larosa", {"LAROSA_PREFETCH_MB": "8,qkv=4"}, {}),
    "larosa-pf-qkv-16": ("larosa", {"LAROSA_PREFETCH_MB": "8,qkv=16"}, {}),
    "larosa-pf-gu-4": ("larosa", {"LAROSA_PREFETCH_MB": "8,gate_up=4"}, {}),
    "larosa-pf-gu-16": ("larosa", {"LAROSA_PREFETCH_MB": "8,gate_up=16"}, {}),
    "larosa-dyn-4096": ("larosa", {"LAROSA_SELECT_DYN": "4096"}, {}),
    "larosa-adapter-split-0.25": ("larosa", {}, {"adapter_split": 0.25}),
    "larosa-attn-v-early": ("larosa", {"LAROSA_ATTN_V_EARLY": "1"}, {}),
    "larosa-attn-128": ("larosa", {"LAROSA_ATTN_PROGRAMS": "128"}, {}),
    "topk-pf-o-0": ("topk", {"LAROSA_PREFETCH_MB": "8,o=0"}, {}),
    # v31: the o / down GEMVs in the tile kernel loading their guessed rows (previous threshold - margin) before the
    # wait for their select (LAROSA_GUESS), with and without the select's L2 prefetch there
    "larosa-guess-o-16": ("larosa", {"LAROSA_GUESS": "o=16"}, {}),
    "larosa-guess-o-64": ("larosa", {"LAROSA_GUESS": "o=64"}, {}),
    "larosa-guess-o-16-nopf": ("larosa", {"LAROSA_GUESS": "o=16", "LAROSA_PREFETCH_MB": "8,o=0"}, {}),
    "larosa-guess-down-16": ("larosa", {"LAROSA_GUESS": "down=16"}, {}),
    "topk-guess-o-16": ("topk", {"LAROSA_GUESS": "o=16"}, {}),
    "topk-guess-o-down-16": ("topk", {"LAROSA_GUESS": "o=16;down=16"}, {}),
    "larosa-again": ("larosa", {}, {}),  # the default again, last in a run: how far two runs of one step differ
    "topk": ("topk", {}, {}),
    "topk-cublas-head": ("topk", {}, {"dense_head": False}),
    "topk-pdl-head": ("topk", {}, {"head_pdl": True}),
    "teal": ("teal", {}, {}),
    "teal-cublas-head": ("teal", {}, {"dense_head": False}),
    "dense": ("dense", {}, {}),
    "dense-cublas-head": ("dense", {}, {"dense_head": False}),
}


def _steps_from_trace(trace: dict, steps: int) -> list[list[dict]]:
    """The trace's kernels grouped by replayed step: by the graph launch's correlation id where CUPTI gives
    every kernel of one replay the same one, else by equal counts."""
    kernels = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") == "kernel"]
    by_corr = collections.defaultdict(list)
    for e in kernels:
        by_corr[(e.get("args") or {}).get("correlation")].append(e)
    groups = [sorted(g, key=lambda e: e["ts"]) for g in by_corr.values()]
    if len(groups) != steps or len({len(g) for g in groups}) != 1:
        kernels.sort(key=lambda e: e["ts"])
        if not kernels or len(kernels) % steps:
            raise RuntimeError(f"{len(kernels)} kernels in {len(by_corr)} correlation groups for {steps} steps: "
                               "cannot split the trace into steps")
        n = len(kernels) // steps
        groups = [kernels[i * n:(i + 1) * n] for i in range(steps)]
    return sorted(groups, key=lambda g: g[0]["ts"])


def critical_path(step: list[dict]) -> list[dict]:
    """Per kernel (start order): start relative to the step's first kernel, duration, gap (idle time before
    it), exposed time (its end past every earlier kernel's end), overlap (how long it started before the
    kernels before it had all ended) in us."""
    t0 = step[0]["ts"]
    covered = t0
    rows = []
    for e in step:
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        rows.append({"name": e["name"], "start": start - t0, "dur": end - start, "gap": max(0.0, start - covered),
                     "exposed": max(0.0, end - max(start, covered)), "overlap": max(0.0, covered - start)})
        covered = max(covered, end)
    return rows


def summarize(steps: list[list[dict]]) -> dict:
    """Medians over the steps, per position in the step and per kernel kind."""
    paths = [critical_path(s) for s in steps]
    n = len(paths[0])
    med = lambda xs: statistics.median(xs)  # noqa: E731
    positions = []
    for i in range(n):
        col = [p[i] for p in paths]
        positions.append({"i": i, "name": col[0]["name"][:80], "kind": kind_of(col[0]["name"]),
                          **{k: round(med([c[k] for c in col]), 2) for k in ("start", "dur", "gap", "exposed",
                                                                              "overlap")}})
    kinds = collections.defaultdict(lambda: collections.Counter())
    for p in positions:
        for k in ("dur", "exposed", "gap", "overlap"):
            kinds[p["kind"]][k] += p[k]
        kinds[p["kind"]]["launches"] += 1
    layers = sum("attn" in p["name"] for p in positions) or 1
    per_name = {}
    for name in sorted({p["name"] for p in positions}):
        occ = [p for p in positions if p["name"] == name]
        roles = max(1, len(occ) // layers)  # a kernel's occurrences per layer (dense: 4 GEMVs, then the head)
        body = occ[:roles * layers] if len(occ) >= layers else occ
        per_name[name[:60]] = {"n": len(occ), "exposed_sum": round(sum(p["exposed"] for p in occ), 1),
                               "by_role": [{k: round(med([p[k] for p in body[j::roles]]), 2)
                                            for k in ("dur", "exposed", "gap", "overlap")} for j in range(roles)],
                               "after_the_layers": [{k: p[k] for k in ("dur", "exposed", "gap", "overlap")}
                                                    for p in occ[len(body):]]}
    spans = [sum(r["gap"] + r["exposed"] for r in p) for p in paths]
    return {"kernels_per_step": n, "span_us_median": round(med(spans), 1),
            "span_us_min_max": [round(min(spans), 1), round(max(spans), 1)],
            "sum_dur_us": round(sum(p["dur"] for p in positions), 1),
            "sum_gap_us": round(sum(p["gap"] for p in positions), 1),
            "sum_exposed_us": round(sum(p["exposed"] for p in positions), 1),
            "by_kind": {k: {kk: round(v, 1) for kk, v in c.items()} for k, c in sorted(kinds.items())},
            "per_name": per_name,
            "positions": positions}


def kernel_trace(run, steps: int) -> dict:
    """The chrome trace (CUPTI via torch.profiler, CUDA and CPU activities) of `steps` calls of run(), as a dict."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return json.loads(path.read_text())


def timed_step_us(eng, timed: int) -> float:
    """Mean time of `timed` decode steps of a warmed-up engine (CUDA events around the loop, no profiler), us."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(timed):
        eng.step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / timed


def run_variant(w, prompt, steps: int, timed: int, env: dict, kw: dict, trace_path: Path | None,
                cls=DecodeEngine) -> dict:
    with contextlib.ExitStack() as stack:
        for name, value in env.items():
            stack.enter_context(env_set(name, value))
        eng = cls(w, max_len=128 + 16 + timed + steps + 8, **kw)
        eng.generate(prompt, 16)  # compile, capture, warm up
        step_us = timed_step_us(eng, timed)
        trace = kernel_trace(eng.step, steps)
    if trace_path is not None:
        with gzip.open(trace_path, "wt") as f:
            json.dump(trace, f)
    res = {"step_us_unprofiled": round(step_us, 1), **summarize(_steps_from_trace(trace, steps))}
    del eng
    torch.cuda.empty_cache()
    return res


def diff(a: dict, b: dict, top: int = 25) -> list[dict]:
    """Positions where b's exposed time differs most from a's (same kernel sequence only)."""
    if a["kernels_per_step"] != b["kernels_per_step"]:
        return []
    rows = [{"i": pa["i"], "name_a": pa["name"][:60], "name_b": pb["name"][:60], "exposed_a": pa["exposed"],
             "exposed_b": pb["exposed"], "delta": round(pb["exposed"] + pb["gap"] - pa["exposed"] - pa["gap"], 2)}
            for pa, pb in zip(a["positions"], b["positions"])]
    return sorted(rows, key=lambda r: -abs(r["delta"]))[:top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=20, help="profiled steps")
    ap.add_argument("--timed", type=int, default=100, help="un-profiled steps timed before them")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--traces", type=Path, default=None, help="folder for each variant's gzipped chrome trace")
    args = ap.parse_args()
    labels = args.variants.split(",")
    unknown = set(labels) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    if args.traces:
        args.traces.mkdir(parents=True, exist_ok=True)
    base = random_base(get_shape(args.shape), torch.bfloat16, "cuda", 0)
    prompt = torch.randint(0, 1000, (1, 128), device="cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16", "batch": 1,
           "shape": args.shape, "sparsity": args.sparsity, "steps": args.steps, "variants": {}}
    weights = {}
    for label in labels:
        method, env, kw, *cls = VARIANTS[label]
        if method not in weights:
            if method == "teal":  # at LaRoSA's parameter-weighted sparsity, as `larosa bench decode` runs it
                pw = _plan_pw(base, args.sparsity, (0.8, 1.2))
                weights[method] = sparse_variant(base, "teal", pw, thresholds=teal_thresholds(base, pw, prompt))
            else:
                weights[method] = base if method == "dense" else sparse_variant(base, method, args.sparsity)
        trace = args.traces / f"{label}.json.gz" if args.traces else None
        r = run_variant(weights[method], prompt, args.steps, args.timed, env, kw, trace, *cls)
        res["variants"][label] = r
        print(f"{label:20s} step {r['step_us_unprofiled']:7.1f} us unprofiled | span {r['span_us_median']:7.1f} us "
              f"| kernels {r['kernels_per_step']} | sum dur {r['sum_dur_us']:7.1f} exposed {r['sum_exposed_us']:7.1f}"
              f" gaps {r['sum_gap_us']:6.1f}", flush=True)
        for name, c in r["per_name"].items():
            if c["n"] >= 32:
                print(f"    {name[:28]:28s} x{c['n']:3d} exposed per role " + " / ".join(
                    f"{x['exposed']:.2f} (dur {x['dur']:.2f})" for x in c["by_role"]))
        for kind, c in r["by_kind"].items():
            print(f"    {kind:28s} launches {c.get('launches', 0):5.0f} dur {c.get('dur', 0):8.1f} exposed "
                  f"{c.get('exposed', 0):8.1f} gap {c.get('gap', 0):6.1f} overlap {c.get('overlap', 0):8.1f}")
    v = res["variants"]
    for a, b in (("larosa", "larosa-pdl-head"), ("larosa", "larosa-pdl-off"), ("larosa", "larosa-cublas-head"),
                 ("topk", "topk-pdl-head")):
        if a in v and b in v:
            res[f"diff {a} -> {b}"] = d = diff(v[a], v[b])
            if not d:
                print(f"{a} -> {b}: the kernel sequences differ ({v[a]['kernels_per_step']} vs "
                      f"{v[b]['kernels_per_step']} kernels), compare per_name instead")
                continue
            print(f"largest changes {a} -> {b} (exposed + gap, us):")
            for r in d[:15]:
                print(f"    #{r['i']:4d} {r['name_a'][:40]:40s} {r['exposed_a']:7.2f} -> {r['exposed_b']:7.2f} "
                      f"({r['delta']:+.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, separators=(",", ":")) + "\n")  # ~40 KB per variant
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
