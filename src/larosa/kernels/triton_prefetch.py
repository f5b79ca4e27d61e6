"""L2 prefetch of a Top-K GEMV's likely rows while its select runs (v23).

A Top-K select is one program per row: for the 5-10 us it takes, one SM works and the memory system idles,
because the GEMV after it cannot load a weight row before the select has said which rows are kept. The
rows kept at this token are mostly the rows whose magnitude reaches the site's threshold at the previous
token (the select's hint slot holds that threshold). So extra programs of the select launch read the row of
x themselves (for a norm + select site: x + res, normalised with its own sum of squares and scaled by the
norm weight, as the select does), find the rows at or above the previous threshold, and issue
`cp.async.bulk.prefetch.L2` for those rows of the GEMV's input-major weights (Hopper: a bulk copy engine
request per piece, no registers, no completion to wait for). The GEMV, launched as the select's
programmatic dependent, then finds most of its rows in L2.

Only the *time* changes: the select and the GEMV compute exactly what they compute without it (a wrong
guess costs bandwidth, never a result). The budget (`LAROSA_PREFETCH_MB`, per launch, read when a launch is
made or captured) keeps the prefetched bytes within what the select's duration can move and the L2 can hold:
only the rows below a limit are considered, lowest first, the order in which the GEMV's programs are dispatched
(its kept list is ascending).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# default budget per select launch, MiB of weight rows (0: off). H200, LaRoSA at the 0.8 / 1.2 split, LLaMA2-7B
# shape, p = 0.4 / 0.5 / 0.75, two alternations in one run (benchmarks/results/history/prefetch-v23/run2-hot-pieces/
# prefetchx-*): 0 MiB 254.0 / 274.6 / 337.8 tok/s, 4 MiB 258.2 / 279.4 / 344.6, 8 MiB 259.2 / 280.0 / 344.8,
# 12 MiB 258.9 / 279.0 / 340.3; 24 MiB no gain (run1-budgets/prefetch-e2e-*). 8 MiB with one piece per row:
# 226.7 / 247.2 / 315.8 (-11 %), with 32: 257.5 / 276.3 / 337.1.
PREFETCH_MB = 8.0
PF_CHUNKS = 8  # pieces per weight row, one bulk prefetch each (a thread per piece); LAROSA_PREFETCH_CHUNKS


@triton.jit
def _bulk_prefetch_l2(ptrs, nbytes, mask):
    """`cp.async.bulk.prefetch.L2.global [ptr], nbytes` where mask (sm_90+; 16-byte aligned, nbytes a
    multiple of 16). Fire and forget: nothing waits for it. Not for the interpreter (no PTX there)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $3, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
                              "mov.b32 $0, 0; }",
                              "=r,l,r,r", [ptrs, nbytes, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_program(j, x_ptr, res_ptr, w_ptr, eps, d_in, hint_ptr, w1_ptr, w2_ptr, rec_ptr, row_bytes, chunk,
                     limit, NORM: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr, PF: tl.constexpr,
                     PF_ROWS: tl.constexpr, PF_CHUNKS: tl.constexpr, TWO: tl.constexpr):
    """Program j of a select launch's prefetch: input rows j * PF_ROWS.. (below limit) of the launch's one row of x.
    NORM: the select's input is w * RMSNorm(x (+ res)) (computed here in fp32, rounded to x's dtype; a hint
    needs no exact rounding). A row is guessed kept where its 15-bit magnitude pattern reaches the hint slot's
    low half (the site's threshold at the previous call). PF bit 0: prefetch those rows of w1 (and w2 with
    TWO), each row_bytes long, in PF_CHUNKS pieces of `chunk` bytes; bit 1 (tests): store the guess, 1 or 0,
    to rec_ptr[row]."""
    rows = j * PF_ROWS + tl.arange(0, PF_ROWS)
    live = rows < limit
    x = tl.load(x_ptr + rows, mask=live, other=0.0)
    if NORM:
        full = tl.arange(0, BLOCK_D)
        fv = full < d_in
        xa = tl.load(x_ptr + full, mask=fv, other=0.0).to(tl.float32)
        xf = x.to(tl.float32)
        if HAS_RES:
            xa += tl.load(res_ptr + full, mask=fv, other=0.0).to(tl.float32)
            xf += tl.load(res_ptr + rows, mask=live, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(xa * xa, 0) / d_in + eps)
        wn = tl.load(w_ptr + rows, mask=live, other=0.0).to(tl.float32)
        x = (xf * inv * wn).to(x_ptr.dtype.element_ty)
    pat = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    keep = live & (pat >= (tl.load(hint_ptr) & 0x7FFF))
    if PF & 2:
        tl.store(rec_ptr + rows, keep.to(tl.int32), mask=live)
    if PF & 1:
        start = tl.arange(0, PF_CHUNKS) * chunk
        n = tl.minimum(chunk, row_bytes - start)
        nb = n[None, :] + tl.zeros((PF_ROWS, 1), tl.int32)
        m = keep[:, None] & (nb > 0)
        off = rows.to(tl.int64)[:, None] * row_bytes + start[None, :]
        _bulk_prefetch_l2(w1_ptr.to(tl.pointer_type(tl.int8)) + off, nb, m)
        if TWO:
            _bulk_prefetch_l2(w2_ptr.to(tl.pointer_type(tl.int8)) + off, nb, m)


class Prefetch(NamedTuple):
    """The prefetch riding in a select launch: the GEMV's weights w1 (and w2, the gated op's up half), both
    (d_in, d_out) input-major and contiguous; input rows [0, limit) are considered. mode: 1 prefetch
    (compiled kernels), 2 record the guess in `record` (an int32 (d_in,) buffer; tests, the interpreter too),
    3 both."""

    w1: torch.Tensor
    w2: torch.Tensor | None
    limit: int
    mode: int = 1
    record: torch.Tensor | None = None


TOPK_SITES = ("qkv", "o", "gate_up", "down")  # the Top-K sites of `triton_gemv.decode_site` (its DECODE_SITES
# adds the head); defined here because triton_gemv imports this module


def _mb(raw: str, env: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not 0.0 <= v <= 1024.0:
        raise ValueError(f"{env}={raw!r}: use a number of MiB from 0 (off) to 1024")
    return v


def prefetch_mb(site: str | None = None) -> float:
    """The prefetch budget per select launch in MiB of weight rows (`LAROSA_PREFETCH_MB`, default `PREFETCH_MB`;
    0 = off). v31, for A/B runs: the value may also name sites, "8,o=0" (8 MiB, none at the o site) or "o=4" (the
    default elsewhere); `site` (a `TOPK_SITES` name) picks its budget, None the one for unnamed sites."""
    env = "LAROSA_PREFETCH_MB"
    raw = os.environ.get(env, str(PREFETCH_MB))
    default, sites = PREFETCH_MB, {}
    for item in (v.strip() for v in raw.split(",")):
        name, eq, value = item.rpartition("=")
        if not eq:
            default = _mb(item, env)
        elif name.strip() in TOPK_SITES:
            sites[name.strip()] = _mb(value.strip(), env)
        else:
            raise ValueError(f"{env}={raw!r}: unknown site {name.strip()!r} (sites: {', '.join(TOPK_SITES)})")
    return sites.get(site, default) if site is not None else default


def prefetch_chunks() -> int:
    """Pieces per weight row, one bulk prefetch each (`LAROSA_PREFETCH_CHUNKS`, default `PF_CHUNKS`; a power of
    two from 1 to 32)."""
    raw = os.environ.get("LAROSA_PREFETCH_CHUNKS", str(PF_CHUNKS))
    if raw not in {str(1 << i) for i in range(6)}:
        raise ValueError(f"LAROSA_PREFETCH_CHUNKS={raw!r}: use a power of two from 1 to 32")
    return int(raw)


def can_prefetch(device: torch.device) -> bool:
    """Whether compiled kernels on `device` can issue the bulk L2 prefetch: CUDA, compute capability 9+, and not
    the interpreter (which runs no PTX)."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _aligned(w: torch.Tensor | None) -> bool:
    return w is None or (w.is_contiguous() and w.data_ptr() % 16 == 0 and w.shape[1] * w.element_size() % 16 == 0)


def plan(x: torch.Tensor, wt: torch.Tensor, wt2: torch.Tensor | None, k: int,
         hint: torch.Tensor | None, site: str | None = None) -> Prefetch | None:
    """The prefetch for a Top-K launch over the rows x with weights wt (wt2), or None: it needs the budget
    (`prefetch_mb`), a hint slot (the previous threshold), one row, a compiled CUDA kernel (sm_90+) and
    16-byte aligned weight rows. The row limit spends the budget on the lowest rows, assuming k / d_in of
    them are kept. `site` (a `TOPK_SITES` name, or None) picks a per-site budget where one is set."""
    budget = prefetch_mb(site)
    if budget <= 0 or hint is None or x.shape[0] != 1 or not can_prefetch(x.device):
        return None
    if not (_aligned(wt) and _aligned(wt2)):
        return None
    d_in = x.shape[1]
    per_row = wt.shape[1] * wt.element_size() * (2 if wt2 is not None else 1)
    limit = min(d_in, int(budget * 2**20 * d_in / (per_row * max(1, min(k, d_in)))))
    return Prefetch(wt, wt2, limit) if limit > 0 else None


def kernel_args(pf: Prefetch | None, x: torch.Tensor, num_warps: int, start: int) -> tuple[int, dict]:
    """(programs, kernel arguments) of a select launch's prefetch whose programs begin at grid index `start`;
    (0, {}) without one. One row of x only."""
    if pf is None:
        return 0, {}
    w1, w2, limit, mode, rec = pf
    d_in = x.shape[1]
    if x.shape[0] != 1:
        raise ValueError(f"the prefetch rides with a one-row select, got {x.shape[0]} rows")
    if w1.dim() != 2 or w1.shape[0] != d_in or (w2 is not None and w2.shape != w1.shape):
        raise ValueError(f"prefetch: weights {tuple(w1.shape)} must be (d_in = {d_in}, d_out), w2 the same")
    if not 0 <= limit <= d_in or mode not in (1, 2, 3) or (mode & 2 and (rec is None or rec.numel() < d_in
                                                                          or rec.dtype != torch.int32)):
        raise ValueError(f"prefetch: limit {limit} (0..{d_in}), mode {mode} (1-3, 2 and 3 with an int32 record of "
                         f"{d_in})")
    if mode & 1 and not (_aligned(w1) and _aligned(w2)):
        raise ValueError("prefetch: weight rows must be contiguous and 16-byte aligned")
    chunks = prefetch_chunks()
    rows = 32 * num_warps // chunks  # PF_ROWS x PF_CHUNKS = one piece per thread
    row_bytes = w1.shape[1] * w1.element_size()
    chunk = triton.cdiv(triton.cdiv(row_bytes, chunks), 16) * 16
    return triton.cdiv(limit, rows), dict(
        pf_start=start, pf_w1_ptr=w1, pf_w2_ptr=w2 if w2 is not None else w1,
        pf_rec_ptr=rec if rec is not None else w1,
        pf_row_bytes=row_bytes, pf_chunk=chunk, pf_limit=limit, PF=mode, PF_ROWS=rows, PF_CHUNKS=chunks,
        PF_TWO=w2 is not None)
