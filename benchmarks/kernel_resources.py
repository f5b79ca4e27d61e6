"""Registers, spills and programs per SM of the package's Triton kernels on Hopper, without a GPU.

    python benchmarks/kernel_resources.py --out benchmarks/results/kernel-resources-sm90.json

Compiles every variant of `tests/hopper_compile.py` (the launches the engine makes on the H200) for sm_90 and
reads the cubin's resource use with the `cuobjdump` that ships with Triton: registers per thread, stack bytes
(spills), shared memory, and how many programs of that kernel fit on one SM by registers (65536 per SM,
allocated per warp in units of 256) and by warps (64 per SM). This is how v18 found that the 8-warp select at
BLOCK_D 16384 holds an SM's whole register file, so side programs compiled into its launch ran one per SM
(benchmarks/NOTES.md v18). The numbers are the local Triton's compiler's (the GPU image's may differ a little).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

REGS_PER_SM, WARPS_PER_SM, REG_UNIT = 65536, 64, 256


def programs_per_sm(regs: int, warps: int) -> int:
    """Programs of `warps` warps at `regs` registers per thread that fit on one SM (registers and warps only)."""
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    return min(REGS_PER_SM // (per_warp * warps), WARPS_PER_SM // warps)


def resources(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource line in cuobjdump's output:\n{out}")
    return {"registers": int(m[1]), "stack_bytes": int(m[2]), "shared_bytes": int(m[3])}


def v21_candidates() -> list:
    """The tilings the v21 per-site sweeps tried that are not defaults (benchmarks/decode_parts.py
    `SITE_CANDIDATES`, `GTILE_CANDIDATES`, the third dense round): dense o / down with the residual, gathered
    ungated (with the residual, as at o and down) and gated."""
    from larosa.kernels import triton_dense as td
    from larosa.kernels import triton_gemv as tg

    dense = [(td.dense_gemv_kernel, {"BN": bn, "BK": bk, "STAGES": 2, "PDL": True, "PREFETCH": True,
                                     "HAS_RES": True}, w) for bn, bk, w in ((16, 512, 4), (16, 1024, 8), (32, 256, 8))]
    gt = {"HAS_BIAS": False, "PDL": True}
    ungated = [(tg.gtile_gemv_kernel, {**gt, "GATED": False, "HAS_RES": True, "BLOCK_M": m, "BLOCK_N": n}, w)
               for m, n, w in ((128, 128, 4), (64, 256, 4), (64, 128, 2), (128, 64, 2), (32, 256, 2), (32, 256, 4),
                               (256, 128, 4))]
    gated = [(tg.gtile_gemv_kernel, {**gt, "GATED": True, "BLOCK_M": m, "BLOCK_N": n}, w)
             for m, n, w in ((64, 64, 4), (32, 128, 2), (32, 128, 4), (64, 32, 2), (32, 64, 2), (128, 64, 2))]
    return dense + ungated + gated


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--v21-candidates", action="store_true",
                    help="instead of the engine's launches: the v21 site sweeps' other tilings")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: this compiles the kernels")
    import triton

    import hopper_compile as hc

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows = []
    print("| kernel | constexprs | warps | registers | stack B | programs/SM |")
    print("|---|---|---|---|---|---|")
    for kernel, constexprs, warps in (v21_candidates() if args.v21_candidates else hc.CASES):
        r = resources(hc.compile_sm90(kernel, constexprs, warps).asm["cubin"], cuobjdump)
        r.update(kernel=kernel.fn.__name__, constexprs=constexprs, num_warps=warps,
                 programs_per_sm=programs_per_sm(r["registers"], warps))
        rows.append(r)
        print(f"| {r['kernel']} | {constexprs} | {warps} | {r['registers']} | {r['stack_bytes']} | "
              f"{r['programs_per_sm']} |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"target": "sm_90", "triton": triton.__version__, "rows": rows}, indent=1)
                            + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
