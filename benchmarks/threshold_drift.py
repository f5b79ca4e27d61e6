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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results/threshold-drift-cpu.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    shape = Shape(4096, 11008, a.layers, 32, 32, 1000)
    base = random_base(shape, torch.bfloat16, "cpu", 0)
    prompt = torch.randint(0, shape.vocab, (1, a.tokens))
    half = 32  # the window of HINT_WINDOW = 6: t in [h - 32, h + 32)
    rows = drift("topk", base, prompt, a.sparsity, half) + drift("larosa", base, prompt, a.sparsity, half)
    print("| method | layer | site | median abs step | max abs step | steps beyond +-32 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['layer']} | {r['site']} | {r['median_abs_step']} | {r['max_abs_step']} | "
              f"{100 * r['beyond_window']:.1f} % |")
    rec = {"hardware": "cpu", "dtype": "bfloat16", "batch": 1, "sparsity": a.sparsity, "shape": "llama2-7b width, "
           f"{a.layers} layers, vocab 1000, random weights", "tokens": a.tokens, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
