"""Chains of dense batch-1 GEMVs at the LLaMA2-7B shape: cuBLAS vs `triton_dense.dense_gemv`.

    PYTHONPATH=src python3 benchmarks/dense_chain.py --block --out benchmarks/results/dense-chain-h200.json

The decode engine's cuBLAS step spends 3.79 ms per token in GEMVs on the H200 (LLaMA2-7B shape), more than the
3.66 ms a 273 tok/s token (the dense bar) may take. Each stand-alone launch loses ~2.5 us to its ramp and tail.
`dense_gemv` launched as a programmatic dependent loads its first weight tiles before it waits for its input,
so the next GEMV's resident programs stream while the previous one finishes (v19 run: 3200 vs 3634 us per
token; since v20 the engine's dense step).

A "token" here is the 128 GEMVs of the shape's 32 layers in order (q/k/v 4096 -> 12288, o 4096 -> 4096, gate
and up 4096 -> 22016, down 11008 -> 4096; each takes the previous output's first d_in entries as its input, so
every GEMV depends on the one before), all 12.9 GB of weights distinct (far beyond the 60 MB L2), captured in
one CUDA graph; median of the replays. bf16, batch 1, random weights. Variants: cuBLAS (F.linear); `dense_gemv`
without PDL, with PDL but waiting before any load, and with PDL loading its first tiles before the wait, at a
few tilings (BN, BK, STAGES, WARPS); with --block also the engine's form (`larosa::dense_linear`: the norm in
the q/k/v and gate/up launches, SiLU * up, the residual in the o and down ones). Each variant's outputs are
checked first (against cuBLAS, the block form against its plain PyTorch form). Printed as a table beside the
copy bandwidth and the bytes-per-token roofline; JSON with the hardware and versions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv import graph_time_us  # noqa: E402
from larosa.bench import copy_bandwidth  # noqa: E402
from larosa.kernels.reference import dense_linear_ref  # noqa: E402
from larosa.kernels.triton_dense import dense_gemv  # noqa: E402

LAYER = (("q/k/v", 4096, 12288), ("o", 4096, 4096), ("gate+up", 4096, 22016), ("down", 11008, 4096))


def weights(layers: int) -> list[torch.Tensor]:
    """The shape's dense GEMV weights in decode order, (d_out, d_in) each (F.linear's layout)."""
    return [torch.randn(n, d, device="cuda", dtype=torch.bfloat16) * d ** -0.5
            for _ in range(layers) for _, d, n in LAYER]


# the block forms timed with --block: which of the engine's parts each GEMV launch carries. (v20 also timed
# gate/up rows interleaved in one matrix, "pairs", code at 4766410: no faster than two pointers, removed;
# results/dense-chain-forms-h200.json)
FORMS = {"norm": {"norm", "g"}, "norm, g folded": {"norm"}, "gate/up": {"gate_up"}, "residual": {"res"},
         "all, norm weight loaded": {"norm", "g", "gate_up", "res"},
         "all, norm weight of ones (the engine on these shapes)": {"norm", "gate_up", "res"}}


def block_args(ws: list[torch.Tensor], form: set) -> list[dict]:
    """Per GEMV, `dense_gemv`'s keyword arguments in a block form (`FORMS`): "norm" at q/k/v and gate/up (with
    its weight "g", else folded into w: only the rms scaling), "gate_up" (the (22016, 4096) weight read as its
    gate and up halves), "res" at o and down."""
    dev = ws[0].device
    out = []
    for i, w in enumerate(ws):
        site, kw = i % 4, {}
        if site in (0, 2) and "norm" in form:
            kw = {"rms": True, "eps": 1e-5}
            if "g" in form:
                kw["norm_w"] = torch.rand(w.shape[1], device=dev, dtype=w.dtype) + 0.5
        if site == 2 and "gate_up" in form:
            kw.update(w=w[: w.shape[0] // 2], w_up=w[w.shape[0] // 2:])
        if site in (1, 3) and "res" in form:
            kw["residual"] = torch.randn(1, w.shape[0], device=dev, dtype=w.dtype)
        out.append(kw)
    return out


def block_ref(x: torch.Tensor, w: torch.Tensor, kw: dict) -> torch.Tensor:
    """The plain PyTorch form (`dense_linear_ref`) of one `block_args` call."""
    kw = dict(kw)
    return dense_linear_ref(x, kw.pop("w", w), **kw)


def chain(ws: list[torch.Tensor], gemv, x0: torch.Tensor, args: list[dict] | None = None) -> tuple[list, list]:
    """The calls of one token from input x0 (each GEMV reads the first d_in outputs of the one before) and
    their outputs; `args`: per GEMV keyword arguments of the block form (`block_args`)."""
    args = args or [{} for _ in ws]
    outs = [torch.empty(1, kw.get("w", w).shape[0], device=x0.device, dtype=x0.dtype) for w, kw in zip(ws, args)]
    calls = []
    for i, (w, kw) in enumerate(zip(ws, args)):
        src = (x0 if i == 0 else outs[i - 1])[:, : w.shape[1]]
        kw = {"w": w, **kw}
        calls.append(lambda src=src, o=outs[i], kw=kw: gemv(src, o, **kw))
    return calls, outs


def token_time_us(calls, reps: int = 30) -> float:
    """Median time of one replay of the whole chain (us)."""
    return graph_time_us(calls, reps) * len(calls)


def variants(tilings, block: bool) -> list[tuple[str, object, set | None]]:
    """(name, gemv(x, out, w=..., **parts), block form or None)."""
    def cublas(x, o, w):
        torch.mm(x, w.T, out=o)

    def ours(t, **fixed):
        def run(x, o, w, **kw):
            bn = max(1, t[0] // 2) if "w_up" in kw else t[0]
            return dense_gemv(x, w, o, tiles=(bn,) + tuple(t[1:]), **fixed, **kw)
        return run

    out = [("cuBLAS (F.linear)", cublas, None)]
    for t in tilings:
        out += [(f"dense_gemv {t}, no PDL", ours(t, pdl=False), None),
                (f"dense_gemv {t}, PDL, wait first", ours(t, pdl=True, prefetch=False), None),
                (f"dense_gemv {t}, PDL, tiles before wait", ours(t, pdl=True, prefetch=True), None)]
        if block:  # the engine's parts in the launches (gate/up: BN halved, BN rows of each matrix)
            out += [(f"dense_gemv {t}, PDL, tiles before wait, {name}", ours(t, pdl=True, prefetch=True), form)
                    for name, form in FORMS.items()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tilings", default="8,512,2,4;4,1024,2,4;2,2048,2,2",
                    help="(BN,BK,STAGES,WARPS) tilings, ';'-separated")
    ap.add_argument("--block", action="store_true", help="also the engine's block form (norms, SiLU * up, residuals)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    tilings = [tuple(int(v) for v in t.split(",")) for t in a.tilings.split(";")]
    bw = copy_bandwidth(torch.device("cuda"))
    ws = weights(a.layers)
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    # check every variant on one layer's chain against cuBLAS (fp32 accumulation both; bf16 outputs)
    x0 = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ref_calls, ref_outs = chain(ws[:4], variants([], False)[0][1], x0)
    for c in ref_calls:
        c()
    rows = []
    print(f"{torch.cuda.get_device_name()} | bf16 | batch 1 | LLaMA2-7B dense GEMVs, {a.layers} layers, "
          f"{nbytes / 1e9:.2f} GB per token | copy BW {bw / 1e12:.2f} TB/s | roofline {nbytes / bw * 1e6:.0f} us")
    print("| variant | us per token | GB/s | of copy BW | vs cuBLAS |")
    print("|---|---|---|---|---|")
    base = None
    for name, gemv, form in variants(tilings, a.block):
        block = form is not None
        bargs = block_args(ws, form) if block else None
        if block:  # checked against the block's plain PyTorch form on one layer (each GEMV on the same input)
            calls, outs = chain(ws[:4], gemv, x0, bargs[:4])
            for c in calls:
                c()
            srcs = [x0] + outs[:3]
            err = max(((o.float() - block_ref(s[:, : w.shape[1]], w, kw).float()).norm() / o.float().norm()).item()
                      for o, s, w, kw in zip(outs, srcs, ws, bargs))
        else:
            calls, outs = chain(ws[:4], gemv, x0)
            for c in calls:
                c()
            err = max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(outs, ref_outs))
        if err > 2e-2:
            raise SystemExit(f"{name}: relative error {err:.3g} against the reference")
        us = token_time_us(chain(ws, gemv, x0, bargs)[0])
        del bargs
        base = base or us
        row = {"variant": name, "block_form": sorted(form) if block else None, "us_per_token": us,
               "GBps": nbytes / us / 1e3, "of_copy_bw": nbytes / us * 1e6 / bw, "vs_cublas": base / us,
               "max_rel_err": err}
        rows.append(row)
        print(f"| {name} | {us:.0f} | {row['GBps']:.0f} | {row['of_copy_bw']:.0%} | {row['vs_cublas']:.3f}x |",
              flush=True)
    import triton

    res = {"device": torch.cuda.get_device_name(), "dtype": "bfloat16", "batch": 1, "layers": a.layers,
           "bytes_per_token": nbytes, "copy_bandwidth_Bps": bw, "roofline_us": nbytes / bw * 1e6,
           "torch": torch.__version__, "triton": triton.__version__, "timing": "CUDA graph of one token's chain, "
           "median of 30 replays", "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
