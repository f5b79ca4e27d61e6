"""How far each Top-K site's threshold moves from one token to the next (CPU, random weights).

    python benchmarks/threshold_drift.py --out benchmarks/results/threshold-drift-cpu.json

The hinted select (`triton_gemv.select(..., hint=)`) searches a window of 2^HINT_WINDOW bf16 patterns (2^6 until
v24, 2^5 since) around the previous token's threshold first; this measures how often the threshold leaves
such a window. A random-weight model at the LLaMA2-7B width (fewer layers, small vocabulary), bf16 on the CPU, one
prefill of random tokens, LaRoSA (adapters) and un-rotated Top-K at nominal p = 0.5: per (layer, site), the bit
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
from larosa.kernels.triton_gemv import HINT_WINDOW  # noqa: E402
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


def decode_drift(method: str, base, prompt: torch.Tensor, p: float, half_window: int, steps: int,
                 **engine_kw) -> list[dict]:
    """The same measured where the hints are used: `steps` decode steps of the engine with select hints on
    (`engine_kw`, else the engine's defaults: on CUDA compiled, graph-captured, LaRoSA's adapters where
    `DecodeEngine` puts them: inside the down projection's select launch since v16, on the side stream
    before). Each select leaves the threshold t it found in its hint slot, so the slots after two
    consecutive steps give (hint, t) per site: the step |t - hint| and whether t fell in the window
    the kernel searched first ([lo, lo + 2 * half_window) with lo = max(hint - half_window, 0)), i.e. a hit."""
    w = sparse_variant(base, method, p)
    eng = DecodeEngine(w, max_len=prompt.shape[1] + steps + 2, select_hints=True, **engine_kw)
    snaps: list[torch.Tensor] = []

    def snapshot(_new) -> bool:
        snaps.append(torch.stack([h[:, 0] for h in eng.hint_buffers]).cpu())  # (layers, 4 sites)
        return False

    eng.generate(prompt, steps, on_tokens=snapshot, chunk=1)
    s = torch.stack(snaps[1:])  # after each decode step (the first snapshot is after the prefill: zeros)
    h, t = s[:-1].long(), s[1:].long()  # the hint each select got and the t it found
    lo = (h - half_window).clamp_min(0)
    hit = (t >= lo) & (t < lo + 2 * half_window)
    d = (t - h).abs()
    rows = []
    for layer in range(s.shape[1]):
        for site in range(4):
            dd = d[:, layer, site].float()
            rows.append({"method": method, "layer": layer, "site": SITES[site], "calls": int(dd.numel()),
                         "median_abs_step": int(dd.median()), "max_abs_step": int(dd.max()),
                         "beyond_window": float(1 - hit[:, layer, site].float().mean())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results/threshold-drift-cpu.json")
    ap.add_argument("--decode", type=int, default=0, help="instead: this many decode steps of the kernel engine, "
                    "the drift and window hits seen by the hinted selects (on the GPU; the CPU runs the kernels "
                    "interpreted)")
    ap.add_argument("--width", default="4096,11008", help="hidden,intermediate")
    ap.add_argument("--eager", action="store_true", help="with --decode: no compile, no graphs, adapters in order")
    a = ap.parse_args()
    torch.manual_seed(0)
    hidden, inter = (int(v) for v in a.width.split(","))
    shape = Shape(hidden, inter, a.layers, 32, 32, 1000)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = random_base(shape, torch.bfloat16, dev if a.decode else "cpu", 0)
    prompt = torch.randint(0, shape.vocab, (1, a.tokens), device=base.device)
    half = 1 << (HINT_WINDOW - 1)  # the hinted select's window: t in [h - half, h + half)
    if a.decode:
        kw = {"compile": False, "graphs": False, "overlap_adapters": False} if a.eager else {}
        rows = (decode_drift("topk", base, prompt, a.sparsity, half, a.decode, **kw)
                + decode_drift("larosa", base, prompt, a.sparsity, half, a.decode, **kw))
    else:
        rows = drift("topk", base, prompt, a.sparsity, half) + drift("larosa", base, prompt, a.sparsity, half)
    print("| method | layer | site | median abs step | max abs step | steps outside the window |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['layer']} | {r['site']} | {r['median_abs_step']} | {r['max_abs_step']} | "
              f"{100 * r['beyond_window']:.1f} % |")
    rec = {"hardware": torch.cuda.get_device_name() if base.device.type == "cuda" else "cpu", "dtype": "bfloat16",
           "batch": 1, "sparsity": a.sparsity, "shape": f"width {hidden}/{inter}, {a.layers} layers, vocab 1000, "
           "random weights", "tokens": a.tokens, "decode_steps": a.decode,
           "engine": ("eager" if a.eager else "defaults") if a.decode else None, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
