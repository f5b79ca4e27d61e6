"""Time the Top-K select kernels alone (GPU): each implementation x warp count at the model row widths.

    PYTHONPATH=src python3 benchmarks/select_bench.py --out benchmarks/results/select-h200.json

bf16, one row, random normal x, k = d_in / 2; CUDA graph replay, median per call (same harness as
benchmarks/gemv.py). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv import select_sweep  # noqa: E402
from larosa.kernels import triton_gemv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impls", default=",".join(triton_gemv.SELECT_IMPLS))
    ap.add_argument("--warps", default="4,8,16")
    ap.add_argument("--widths", default="4096,11008,14336")
    ap.add_argument("--out", default="benchmarks/results/select.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/select_bench.py needs a CUDA GPU")
    torch.manual_seed(0)
    rows, _ = select_sweep(torch.bfloat16, widths=[int(v) for v in args.widths.split(",")],
                           impls=args.impls.split(","), warps=[int(v) for v in args.warps.split(",")])
    print("| d_in | impl | warps | us |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['d_in']} | {r['impl']} | {r['num_warps']} | {r['us']:.2f} |")
    props = torch.cuda.get_device_properties(0)
    rec = {"gpu": props.name, "dtype": "bf16", "batch": 1, "k": "d_in / 2",
           "timing": "CUDA graph replay, median per call", "torch": torch.__version__,
           "triton": __import__("triton").__version__, "rows": rows,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
