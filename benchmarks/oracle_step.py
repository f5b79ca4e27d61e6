"""How fast could the LaRoSA step be with every select free? (v31; H200, bf16, batch 1, random weights)

Thirty sessions of select work left LaRoSA at ~1.03x of dense at p = 0.5 on the LLaMA2-7B shape (bar: 1.50x). This
times the same step in several forms, each captured whole (all layers, then the head) in one CUDA graph:

  gather          the engine's gathered Top-K GEMVs (`launch_gtile`, x carried in the kept list, fp32 atomics and the
                  finisher, PDL, the residual added in the o / down epilogues) fed a *fixed* kept list per site, with
                  no select or norm launch at all: LaRoSA's step if every select cost nothing;
  gather-adapter  the same with the residual adapter's programs in the down launch, as the engine runs them;
  compact         dense GEMVs (`larosa::dense_linear`, the dense engine's kernel) over only the kept rows, stored
                  contiguously: nothing paid for sparsity but the smaller launches (v31: slower than `gather`, the
                  dense kernel's tiles being tuned for the full widths);
  compact-adapter the same plus the adapter as one more dense GEMV per layer;
  dense           the dense step from the same building blocks (the norms folded into the projections);
  gather-late, gather-adapter-late
                  the gather forms with each GEMV loading its list and weight rows *before* its PDL wait (the
                  kernel's LATE_WAIT, possible only because the lists are fixed), as the dense chain loads its first
                  weights early: what is left of the gather forms' overhead once the wait for the list costs nothing.

Every form runs the engine's split attention (RoPE and the cache write inside it, the last program combining). The
numbers these forms compute are meaningless (fixed lists, the adapter's output not added back, no norms on the
sparse forms): only their time is. The real engines' steps (dense, LaRoSA, un-rotated Top-K) are timed in the same run
with `DecodeEngine` as the tables build them, so each bound sits beside what the product does.

    PYTHONPATH=src python3 benchmarks/oracle_step.py --out benchmarks/results/oracle-step-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import graph_timeline as gt  # noqa: E402
from gemv import graph_time_us  # noqa: E402
from larosa.engine import DecodeEngine  # noqa: E402
from larosa.kernels import ops, triton_attention, triton_gemv  # noqa: E402
from larosa.record import run_record  # noqa: E402
from larosa.shapes import Shape, get_shape, random_base, sparse_variant  # noqa: E402
from larosa.sparsity import SparsityPlan  # noqa: E402

FORMS = ("dense", "compact", "compact-adapter", "gather", "gather-adapter", "gather-late", "gather-adapter-late")


def kept_counts(sh: Shape, p: float) -> dict:
    """Kept inputs per site at nominal sparsity p with the paper's 0.8 / 1.2 split."""
    plan = SparsityPlan.from_nominal(p)
    return {"qkv": plan.k("attn_in", sh.hidden), "o": plan.k("attn_out", sh.hidden),
            "gate_up": plan.k("mlp_in", sh.hidden), "down": plan.k("mlp_out", sh.intermediate)}


def _rnd(*size, gen):
    return (torch.randn(*size, device=gen.device, dtype=torch.float32, generator=gen) * 0.02).to(torch.bfloat16)


def _kept_list(d_in: int, k: int, gen) -> torch.Tensor:
    """A compacting select's output (t, cutoff, then k packed entries with x) for a random row: a valid fixed list."""
    x = torch.randn(1, d_in, device=gen.device, generator=gen).to(torch.bfloat16)
    return triton_gemv.select(x, k, None, "packed", compact=True, pack_x=True)


def _counters(d_in: int, d_out: int, gated: bool, k: int, device) -> torch.Tensor:
    return torch.zeros(triton_gemv.counters_needed(1, d_in, d_out, gated, impl="gtile", k=k), dtype=torch.int32,
                       device=device)


class Step:
    """One form of the decode step over all layers: build its weights, then `__call__` runs one position."""

    def __init__(self, form: str, sh, ks: dict, max_len: int, gen):
        d, f, hd = sh.hidden, sh.intermediate, sh.head_dim
        dev = gen.device
        self.form, self.sh, self.ks = form, sh, ks
        nq = (sh.heads + 2 * sh.kv_heads) * hd
        self.kc = torch.zeros(sh.layers, 1, sh.kv_heads, max_len, hd, device=dev, dtype=torch.bfloat16)
        self.vc = torch.zeros_like(self.kc)
        self.pos = torch.tensor([max_len // 2], device=dev)
        ang = torch.rand(hd // 2, device=dev, generator=gen) * 6.0
        self.cos = torch.cat([ang.cos()] * 2).to(torch.bfloat16)
        self.sin = torch.cat([ang.sin()] * 2).to(torch.bfloat16)
        self.attn_cnt = torch.zeros(sh.layers, sh.kv_heads, dtype=torch.int32, device=dev)
        self.head = _rnd(sh.vocab, d, gen=gen)
        self.x0 = _rnd(1, d, gen=gen)
        kq, ko, kg, kd = ks["qkv"], ks["o"], ks["gate_up"], ks["down"]
        adapter = "adapter" in form
        self.late = form.endswith("-late")
        self.layers = []
        for _ in range(sh.layers):
            if form == "dense":  # output-major, as F.linear and dense_linear take them
                L = dict(wqkv=_rnd(nq, d, gen=gen), wo=_rnd(d, d, gen=gen), wg=_rnd(f, d, gen=gen),
                         wu=_rnd(f, d, gen=gen), wd=_rnd(d, f, gen=gen))
            elif form.startswith("compact"):  # only the kept rows (input features), contiguous
                L = dict(wqkv=_rnd(nq, kq, gen=gen), wo=_rnd(d, ko, gen=gen), wg=_rnd(f, kg, gen=gen),
                         wu=_rnd(f, kg, gen=gen), wd=_rnd(d, kd, gen=gen))
            else:  # input-major (d_in, d_out), as the gathered kernel takes them
                L = dict(wqkv=_rnd(d, nq, gen=gen), wo=_rnd(d, d, gen=gen), wg=_rnd(d, f, gen=gen),
                         wu=_rnd(d, f, gen=gen), wd=_rnd(f, d, gen=gen),
                         cq=_counters(d, nq, False, kq, dev), co=_counters(d, d, False, ko, dev),
                         cg=_counters(d, f, True, kg, dev), cd=_counters(f, d, False, kd, dev))
            if adapter:
                L["adapter"] = _rnd(d, d, gen=gen)  # output-major (F.linear's layout), as the engine keeps R_l^T
            self.layers.append(L)
        if form.startswith("gather"):
            self.sel = {"qkv": _kept_list(d, kq, gen), "o": _kept_list(d, ko, gen), "gate_up": _kept_list(d, kg, gen),
                        "down": _kept_list(f, kd, gen)}
        self.bufs = {"qkv": torch.empty(1, nq, device=dev, dtype=torch.bfloat16),
                     "act": torch.empty(1, f, device=dev, dtype=torch.bfloat16),
                     "side": torch.empty(1, d, device=dev, dtype=torch.bfloat16)}

    def read_bytes(self) -> int:
        """Weight bytes one step reads: every stored matrix (dense, compact; the adapters), but only the kept rows
        of the gathered ones; the head. (The KV cache's few MB are left out.)"""
        kept = {"wqkv": "qkv", "wo": "o", "wg": "gate_up", "wu": "gate_up", "wd": "down"}
        total = self.head.numel() * 2
        for L in self.layers:
            for n, t in L.items():
                if n == "adapter" or (n in kept and not self.form.startswith("gather")):
                    total += t.numel() * 2
                elif n in kept:  # input-major (d_in, d_out): k of the d_in rows
                    total += self.ks[kept[n]] * t.shape[1] * 2
        return total

    def _attention(self, i: int, qkv: torch.Tensor) -> torch.Tensor:
        sh = self.sh
        o = triton_attention.rope_decode_attention(qkv, self.kc[i], self.vc[i], self.pos, self.cos, self.sin,
                                                   sh.head_dim ** -0.5, counters=self.attn_cnt[i],
                                                   pdl=self.form == "dense")
        return o.view(1, -1)

    def __call__(self) -> torch.Tensor:
        x = self.x0
        ks = self.ks
        for i, L in enumerate(self.layers):
            if self.form == "dense" or self.form.startswith("compact"):
                dense = self.form == "dense"
                qkv = ops.dense_linear(x if dense else x[:, :ks["qkv"]], L["wqkv"], rms=True)
                o = self._attention(i, qkv)
                x = ops.dense_linear(o if dense else o[:, :ks["o"]], L["wo"], residual=x)
                act = ops.dense_linear(x if dense else x[:, :ks["gate_up"]], L["wg"], L["wu"], rms=True)
                if "adapter" in L:  # x_mid R_l, then down(m) on top of it
                    x = ops.dense_linear(act[:, :ks["down"]], L["wd"], residual=ops.dense_linear(x, L["adapter"]))
                else:
                    x = ops.dense_linear(act if dense else act[:, :ks["down"]], L["wd"], residual=x)
            else:
                qkv = self.bufs["qkv"]
                late = self.late
                triton_gemv.launch_gtile(x, L["wqkv"], qkv, ks["qkv"], sel=self.sel["qkv"], counters=L["cq"],
                                         pack_x=True, late_wait=late)
                o = self._attention(i, qkv)
                xm = torch.empty_like(x)
                triton_gemv.launch_gtile(o, L["wo"], xm, ks["o"], sel=self.sel["o"], counters=L["co"], residual=x,
                                         pack_x=True, late_wait=late)
                act = self.bufs["act"]
                triton_gemv.launch_gtile(xm, L["wg"], act, ks["gate_up"], wt2=L["wu"], sel=self.sel["gate_up"],
                                         counters=L["cg"], pack_x=True, late_wait=late)
                x = torch.empty_like(xm)
                side = None
                if "adapter" in L:  # its programs start with the launch, as in the engine (the sum is not formed)
                    side = triton_gemv.SideGemv(xm, L["adapter"], self.bufs["side"], 0, xm.shape[1])
                triton_gemv.launch_gtile(act, L["wd"], x, ks["down"], sel=self.sel["down"], counters=L["cd"],
                                         residual=None if side is not None else xm, side=side, pack_x=True,
                                         late_wait=late)
        return torch.nn.functional.linear(x, self.head)


def timeline(fn, steps: int = 20) -> dict:
    """Per-kernel start / end inside replays of a one-step CUDA graph (CUPTI via torch.profiler), summarised as
    `graph_timeline.py` does it: each kernel's exposed time on the step's critical path, per name and role."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    trace = gt.kernel_trace(g.replay, steps)
    del g
    out = gt.summarize(gt._steps_from_trace(trace, steps))
    out.pop("positions")
    return out


def engine_step_us(w, timed: int) -> float:
    """The product's decode step (`DecodeEngine`, defaults: compiled, CUDA graphs), mean over `timed` steps after a
    128-token prompt, as `graph_timeline.py` times it."""
    prompt = torch.randint(0, 1000, (1, 128), device="cuda")
    eng = DecodeEngine(w, max_len=128 + 16 + timed + 8)
    eng.generate(prompt, 16)
    us = gt.timed_step_us(eng, timed)
    del eng
    torch.cuda.empty_cache()
    return us


def _save(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--sparsities", default="0.5,0.75", help="comma list of nominal sparsities (the 0.8 / 1.2 split)")
    ap.add_argument("--forms", default=",".join(FORMS), help="comma list of: " + ", ".join(FORMS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--engines", default="dense,larosa,topk", help="product engines timed beside (empty: none)")
    ap.add_argument("--timed", type=int, default=100)
    ap.add_argument("--timeline", default="gather-adapter",
                    help="comma list of forms whose step is also profiled per kernel (graph_timeline.py's summary), "
                         "at --timeline-sparsity; empty: none")
    ap.add_argument("--timeline-sparsity", type=float, default=0.5)
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny shape on the CPU (TRITON_INTERPRET=1), each form called once, no graphs, no engines: "
                         "checks the wiring only")
    args = ap.parse_args()
    forms = [f for f in args.forms.split(",") if f]
    bad = set(forms) - set(FORMS)
    if bad:
        ap.error(f"unknown forms {sorted(bad)}; choose from {', '.join(FORMS)}")
    if args.smoke:
        sh, dev = Shape(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=4, vocab=512), "cpu"
        args.engines = ""
    else:
        sh, dev = get_shape(args.shape), "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    config = {k: str(v) for k, v in vars(args).items()}
    res = {**run_record("benchmarks/oracle_step.py", config),
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)", "dtype": "bfloat16", "batch": 1,
           "shape": args.shape, "split": [0.8, 1.2], "context": "positions 0..max_len/2 (256 of a 512 cache)",
           "timing": f"CUDA graph of 10 steps, median of {args.reps} replays, per step", "rows": []}
    print(f"{res['device']} | bf16 | batch 1 | {args.shape} | step time, us (median)", flush=True)
    sps = [float(s) for s in args.sparsities.split(",") if s]
    todo = [("dense", 0.0)] if "dense" in forms else []
    todo += [(f, p) for p in sps for f in forms if f != "dense"]
    for form, p in todo:
        ks = kept_counts(sh, p) if p else {"qkv": sh.hidden, "o": sh.hidden, "gate_up": sh.hidden,
                                           "down": sh.intermediate}
        step = Step(form, sh, ks, 512, gen)
        with torch.no_grad():
            tl = None
            if args.smoke:
                y = step()
                if not torch.isfinite(y.float()).all():
                    raise RuntimeError(f"{form}: non-finite logits")
                us = 1.0
            else:
                us = graph_time_us([step] * 10, reps=args.reps)  # a graph of 10 steps, per step
                if form in args.timeline.split(",") and (p == args.timeline_sparsity or form == "dense"):
                    try:
                        tl = timeline(step)
                    except Exception as e:  # (CUPTI) keep the timing; the error is recorded and printed
                        res.setdefault("timeline_errors", []).append(f"{form} p = {p}: {e!r}")
                        print(f"  {form} p = {p}: no timeline ({e!r})", flush=True)
                        tl = None
                if tl is not None:
                    res.setdefault("timelines", {})[f"{form} p = {p}"] = tl
                    print(f"  {form} p = {p} per kernel (exposed per role, us): span {tl['span_us_median']}, "
                          f"gaps {tl['sum_gap_us']}", flush=True)
                    for name, c in tl["per_name"].items():
                        if c["n"] >= sh.layers:
                            print(f"    {name[:28]:28s} x{c['n']:3d} " + " / ".join(
                                f"{x['exposed']:.2f} (dur {x['dur']:.2f})" for x in c["by_role"]), flush=True)
        nb = step.read_bytes()
        row = {"form": form, "sparsity": p, "k": ks, "step_us": round(us, 1), "tok_s": round(1e6 / us, 1),
               "read_bytes": nb, "tb_s": round(nb / us / 1e6, 3)}
        res["rows"].append(row)
        print(f"  {form:16s} p = {p:4.2f}: {us:8.1f} us  {1e6 / us:6.1f} tok/s  {nb / 1e9:6.2f} GB read "
              f"({nb / us / 1e6:.2f} TB/s)", flush=True)
        del step
        _save(args.out, res)  # after every row: a call stopped early keeps what it measured
        if dev == "cuda":
            torch.cuda.empty_cache()
    engines = [e for e in args.engines.split(",") if e]
    if engines:
        base = random_base(sh, torch.bfloat16, "cuda", 0)
        for method in engines:
            for p in ([0.0] if method == "dense" else sps):
                w = base if method == "dense" else sparse_variant(base, method, p)
                us = engine_step_us(w, args.timed)
                res["rows"].append({"form": f"engine {method}", "sparsity": p, "step_us": round(us, 1),
                                    "tok_s": round(1e6 / us, 1)})
                print(f"  engine {method:9s} p = {p:4.2f}: {us:8.1f} us  {1e6 / us:6.1f} tok/s", flush=True)
                del w
                _save(args.out, res)
                torch.cuda.empty_cache()
    dense = {r["form"]: r for r in res["rows"] if r["sparsity"] == 0.0}
    for r in res["rows"]:
        ref = dense.get("engine dense" if r["form"].startswith("engine") else "dense")
        if ref and r["sparsity"]:
            r["speedup"] = round(ref["step_us"] / r["step_us"], 3)
            if "read_bytes" in r and "read_bytes" in ref:  # bytes alone, at the dense step's own rate
                r["byte_limit"] = round(ref["read_bytes"] / r["read_bytes"], 3)
    print("\nspeed-up over the dense step of the same kind (synthetic forms: the synthetic dense step; engines: the "
          "dense engine)")
    for r in res["rows"]:
        if "speedup" in r:
            lim = f" (bytes alone: {r['byte_limit']:.3f}x)" if "byte_limit" in r else ""
            print(f"  {r['form']:16s} p = {r['sparsity']:4.2f}: {r['speedup']:.3f}x{lim}")
    _save(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
