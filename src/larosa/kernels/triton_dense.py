"""Dense batch-1 GEMV that loads its first weight tiles before waiting for its input (experiment, v19).

The dense bar of the decode engine (273 tok/s on the LLaMA2-7B shape) lies below what cuBLAS's GEMVs alone
allow on the H200 (3.79 ms of a 3.66 ms token): each stand-alone launch loses ~2.5 us to its ramp and tail
(`benchmarks/results/floor-h200-bf16.json`). A GEMV's weights do not depend on the kernel before it, only
its input does. Launched as a programmatic dependent (PDL, Hopper), each program here first lets its own
dependents launch, then loads its first `STAGES` weight tiles, and only then waits (`griddepcontrol.wait`)
for the input: the loads of the programs that are already resident overlap the previous kernel's tail.
`benchmarks/dense_chain.py` measures chains of these against cuBLAS before the engine uses them.

y[r, n] = sum_k x[r, k] w[n, k]: w (n_out, d) output-major (F.linear's layout, each output's weights one
contiguous row), x (rows, d), fp32 accumulation in a 2-D register tile, one rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gemv import _interpreted_bf16, _round, _use_pdl, gdc_launch_dependents, gdc_wait

DENSE_TILES = (4, 1024, 2)  # BN outputs per program, BK inputs per step, STAGES steps loaded at once


@triton.jit
def dense_gemv_kernel(x_ptr, w_ptr, y_ptr, d, n_out, stride_x, stride_w, stride_y,
                      BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr = False,
                      PREFETCH: tl.constexpr = True, ROUND_BF16: tl.constexpr = False):
    """Program (n, r): outputs n * BN .. of row r. With PDL the program lets its dependents launch first;
    with PREFETCH it loads the first STAGES weight tiles before waiting for x, else it waits first."""
    r = tl.program_id(1).to(tl.int64)
    outs = tl.program_id(0) * BN + tl.arange(0, BN)
    omask = outs < n_out
    rk = tl.arange(0, BK)
    w_rows = w_ptr + outs.to(tl.int64)[:, None] * stride_w
    x_row = x_ptr + r * stride_x
    if PDL:
        gdc_launch_dependents()
        if not PREFETCH:
            gdc_wait()
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    STEP: tl.constexpr = BK * STAGES
    # the first step's weight tiles (before the wait with PREFETCH), then its inputs
    w0 = tl.load(w_rows + rk[None, :], mask=omask[:, None] & (rk < d)[None, :], other=0.0)
    w1 = w0
    if STAGES > 1:
        w1 = tl.load(w_rows + (BK + rk)[None, :], mask=omask[:, None] & (BK + rk < d)[None, :], other=0.0)
    if PDL:
        if PREFETCH:
            gdc_wait()
    acc += w0.to(tl.float32) * tl.load(x_row + rk, mask=rk < d, other=0.0).to(tl.float32)[None, :]
    if STAGES > 1:
        acc += w1.to(tl.float32) * tl.load(x_row + BK + rk, mask=BK + rk < d, other=0.0).to(tl.float32)[None, :]
    for k0 in range(STEP, d, STEP):
        for s in tl.static_range(STAGES):
            kk = k0 + s * BK + rk
            km = kk < d
            w = tl.load(w_rows + kk[None, :], mask=omask[:, None] & km[None, :], other=0.0)
            acc += w.to(tl.float32) * tl.load(x_row + kk, mask=km, other=0.0).to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    tl.store(y_ptr + r * stride_y + outs, _round(y, y_ptr.dtype.element_ty, ROUND_BF16), mask=omask)


def dense_gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, pdl: bool | None = None,
               prefetch: bool = True, tiles: tuple[int, int, int] = DENSE_TILES) -> torch.Tensor:
    """x (rows, d) @ w.T with w (n_out, d) contiguous: (rows, n_out) in x's dtype, or into `out`. `pdl`:
    launch as a programmatic dependent of the kernel before (default where the GPU supports it, never under
    the interpreter); `prefetch`: load the first weight tiles before waiting for x (only with PDL).
    `tiles`: (BN, BK, STAGES), BN and BK powers of two, STAGES 1 or 2."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x (rows, d) and w (n_out, d), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.stride(1) != 1 or not w.is_contiguous():
        raise ValueError("x needs unit stride along d and w must be contiguous")
    bn, bk, stages = tiles
    if bn < 1 or bk < 16 or bn & (bn - 1) or bk & (bk - 1) or stages not in (1, 2):
        raise ValueError(f"tiles must be (BN, BK, STAGES) with BN, BK powers of two (BK >= 16), STAGES 1 or 2, "
                         f"got {tiles}")
    rows, d = x.shape
    n_out = w.shape[0]
    if out is None:
        out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    elif out.shape != (rows, n_out) or out.stride(1) != 1 or out.device != x.device:
        raise ValueError(f"out must be ({rows}, {n_out}) with unit stride on {x.device}, got {tuple(out.shape)}")
    use_pdl = _use_pdl(x, pdl)
    dense_gemv_kernel[(triton.cdiv(n_out, bn), rows)](
        x, w, out, d, n_out, x.stride(0), w.stride(0), out.stride(0), BN=bn, BK=bk, STAGES=stages,
        ROUND_BF16=_interpreted_bf16(out), num_warps=2,
        **({"PDL": True, "PREFETCH": bool(prefetch), "launch_pdl": True} if use_pdl else {}))
    return out
