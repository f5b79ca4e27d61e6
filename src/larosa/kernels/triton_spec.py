"""Speculative Top-K GEMV (v22, `impl="spec"`): the weights stream while the select still runs.

In the two-launch Top-K op (`triton_gemv`) the GEMV cannot load a weight row before the select has found
(t, cutoff): the select (5-14 us, one program per row, latency-bound) sits on the critical path of every
projection. But x is complete before the select starts, and the threshold of a site barely moves from one
token to the next. So here:

1. the select (`select_spec_kernel`, one program per row, the packed bisection of `triton_gemv`) reads the
   row's threshold at the previous call h from its hint slot's low half, puts it in the high half (this call's
   guess), lets the GEMV launch (PDL), finds the exact (t, cutoff), stores t in the low half, and writes the
   *fix list*: the positions where the exact keep mask differs from the guess "pattern >= h" (rows near the
   threshold; few when t is close to h);
2. every GEMV program (`spec_gemv_kernel`, BN output columns, all inputs) reads the guess from the slot's high
   half and, without waiting for the select, sums x_i W^T[i, cols] over the guessed rows (masked loads:
   unguessed rows cost no memory traffic). Then it waits for the select (`griddepcontrol.wait`), and adds the
   kept rows of the fix list and subtracts the guessed ones that are not kept: the result is exactly the Top-K
   product, in fp32, one rounding.

The guess must be the select's: the select writes the h it used (sel[2]); a program that read another value
walks all rows for its corrections instead of the list. Any hint gives the same result; only the time changes.
(A first version kept a plain t in the slot, which the select overwrote while GEMV programs were still to read it:
those took the slow path, results/history/spec-v22a.)

Measured (H200, bf16, batch 1, benchmarks/NOTES.md v22): at the LLaMA o projection the blocked form (`spec_layout`)
beats the gathered GEMV per op, its select included (13.9 vs 15.1 us at p = 0.5), but the decode step with it was
1.5-3 % slower, so the engine does not use it by default (`DecodeEngine(spec=)`, `LAROSA_SPEC=1`). Its programs
walk all d_in rows, so its time hardly falls with k, unlike the gathered GEMV's.

sel rows are 4 + d_in wide: t, cutoff, h, n_fix, then the fix list (ascending), each entry the position (low 16
bits) and x there (high 16 bits), its sign flipped where the row is to be subtracted: after its wait a program
needs one round trip for the header and the list's first entries, and one for their weight rows. Column-complete programs: no
atomics, no counters, no workspace; bias and the residual are added in the epilogue. Ungated only.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .triton_gemv import (_interpreted_bf16, _packed_select, _round, _scatter_i32_at,
                          _side_program, _use_pdl, gdc_launch_dependents, gdc_wait, parse_tiles, select_warps,
                          select_window, side_config, SideGemv, _side_args)

# BN outputs per program, BK inputs per step, STAGES steps loaded at once, warps, BM list entries per step. v22 per-op
# sweep (benchmarks/spec_ab.py, results/history/spec-v22a/run2-blocked-sweep, LLaMA2-7B o at p = 0.5, blocked
# weights): (16, 512, 4, 8) 13.10 us, (32, 512, 4, 8) 13.33, (16, 256, 4, 8) 16.8 (input-major weights: at best
# 17.45, run1-input-major); a later sweep with BK up to 1024 (run3-blocked-racing-hint) put (16, 512, 4, 4) first
# at 13.23, within 0.2 us of the next five, this one among them
SPEC_TILES = (16, 512, 4, 8, 64)
SEL_HEAD = 4  # t, cutoff, h, n_fix
NO_GUESS = 0x8000  # a hint above every 15-bit pattern: the guess keeps no row


def spec_tiles() -> tuple[int, int, int, int, int]:
    """`SPEC_TILES`, or `LAROSA_SPEC_TILES="BN,BK,STAGES,WARPS,BM"` (A/B runs)."""
    return _spec_tiles(os.environ.get("LAROSA_SPEC_TILES", ""))


@functools.lru_cache(maxsize=16)  # read at every call outside a CUDA graph: parsed once per value
def _spec_tiles(raw: str) -> tuple[int, int, int, int, int]:
    if not raw:
        return SPEC_TILES
    t = parse_tiles(raw, "LAROSA_SPEC_TILES", "BN,BK,STAGES,WARPS,BM")
    if (any(v < 1 or v & (v - 1) for v in (t[0], t[1], t[4])) or not 1 <= t[2] <= 4
            or t[3] not in (1, 2, 4, 8)):
        raise ValueError(f"LAROSA_SPEC_TILES={raw!r}: BN,BK,STAGES,WARPS,BM with BN, BK, BM powers of two, "
                         "STAGES 1-4, WARPS 1, 2, 4 or 8")
    return t


def spec_window() -> int:
    """The spec select's hinted search window (log2 patterns): `LAROSA_SPEC_WINDOW`, else the package's
    `select_window()`; 0 = the full 15-count search (the hint then serves the guess only)."""
    raw = os.environ.get("LAROSA_SPEC_WINDOW")
    if raw is None:
        return select_window()
    if not raw.strip().isdigit() or not 0 <= int(raw) <= 14:
        raise ValueError(f"LAROSA_SPEC_WINDOW={raw!r}: use an integer from 0 (off) to 14")
    return int(raw)


@triton.jit
def _pattern(xv):
    """The 15-bit magnitude pattern of 16-bit floats (the select's order)."""
    return xv.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF


@triton.jit
def select_spec_kernel(x_ptr, sel_ptr, hint_ptr, d_in, k, stride_x, stride_sel, BLOCK_D: tl.constexpr,
                       PDL: tl.constexpr = False, WINDOW: tl.constexpr = 0, ASM: tl.constexpr = False):
    """One program per row: (t, cutoff) as `select_packed_kernel`, the hint h it read, and the fix list
    against the guess pattern >= h (see the module docstring). The row's hint slot becomes t."""
    row = tl.program_id(0).to(tl.int64)
    h = tl.load(hint_ptr + row) & 0xFFFF  # the previous call's t: this call's guess
    # the guess into the slot's high half before the GEMV can start; its programs read it there, and it stays
    # until the next call's select (the low half gets this call's t at the end)
    old = tl.atomic_xchg(hint_ptr + row, (h << 16) | h)
    if PDL:
        if old != 0x5EC0FFEE:  # after the exchange has returned (a use of its value), whatever the value
            gdc_launch_dependents()
    offs = tl.arange(0, BLOCK_D)
    valid = offs < d_in
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0)
    t, cutoff = _packed_select(x, valid, k, BLOCK_D, 14, hint_ptr + row, WINDOW, True, None, False, True)
    if WINDOW == 0:  # the windowed search stores t itself
        tl.store(hint_ptr + row, (h << 16) | t)
    # the fix list, two entries per lane (as the packed select's tie prefix sum); each entry carries the position
    # (low 16 bits) and the 16-bit x there, its sign flipped where the guess took a row Top-K drops (high 16 bits)
    bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    b_lo, b_hi = tl.split(tl.reshape(bits, (BLOCK_D // 2, 2)))
    lo = b_lo & 0x7FFF
    hi = b_hi & 0x7FFF
    v_lo, v_hi = tl.split(tl.reshape(valid.to(tl.int32), (BLOCK_D // 2, 2)))
    lane = tl.arange(0, BLOCK_D // 2)
    k_lo = (v_lo > 0) & ((lo > t) | ((lo == t) & (2 * lane < cutoff)))
    k_hi = (v_hi > 0) & ((hi > t) | ((hi == t) & (2 * lane + 1 < cutoff)))
    f_lo = (k_lo != ((v_lo > 0) & (lo >= h))).to(tl.int32)
    f_hi = (k_hi != ((v_hi > 0) & (hi >= h))).to(tl.int32)
    cs = tl.cumsum(f_lo + f_hi, 0)
    at_lo = cs - f_lo - f_hi
    sel_row = sel_ptr + row * stride_sel
    e_lo = ((b_lo ^ tl.where(k_lo, 0, 0x8000)) << 16) | (2 * lane)
    e_hi = ((b_hi ^ tl.where(k_hi, 0, 0x8000)) << 16) | (2 * lane + 1)
    if ASM:
        _scatter_i32_at(sel_row + 4, at_lo, e_lo, f_lo > 0)
        _scatter_i32_at(sel_row + 4, at_lo + f_lo, e_hi, f_hi > 0)
    else:
        tl.store(sel_row + 4 + at_lo, e_lo, mask=f_lo > 0)
        tl.store(sel_row + 4 + at_lo + f_lo, e_hi, mask=f_hi > 0)
    tl.store(sel_row, t)
    tl.store(sel_row + 1, cutoff)
    tl.store(sel_row + 2, h)
    tl.store(sel_row + 3, tl.sum(f_lo + f_hi, 0))


@triton.jit
def _w_ptrs(wt_ptr, rows, cols, d_in, d_out, BN: tl.constexpr, BLOCKED: tl.constexpr):
    """Pointers to W^T[rows, cols] (cols one program's BN columns): input-major (d_in, d_out), or BLOCKED
    (d_out / BN, d_in, BN), each program's columns one contiguous (d_in, BN) slab."""
    r = rows.to(tl.int64)[:, None]
    if BLOCKED:
        return wt_ptr + tl.program_id(0).to(tl.int64) * d_in * BN + r * BN + (cols % BN)[None, :]
    return wt_ptr + r * d_out + cols[None, :]


@triton.jit
def _fix_rows(x_row, wt_ptr, idx, im, t, cutoff, cols, cmask, d_in, d_out, BN: tl.constexpr,
              BLOCKED: tl.constexpr):
    """sum over rows idx (where im) of +-x_i W^T[i, cols]: + where exact Top-K keeps i, - where it does not."""
    xv = tl.load(x_row + idx, mask=im, other=0.0)
    pat = _pattern(xv)
    keep = (pat > t) | ((pat == t) & (idx < cutoff))
    xf = xv.to(tl.float32)
    xs = tl.where(im, tl.where(keep, xf, -xf), 0.0)
    w = tl.load(_w_ptrs(wt_ptr, idx, cols, d_in, d_out, BN, BLOCKED), mask=im[:, None] & cmask[None, :], other=0.0)
    return tl.sum(w.to(tl.float32) * xs[:, None], 0)


@triton.jit
def _fix_entries(e, em, wt_ptr, cols, cmask, d_in, d_out, BN: tl.constexpr, BLOCKED: tl.constexpr, XT: tl.constexpr):
    """sum over the fix list entries e (where em) of x W^T[i, cols] with the entry's signed 16-bit x (dtype XT)."""
    idx = e & 0xFFFF
    xs = tl.where(em, ((e >> 16) & 0xFFFF).to(tl.int16).to(XT, bitcast=True).to(tl.float32), 0.0)
    w = tl.load(_w_ptrs(wt_ptr, idx, cols, d_in, d_out, BN, BLOCKED), mask=em[:, None] & cmask[None, :], other=0.0)
    return tl.sum(w.to(tl.float32) * xs[:, None], 0)


@triton.jit
def _spec_body(x_ptr, wt_ptr, y_ptr, sel_ptr, hint_ptr, bias_ptr, res_ptr, d_in, d_out, stride_x, stride_y,
               stride_r, stride_sel, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, BM: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr, ROUND_BF16: tl.constexpr,
               BLOCKED: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < d_out
    x_row = x_ptr + row * stride_x
    h = (tl.load(hint_ptr + row, volatile=True) >> 16) & 0xFFFF  # this call's guess (`select_spec_kernel`)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    # pass 1, before the select is done: the rows the guess keeps
    for k0 in range(0, d_in, BK * STAGES):
        for s in tl.static_range(STAGES):
            kk = k0 + s * BK + rk
            xv = tl.load(x_row + kk, mask=kk < d_in, other=0.0)
            g = (kk < d_in) & (_pattern(xv) >= h)
            w = tl.load(_w_ptrs(wt_ptr, kk, cols, d_in, d_out, BN, BLOCKED), mask=g[:, None] & cmask[None, :],
                        other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * tl.where(g, xv.to(tl.float32), 0.0)[:, None]
    y = tl.sum(acc, 0)
    if PDL:
        gdc_wait()
    sel_row = sel_ptr + row * stride_sel
    rm = tl.arange(0, BM)
    # the header and the list's first BM entries in one round trip (entries past n_fix are not used)
    h_sel = tl.load(sel_row + 2)
    n_fix = tl.load(sel_row + 3)
    e = tl.load(sel_row + 4 + rm, mask=rm < d_in, other=0)
    if h_sel == h:  # the select's list is against this guess
        y += _fix_entries(e, rm < n_fix, wt_ptr, cols, cmask, d_in, d_out, BN, BLOCKED, x_ptr.dtype.element_ty)
        for j0 in range(BM, n_fix, BM):
            jm = j0 + rm < n_fix
            e = tl.load(sel_row + 4 + j0 + rm, mask=jm, other=0)
            y += _fix_entries(e, jm, wt_ptr, cols, cmask, d_in, d_out, BN, BLOCKED, x_ptr.dtype.element_ty)
    else:  # another guess (read after the select stored the new hint): every row where it differs
        t = tl.load(sel_row)
        cutoff = tl.load(sel_row + 1)
        for i0 in range(0, d_in, BM):
            ii = i0 + rm
            im = ii < d_in
            pat = _pattern(tl.load(x_row + ii, mask=im, other=0.0))
            keep = (pat > t) | ((pat == t) & (ii < cutoff))
            y += _fix_rows(x_row, wt_ptr, ii, im & (keep != (pat >= h)), t, cutoff, cols, cmask, d_in, d_out, BN,
                           BLOCKED)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_RES:
        y += tl.load(res_ptr + row * stride_r + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, _round(y, y_ptr.dtype.element_ty, ROUND_BF16), mask=cmask)


@triton.jit
def spec_gemv_kernel(x_ptr, wt_ptr, y_ptr, sel_ptr, hint_ptr, bias_ptr, res_ptr, d_in, d_out, stride_x, stride_y,
                     stride_r, stride_sel, n_main,
                     BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, BM: tl.constexpr,
                     HAS_BIAS: tl.constexpr = False, HAS_RES: tl.constexpr = False, PDL: tl.constexpr = False,
                     ROUND_BF16: tl.constexpr = False,
                     ax_ptr=None, aw_ptr=None, ay_ptr=None, ap_ptr=None, a_d=0, a_c0=0, a_c1=0, a_nb=1,
                     stride_ax=0, stride_aw=0, stride_ay=0, stride_ap=0, SIDE: tl.constexpr = False,
                     A_BN: tl.constexpr = 4, A_BK: tl.constexpr = 512, A_STAGES: tl.constexpr = 2,
                     HAS_PREV: tl.constexpr = False, A_ROUND_BF16: tl.constexpr = False,
                     BLOCKED: tl.constexpr = False):
    """Program (n, r), n < n_main: outputs n * BN .. of row r (`_spec_body`). With SIDE, programs n_main .. are a
    side GEMV's (`triton_gemv.SideGemv`, `_side_program`), after the GEMV's own so that those start (and read the
    hint) first. With PDL every program first lets the launch's dependents start."""
    if PDL:
        gdc_launch_dependents()
    if SIDE and tl.program_id(0) >= n_main:
        j = tl.program_id(0) - n_main
        if j < a_nb:
            _side_program(tl.program_id(1) * a_nb + j, ax_ptr, aw_ptr, ay_ptr, ap_ptr, a_d, a_c0, a_c1, a_nb,
                          stride_ax, stride_aw, stride_ay, stride_ap, A_BN, A_BK, A_STAGES, HAS_PREV, False,
                          A_ROUND_BF16)
    else:
        _spec_body(x_ptr, wt_ptr, y_ptr, sel_ptr, hint_ptr, bias_ptr, res_ptr, d_in, d_out, stride_x, stride_y,
                   stride_r, stride_sel, BN, BK, STAGES, BM, HAS_BIAS, HAS_RES, PDL, ROUND_BF16, BLOCKED)


def select_spec(x: torch.Tensor, k: int, hint: torch.Tensor, pdl: bool = False, window: int | None = None,
                num_warps: int | None = None) -> torch.Tensor:
    """(rows, 4 + d_in) int32: t, cutoff, the guess h, the fix list's length, the fix list (module docstring).
    `hint` (int32, a slot per row): h = its low 16 bits (the previous call's t; 0x8000 and above guess no row);
    afterwards (h << 16) | t."""
    rows, d_in = x.shape
    if not 1 <= k <= d_in:
        raise ValueError(f"k must be in [1, {d_in}], got {k}")
    if d_in >= 1 << 15:
        raise ValueError(f"the spec select takes rows up to 32767 wide, got {d_in}")
    sel = torch.empty(rows, SEL_HEAD + d_in, dtype=torch.int32, device=x.device)
    block_d = max(2, triton.next_power_of_2(d_in))
    compiled = x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
    select_spec_kernel[(rows,)](x, sel, hint, d_in, k, x.stride(0), sel.stride(0), BLOCK_D=block_d,
                                WINDOW=spec_window() if window is None else window, ASM=compiled,
                                num_warps=num_warps or select_warps(block_d), **({"PDL": True} if pdl else {}))
    return sel


def spec_layout(wt: torch.Tensor, bn: int | None = None) -> torch.Tensor:
    """W^T (d_in, d_out) as the blocked layout (ceil(d_out / BN), d_in, BN) of `launch_spec`: each program's BN
    columns one contiguous slab, so its kept rows are short hops forward through it (the input-major layout puts
    them d_out apart). Columns past d_out are zero. BN: the spec tiles' (`spec_tiles`)."""
    bn = spec_tiles()[0] if bn is None else bn
    d_in, d_out = wt.shape
    nb = -(-d_out // bn)
    if nb * bn != d_out:
        wt = torch.nn.functional.pad(wt, (0, nb * bn - d_out))
    return wt.reshape(d_in, nb, bn).permute(1, 0, 2).contiguous()


def check_hint(hint: torch.Tensor | None, x: torch.Tensor) -> None:
    if (hint is None or hint.dtype != torch.int32 or not hint.is_contiguous() or hint.device != x.device
            or hint.numel() < x.shape[0]):
        raise ValueError(f"impl='spec' needs a contiguous int32 hint buffer with a slot per row ({x.shape[0]}) on "
                         f"{x.device}, got {None if hint is None else (tuple(hint.shape), hint.dtype)}")


def launch_spec(x: torch.Tensor, wt: torch.Tensor, y: torch.Tensor, k: int, *, hint: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                side: SideGemv | None = None, pdl: bool | None = None, tiles: tuple[int, ...] | None = None,
                sel: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """y = TopK_k(x) @ wt (+ bias) (+ residual), x (rows, d_in) with unit stride, wt (d_in, d_out) contiguous or
    blocked (`spec_layout`, at the tiles' BN), y (rows, d_out): the spec select, then the speculative GEMV as its programmatic dependent (where PDL is possible).
    `hint` (int32, a slot per row, `select_spec`): the rows' thresholds at the previous call (any values: speed
    only); None: a fresh guess of no row (the GEMV then sums the kept rows from the select's list only).
    `side`: a dense GEMV in extra programs of the GEMV launch (its inputs complete before the select starts).
    `sel`: the spec select's output for these rows, already computed (tests). Returns sel."""
    if hint is None:  # no previous threshold: guess no row (pattern >= 0x8000), so the fix list is the kept rows
        hint = torch.full((x.shape[0],), NO_GUESS, dtype=torch.int32, device=x.device)
    check_hint(hint, x)
    rows, d_in = x.shape
    d_out = y.shape[1]
    bn, bk, stages, warps, bm = spec_tiles() if tiles is None else tiles
    blocked = wt.dim() == 3
    if blocked and (wt.shape[1:] != (d_in, bn) or wt.shape[0] * bn < d_out or not wt.is_contiguous()):
        raise ValueError(f"blocked weights must be (ceil(d_out / BN), d_in, BN) = {(-(-d_out // bn), d_in, bn)} "
                         f"contiguous (`spec_layout`), got {tuple(wt.shape)}")
    if not blocked and (wt.shape != (d_in, d_out) or not wt.is_contiguous()):
        raise ValueError(f"wt must be (d_in, d_out) = {(d_in, d_out)} contiguous, got {tuple(wt.shape)}")
    use_pdl = _use_pdl(x, pdl)
    n_main = triton.cdiv(d_out, bn)
    side_kw, n_side = {}, 0
    if side is not None:
        n_side, side_kw = _side_args(side, rows, x, side_config(gemv=True))
        n_side //= rows
        side_kw["A_ROUND_BF16"] = _interpreted_bf16(side.x)
    if sel is None:
        sel = select_spec(x, k, hint, pdl=use_pdl, window=window)
    elif sel.shape != (rows, SEL_HEAD + d_in) or sel.dtype != torch.int32:
        raise ValueError(f"sel must be the spec select's (rows, 4 + d_in) = {(rows, SEL_HEAD + d_in)} int32, got "
                         f"{tuple(sel.shape)} {sel.dtype}")
    spec_gemv_kernel[(n_main + n_side, rows)](
        x, wt, y, sel, hint, bias if bias is not None else wt, residual if residual is not None else y, d_in, d_out,
        x.stride(0), y.stride(0), residual.stride(0) if residual is not None else 0, sel.stride(0), n_main,
        BN=bn, BK=bk, STAGES=stages, BM=bm, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        ROUND_BF16=_interpreted_bf16(y), BLOCKED=blocked, num_warps=warps, **side_kw,
        **({"PDL": True, "launch_pdl": True} if use_pdl else {}))
    return sel
