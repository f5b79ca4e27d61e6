"""Dense batch-1 GEMV that loads its first weight tiles before waiting for its input (v20: the dense decode step).

Each stand-alone cuBLAS GEMV launch of the decode step loses ~2.5 us to its ramp and tail on the H200
(`benchmarks/results/floor-h200-bf16.json`). A GEMV's weights do not depend on the kernel before it, only its
input does. Launched as a programmatic dependent (PDL, Hopper), each program here first lets its own dependents
launch, then loads its first `STAGES` weight tiles, and only then waits (`griddepcontrol.wait`) for the input:
the loads of the programs already resident overlap the previous kernel's tail. A chain of the LLaMA2-7B
shape's 128 GEMVs per token streams at 96 % of the copy bandwidth this way against cuBLAS's 85 %
(`benchmarks/dense_chain.py`, `results/dense-chain-h200.json`: 3200 vs 3634 us per token).

So that every launch of the decode step's chain is one of these, the block's other work rides in them:

    y = (norm(x) @ w.T + bias) + residual                 one projection
    y = silu(norm(x) @ w.T) * (norm(x) @ w_up.T)          gate/up (w_up given)

norm(x) = x / rms(x) * g (RMSNorm, weight g): each program sums x^2 over the input it loads anyway and scales
its fp32 sums once at the end, y = rsqrt(mean(x^2) + eps) * sum_k w[n, k] g[k] x[k] (HF rounds the normalised
input to the dtype first: within one rounding). Bias, SiLU * up and the residual are added in fp32 before
the one rounding of the output.

w (n_out, d) output-major (F.linear's layout: each output's weights one contiguous row), x (rows, d).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .triton_gemv import (DECODE_SITES, _interpreted_bf16, _round, _use_pdl, decode_site, gdc_launch_dependents,
                          gdc_wait, parse_tiles, site_specs)

# BN outputs per program, BK inputs per step, STAGES steps loaded at once, warps per program. v19 experiment
# at 2 warps (dense-chain-h200.json, plain GEMVs): (2, 2048, 2) 3200 us per token, (4, 1024, 2) 3277,
# (8, 512, 2) 3861, cuBLAS 3634. With the block's parts in the launches (v20, dense-chain-block-h200.json)
# (4, 1024, 2, 4) 3649 us, (2, 2048, 2, 2) 3798, (2, 2048, 2, 4) 4134; end to end (dense-kernel-h200.json,
# LLaMA2-7B dense) 244.1 tok/s vs 215.9 / 211.4, cuBLAS 224.6. With the norm weights of ones not loaded
# (dense-tiles-h200.json, one run, two alternations, one tiling for every site): (8, 512, 2, 4) 264.3 tok/s,
# (4, 1024, 2, 2) 259.4, (4, 1024, 2, 4) 255.6, (2, 2048, 2, 2) 246.4, cuBLAS 225.2. Gate/up's BN is per
# matrix (each program reads BN rows of each).
DENSE_TILES = (8, 512, 2, 4)
# The sites of a decode step (`triton_gemv.decode_site`, by shape), each with its tiles. v21 (dense-sites-h200.json,
# LLaMA2-7B dense, greedy site after site from DENSE_TILES): down 264.7 -> 270.2 tok/s at (16, 512, 2, 8) (one
# 8-warp program per SM, 181 registers), then o 270.3 -> 273.9 at (16, 512, 2, 8); q/k/v and the head best at
# DENSE_TILES (the head's five tilings within 0.3 tok/s); gate/up (2, 1024, 2, 2) 264.6 vs 264.1. All together vs
# DENSE_TILES everywhere: 273.8 vs 264.2 tok/s (LLaMA2-7B), 242.3 vs 233.7 (LLaMA3-8B); a second round around
# these found nothing better (dense-sites2-h200.json). In the sm_90 compile (kernel-resources-sm90.json) gate/up
# at (2, 1024, 2, 2) spills 104 B where it loads a norm weight (real HF dense models), none with weights of ones
SITE_TILES = {"qkv": DENSE_TILES, "o": (16, 512, 2, 8), "gate_up": (2, 1024, 2, 2), "down": (16, 512, 2, 8),
              "head": DENSE_TILES}


def site_tiles() -> dict[str, tuple[int, int, int, int]]:
    """The tiles of every site: `SITE_TILES`, or as `LAROSA_DENSE_TILES` says (for A/B runs): "BN,BK,STAGES,WARPS"
    for every site (BN halved for gate/up), or "site=BN,BK,STAGES,WARPS;..." for the named sites only."""
    return dict(_site_tiles(os.environ.get("LAROSA_DENSE_TILES", "")))


@functools.lru_cache(maxsize=64)  # read at every launch outside a CUDA graph: parsed once per value
def _site_tiles(env: str) -> dict[str, tuple[int, int, int, int]]:
    if not env:
        return dict(SITE_TILES)
    if "=" not in env:
        t = parse_tiles(env, "LAROSA_DENSE_TILES", "BN,BK,STAGES,WARPS")
        return {s: (max(1, t[0] // 2), *t[1:]) if s == "gate_up" else t for s in DECODE_SITES}
    return {**SITE_TILES, **site_specs(env, "LAROSA_DENSE_TILES", DECODE_SITES, "BN,BK,STAGES,WARPS")}


def dense_tiles(d: int, n_out: int, gate_up: bool = False) -> tuple[int, int, int, int]:
    """The tiles of a GEMV of this shape: its site's (`triton_gemv.decode_site`, `site_tiles`)."""
    return site_tiles()[decode_site(d, n_out, gate_up)]


@triton.jit
def _x_tile(x_row, g_ptr, kk, d, HAS_G: tl.constexpr):
    """Inputs kk of the row in fp32 (times the norm weight with HAS_G) and their squares."""
    km = kk < d
    xv = tl.load(x_row + kk, mask=km, other=0.0).to(tl.float32)
    sq = xv * xv
    if HAS_G:
        xv = xv * tl.load(g_ptr + kk, mask=km, other=0.0).to(tl.float32)
    return xv, sq


@triton.jit
def dense_gemv_kernel(x_ptr, w_ptr, y_ptr, d, n_out, stride_x, stride_w, stride_y,
                      BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr = False,
                      PREFETCH: tl.constexpr = True, ROUND_BF16: tl.constexpr = False,
                      w2_ptr=None, b_ptr=None, r_ptr=None, stride_r=0, g_ptr=None, eps=0.0,
                      GATE_UP: tl.constexpr = False, HAS_BIAS: tl.constexpr = False, HAS_RES: tl.constexpr = False,
                      NORM: tl.constexpr = False, HAS_G: tl.constexpr = False):
    """Program (n, r): outputs n * BN .. of row r (of each of w and w2 with GATE_UP). With PDL the program
    lets its dependents launch first; with PREFETCH it loads the first STAGES weight tiles before waiting
    for x (and the residual), else it waits first. NORM: scale the sums by rsqrt(mean(x^2) + eps), the
    squares summed as a vector over the steps and reduced once; HAS_G: times the norm weight g (else folded
    into w by the caller)."""
    r = tl.program_id(1).to(tl.int64)
    outs = tl.program_id(0) * BN + tl.arange(0, BN)
    omask = outs < n_out
    rk = tl.arange(0, BK)
    w_rows = w_ptr + outs.to(tl.int64)[:, None] * stride_w
    u_rows = w_rows
    if GATE_UP:
        u_rows = w2_ptr + outs.to(tl.int64)[:, None] * stride_w
    x_row = x_ptr + r * stride_x
    if PDL:
        gdc_launch_dependents()
        if not PREFETCH:
            gdc_wait()
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    acc2 = acc
    STEP: tl.constexpr = BK * STAGES
    # the first step's weight tiles (before the wait with PREFETCH), then its inputs
    m0 = omask[:, None] & (rk < d)[None, :]
    w0 = tl.load(w_rows + rk[None, :], mask=m0, other=0.0)
    w1 = w0
    u0 = w0
    u1 = w0
    if GATE_UP:
        u0 = tl.load(u_rows + rk[None, :], mask=m0, other=0.0)
    if STAGES > 1:
        m1 = omask[:, None] & (BK + rk < d)[None, :]
        w1 = tl.load(w_rows + (BK + rk)[None, :], mask=m1, other=0.0)
        if GATE_UP:
            u1 = tl.load(u_rows + (BK + rk)[None, :], mask=m1, other=0.0)
    if PDL:
        if PREFETCH:
            gdc_wait()
    xv, sq = _x_tile(x_row, g_ptr, rk, d, HAS_G)
    acc += w0.to(tl.float32) * xv[None, :]
    if GATE_UP:
        acc2 += u0.to(tl.float32) * xv[None, :]
    if STAGES > 1:
        xv, s1 = _x_tile(x_row, g_ptr, BK + rk, d, HAS_G)
        sq += s1
        acc += w1.to(tl.float32) * xv[None, :]
        if GATE_UP:
            acc2 += u1.to(tl.float32) * xv[None, :]
    for k0 in range(STEP, d, STEP):
        for s in tl.static_range(STAGES):
            kk = k0 + s * BK + rk
            mk = omask[:, None] & (kk < d)[None, :]
            w = tl.load(w_rows + kk[None, :], mask=mk, other=0.0)
            u = w
            if GATE_UP:
                u = tl.load(u_rows + kk[None, :], mask=mk, other=0.0)
            xv, s1 = _x_tile(x_row, g_ptr, kk, d, HAS_G)
            sq += s1
            acc += w.to(tl.float32) * xv[None, :]
            if GATE_UP:
                acc2 += u.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, 1)
    if NORM:
        inv = 1.0 / tl.sqrt(tl.sum(sq, 0) / d + eps)
        y = y * inv
    if HAS_BIAS:
        y += tl.load(b_ptr + outs, mask=omask, other=0.0).to(tl.float32)
    if GATE_UP:
        up = tl.sum(acc2, 1)
        if NORM:
            up = up * inv
        y = y / (1.0 + tl.exp(-y)) * up
    if HAS_RES:
        y += tl.load(r_ptr + r * stride_r + outs, mask=omask, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * stride_y + outs, _round(y, y_ptr.dtype.element_ty, ROUND_BF16), mask=omask)


def _check_vec(name: str, t: torch.Tensor | None, n: int, x: torch.Tensor) -> None:
    if t is not None and (t.shape != (n,) or t.stride(0) != 1 or t.device != x.device):
        raise ValueError(f"{name} must be a contiguous ({n},) vector on {x.device}, got {tuple(t.shape)}")


def dense_gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, pdl: bool | None = None,
               prefetch: bool = True, tiles: tuple[int, ...] | None = None, *, w_up: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
               norm_w: torch.Tensor | None = None, eps: float = 0.0, rms: bool | None = None) -> torch.Tensor:
    """x (rows, d) @ w.T with w (n_out, d) contiguous: (rows, n_out) in x's dtype, or into `out`.

    norm_w: RMSNorm x first (weight norm_w (d,), `eps`); rms: the norm's scaling even without norm_w (its
    weight folded into w's columns by the caller; default: norm_w given); w_up (n_out, d): silu(. @ w.T) *
    (. @ w_up.T); bias (n_out,) (not with w_up); residual (rows, n_out): added last. All in fp32, one
    rounding.
    `pdl`: launch as a programmatic dependent of the kernel before (default where the GPU supports it, never
    under the interpreter, off with `LAROSA_DENSE_PDL=0`); `prefetch`: load the first weight tiles before waiting
    for x (only with PDL; off with `LAROSA_DENSE_PDL=noprefetch`).
    `tiles`: (BN, BK, STAGES[, WARPS]), BN and BK powers of two, STAGES 1 or 2, WARPS 1-8 (default 4); None =
    the tiles of the shape's site (`dense_tiles`; BN rows of each matrix with w_up)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"expected x (rows, d) and w (n_out, d), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.stride(1) != 1 or not w.is_contiguous():
        raise ValueError("x needs unit stride along d and w must be contiguous")
    if w_up is not None and (w_up.shape != w.shape or not w_up.is_contiguous()):
        raise ValueError(f"w_up must be contiguous and shaped like w {tuple(w.shape)}, got {tuple(w_up.shape)}")
    if w_up is not None and bias is not None:
        raise ValueError("bias is not supported with w_up")
    if tiles is None:
        tiles = dense_tiles(x.shape[1], w.shape[0], w_up is not None)
    if len(tiles) not in (3, 4):
        raise ValueError(f"tiles must be (BN, BK, STAGES[, WARPS]), got {tiles}")
    bn, bk, stages, warps = tuple(tiles) + (4,) * (len(tiles) == 3)
    if (bn < 1 or bk < 16 or bn & (bn - 1) or bk & (bk - 1) or stages not in (1, 2)
            or warps not in (1, 2, 4, 8)):
        raise ValueError(f"tiles must be (BN, BK, STAGES[, WARPS]) with BN, BK powers of two (BK >= 16), STAGES 1 "
                         f"or 2, WARPS 1, 2, 4 or 8, got {tiles}")
    rows, d = x.shape
    n_out = w.shape[0]
    _check_vec("bias", bias, n_out, x)
    _check_vec("norm_w", norm_w, d, x)
    if residual is not None and (residual.shape != (rows, n_out) or residual.stride(1) != 1):
        raise ValueError(f"residual must be ({rows}, {n_out}) with unit stride, got {tuple(residual.shape)}")
    if out is None:
        out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    elif out.shape != (rows, n_out) or out.stride(1) != 1 or out.device != x.device:
        raise ValueError(f"out must be ({rows}, {n_out}) with unit stride on {x.device}, got {tuple(out.shape)}")
    mode = os.environ.get("LAROSA_DENSE_PDL", "1")  # v28 diagnostic: "0" no PDL, "noprefetch" PDL, no prefetch
    if mode not in ("1", "0", "noprefetch"):
        raise ValueError(f"LAROSA_DENSE_PDL must be 1, 0 or noprefetch, got {mode!r}")
    use_pdl = _use_pdl(x, pdl if pdl is not None or mode != "0" else False)
    prefetch = prefetch and mode != "noprefetch"
    dense_gemv_kernel[(triton.cdiv(n_out, bn), rows)](
        x, w, out, d, n_out, x.stride(0), w.stride(0), out.stride(0), BN=bn, BK=bk, STAGES=stages,
        ROUND_BF16=_interpreted_bf16(out), w2_ptr=w_up, b_ptr=bias, r_ptr=residual,
        stride_r=0 if residual is None else residual.stride(0), g_ptr=norm_w, eps=float(eps),
        GATE_UP=w_up is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        NORM=norm_w is not None if rms is None else bool(rms), HAS_G=norm_w is not None,
        num_warps=warps, **({"PDL": True, "PREFETCH": bool(prefetch), "launch_pdl": True} if use_pdl else {}))
    return out
