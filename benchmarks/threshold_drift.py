"""How far each Top-K site's threshold moves from one token to the next (CPU, random weights).

    python benchmarks/threshold_drift.py --out benchmarks/results/threshold-drift-cpu.json

The hinted select (`triton_gemv.select(..., hint=)`) searches a window of 2^6 bf16 patterns around the
previous token's threshold first; this measures how often the threshold leaves such a window. A random-
weight model at the LLaMA2-7B width (fewer layers, small vocabulary), bf16 on the CPU, one prefill of
random tokens, LaRoSA (adapters) and un-rotated Top-K at nominal p = 0.5: per (layer, site), the bit
pattern of the k-th largest |x| at every position, and its change between consecutive positions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from larosa.engine import DecodeEngine  # noqa: E402
from larosa.shapes import Shape, random_base, sparse_variant  # noqa: E402

SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def drift(method: str, base, prompt: torch.Tensor, p: float, half_window: int) -> list[dict]:
    w = sparse_variant(base, method, p)
    eng = DecodeEngine(w, max_len=prompt.shape[1] + 1, compile=False, graphs=False)
    pats = {}

    def probe(layer: int, site: int, x: torch.Tensor) -> None:
        k = getattr(w.statics[layer], SITES[site]).k
        kth = x.reshape(-1, x.shape[-1]).abs().float().topk(k, dim=-1).values[:, -1].to(torch.bfloat16)
        pats[(layer, site)] = kth.view(torch.int16).to(torch.int32) & 0x7FFF

    eng.prefill(prompt, probe=probe)
    rows = []
    for (layer, site), pat in sorted(pats.items()):
        d = (pat[1:] - pat[:-1]).abs()
        rows.append({"method": method, "layer": layer, "site": SITES[site], "median_abs_step": int(d.median()),
                     "max_abs_step": int(d.max()), "beyond_window": float((d > half_window).float().mean())})
    return rows


def decode_drift(method: str, base, prompt: torch.Tensor, p: float, half_window: int, steps: int) -> list[dict]:
    """The same measured where the hints are used: `steps` decode steps of the eager kernel engine (no compile,
    no graphs; LaRoSA's adapters on the side stream as in the default CUDA engine), recording at every hinted
    select the threshold t it found and the hint it was given (the previous token's t of the same site)."""
    from larosa.kernels import ops

    tg = ops.triton_gemv
    w = sparse_variant(base, method, p)
    eng = DecodeEngine(w, max_len=prompt.shape[1] + steps + 2, compile=False, graphs=False, select_hints=True)
    log: dict[int, list[tuple[int, int]]] = {}  # hint slot address -> (hint before, t found)
    real_sel, real_norm = tg.select, tg.rmsnorm_select

    def sel(x, k, *a, hint=None, **kw):
        before = None if hint is None else int(hint[0])
        out = real_sel(x, k, *a, hint=hint, **kw)
        if hint is not None:
            log.setdefault(hint.data_ptr(), []).append((before, int(out[0, 0])))
        return out

    def norm(*a, hint=None, **kw):
        before = None if hint is None else int(hint[0])
        out = real_norm(*a, hint=hint, **kw)
        if hint is not None:
            log.setdefault(hint.data_ptr(), []).append((before, int(out[2][0, 0])))
        return out

    site_of = {}
    for layer, t in enumerate(eng._tensors):
        for site in range(4):
            site_of[t[-1][site].data_ptr()] = (layer, SITES[site])
    tg.select, tg.rmsnorm_select = sel, norm
    try:
        eng.generate(prompt, steps)
    finally:
        tg.select, tg.rmsnorm_select = real_sel, real_norm
    rows = []
    for ptr, pairs in sorted(log.items(), key=lambda kv: site_of.get(kv[0], (-1, ""))):
        if len(pairs) < 2:
            continue
        d = torch.tensor([abs(t - h) for h, t in pairs[1:]])  # the first call's hint is the zero initial slot
        layer, site = site_of.get(ptr, (-1, "?"))
        rows.append({"method": method, "layer": layer, "site": site, "calls": len(pairs),
                     "median_abs_step": int(d.median()), "max_abs_step": int(d.max()),
                     "beyond_window": float((d >= half_window).float().mean())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results/threshold-drift-cpu.json")
    ap.add_argument("--decode", type=int, default=0, help="instead: this many decode steps of the kernel engine, "
                    "the drift seen by the hinted selects (on the GPU; the CPU runs the kernels interpreted)")
    ap.add_argument("--width", default="4096,11008", help="hidden,intermediate")
    a = ap.parse_args()
    torch.manual_seed(0)
    hidden, inter = (int(v) for v in a.width.split(","))
    shape = Shape(hidden, inter, a.layers, 32, 32, 1000)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = random_base(shape, torch.bfloat16, dev if a.decode else "cpu", 0)
    prompt = torch.randint(0, shape.vocab, (1, a.tokens), device=base.device)
    half = 32  # the window of HINT_WINDOW = 6: t in [h - 32, h + 32)
    if a.decode:
        rows = (decode_drift("topk", base, prompt, a.sparsity, half, a.decode)
                + decode_drift("larosa", base, prompt, a.sparsity, half, a.decode))
    else:
        rows = drift("topk", base, prompt, a.sparsity, half) + drift("larosa", base, prompt, a.sparsity, half)
    print("| method | layer | site | median abs step | max abs step | steps beyond +-32 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['layer']} | {r['site']} | {r['median_abs_step']} | {r['max_abs_step']} | "
              f"{100 * r['beyond_window']:.1f} % |")
    rec = {"hardware": torch.cuda.get_device_name() if base.device.type == "cuda" else "cpu", "dtype": "bfloat16",
           "batch": 1, "sparsity": a.sparsity, "shape": f"width {hidden}/{inter}, {a.layers} layers, vocab 1000, "
           "random weights", "tokens": a.tokens, "decode_steps": a.decode, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
