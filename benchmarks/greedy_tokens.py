"""How varied greedy decoding of a random-weight shape is: distinct tokens among the generated ones (CPU or GPU).

    PYTHONPATH=src python benchmarks/greedy_tokens.py --shape llama2-7b --tokens 48 \
        --out benchmarks/results/greedy-tokens-cpu.json

The decode tables time random weights at the real shapes. The hinted Top-K selects search near the previous
token's threshold first, so a run that kept repeating a few tokens would flatter them; this shows whether the
random weights' greedy decoding does (v21, benchmarks/NOTES.md). Dense engine, bf16, batch 1, prompt 128, the
tables' weight seed (0).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from larosa.engine import DecodeEngine  # noqa: E402
from larosa.shapes import get_shape, random_base  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    base = random_base(get_shape(a.shape), torch.bfloat16, a.device, 0)
    prompt = torch.randint(0, 1000, (1, 128), device=a.device)
    cuda = a.device.startswith("cuda")
    eng = DecodeEngine(base, max_len=128 + a.tokens + 64, compile=cuda, graphs=cuda)
    t0 = time.perf_counter()
    toks = eng.generate(prompt, a.tokens).tokens[0].tolist()
    row = {"shape": a.shape, "dtype": "bfloat16", "batch": 1, "prompt": 128, "generated": len(toks),
           "distinct": len(set(toks)), "tokens": toks, "seconds": round(time.perf_counter() - t0, 1),
           "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
           "torch": torch.__version__}
    print("| shape | device | generated | distinct |\n|---|---|---|---|")
    print(f"| {a.shape} | {row['device']} | {row['generated']} | {row['distinct']} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(row, indent=1) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
