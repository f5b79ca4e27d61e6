"""Triton Top-K sparse GEMV: y = TopK_k(x) @ W^T with W stored input-major (W^T contiguous, d_in x d_out).

One program owns BLOCK_N output columns of one row of x and walks all input channels, so no reduction
across programs is needed (no atomics, bf16 and fp16 alike, fp32 accumulate, one launch per op).
Selection is part of the op: every program finds the exact threshold of its row itself from x (which
sits in L2), with a two-level radix select on the 15-bit magnitude pattern of the 16-bit float:
  pass 1  histogram of the top 8 bits  -> the bin b1 holding the k-th largest |x|
  pass 2  histogram of the low 7 bits of the elements in b1 -> the exact threshold pattern t
  pass 3  among entries with pattern == t, the lower indices win until exactly k are kept
Then a weight row W^T[i, cols] is loaded only when x_i is kept (masked loads: skipped rows cost no
memory traffic), so bytes read ~ k * d_out * 2. Work per call is fixed by k: no host sync, no index list.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _select_threshold(x_row, d_in, k, BLOCK_S: tl.constexpr):
    """(t, cutoff): keep i iff bits_i > t or (bits_i == t and i < cutoff); exactly k kept."""
    bins = tl.arange(0, 256)
    h1 = tl.zeros([256], dtype=tl.int32)
    for c in range(0, d_in, BLOCK_S):
        offs = c + tl.arange(0, BLOCK_S)
        x = tl.load(x_row + offs, mask=offs < d_in, other=0.0)
        bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        h1 += tl.histogram(bits >> 7, 256)
    ge1 = tl.cumsum(h1, 0, reverse=True)
    b1 = tl.sum((ge1 >= k).to(tl.int32), 0) - 1
    above1 = tl.sum(tl.where(bins > b1, h1, 0), 0)
    h2 = tl.zeros([256], dtype=tl.int32)
    for c in range(0, d_in, BLOCK_S):
        offs = c + tl.arange(0, BLOCK_S)
        x = tl.load(x_row + offs, mask=offs < d_in, other=0.0)
        bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        h2 += tl.histogram(tl.where((bits >> 7) == b1, bits & 127, 128), 256)
    h2 = tl.where(bins < 128, h2, 0)
    ge2 = tl.cumsum(h2, 0, reverse=True)
    need = k - above1
    b2 = tl.sum((ge2 >= need).to(tl.int32), 0) - 1
    t = b1 * 128 + b2
    need_eq = need - tl.sum(tl.where(bins > b2, h2, 0), 0)
    cutoff = d_in
    if need_eq < tl.sum(tl.where(bins == b2, h2, 0), 0):  # ties at t: lower indices first
        seen = 0
        cutoff = 0
        for c in range(0, d_in, BLOCK_S):
            offs = c + tl.arange(0, BLOCK_S)
            x = tl.load(x_row + offs, mask=offs < d_in, other=0.0)
            bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
            eq = ((bits == t) & (offs < d_in)).to(tl.int32)
            rank = tl.cumsum(eq, 0) + seen
            hit = (eq > 0) & (rank == need_eq)
            cutoff = tl.maximum(cutoff, tl.max(tl.where(hit, offs + 1, 0), 0))
            seen += tl.sum(eq, 0)
    return t, cutoff


@triton.jit
def sparse_gemv_kernel(x_ptr, wt_ptr, wt2_ptr, bias_ptr, y_ptr, d_in, d_out, k, threshold,
                       stride_x, stride_y,
                       MODE: tl.constexpr,  # 0: exact Top-K, 1: |x| > threshold (TEAL-style), 2: dense
                       GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + row * stride_x
    t = 0
    cutoff = 0
    if MODE == 0:
        t, cutoff = _select_threshold(x_row, d_in, k, BLOCK_S)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < d_out
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        valid = offs < d_in
        xv = tl.load(x_row + offs, mask=valid, other=0.0)
        if MODE == 0:
            bits = xv.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
            keep = valid & ((bits > t) | ((bits == t) & (offs < cutoff)))
        elif MODE == 1:
            keep = valid & (tl.abs(xv.to(tl.float32)) > threshold)
        else:
            keep = valid
        xf = tl.where(keep, xv.to(tl.float32), 0.0)
        wmask = keep[:, None] & cmask[None, :]
        w_off = offs.to(tl.int64)[:, None] * d_out + cols[None, :]
        w = tl.load(wt_ptr + w_off, mask=wmask, other=0.0)
        acc += tl.sum(xf[:, None] * w.to(tl.float32), axis=0)
        if GATED:
            w2 = tl.load(wt2_ptr + w_off, mask=wmask, other=0.0)
            acc2 += tl.sum(xf[:, None] * w2.to(tl.float32), axis=0)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc2
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, acc.to(y_ptr.dtype.element_ty), mask=cmask)


def launch(x, wt, y, k: int, *, wt2=None, bias=None, threshold: float = 0.0, mode: int = 0,
           block_k: int | None = None, block_n: int | None = None, num_warps: int | None = None,
           num_stages: int | None = None) -> None:
    """x (B, d_in) contiguous rows, wt (d_in, d_out) contiguous, y (B, d_out)."""
    rows, d_in = x.shape
    d_out = wt.shape[1]
    cfg = default_config(d_in, d_out)
    block_n = block_n or cfg["block_n"]
    block_k = block_k or cfg["block_k"]
    kwargs = {"num_warps": num_warps or cfg["num_warps"], "num_stages": num_stages or cfg["num_stages"]}
    grid = (triton.cdiv(d_out, block_n), rows)
    sparse_gemv_kernel[grid](
        x, wt, wt2 if wt2 is not None else wt, bias if bias is not None else wt, y, d_in, d_out, k,
        float(threshold), x.stride(0), y.stride(0),
        MODE=mode, GATED=wt2 is not None, HAS_BIAS=bias is not None,
        BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_S=1024, **kwargs)


def default_config(d_in: int, d_out: int) -> dict:
    """Tile sizes chosen from the H200 sweep in benchmarks/gemv.py (see benchmarks/NOTES.md)."""
    return {"block_n": 32 if d_out <= 8192 else 64, "block_k": 128, "num_warps": 4, "num_stages": 4}
