"""Triton Top-K sparse GEMV: y = TopK_k(x) @ W^T with W stored input-major (W^T contiguous, d_in x d_out).

Two launches per op, no host synchronisation, a fixed amount of work per call:

1. a select kernel, one program per row of x, the whole row held in registers, finds the exact
   threshold on the 15-bit magnitude pattern t of the 16-bit float: `select_packed_kernel` (default,
   fastest on the H200) fixes t bit by bit with 15 counting reductions over two patterns per 32-bit
   lane; `select_bisect_kernel` does the same one pattern per lane; `select_kernel` does a two-level
   radix select with histograms (top 8 bits, then the low 7). Among entries equal to t the lower indices
   win (a prefix sum gives the cutoff index), so exactly k entries are kept. Output: (t, cutoff) per row.
2. `gtile_gemv_kernel` (v15, the default where k <= 0.6 d_in): the select also lists the k kept positions (ascending) and
   each program loads BLOCK_M of those weight rows x BLOCK_N columns, so the grid and every load scale
   with k (no program walks dropped rows); sums, counter and finisher as in the tile kernel below.
   `tile_gemv_kernel` (v11, the default for larger k): one BLOCK_M x BLOCK_N weight tile per program; a weight row
   W^T[i, cols] (contiguous, coalesced) is loaded only when x_i is kept (masked loads: skipped rows cost no
   memory traffic), the fp32 partial sum is added with atomics into fp32 sums kept in a caller-owned zeroed
   buffer, and the last program of each column block (an atomic counter, reset by that program) applies
   the bias or the silu(gate) * up epilogue, writes the 16-bit output and zeroes the sums again. On
   Hopper the GEMV is launched as a programmatic dependent of the select (PDL): its programs are resident
   and have loaded their slice of x when the select finishes. No 16-bit atomics; bf16 and fp16 alike.
   The sums are added in whatever order the programs finish, so results can differ in the last bits
   between calls; `impl="split"` is the deterministic alternative.

Measured alternatives, selectable with `launch(..., impl=...)` or `LAROSA_KERNEL_IMPL` and tested, slower
on the H200 for Top-K (benchmarks/NOTES.md): "tile" (v11, masked rows), "split" (v4-v10: split-K over ROWS_PER_SPLIT input rows per
program, per-split partials summed in a fixed order by the last program; the default for the TEAL-style
threshold mode, where it was faster end to end), "inline" (the split-K grid, every program finding
(t, cutoff) itself, no select launch) and "fused" (one launch, column-complete programs).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_prefetch import TOPK_SITES, Prefetch, prefetch_program
from .triton_prefetch import kernel_args as prefetch_kwargs
from .triton_prefetch import plan as plan_prefetch

try:  # programmatic dependent launch (Hopper+): the GEMV's programs start while the select finishes
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAVE_GDC = True
except ImportError:  # pragma: no cover - older Triton
    HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit
def select_kernel(x_ptr, sel_ptr, d_in, k, stride_x, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    valid = offs < d_in
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0)
    bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    bins = tl.arange(0, 256)
    hi = bits >> 7
    h1 = tl.histogram(hi, 256)
    ge1 = tl.cumsum(h1, 0, reverse=True)
    b1 = tl.sum((ge1 >= k).to(tl.int32), 0) - 1
    above1 = tl.sum(tl.where(bins > b1, h1, 0), 0)
    h2 = tl.histogram(tl.where(hi == b1, bits & 127, 128), 256)
    h2 = tl.where(bins < 128, h2, 0)
    ge2 = tl.cumsum(h2, 0, reverse=True)
    need = k - above1
    b2 = tl.sum((ge2 >= need).to(tl.int32), 0) - 1
    t = b1 * 128 + b2
    need_eq = need - tl.sum(tl.where(bins > b2, h2, 0), 0)
    cutoff = _tie_cutoff((bits == t) & valid, offs, need_eq)
    tl.store(sel_ptr + row * 2, t)
    tl.store(sel_ptr + row * 2 + 1, cutoff)


@triton.jit
def _tie_cutoff(eq, offs, need_eq):
    """Among the entries equal to the threshold (eq), the lower indices win: the index one past the
    need_eq-th of them (a prefix sum), so that `bits > t | (bits == t & offs < cutoff)` keeps exactly k."""
    eq = eq.to(tl.int32)
    return tl.max(tl.where((eq > 0) & (tl.cumsum(eq, 0) == need_eq), offs + 1, 0), 0)


@triton.jit
def _bisect_threshold(bits, k):
    """The largest 15-bit pattern t with at least k entries >= t, fixed bit by bit (15 counting reductions)."""
    t = 0
    for b in tl.static_range(14, -1, -1):
        cand = t | (1 << b)
        if tl.sum((bits >= cand).to(tl.int32), 0) >= k:
            t = cand
    return t


@triton.jit
def select_bisect_kernel(x_ptr, sel_ptr, d_in, k, stride_x, BLOCK_D: tl.constexpr):
    """Same output as `select_kernel`, found bit by bit: 15 counting reductions instead of histograms."""
    row = tl.program_id(0).to(tl.int64)
    t, cutoff = _row_select(x_ptr + row * stride_x, d_in, k, BLOCK_D)
    tl.store(sel_ptr + row * 2, t)
    tl.store(sel_ptr + row * 2 + 1, cutoff)


@triton.jit
def _row_select(x_row, d_in, k, BLOCK_D: tl.constexpr):
    """(t, cutoff) of one row's exact Top-k: the whole row in registers, bisection, then the tie cutoff."""
    offs = tl.arange(0, BLOCK_D)
    valid = offs < d_in
    x = tl.load(x_row + offs, mask=valid, other=0.0)
    bits = tl.where(valid, x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF, -1)
    t = _bisect_threshold(bits, k)
    cutoff = _tie_cutoff(bits == t, offs, k - tl.sum((bits > t).to(tl.int32), 0))
    return t, cutoff


@triton.jit
def _count_ge_packed(lanes, cand):
    """Entries >= cand among the two guarded 15-bit patterns of every lane (see select_packed_kernel)."""
    tot = tl.sum(((lanes - (cand * 0x10001).to(tl.uint32)) >> 15) & 0x10001, 0)
    return ((tot & 0xFFFF) + (tot >> 16)).to(tl.int32)


@triton.jit
def _bisect_packed(lanes, k, t, TOP_BIT: tl.constexpr, hi):
    """The largest pattern t' in [t, hi) with at least k entries >= t', fixed from bit TOP_BIT down: the
    caller knows count(>= t) >= k and count(>= hi) < k (hi <= 0x8000, where no pattern reaches)."""
    t = tl.zeros((), tl.int32) + t  # a 0-d tensor, so the conditional update below keeps one type
    for b in tl.static_range(TOP_BIT, -1, -1):
        cand = tl.minimum(t + (1 << b), hi)  # hi never qualifies
        if _count_ge_packed(lanes, cand) >= k:
            t = cand
    return t


@triton.jit
def select_packed_kernel(x_ptr, sel_ptr, hint_ptr, d_in, k, stride_x, BLOCK_D: tl.constexpr,
                         PDL: tl.constexpr = False, FIRST_BIT: tl.constexpr = 14,
                         WINDOW: tl.constexpr = 0, FALLBACK: tl.constexpr = True, COMPACT: tl.constexpr = False,
                         n_rows=1, ax_ptr=None, aw_ptr=None, ay_ptr=None, ap_ptr=None, a_d=0, a_c0=0, a_c1=0,
                         a_nb=1, stride_ax=0, stride_aw=0, stride_ay=0, stride_ap=0,
                         SIDE: tl.constexpr = False, A_BN: tl.constexpr = 32, A_BK: tl.constexpr = 128,
                         A_STAGES: tl.constexpr = 2, HAS_PREV: tl.constexpr = False,
                         ROUND_BF16: tl.constexpr = False, WAIT: tl.constexpr = False,
                         pf_start=1, pf_w1_ptr=None, pf_w2_ptr=None, pf_rec_ptr=None, pf_row_bytes=0, pf_chunk=0,
                         pf_limit=0,
                         PF: tl.constexpr = 0, PF_ROWS: tl.constexpr = 16, PF_CHUNKS: tl.constexpr = 8,
                         PF_TWO: tl.constexpr = False, PACK_X: tl.constexpr = False, HIST: tl.constexpr = 0,
                         HIST_TRUST: tl.constexpr = False, DYN: tl.constexpr = False):
    """Bisection on two 15-bit patterns per 32-bit lane (v10), see `_packed_select`. Same output as
    `select_bisect_kernel`.
    PDL: let the dependent GEMV launch now (its programs wait for this kernel before reading (t, cutoff)).
    WAIT (v20): launched as a programmatic dependent itself (of the GEMV before, which lets it launch early),
    every program first waits for that kernel, and only then lets its own dependent launch.
    FIRST_BIT < 14 is for timing only (benchmarks/select_bench.py --steps): fewer bisection steps, wrong
    selections.
    WINDOW > 0: search near the row's previous threshold first (`_packed_select`), and store the new one
    to hint_ptr[row]. FALLBACK=False (tests only) skips the full search where the window misses.
    COMPACT (v15, for `gtile_gemv_kernel`): sel rows are 2 + k wide, (t, cutoff) then the k kept positions,
    ascending (4, compiled default since v19: stored by inline PTX from 32-bit offsets, `_scatter_i32_at`; 3:
    the same from 64-bit pointers, `_scatter_i32`; 1: by `tl.store`; 2: timing only, no list).
    SIDE (v16): programs n_rows.. compute a dense side GEMV meanwhile (`_side_program`, `SideGemv`).
    PF (v23): programs pf_start.. prefetch the GEMV's likely rows into L2 meanwhile (`triton_prefetch`).
    PACK_X (with COMPACT): each list entry is (x's 16 bits << 16) | position (`_packed_select`).
    HIST > 0 (v30): hint_ptr holds each row's histogram of x (2^(15 - HIST) bins, `_finish_block`) instead of a
    hint; the window is its boundary bin (`_packed_select`). Not with PF."""
    if WAIT:
        gdc_wait()
    if PF and tl.program_id(0) >= pf_start:
        if PDL:
            gdc_launch_dependents()
        prefetch_program(tl.program_id(0) - pf_start, x_ptr, x_ptr, x_ptr, 0.0, d_in, hint_ptr, pf_w1_ptr, pf_w2_ptr,
                         pf_rec_ptr, pf_row_bytes, pf_chunk, pf_limit, False, False, BLOCK_D, PF, PF_ROWS, PF_CHUNKS,
                         PF_TWO)
    elif SIDE and tl.program_id(0) >= n_rows:  # SIDE is a constexpr: without it no branch is compiled
        _side_program(tl.program_id(0) - n_rows, ax_ptr, aw_ptr, ay_ptr, ap_ptr, a_d, a_c0, a_c1, a_nb,
                      stride_ax, stride_aw, stride_ay, stride_ap, A_BN, A_BK, A_STAGES, HAS_PREV, PDL, ROUND_BF16)
    else:
        _select_row(x_ptr, sel_ptr, hint_ptr, d_in, k, stride_x, BLOCK_D, PDL, FIRST_BIT, WINDOW, FALLBACK,
                    COMPACT, PACK_X, HIST, HIST_TRUST, DYN)


@triton.jit
def _select_row(x_ptr, sel_ptr, hint_ptr, d_in, k, stride_x, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
                FIRST_BIT: tl.constexpr, WINDOW: tl.constexpr, FALLBACK: tl.constexpr, COMPACT: tl.constexpr,
                PACK_X: tl.constexpr = False, HIST: tl.constexpr = 0, HIST_TRUST: tl.constexpr = False,
                DYN: tl.constexpr = False):
    row, offs, valid, x = _row_prologue(x_ptr, stride_x, d_in, BLOCK_D, PDL)
    sel_row = sel_ptr + row * (2 + k if COMPACT else 2)
    slot = hint_ptr + row
    if HIST > 0:  # the row's histogram
        slot = hint_ptr + row * (1 << (15 - HIST))
    t, cutoff = _packed_select(x, valid, k, BLOCK_D, FIRST_BIT, slot, WINDOW, FALLBACK,
                               sel_row + 2, COMPACT, PACK_X=PACK_X, HIST=HIST, HIST_TRUST=HIST_TRUST, DYN=DYN)
    tl.store(sel_row, t)
    tl.store(sel_row + 1, cutoff)


@triton.jit
def _side_program(j, ax_ptr, aw_ptr, ay_ptr, ap_ptr, d, c0, c1, n_blocks, stride_ax, stride_aw, stride_ay,
                  stride_ap, A_BN: tl.constexpr, A_BK: tl.constexpr, A_STAGES: tl.constexpr,
                  HAS_PREV: tl.constexpr, PDL: tl.constexpr, ROUND_BF16: tl.constexpr):
    """One program of a side GEMV riding in a select launch (v16) or a GEMV launch (v18, `_side_slice`): outputs
    c0 + (j % n_blocks) * A_BN.. (below c1) of row j // n_blocks of y = x @ W^T, W (outputs x d) output-major
    (F.linear's layout: each output's d weights contiguous, so every load is a wide vector), the d inputs
    walked A_BK at a time into a 2-D fp32 accumulator (one reduction at the end), rounded once. A_STAGES
    tiles are loaded before the first is used (the loop is unrolled that far by hand: Triton pipelines
    only loads that feed a dot). With HAS_PREV the row's first program also copies outputs [0, c0) from
    prev (computed earlier by another launch's side programs). The select programs of the launch do not
    wait for these; the launch's dependents do (they wait for the whole grid)."""
    if PDL:
        gdc_launch_dependents()
    r = (j // n_blocks).to(tl.int64)
    nb = j % n_blocks
    outs = c0 + nb * A_BN + tl.arange(0, A_BN)
    omask = outs < c1
    rk = tl.arange(0, A_BK)
    w_rows = aw_ptr + outs.to(tl.int64)[:, None] * stride_aw
    x_row = ax_ptr + r * stride_ax
    acc = tl.zeros((A_BN, A_BK), dtype=tl.float32)
    STEP: tl.constexpr = A_BK * A_STAGES
    for k0 in range(0, d, STEP):
        for s in tl.static_range(A_STAGES):
            kk = k0 + s * A_BK + rk
            km = kk < d
            w = tl.load(w_rows + kk[None, :], mask=omask[:, None] & km[None, :], other=0.0)
            xv = tl.load(x_row + kk, mask=km, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, 1)
    tl.store(ay_ptr + r * stride_ay + outs, _round(y, ay_ptr.dtype.element_ty, ROUND_BF16), mask=omask)
    if HAS_PREV:
        if nb == 0:
            for p0 in range(0, c0, 1024):
                pc = p0 + tl.arange(0, 1024)
                pm = pc < c0
                tl.store(ay_ptr + r * stride_ay + pc, tl.load(ap_ptr + r * stride_ap + pc, mask=pm), mask=pm)


@triton.jit
def _row_prologue(x_ptr, stride_x, d_in, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """A one-program-per-row kernel's start: let the dependent GEMV launch (PDL), then load the row
    (0 past d_in). Returns (row, offs, valid, x)."""
    if PDL:
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    valid = offs < d_in
    return row, offs, valid, tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0)


@triton.jit
def _window_holds(lanes, k, w_lo, w_hi):
    """Whether t lies in [w_lo, w_hi): at least k entries >= w_lo, fewer than k >= w_hi (two counts)."""
    # count(>= 0) = d_in >= k always; candidates are >= 1 (the zero padding is never counted)
    return ((w_lo == 0) | (_count_ge_packed(lanes, tl.maximum(w_lo, 1)) >= k)) & (_count_ge_packed(lanes, w_hi) < k)


@triton.jit
def _bisect_packed_dyn(lanes, k, t, top, hi):
    """`_bisect_packed` from run-time bit `top` down: a loop, not unrolled (one body for any start)."""
    t = tl.zeros((), tl.int32) + t
    for i in range(0, top + 1):
        cand = tl.minimum(t + (1 << (top - i)), hi)  # hi never qualifies
        if _count_ge_packed(lanes, cand) >= k:
            t = cand
    return t


@triton.jit
def _window_or_full(lanes, k, w_lo, w_hi, BITS: tl.constexpr, FALLBACK: tl.constexpr, DYN: tl.constexpr):
    """t from the window [w_lo, w_hi) of 2^BITS patterns where two counts show it holds t, else (FALLBACK) from
    the full 15-count search; exact either way. DYN (v30): one run-time loop whose start and length the check
    picks, instead of a branch between two unrolled searches (which spills at 16384 lanes)."""
    ok = _window_holds(lanes, k, w_lo, w_hi)
    if DYN:
        if not FALLBACK:  # (tests) the window's search alone
            ok = True
        return _bisect_packed_dyn(lanes, k, tl.where(ok, w_lo, 0), tl.where(ok, BITS - 1, 14),
                                  tl.where(ok, w_hi, 0x8000))
    t = tl.zeros((), tl.int32)
    if ok:
        t = _bisect_packed(lanes, k, w_lo, BITS - 1, w_hi)
    else:
        if FALLBACK:
            t = _bisect_packed(lanes, k, 0, 14, 0x8000)
    return t


@triton.jit
def _hist_window(hist_row, k, HIST: tl.constexpr):
    """[lo, hi) of the bin of hist_row (2^(15 - HIST) counts of |x|'s 15-bit patterns >> HIST, `_finish_block`)
    where the count of entries from the top reaches k: t, the largest pattern with k entries >= it, lies in it.
    The counts are zeroed again (each by the thread that loaded it: the same pointers) for the next producer.
    A histogram that is not the row's (none written: all zero) gives a window the caller's check rejects."""
    NB: tl.constexpr = 1 << (15 - HIST)
    j = tl.arange(0, NB)
    ptrs = hist_row + (NB - 1 - j)  # from the top bin down
    c = tl.load(ptrs)
    tl.store(ptrs, tl.zeros((NB,), tl.int32))
    jb = tl.min(tl.where(tl.cumsum(c, 0) >= k, j, NB - 1), 0)  # the top jb + 1 bins hold >= k entries
    lo = (NB - 1 - jb) << HIST
    return lo, lo + (1 << HIST)


@triton.jit
def _packed_select(x, valid, k, BLOCK_D: tl.constexpr, FIRST_BIT: tl.constexpr = 14, hint_ptr=None,
                   WINDOW: tl.constexpr = 0, FALLBACK: tl.constexpr = True, idx_ptr=None,
                   COMPACT: tl.constexpr = False, HINT_HI: tl.constexpr = False, PACK_X: tl.constexpr = False,
                   HIST: tl.constexpr = 0, HIST_TRUST: tl.constexpr = False, DYN: tl.constexpr = False):
    """(t, cutoff) of the exact Top-k of a row held in registers (16-bit floats, 0 where not valid).

    t is the largest 15-bit pattern with at least k entries >= t. Plain: fixed bit by bit (15 counts).
    WINDOW > 0 (v13): a hint h (the row's threshold at the previous token, in hint_ptr) gives the window
    [lo, hi) = [h - 2^(WINDOW-1), lo + 2^WINDOW); two counts check that t lies in it (at least k entries
    >= lo, fewer than k >= hi), and then WINDOW counts find it there: 2 + WINDOW counts instead of 15.
    Where the check fails the full 15-count search runs. Exact either way (any hint gives the same t);
    the new t is stored as the next hint.
    HIST > 0 (v30): hint_ptr is instead the row's histogram, 2^(15 - HIST) bins of 2^HIST patterns counted by the
    kernel that wrote the row (`_finish_block`); its boundary bin is the window (`_hist_window`, which zeroes
    the histogram for the next producer): 2 + HIST counts, the same check and fallback, no hint stored.

    Two 15-bit patterns per 32-bit lane: lane = 1 hi 1 lo with the guard bits 31 and 15 set, so
    (lane - cand * 0x10001) keeps bit 31 iff hi >= cand and bit 15 iff lo >= cand (the guard stops the
    borrow); one subtraction, shift and mask count two entries, and the counts of both halves add up in
    one 32-bit sum (each < 2^15).

    COMPACT: also store the k kept positions, ascending, to idx_ptr[0:k] (the tie prefix sum then counts
    the entries above t too, in its high half). PACK_X (v23, `gather_x`): each entry also carries the kept
    value, (x's 16 bits << 16) | position (positions < 2^15), so the gathered GEMV reads x with its position
    instead of gathering it from x afterwards (one dependent load fewer)."""
    raw = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF  # padding is 0: never >= a candidate (>= 1)
    lo, hi = tl.split(tl.reshape(raw, (BLOCK_D // 2, 2)))
    lanes = ((hi.to(tl.uint32) << 16) | lo.to(tl.uint32)) | 0x80008000
    if HIST > 0:  # v30: the window is the boundary bin of the histogram the row's producer counted
        w_lo, w_hi = _hist_window(hint_ptr, k, HIST)
        if HIST_TRUST:  # (A/B runs, `hist_trust`) no check: exact only with the row's own counts
            t = _bisect_packed(lanes, k, w_lo, HIST - 1, w_hi)
        else:
            t = _window_or_full(lanes, k, w_lo, w_hi, HIST, FALLBACK, True)
    elif WINDOW > 0:
        v = tl.load(hint_ptr)
        h = v & 0x7FFF  # (HINT_HI: the slot's low half; the high half is kept, `triton_spec`)
        w_lo = tl.minimum(tl.maximum(h - (1 << (WINDOW - 1)), 0), 0x7FFF)
        w_hi = tl.minimum(w_lo + (1 << WINDOW), 0x8000)  # 0x8000: no pattern reaches it (count 0)
        t = _window_or_full(lanes, k, w_lo, w_hi, WINDOW, FALLBACK, DYN)
        if HINT_HI:
            tl.store(hint_ptr, (v & -65536) | t)
        else:
            tl.store(hint_ptr, t)
    else:
        if DYN:  # v30 (A/B, `select_dyn`): the same search as a loop, not unrolled
            t = _bisect_packed_dyn(lanes, k, 0, FIRST_BIT, 0x8000)
        else:
            t = _bisect_packed(lanes, k, 0, FIRST_BIT, 0x8000)
    # ties on half-width lanes too: entries > t, then the need_eq-th entry == t (lower index first)
    need_eq = k - _count_ge_packed(lanes, t + 1)
    v_lo, v_hi = tl.split(tl.reshape(valid.to(tl.int32), (BLOCK_D // 2, 2)))
    e_lo = ((lo == t) & (v_lo > 0)).to(tl.int32)
    e_hi = ((hi == t) & (v_hi > 0)).to(tl.int32)
    lane = tl.arange(0, BLOCK_D // 2)
    if COMPACT:  # one prefix sum counts both: entries > t (high half) and entries == t (low half), < 2^16 each
        g_lo = (lo > t).to(tl.int32)  # padding is 0, never > t
        g_hi = (hi > t).to(tl.int32)
        cs = tl.cumsum(((g_lo + g_hi) << 16) + e_lo + e_hi, 0)
        eq0 = (cs & 0xFFFF) - e_lo - e_hi  # equal entries in the lanes before this one
        gt0 = (cs >> 16) - g_lo - g_hi
        cut = tl.where((e_lo > 0) & (eq0 + 1 == need_eq), 2 * lane + 1,
                       tl.where((e_hi > 0) & (eq0 + e_lo + 1 == need_eq), 2 * lane + 2, 0))
        # kept: above t, or among the first need_eq entries equal to t; place = kept entries before it
        # 2 (timing only, benchmarks/select_bench.py --compact): the packed prefix sum, no list
        p_lo, m_lo = idx_ptr + gt0 + tl.minimum(eq0, need_eq), (g_lo > 0) | ((e_lo > 0) & (eq0 < need_eq))
        p_hi = idx_ptr + gt0 + g_lo + tl.minimum(eq0 + e_lo, need_eq)
        m_hi = (g_hi > 0) | ((e_hi > 0) & (eq0 + e_lo < need_eq))
        val_lo = 2 * lane
        val_hi = 2 * lane + 1
        if PACK_X:
            xb_lo, xb_hi = tl.split(tl.reshape(x.to(tl.int16, bitcast=True).to(tl.int32), (BLOCK_D // 2, 2)))
            val_lo = (xb_lo << 16) | val_lo
            val_hi = (xb_hi << 16) | val_hi
        if COMPACT == 1:
            tl.store(p_lo, val_lo, mask=m_lo)
            tl.store(p_hi, val_hi, mask=m_hi)
        if COMPACT == 3:  # v16-v18's default: the same stores without a layout conversion
            _scatter_i32(p_lo, val_lo, m_lo)
            _scatter_i32(p_hi, val_hi, m_hi)
        if COMPACT == 4:  # the compiled default (v19): 32-bit offsets, the address formed in the store's own PTX
            _scatter_i32_at(idx_ptr, gt0 + tl.minimum(eq0, need_eq), val_lo, m_lo)
            _scatter_i32_at(idx_ptr, gt0 + g_lo + tl.minimum(eq0 + e_lo, need_eq), val_hi, m_hi)
    else:
        cs = tl.cumsum(e_lo + e_hi, 0)  # equal entries up to and including this lane's pair
        cut = tl.where((e_lo > 0) & (cs - e_hi == need_eq), 2 * lane + 1,
                       tl.where((e_hi > 0) & (cs == need_eq), 2 * lane + 2, 0))
    cutoff = tl.max(cut, 0)
    return t, cutoff


@triton.jit
def _scatter_i32(ptrs, vals, mask):
    """Predicated 32-bit stores through inline PTX, in the operands' own layout (v16, the compiled default). `tl.store`
    of a pointer tensor with no contiguity first moves pointers, values and mask to one element per thread
    through shared memory (in the compacting select: 16 KB of scratch and 24 more barriers at BLOCK_D 16384,
    where the stored list costs ~4 us of 14). The kept positions are ascending in lane order, so a warp's
    stores still land in a short run of addresses. Not for the interpreter (no PTX there)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b32 [$1], $2; mov.b32 $0, 0; }",
                              "=r,l,r,r", [ptrs, vals, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _scatter_i32_at(base, offs, vals, mask):
    """`_scatter_i32` of base + offs (v19 default, `LAROSA_COMPACT_STORE=asm32`): the 64-bit address is formed
    inside the store's PTX from a 32-bit offset, so the compiler holds int32 offsets (one register each)
    instead of a tensor of 64-bit pointers (two each); the 16384-wide compacting select spills 200 B of
    registers with the pointers, 24 B with the offsets (`benchmarks/kernel_resources.py`). On the H200 the select
    at d_in = 11008 takes 11.67 vs 11.86 us alone, and LaRoSA decodes +1.3 / +1.4 / +2.6 % faster at p = 0.4 / 0.5 /
    0.75 with the select hints off (+0.4 / +1.8 / +2.4 % with them on; `results/compact-store32-h200.json`)."""
    tl.inline_asm_elementwise("{ .reg .pred p; .reg .b64 a; setp.ne.b32 p, $4, 0; mad.wide.s32 a, $2, 4, $1; "
                              "@p st.global.b32 [a], $3; mov.b32 $0, 0; }",
                              "=r,l,r,r,r", [base, offs, vals, mask.to(tl.int32)], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def _round(xf, dst: tl.constexpr, ROUND_BF16: tl.constexpr):
    """fp32 -> dst rounded to nearest even, as torch rounds. Compiled casts do that; the interpreter's
    fp32 -> bf16 cast truncates, so there (ROUND_BF16) bf16 is rounded on the bits (finite values)."""
    if ROUND_BF16:
        b = xf.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return xf.to(dst)


@triton.jit
def rmsnorm_select_kernel(x_ptr, res_ptr, w_ptr, xs_ptr, h_ptr, sel_ptr, hint_ptr, d_in, k, eps,
                          stride_x, stride_r, stride_xs, stride_h,
                          HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
                          ROUND_BF16: tl.constexpr = False, WINDOW: tl.constexpr = 0,
                          COMPACT: tl.constexpr = False,
                          n_rows=1, ax_ptr=None, aw_ptr=None, ay_ptr=None, ap_ptr=None, a_d=0, a_c0=0, a_c1=0,
                          a_nb=1, stride_ax=0, stride_aw=0, stride_ay=0, stride_ap=0,
                          SIDE: tl.constexpr = False, A_BN: tl.constexpr = 32, A_BK: tl.constexpr = 128,
                          A_STAGES: tl.constexpr = 2, HAS_PREV: tl.constexpr = False,
                          WAIT: tl.constexpr = False,
                          pf_start=1, pf_w1_ptr=None, pf_w2_ptr=None, pf_rec_ptr=None, pf_row_bytes=0, pf_chunk=0,
                          pf_limit=0,
                          PF: tl.constexpr = 0, PF_ROWS: tl.constexpr = 16, PF_CHUNKS: tl.constexpr = 8,
                          PF_TWO: tl.constexpr = False, PACK_X: tl.constexpr = False):
    """The select folded into its producer: xs = x + res (stored; x itself without res), h = w * RMSNorm(xs)
    with HF's arithmetic (normalise in fp32, round to the 16-bit dtype, then scale and round), stored, and
    (t, cutoff) of h's exact Top-k (`_packed_select`). One program per row; the GEMV that follows reads h
    and (t, cutoff), as a programmatic dependent (PDL) when possible: it then waits before loading h.
    SIDE (v16): programs n_rows.. compute a dense side GEMV meanwhile (`_side_program`, `SideGemv`). WAIT, PF
    (the prefetch computes the norm itself) and PACK_X (h's bits in the list): as in select_packed_kernel."""
    if WAIT:
        gdc_wait()
    if PF and tl.program_id(0) >= pf_start:
        if PDL:
            gdc_launch_dependents()
        prefetch_program(tl.program_id(0) - pf_start, x_ptr, res_ptr, w_ptr, eps, d_in, hint_ptr, pf_w1_ptr, pf_w2_ptr,
                         pf_rec_ptr, pf_row_bytes, pf_chunk, pf_limit, True, HAS_RES, BLOCK_D, PF, PF_ROWS, PF_CHUNKS,
                         PF_TWO)
    elif SIDE and tl.program_id(0) >= n_rows:  # as in select_packed_kernel
        _side_program(tl.program_id(0) - n_rows, ax_ptr, aw_ptr, ay_ptr, ap_ptr, a_d, a_c0, a_c1, a_nb,
                      stride_ax, stride_aw, stride_ay, stride_ap, A_BN, A_BK, A_STAGES, HAS_PREV, PDL, ROUND_BF16)
    else:
        _rmsnorm_select_row(x_ptr, res_ptr, w_ptr, xs_ptr, h_ptr, sel_ptr, hint_ptr, d_in, k, eps, stride_x,
                            stride_r, stride_xs, stride_h, HAS_RES, BLOCK_D, PDL, ROUND_BF16, WINDOW, COMPACT, PACK_X)


@triton.jit
def _rmsnorm_select_row(x_ptr, res_ptr, w_ptr, xs_ptr, h_ptr, sel_ptr, hint_ptr, d_in, k, eps,
                        stride_x, stride_r, stride_xs, stride_h, HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr,
                        PDL: tl.constexpr, ROUND_BF16: tl.constexpr, WINDOW: tl.constexpr, COMPACT: tl.constexpr,
                        PACK_X: tl.constexpr = False):
    row, offs, valid, x = _row_prologue(x_ptr, stride_x, d_in, BLOCK_D, PDL)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=valid, other=0.0)
        x = _round(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty, ROUND_BF16)
        tl.store(xs_ptr + row * stride_xs + offs, x, mask=valid)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / d_in + eps)
    hn = _round(xf * inv, x_ptr.dtype.element_ty, ROUND_BF16)
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    h = _round(w.to(tl.float32) * hn.to(tl.float32), x_ptr.dtype.element_ty, ROUND_BF16)  # padding: w = 0, h = 0
    tl.store(h_ptr + row * stride_h + offs, h, mask=valid)
    sel_row = sel_ptr + row * (2 + k if COMPACT else 2)  # COMPACT: as in select_packed_kernel
    t, cutoff = _packed_select(h, valid, k, BLOCK_D, 14, hint_ptr + row, WINDOW, True, sel_row + 2, COMPACT,
                               PACK_X=PACK_X)
    tl.store(sel_row, t)
    tl.store(sel_row + 1, cutoff)


@triton.jit
def select_bisect2_kernel(x_ptr, sel_ptr, d_in, k, stride_x, BLOCK_D: tl.constexpr):
    """Bisection two bits at a time: the three candidate counts of a bit pair travel packed in one int64
    (20 bits each, counts < 2^20), so 8 block reductions replace 15."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    valid = offs < d_in
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0)
    bits = tl.where(valid, x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF, -1)
    t = 0
    if tl.sum((bits >= (1 << 14)).to(tl.int32), 0) >= k:
        t = 1 << 14
    for b in tl.static_range(13, 0, -2):  # bit pairs (13, 12), (11, 10), ..., (1, 0)
        c1 = t | (1 << (b - 1))
        c2 = t | (2 << (b - 1))
        c3 = t | (3 << (b - 1))
        packed = (bits >= c1).to(tl.int64) + ((bits >= c2).to(tl.int64) << 20) + ((bits >= c3).to(tl.int64) << 40)
        tot = tl.sum(packed, 0)
        n1 = tot & 0xFFFFF
        n2 = (tot >> 20) & 0xFFFFF
        n3 = tot >> 40
        j = (n1 >= k).to(tl.int32) + (n2 >= k).to(tl.int32) + (n3 >= k).to(tl.int32)
        t = t | (j << (b - 1))
    cutoff = _tie_cutoff(bits == t, offs, k - tl.sum((bits > t).to(tl.int32), 0))
    tl.store(sel_ptr + row * 2, t)
    tl.store(sel_ptr + row * 2 + 1, cutoff)


@triton.jit
def _keep(xv, offs, valid, t, cutoff, threshold, MODE: tl.constexpr):
    """Which inputs x[offs] are kept: exact Top-K by (t, cutoff) (MODE 0), |x| > threshold (MODE 1, the
    TEAL-style baseline), or all (MODE 2)."""
    if MODE == 0:
        bits = xv.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        keep = valid & ((bits > t) | ((bits == t) & (offs < cutoff)))
    elif MODE == 1:
        keep = valid & (tl.abs(xv.to(tl.float32)) > threshold)
    else:
        keep = valid
    return keep


@triton.jit
def _masked_rows_fma(x_row, wt_ptr, wt2_ptr, offs, valid, cols, cmask, d_out, t, cutoff, threshold, acc_t, acc2_t,
                     MODE: tl.constexpr, GATED: tl.constexpr):
    """Accumulate x[offs] * W^T[offs, cols] (and the second weight when GATED) into the 2-D fp32
    accumulators, loading only the weight rows whose input is kept: Top-K by (t, cutoff) (MODE 0),
    |x| > threshold (MODE 1) or all (MODE 2). Masked-off rows cost no memory traffic."""
    xv = tl.load(x_row + offs, mask=valid, other=0.0)
    keep = _keep(xv, offs, valid, t, cutoff, threshold, MODE)
    xf = tl.where(keep, xv.to(tl.float32), 0.0)
    wmask = keep[:, None] & cmask[None, :]
    w_off = offs.to(tl.int64)[:, None] * d_out + cols[None, :]
    w = tl.load(wt_ptr + w_off, mask=wmask, other=0.0)
    acc_t += xf[:, None] * w.to(tl.float32)
    if GATED:
        w2 = tl.load(wt2_ptr + w_off, mask=wmask, other=0.0)
        acc2_t += xf[:, None] * w2.to(tl.float32)
    return acc_t, acc2_t


@triton.jit
def sparse_gemv_kernel(x_ptr, wt_ptr, wt2_ptr, bias_ptr, y_ptr, sel_ptr, part_ptr, cnt_ptr,
                       d_in, d_out, k, threshold, stride_x, stride_y, n_splits, res_ptr, stride_r,
                       MODE: tl.constexpr,  # 0: exact Top-K (sel_ptr), 1: |x| > threshold (TEAL-style), 2: dense,
                       # 3: gather (x_ptr = compacted fp32 values, sel_ptr = their int32 indices, d_in = k)
                       GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_PER_SPLIT: tl.constexpr,
                       INLINE: tl.constexpr = False,  # MODE 0: every program finds (t, cutoff) itself
                       BLOCK_D: tl.constexpr = 16, SPLIT_CHUNK: tl.constexpr = 1,
                       PDL: tl.constexpr = False,  # launched as a programmatic dependent of the select
                       HAS_RES: tl.constexpr = False):  # y = res + ..., added in fp32 before rounding
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    n_blocks = tl.num_programs(0)
    x_row = x_ptr + row * stride_x
    t = 0
    cutoff = 0
    if MODE == 0:
        if INLINE:
            t, cutoff = _row_select(x_row, d_in, k, BLOCK_D)
        else:
            if PDL:  # everything before this overlaps the select kernel's run
                gdc_wait()
            t = tl.load(sel_ptr + row * 2)
            cutoff = tl.load(sel_ptr + row * 2 + 1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < d_out
    # 2-D accumulators: one cross-thread reduction at the end instead of one per iteration
    acc_t = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    acc2_t = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    start = pid_s * ROWS_PER_SPLIT
    for k0 in range(start, start + ROWS_PER_SPLIT, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        valid = offs < d_in
        if MODE == 3:
            ii = tl.load(sel_ptr + row * stride_x + offs, mask=valid, other=0)
            xf = tl.load(x_row + offs, mask=valid, other=0.0)
            wmask = valid[:, None] & cmask[None, :]
            w_off = ii.to(tl.int64)[:, None] * d_out + cols[None, :]
            w = tl.load(wt_ptr + w_off, mask=wmask, other=0.0)
            acc_t += xf[:, None] * w.to(tl.float32)
            if GATED:
                w2 = tl.load(wt2_ptr + w_off, mask=wmask, other=0.0)
                acc2_t += xf[:, None] * w2.to(tl.float32)
        else:
            acc_t, acc2_t = _masked_rows_fma(x_row, wt_ptr, wt2_ptr, offs, valid, cols, cmask, d_out, t, cutoff,
                                             threshold, acc_t, acc2_t, MODE, GATED)
    acc = tl.sum(acc_t, axis=0)
    acc2 = tl.sum(acc2_t, axis=0)
    # split-K reduction: partials to the workspace, the last program of this column block sums them
    n_parts = 2 if GATED else 1
    part_row = part_ptr + (row * n_parts * n_splits) * d_out
    tl.store(part_row + pid_s * d_out + cols, acc, mask=cmask)
    if GATED:
        tl.store(part_row + (n_splits + pid_s) * d_out + cols, acc2, mask=cmask)
    tl.debug_barrier()
    cnt_addr = cnt_ptr + row * n_blocks + pid_n
    done = tl.atomic_add(cnt_addr, 1, sem="acq_rel")
    if done == n_splits - 1:
        tl.atomic_xchg(cnt_addr, 0)
        tot = tl.zeros([BLOCK_N], dtype=tl.float32)
        tot2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        # SPLIT_CHUNK partials per load: one L2 round trip per chunk instead of one per split (v9)
        for s0 in range(0, n_splits, SPLIT_CHUNK):
            ss = s0 + tl.arange(0, SPLIT_CHUNK)
            pmask = (ss < n_splits)[:, None] & cmask[None, :]
            p_off = ss[:, None] * d_out + cols[None, :]
            tot += tl.sum(tl.load(part_row + p_off, mask=pmask, other=0.0, cache_modifier=".cg"), axis=0)
            if GATED:
                tot2 += tl.sum(tl.load(part_row + n_splits * d_out + p_off, mask=pmask, other=0.0,
                                       cache_modifier=".cg"), axis=0)
        _epilogue_store(tot, tot2, bias_ptr, y_ptr + row * stride_y, cols, cmask, GATED, HAS_BIAS,
                        res_ptr + row * stride_r, HAS_RES)


@triton.jit
def _epilogue_store(tot, up, bias_ptr, y_row, cols, cmask, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    res_row, HAS_RES: tl.constexpr):
    """y[cols] = silu(tot) * up (GATED) or tot (+ bias) (+ the residual row), cast to the output dtype."""
    if GATED:
        tot = tot * tl.sigmoid(tot) * up
    if HAS_BIAS:
        tot += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_RES:
        tot += tl.load(res_row + cols, mask=cmask, other=0.0).to(tl.float32)
    yv = tot.to(y_row.dtype.element_ty)
    tl.store(y_row + cols, yv, mask=cmask)
    return yv


@triton.jit
def fused_gemv_kernel(x_ptr, wt_ptr, wt2_ptr, bias_ptr, y_ptr, d_in, d_out, k, threshold, stride_x, stride_y,
                      MODE: tl.constexpr,  # 0: exact Top-K, 1: |x| > threshold (TEAL-style), 2: dense
                      GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """One launch: every program finds the row's Top-K threshold itself (bisection, whole row of x in
    registers; the row is a few KiB read from L2), then owns BLOCK_N output columns over all d_in
    input channels, loading only kept weight rows. No workspace, no split-K reduction, no counters."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + row * stride_x
    t = 0
    cutoff = 0
    if MODE == 0:
        t, cutoff = _row_select(x_row, d_in, k, BLOCK_D)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < d_out
    acc_t = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    acc2_t = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        acc_t, acc2_t = _masked_rows_fma(x_row, wt_ptr, wt2_ptr, offs, offs < d_in, cols, cmask, d_out, t, cutoff,
                                         threshold, acc_t, acc2_t, MODE, GATED)
    acc = tl.sum(acc_t, axis=0)
    if GATED:
        acc2 = tl.sum(acc2_t, axis=0)
        acc = acc * tl.sigmoid(acc) * acc2
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, acc.to(y_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def tile_gemv_kernel(x_ptr, wt_ptr, wt2_ptr, acc_ptr, sel_ptr, cnt_ptr, bias_ptr, y_ptr,
                     d_in, d_out, threshold, stride_x, stride_y, res_ptr, stride_r,
                     MODE: tl.constexpr,  # 0: exact Top-K (sel_ptr), 1: |x| > threshold, 2: dense
                     GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PDL: tl.constexpr = False,  # launched as a programmatic dependent of the select
                     X_LATE: tl.constexpr = False,  # with PDL: x too is written by that predecessor
                     HAS_RES: tl.constexpr = False,  # y = res + ..., added in fp32 before rounding
                     m0=0, ax_ptr=None, aw_ptr=None, ay_ptr=None, ap_ptr=None, a_d=0, a_c0=0, a_c1=0,
                     a_nb=1, stride_ax=0, stride_aw=0, stride_ay=0, stride_ap=0,
                     SIDE: tl.constexpr = False, A_BN: tl.constexpr = 4, A_BK: tl.constexpr = 512,
                     A_STAGES: tl.constexpr = 2, HAS_PREV: tl.constexpr = False, ROUND_BF16: tl.constexpr = False,
                     hist_ptr=None, HIST: tl.constexpr = 0, hint_ptr=None, GUESS: tl.constexpr = 0):
    """v11, one weight tile per program: BLOCK_M input rows x BLOCK_N output columns, the kept rows loaded
    at once (every load of the program in flight together, nothing to pipeline), the partial sum added into
    fp32 sums acc[row, :] (two for GATED) with atomics. The sums live in a zeroed buffer that is left
    zeroed: the last program of each column block (an atomic counter) turns them into the 16-bit output
    (bias or silu(gate) * up epilogue) and zeroes them.
    SIDE (v18): the first m0 slices along grid axis 1 are the programs of a dense side GEMV (`_side_slice`),
    which start at once, while the GEMV's programs wait for their select (PDL). With PDL every program also
    lets the kernel after it launch at once (v20: a select launched as this one's dependent waits for it,
    `WAIT`).
    GUESS > 0 (v31 A/B, `guess_sites`; MODE 0, x written before the select): before its wait the program loads the
    rows of its block whose pattern reaches the row's previous threshold (hint_ptr, as the select keeps it) minus
    GUESS patterns; after the wait it keeps the exact (t, cutoff) rows of those and loads any kept row the guess
    missed. Exact with any hint; only the time changes."""
    if PDL:
        gdc_launch_dependents()
    if SIDE and tl.program_id(1) < m0:  # SIDE is a constexpr: without it no branch is compiled
        _side_slice(m0, ax_ptr, aw_ptr, ay_ptr, ap_ptr, a_d, a_c0, a_c1, a_nb, stride_ax, stride_aw, stride_ay,
                    stride_ap, A_BN, A_BK, A_STAGES, HAS_PREV, ROUND_BF16)
    else:
        _tile_gemv_body(x_ptr, wt_ptr, wt2_ptr, acc_ptr, sel_ptr, cnt_ptr, bias_ptr, y_ptr, d_in, d_out, threshold,
                        stride_x, stride_y, res_ptr, stride_r, MODE, GATED, HAS_BIAS, BLOCK_M, BLOCK_N, PDL, X_LATE,
                        HAS_RES, m0 if SIDE else 0, hist_ptr, HIST, hint_ptr, GUESS)


@triton.jit
def _tile_gemv_body(x_ptr, wt_ptr, wt2_ptr, acc_ptr, sel_ptr, cnt_ptr, bias_ptr, y_ptr, d_in, d_out, threshold,
                    stride_x, stride_y, res_ptr, stride_r, MODE: tl.constexpr, GATED: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
                    X_LATE: tl.constexpr, HAS_RES: tl.constexpr, m0, hist_ptr=None, HIST: tl.constexpr = 0,
                    hint_ptr=None, GUESS: tl.constexpr = 0):
    pid_n, row, rn, cmask, rm = _tile_program(d_out, BLOCK_M, BLOCK_N, m0)
    valid = rm < d_in
    if GUESS > 0:  # v31: the guessed rows loaded before the wait (MODE 0, x written before the select)
        xg = tl.load(x_ptr + row * stride_x + rm, mask=valid, other=0.0)
        bits = xg.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        guess = valid & (bits >= tl.maximum((tl.load(hint_ptr + row) & 0x7FFF) - GUESS, 0))
        w_off = rm.to(tl.int64)[:, None] * d_out + rn[None, :]
        w = tl.load(wt_ptr + w_off, mask=guess[:, None] & cmask[None, :], other=0.0, eviction_policy="evict_first")
        w2 = w
        if GATED:
            w2 = tl.load(wt2_ptr + w_off, mask=guess[:, None] & cmask[None, :], other=0.0,
                         eviction_policy="evict_first")
        if PDL:
            gdc_wait()
        keep = _keep(xg, rm, valid, tl.load(sel_ptr + row * 2), tl.load(sel_ptr + row * 2 + 1), threshold, 0)
        xk = xg.to(tl.float32)
        part = tl.sum(w.to(tl.float32) * tl.where(keep & guess, xk, 0.0)[:, None], 0)  # the guess's tile dies here
        part2 = part
        if GATED:
            part2 = tl.sum(w2.to(tl.float32) * tl.where(keep & guess, xk, 0.0)[:, None], 0)
        miss = keep & ~guess  # kept rows below the guess: none while the threshold stays in the margin
        if tl.sum(miss.to(tl.int32), 0) > 0:
            mmask = miss[:, None] & cmask[None, :]
            xm = tl.where(miss, xk, 0.0)
            part += tl.sum(tl.load(wt_ptr + w_off, mask=mmask, other=0.0).to(tl.float32) * xm[:, None], 0)
            if GATED:
                part2 += tl.sum(tl.load(wt2_ptr + w_off, mask=mmask, other=0.0).to(tl.float32) * xm[:, None], 0)
        _add_count_finish(part, part2, acc_ptr, cnt_ptr, bias_ptr, y_ptr, res_ptr, row, pid_n, rn, cmask, d_out,
                          stride_y, stride_r, GATED, HAS_BIAS, HAS_RES, m0, hist_ptr, HIST)
    else:
        if PDL:
            if X_LATE:  # x comes from the predecessor (`rmsnorm_select_kernel`): wait before loading it
                gdc_wait()
        xv = tl.load(x_ptr + row * stride_x + rm, mask=valid, other=0.0)  # else written before the select ran
        t = 0
        cutoff = 0
        if MODE == 0:
            if PDL:
                if not X_LATE:
                    gdc_wait()
            t = tl.load(sel_ptr + row * 2)
            cutoff = tl.load(sel_ptr + row * 2 + 1)
        keep = _keep(xv, rm, valid, t, cutoff, threshold, MODE)
        xf = tl.where(keep, xv.to(tl.float32), 0.0)
        _tile_add_finish(rm, keep, xf, wt_ptr, wt2_ptr, acc_ptr, cnt_ptr, bias_ptr, y_ptr, res_ptr, row, pid_n, rn,
                         cmask, d_out, stride_y, stride_r, GATED, HAS_BIAS, HAS_RES, m0, hist_ptr, HIST)


@triton.jit
def gtile_gemv_kernel(x_ptr, wt_ptr, wt2_ptr, acc_ptr, sel_ptr, cnt_ptr, bias_ptr, y_ptr,
                      d_out, k, stride_x, stride_y, res_ptr, stride_r,
                      GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      PDL: tl.constexpr = False,  # launched as a programmatic dependent of the select
                      HAS_RES: tl.constexpr = False,
                      m0=0, ax_ptr=None, aw_ptr=None, ay_ptr=None, ap_ptr=None, a_d=0, a_c0=0, a_c1=0,
                      a_nb=1, stride_ax=0, stride_aw=0, stride_ay=0, stride_ap=0,
                      SIDE: tl.constexpr = False, A_BN: tl.constexpr = 4, A_BK: tl.constexpr = 512,
                      A_STAGES: tl.constexpr = 2, HAS_PREV: tl.constexpr = False, ROUND_BF16: tl.constexpr = False,
                      PACK_X: tl.constexpr = False, hist_ptr=None, HIST: tl.constexpr = 0,
                      LATE_WAIT: tl.constexpr = False):
    """v15, exact Top-K over gathered rows: the select wrote each row's k kept positions (ascending) after
    its (t, cutoff) (COMPACT, sel rows 2 + k wide); program (n, m) takes kept positions m * BLOCK_M ...
    and loads those weight rows W^T[idx, cols] (each contiguous), so every loaded row is a kept one and
    the grid shrinks with k. Sums, counter and finisher as in `tile_gemv_kernel`; SIDE and PDL as there.
    PACK_X: the list's entries carry x too (`_packed_select`), and x itself is not read.
    HIST (v30, with `tile_gemv_kernel` too): the finishers count y into hist_ptr's bins (`_finish_block`).
    LATE_WAIT (v31, timing only: `benchmarks/oracle_step.py`): with PDL, the kept list and the weight rows are loaded
    and multiplied *before* the wait for the kernel before, which then gates only the atomic adds and the finisher,
    as the dense chain loads its first weights early. Right only where the list (and x) were complete before the
    launch, never after a select of the same step."""
    if PDL:
        gdc_launch_dependents()
    if SIDE and tl.program_id(1) < m0:
        _side_slice(m0, ax_ptr, aw_ptr, ay_ptr, ap_ptr, a_d, a_c0, a_c1, a_nb, stride_ax, stride_aw, stride_ay,
                    stride_ap, A_BN, A_BK, A_STAGES, HAS_PREV, ROUND_BF16)
    else:
        _gtile_gemv_body(x_ptr, wt_ptr, wt2_ptr, acc_ptr, sel_ptr, cnt_ptr, bias_ptr, y_ptr, d_out, k, stride_x,
                         stride_y, res_ptr, stride_r, GATED, HAS_BIAS, BLOCK_M, BLOCK_N, PDL, HAS_RES,
                         m0 if SIDE else 0, PACK_X, hist_ptr, HIST, LATE_WAIT)


@triton.jit
def _gtile_gemv_body(x_ptr, wt_ptr, wt2_ptr, acc_ptr, sel_ptr, cnt_ptr, bias_ptr, y_ptr, d_out, k, stride_x, stride_y,
                     res_ptr, stride_r, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, PDL: tl.constexpr, HAS_RES: tl.constexpr, m0, PACK_X: tl.constexpr,
                     hist_ptr=None, HIST: tl.constexpr = 0, LATE_WAIT: tl.constexpr = False):
    pid_n, row, rn, cmask, j = _tile_program(d_out, BLOCK_M, BLOCK_N, m0)  # j: places in the kept list
    jmask = j < k
    if PDL and not LATE_WAIT:  # the positions (and x, where the predecessor wrote it) come from the select
        gdc_wait()
    idx = tl.load(sel_ptr + row * (2 + k) + 2 + j, mask=jmask, other=0)
    if PACK_X:  # (x's 16 bits << 16) | position
        xf = (idx >> 16).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
        idx = idx & 0xFFFF
    else:
        xf = tl.load(x_ptr + row * stride_x + idx, mask=jmask, other=0.0).to(tl.float32)
    _tile_add_finish(idx, jmask, xf, wt_ptr, wt2_ptr, acc_ptr, cnt_ptr, bias_ptr, y_ptr, res_ptr, row, pid_n,
                     rn, cmask, d_out, stride_y, stride_r, GATED, HAS_BIAS, HAS_RES, m0, hist_ptr, HIST,
                     PDL and LATE_WAIT)


@triton.jit
def _side_slice(m0, ax_ptr, aw_ptr, ay_ptr, ap_ptr, a_d, a_c0, a_c1, a_nb, stride_ax, stride_aw, stride_ay,
                stride_ap, A_BN: tl.constexpr, A_BK: tl.constexpr, A_STAGES: tl.constexpr, HAS_PREV: tl.constexpr,
                ROUND_BF16: tl.constexpr):
    """A program of the first m0 slices (grid axis 1) of a tile or gathered GEMV launch that carries a side GEMV
    (v18): output block j = slice * (programs along axis 0) + column block (up to a_nb of them) of the side
    GEMV's row program_id(2), the launch's own row (`_side_program`). Launched as the select's programmatic
    dependent, the GEMV's programs wait for it; these do not, so the side GEMV streams its weights while the
    select runs: its inputs (x, w, prev) must be complete before the select began (`SideGemv`)."""
    j = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    if j < a_nb:
        _side_program(tl.program_id(2) * a_nb + j, ax_ptr, aw_ptr, ay_ptr, ap_ptr, a_d, a_c0, a_c1, a_nb, stride_ax,
                      stride_aw, stride_ay, stride_ap, A_BN, A_BK, A_STAGES, HAS_PREV, False, ROUND_BF16)


@triton.jit
def _tile_program(d_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, m0):
    """A tile program's place: (column block, row of x, its columns, which of them are < d_out, its BLOCK_M
    offsets along the inputs); the first m0 slices along grid axis 1 are a side GEMV's (`_side_slice`)."""
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return (pid_n, tl.program_id(2).to(tl.int64), rn, rn < d_out,
            (tl.program_id(1) - m0) * BLOCK_M + tl.arange(0, BLOCK_M))


@triton.jit
def _tile_add_finish(rows_in, keep, xf, wt_ptr, wt2_ptr, acc_ptr, cnt_ptr, bias_ptr, y_ptr, res_ptr, row, pid_n,
                     rn, cmask, d_out, stride_y, stride_r, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_RES: tl.constexpr, m0, hist_ptr=None, HIST: tl.constexpr = 0, WAIT_HERE: tl.constexpr = False):
    """A tile program's body after it knows its input rows: load W^T[rows_in, rn] where kept (xf is 0
    elsewhere), add the fp32 partial sums into acc with atomics, and let the last program of the column
    block (counter; the block has num_programs(1) - m0 of them) finish it (`_finish_block`). WAIT_HERE (the
    gathered kernel's LATE_WAIT): the PDL wait between the products and the atomic adds."""
    wmask = keep[:, None] & cmask[None, :]
    w_off = rows_in.to(tl.int64)[:, None] * d_out + rn[None, :]
    w = tl.load(wt_ptr + w_off, mask=wmask, other=0.0, eviction_policy="evict_first")
    acc_row = acc_ptr + row * (2 if GATED else 1) * d_out
    if WAIT_HERE:
        part = tl.sum(w.to(tl.float32) * xf[:, None], 0)
        part2 = part
        if GATED:
            w2 = tl.load(wt2_ptr + w_off, mask=wmask, other=0.0, eviction_policy="evict_first")
            part2 = tl.sum(w2.to(tl.float32) * xf[:, None], 0)
        gdc_wait()
        _add_count_finish(part, part2, acc_ptr, cnt_ptr, bias_ptr, y_ptr, res_ptr, row, pid_n, rn, cmask, d_out,
                          stride_y, stride_r, GATED, HAS_BIAS, HAS_RES, m0, hist_ptr, HIST)
    else:
        tl.atomic_add(acc_row + rn, tl.sum(w.to(tl.float32) * xf[:, None], 0), mask=cmask, sem="relaxed")
        if GATED:
            w2 = tl.load(wt2_ptr + w_off, mask=wmask, other=0.0, eviction_policy="evict_first")
            tl.atomic_add(acc_row + d_out + rn, tl.sum(w2.to(tl.float32) * xf[:, None], 0), mask=cmask,
                          sem="relaxed")
        _count_finish(acc_row, cnt_ptr, bias_ptr, y_ptr, res_ptr, row, pid_n, rn, cmask, d_out, stride_y, stride_r,
                      GATED, HAS_BIAS, HAS_RES, m0, hist_ptr, HIST)


@triton.jit
def _add_count_finish(part, part2, acc_ptr, cnt_ptr, bias_ptr, y_ptr, res_ptr, row, pid_n, rn, cmask, d_out,
                      stride_y, stride_r, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, m0,
                      hist_ptr=None, HIST: tl.constexpr = 0):
    """A tile program's partial sums (part, and part2 of the up half when GATED) added into acc with atomics, then
    `_count_finish`."""
    acc_row = acc_ptr + row * (2 if GATED else 1) * d_out
    tl.atomic_add(acc_row + rn, part, mask=cmask, sem="relaxed")
    if GATED:
        tl.atomic_add(acc_row + d_out + rn, part2, mask=cmask, sem="relaxed")
    _count_finish(acc_row, cnt_ptr, bias_ptr, y_ptr, res_ptr, row, pid_n, rn, cmask, d_out, stride_y, stride_r,
                  GATED, HAS_BIAS, HAS_RES, m0, hist_ptr, HIST)


@triton.jit
def _count_finish(acc_row, cnt_ptr, bias_ptr, y_ptr, res_ptr, row, pid_n, rn, cmask, d_out, stride_y, stride_r,
                  GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, m0, hist_ptr=None,
                  HIST: tl.constexpr = 0):
    """After a program's atomic adds: count it in its column block; the last of the block's num_programs(1) - m0
    programs finishes the block (`_finish_block`) and resets the counter."""
    tl.debug_barrier()
    cnt_addr = cnt_ptr + row * tl.num_programs(0) + pid_n
    if tl.atomic_add(cnt_addr, 1, sem="acq_rel") == tl.num_programs(1) - m0 - 1:
        tl.atomic_xchg(cnt_addr, 0)
        hist_row = hist_ptr
        if HIST > 0:
            hist_row = hist_ptr + row * (1 << (15 - HIST))
        _finish_block(acc_row, bias_ptr, y_ptr + row * stride_y, rn, cmask, d_out, GATED, HAS_BIAS,
                      res_ptr + row * stride_r, HAS_RES, hist_row, HIST)


@triton.jit
def _finish_block(acc_row, bias_ptr, y_row, rn, cmask, d_out, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  res_row, HAS_RES: tl.constexpr, hist_row=None, HIST: tl.constexpr = 0):
    """y[rn] from the fp32 sums (silu(gate) * up when GATED, + bias, + residual), and the sums zeroed again.
    HIST > 0 (v30): also count the stored outputs into hist_row's 2^(15 - HIST) bins by |y|'s 15-bit pattern
    shifted right by HIST (`_hist_window`: the next select starts from the boundary bin).

    The barrier keeps every thread's read of the sums before any thread's zeroing store: the compiler may
    lay the loaded and the stored vectors out over different threads, and without it the compiled kernel
    (triton 3.6, H200) read zeros in the last, partially masked column group when a bias load sat in
    between (tests/test_kernels.py::test_bias_and_leading_shape, d_out = 37). An atomic exchange instead
    was as correct but made the fused gate+up op 4-6 us slower."""
    zero = tl.zeros(rn.shape, dtype=tl.float32)
    tot = tl.load(acc_row + rn, mask=cmask, other=0.0, cache_modifier=".cg")
    up = zero
    if GATED:
        up = tl.load(acc_row + d_out + rn, mask=cmask, other=0.0, cache_modifier=".cg")
    tl.debug_barrier()
    tl.store(acc_row + rn, zero, mask=cmask)
    if GATED:
        tl.store(acc_row + d_out + rn, zero, mask=cmask)
    yv = _epilogue_store(tot, up, bias_ptr, y_row, rn, cmask, GATED, HAS_BIAS, res_row, HAS_RES)
    if HIST > 0:
        bins = (yv.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF) >> HIST
        tl.atomic_add(hist_row + bins, tl.full(bins.shape, 1, tl.int32), mask=cmask, sem="relaxed")


def tile_config(d_in: int, d_out: int, gated: bool = False) -> dict:
    """Tiles of the one-tile-per-program kernel (H200 sweeps of `benchmarks/gemv.py --tune --impl tile` and
    `benchmarks/floor.py`, benchmarks/NOTES.md v11): 2 warps; 64 x 256 tiles ungated, 64 x 64 for the
    fused gate+up op (the best counter-finished configurations of the sweep). In threshold mode, which
    runs split-K by default, 64 x 64 measured faster (`results/floor-h200-bf16.json`, "tile-64x64")."""
    if gated:
        return {"block_m": 64, "block_n": 64, "num_warps": 2}
    return {"block_m": 64, "block_n": 256, "num_warps": 2}


def _zeroed_buffer(counters: torch.Tensor | None, need: int, device) -> torch.Tensor:
    """The caller's zeroed int32 buffer, checked for size, or a fresh one (one memset)."""
    if counters is None:
        return torch.zeros(need, dtype=torch.int32, device=device)
    if counters.numel() < need:
        raise ValueError(f"counters holds {counters.numel()} entries; this call needs {need}")
    return counters


def tile_workspace_needed(rows: int, d_out: int, gated: bool, block_n: int) -> int:
    """int32 entries of the zeroed buffer the tile kernel needs: counters, then the fp32 sums."""
    return _ws_offset(rows * triton.cdiv(d_out, block_n)) + rows * (2 if gated else 1) * d_out


def _tile_buffers(x, wt, gated: bool, counters: torch.Tensor | None, cfg: dict, block_m: int | None,
                  block_n: int | None):
    """(block_m, block_n, counters, fp32 sums) of a tile-kernel launch: the tiles asked for, else cfg's; the
    caller's zeroed buffer checked for size (or a fresh one), and the sums' view inside it."""
    rows, d_out = x.shape[0], wt.shape[1]
    block_m, block_n = block_m or cfg["block_m"], block_n or cfg["block_n"]
    need = tile_workspace_needed(rows, d_out, gated, block_n)
    counters = _zeroed_buffer(counters, need, x.device)
    return block_m, block_n, counters, counters[_ws_offset(rows * triton.cdiv(d_out, block_n)):need].view(torch.float32)


def launch_tile(x, wt, y, k: int, *, wt2=None, bias=None, threshold: float = 0.0, mode: int = 0,
                counters: torch.Tensor | None = None, pdl: bool | None = None, block_m: int | None = None,
                block_n: int | None = None, num_warps: int | None = None, select_num_warps: int | None = None,
                select_impl: str | None = None, num_stages: int | None = None,
                sel: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                hint: torch.Tensor | None = None, side: SideGemv | None = None, hist: torch.Tensor | None = None,
                hist_out: torch.Tensor | None = None, guess: int = 0) -> None:
    """One-tile-per-program variant of `launch` (same arguments and result), v11. `guess` > 0 (v31, A/B:
    `guess_sites`): the kernel's GUESS, with the select's hint as the guess (exact Top-K, the select run here)."""
    _check_residual(residual, y, wt2)
    if guess and (mode != 0 or hint is None or sel is not None or not 0 < guess < 1 << 15):
        raise ValueError("guess= needs exact Top-K (mode=0) with a hint and the select run here (no sel=), and a "
                         f"margin of 1 to 32767 patterns, got {guess}")
    if side is not None and mode != 0:
        raise ValueError("side= rides with an exact Top-K launch (mode 0)")
    rows, d_in = x.shape
    d_out = wt.shape[1]
    gated = wt2 is not None
    cfg = tile_config(d_in, d_out, gated)
    block_m, block_n, counters, acc = _tile_buffers(x, wt, gated, counters, cfg, block_m, block_n)
    select_impl = select_impl or SELECT_IMPL
    late = sel is not None
    n0 = triton.cdiv(d_out, block_n)
    sel_side, m0, side_kw = _route_side(side, "tile", late, rows, n0, x)
    if late:  # (t, cutoff) and x from the kernel launched just before (`rmsnorm_select`)
        sel_pdl = _check_presel(x, sel, mode) and _use_pdl(x, pdl)
    else:
        sel_pdl = _select_then_pdl(x, pdl, mode, select_impl)
        sel = select(x, k, select_num_warps, select_impl, pdl=sel_pdl, hint=hint, side=sel_side,
                     prefetch=plan_prefetch(x, wt, wt2, k, hint, decode_site(d_in, d_out, wt2 is not None))
                     if select_impl == "packed" else None,
                     hist=hist) \
            if mode == 0 else x
    grid = (n0, m0 + triton.cdiv(d_in, block_m), rows)
    tile_gemv_kernel[grid](
        x, wt, wt2 if gated else wt, acc, sel, counters, bias if bias is not None else wt, y, d_in, d_out,
        float(threshold), x.stride(0), y.stride(0), residual if residual is not None else y,
        residual.stride(0) if residual is not None else 0, MODE=mode, GATED=gated, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or 1,
        **({"PDL": True, "X_LATE": late, "launch_pdl": True} if sel_pdl else {}), **side_kw,
        **_hist_out_kw(hist_out, y), **({"hint_ptr": hint, "GUESS": int(guess)} if guess else {}))


def _hist_out_kw(hist_out: torch.Tensor | None, y: torch.Tensor) -> dict:
    """The tile / gathered kernels' arguments to count y into `hist_out` (`_finish_block`), checked; {} without."""
    hist_out = _hist_arg(hist_out, y, "hist_out")
    return {} if hist_out is None else {"hist_ptr": hist_out, "HIST": hist_bits()}


DECODE_SITES = TOPK_SITES + ("head",)


def decode_site(d_in: int, d_out: int, gated: bool = False) -> str:
    """The decode-step site a GEMV of this shape is, for its tiles: "gate_up" (gated), "down" (d_in > d_out),
    "o" (square), "head" (d_out >= 4 d_in: a vocabulary), else "qkv"."""
    if gated:
        return "gate_up"
    if d_out < d_in:
        return "down"
    if d_out == d_in:
        return "o"
    return "head" if d_out >= 4 * d_in else "qkv"


def parse_tiles(spec: str, env: str, form: str) -> tuple[int, ...]:
    """"a,b,..." -> ints, as many as `form` ("BN,BK,STAGES,WARPS") names."""
    try:
        t = tuple(int(v) for v in spec.split(","))
    except ValueError:
        t = ()
    if len(t) != len(form.split(",")):
        raise ValueError(f"{env}: tiles must be {form}, got {spec!r}")
    return t


@functools.lru_cache(maxsize=64)  # read at every launch outside a CUDA graph: parsed once per value
def site_specs(env_value: str, env: str, sites: tuple[str, ...], form: str) -> dict[str, tuple[int, ...]]:
    """"site=a,b,...;site=..." -> {site: tiles} for the named sites (of `sites`). Cached: do not mutate."""
    out = {}
    for item in filter(None, (v.strip() for v in env_value.split(";"))):
        site, _, spec = item.partition("=")
        if site.strip() not in sites:
            raise ValueError(f"{env}: unknown site {site.strip()!r} (sites: {', '.join(sites)})")
        out[site.strip()] = parse_tiles(spec, env, form)
    return out


def guess_sites() -> dict[str, int]:
    """v31 (A/B runs): `LAROSA_GUESS="site=MARGIN;..."` runs those sites' one-row, hinted Top-K launches in the tile
    kernel with GUESS = MARGIN patterns (`tile_gemv_kernel`: the rows at or above the previous threshold minus the
    margin loaded before the wait). Unset: none."""
    env = os.environ.get("LAROSA_GUESS")
    if not env:
        return {}
    out = {site: v[0] for site, v in site_specs(env, "LAROSA_GUESS", TOPK_SITES, "MARGIN").items()}
    if not all(0 < v < 1 << 15 for v in out.values()):
        raise ValueError(f"LAROSA_GUESS={env!r}: margins from 1 to 32767 patterns")
    return out


def gtile_site_tiles() -> dict[str, tuple[int, int, int]]:
    """Tiles of the gathered-rows kernel by site (`decode_site`) from `LAROSA_GTILE_TILES`
    ("site=BLOCK_M,BLOCK_N,WARPS;...", for A/B runs); the sites not named keep `gtile_config`'s rule."""
    env = os.environ.get("LAROSA_GTILE_TILES")
    return site_specs(env, "LAROSA_GTILE_TILES", TOPK_SITES, "BLOCK_M,BLOCK_N,WARPS") if env else {}


GTILE_TALL = 14_000_000  # k * d_out from which 128 x 128 tiles beat 64 x 256 (half the atomics), v15 sweep


def gtile_config(d_in: int, d_out: int, gated: bool = False, k: int | None = None) -> dict:
    """Tiles of the gathered-rows kernel (v15): BLOCK_M kept rows x BLOCK_N columns per program, 2 warps.
    H200 sweep (`benchmarks/gtile_ab.py`, `results/gtile-ab-h200.json`, 12 tilings x 8 ops x 5 sparsities):
    gated 64 x 64 (best or within 1.1 us everywhere); ungated 64 x 256, or 128 x 128 where k * d_out >=
    GTILE_TALL (the LLaMA qkv and down projections at low sparsity: the total of atomic adds, d_out * k /
    BLOCK_M, halves; 23.8 vs 27.4 us on 4096 -> 12288 at k = 2048). Without k: the tiles of k = d_in.
    `LAROSA_GTILE_TILES` sets them by site (`gtile_site_tiles`)."""
    site = gtile_site_tiles().get(decode_site(d_in, d_out, gated))
    if site is not None:
        return {"block_m": site[0], "block_n": site[1], "num_warps": site[2]}
    if gated:
        return {"block_m": 64, "block_n": 64, "num_warps": 2}
    if (d_in if k is None else k) * d_out >= GTILE_TALL:
        return {"block_m": 128, "block_n": 128, "num_warps": 2}
    return {"block_m": 64, "block_n": 256, "num_warps": 2}


def launch_gtile(x, wt, y, k: int, *, wt2=None, bias=None, counters: torch.Tensor | None = None,
                 pdl: bool | None = None, block_m: int | None = None, block_n: int | None = None,
                 num_warps: int | None = None, select_num_warps: int | None = None,
                 sel: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                 hint: torch.Tensor | None = None, side: SideGemv | None = None, pack_x: bool | None = None,
                 hist: torch.Tensor | None = None, hist_out: torch.Tensor | None = None,
                 late_wait: bool = False) -> None:
    """Gathered-rows variant of `launch` (exact Top-K only, same result), v15: the select also writes the
    kept positions (`select(..., compact=True)`), and the GEMV's grid covers only the k kept rows.
    `pack_x` (None = `gather_x(d_in)`): the list carries x with each position; a given `sel` must then come from a
    select with `pack_x=True` too. `late_wait` (v31, timing only, with `sel`): the kernel's LATE_WAIT."""
    _check_residual(residual, y, wt2)
    if late_wait and sel is None:
        raise ValueError("late_wait (timing only) needs a kept list complete before the launch (sel=)")
    rows, d_in = x.shape
    d_out = wt.shape[1]
    gated = wt2 is not None
    k = _compact_k(k, d_in)
    cfg = gtile_config(d_in, d_out, gated, k)
    block_m, block_n, counters, acc = _tile_buffers(x, wt, gated, counters, cfg, block_m, block_n)
    sel_pdl = _use_pdl(x, pdl)
    n0 = triton.cdiv(d_out, block_n)
    sel_side, m0, side_kw = _route_side(side, "gtile", sel is not None, rows, n0, x)
    pack_x = gather_x(d_in) if pack_x is None else bool(pack_x)  # (compacting selects take rows < 2^15 wide)
    if sel is None:
        sel = select(x, k, select_num_warps, "packed", pdl=sel_pdl, hint=hint, compact=True, side=sel_side,
                     prefetch=plan_prefetch(x, wt, wt2, k, hint, decode_site(d_in, d_out, gated)), pack_x=pack_x,
                     hist=hist)
    elif sel.shape != (rows, 2 + k) or sel.dtype != torch.int32:  # from the kernel launched just before
        raise ValueError(f"impl='gtile' needs sel from a compacting select, (rows, 2 + k) = {(rows, 2 + k)} "
                         f"int32, got {tuple(sel.shape)} {sel.dtype}")
    grid = (n0, m0 + triton.cdiv(k, block_m), rows)
    gtile_gemv_kernel[grid](
        x, wt, wt2 if gated else wt, acc, sel, counters, bias if bias is not None else wt, y, d_out, k,
        x.stride(0), y.stride(0), residual if residual is not None else y,
        residual.stride(0) if residual is not None else 0, GATED=gated, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps or cfg["num_warps"], num_stages=1,
        **({"PDL": True, "launch_pdl": True} if sel_pdl else {}), **side_kw, **({"PACK_X": True} if pack_x else {}),
        **_hist_out_kw(hist_out, y), **({"LATE_WAIT": True} if late_wait else {}))


def _check_residual(residual: torch.Tensor | None, y: torch.Tensor, wt2) -> None:
    if residual is None:
        return
    if wt2 is not None:
        raise ValueError("the gated form takes no residual")
    if residual.shape != y.shape or residual.stride(-1) != 1:
        raise ValueError(f"residual {tuple(residual.shape)} must match the output {tuple(y.shape)} "
                         f"(rows with unit stride)")


def _check_presel(x: torch.Tensor, sel: torch.Tensor, mode: int) -> bool:
    if mode != 0:
        raise ValueError("a precomputed selection (sel=) is for Top-K mode (mode=0) only")
    if sel.shape != (x.shape[0], 2) or sel.dtype != torch.int32:
        raise ValueError(f"sel must be (rows, 2) int32 (t, cutoff) per row, got {tuple(sel.shape)} {sel.dtype}")
    return True


def rmsnorm_select(x: torch.Tensor, res: torch.Tensor | None, w: torch.Tensor, eps: float, k: int,
                   pdl: bool = False, num_warps: int | None = None, hint: torch.Tensor | None = None,
                   compact: bool = False, side: SideGemv | None = None, prefetch: Prefetch | None = None,
                   pack_x: bool = False):
    """(xs, h, sel): xs = x + res (None without res), h = w * RMSNorm(xs) (HF arithmetic) and the (rows, 2)
    int32 (t, cutoff) of h's exact Top-k, from one kernel (`rmsnorm_select_kernel`). `pdl`: the next
    launch is a programmatic dependent that waits before reading h and sel (`launch(..., sel=sel)`);
    `hint`, `compact`, `side`, `prefetch` and `pack_x`: as in `select`."""
    rows, d_in = x.shape
    if w.shape != (d_in,):
        raise ValueError(f"norm weight {tuple(w.shape)} does not match rows of width {d_in}")
    if res is not None and res.shape != x.shape:
        raise ValueError(f"res {tuple(res.shape)} does not match x {tuple(x.shape)}")
    xs = torch.empty_like(x) if res is not None else None
    h = torch.empty_like(x)
    _check_compact(compact, d_in)
    k = _compact_k(k, d_in) if compact else k
    sel = torch.empty(rows, 2 + k if compact else 2, dtype=torch.int32, device=x.device)
    block_d = max(2, triton.next_power_of_2(d_in))
    hint, window = _hint_args(hint, x)
    warps = num_warps or select_warps(block_d)
    extra, side_kw = _side_kwargs(side, rows, x)
    n_pf, pf_kw = prefetch_kwargs(prefetch if hint is not None else None, x, warps, rows + extra)
    rmsnorm_select_kernel[(rows + extra + n_pf,)](
        x, res if res is not None else x, w, xs if xs is not None else h, h, sel,
        hint if hint is not None else sel, d_in, k, float(eps),
        x.stride(0), res.stride(0) if res is not None else 0, xs.stride(0) if xs is not None else 0, h.stride(0),
        HAS_RES=res is not None, BLOCK_D=block_d, num_warps=warps, WINDOW=window, COMPACT=_compact_mode(compact),
        ROUND_BF16=_interpreted_bf16(x), **({"PDL": True} if pdl and _pdl_possible(x) else {}),
        **_wait_kw(x), **side_kw, **pf_kw, **_pack_kw(pack_x, compact))
    return xs, h, sel


def fused_config(d_in: int, d_out: int) -> dict:
    """Tile sizes of the one-launch kernel (H200 sweep: benchmarks/NOTES.md)."""
    return {"block_n": 32, "block_k": 128, "num_warps": 4, "num_stages": 3}


def launch_fused(x, wt, y, k: int, *, wt2=None, bias=None, threshold: float = 0.0, mode: int = 0,
                 block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None) -> None:
    """One-launch variant of `launch` (same arguments and result): selection inside every program."""
    rows, d_in = x.shape
    d_out = wt.shape[1]
    cfg = fused_config(d_in, d_out)
    block_n = block_n or cfg["block_n"]
    block_k = block_k or cfg["block_k"]
    block_d = triton.next_power_of_2(d_in)
    grid = (triton.cdiv(d_out, block_n), rows)
    fused_gemv_kernel[grid](
        x, wt, wt2 if wt2 is not None else wt, bias if bias is not None else wt, y,
        d_in, d_out, k, float(threshold), x.stride(0), y.stride(0),
        MODE=mode, GATED=wt2 is not None, HAS_BIAS=bias is not None, BLOCK_D=block_d,
        BLOCK_K=block_k, BLOCK_N=block_n,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"])


def _ws_offset(n_counters: int) -> int:
    return -(-n_counters // 32) * 32  # the fp32 sums start 128-byte aligned after the counters


def counters_needed(rows: int, d_in: int, d_out: int, gated: bool = False, mode: int = 0,
                    impl: str | None = None, k: int | None = None) -> int:
    """int32 entries of the zeroed buffer (`counters=`) a `launch` of `impl` (None: the default of `mode`) with
    its default tiles needs for `rows` rows: the per-column-block counters, then, for the tile kernels,
    rows x (1 or 2) x d_out fp32 sums. Without k, room for any k (the gathered kernel's narrowest tiles,
    and both kernels where "auto" could pick either)."""
    impl = resolve_impl(impl, mode, d_in, k)
    if impl in ("tile", "gtile", "auto"):  # "auto" is left only without k
        cfgs = [c(d_in, d_out, gated, *((k,) if n == "gtile" else ())) for n, c in
                (("tile", tile_config), ("gtile", gtile_config)) if impl in (n, "auto")]
        return max(tile_workspace_needed(rows, d_out, gated, c["block_n"]) for c in cfgs)
    if impl == "spec":  # column-complete programs: no counters
        return 0
    return rows * triton.cdiv(d_out, default_config(d_in, d_out)["block_n"])


def default_config(d_in: int, d_out: int) -> dict:
    """Tile sizes from the H200 sweep of benchmarks/gemv.py --tune (benchmarks/NOTES.md)."""
    if d_out <= 4096 and d_in <= 4096:
        return {"block_n": 128, "block_k": 64, "rows_per_split": 256, "num_warps": 4, "num_stages": 3}
    # wider: 256 rows per split up to d_out 8192 (LLaMA3-8B qkv 4096->6144, v9 sweep: 21.8 vs 26.2 us)
    rps = 256 if d_in <= 4096 and d_out <= 8192 else 512
    return {"block_n": 64, "block_k": 16, "rows_per_split": rps, "num_warps": 4, "num_stages": 3}


def split_chunk(n_splits: int, block_n: int) -> int:
    """Partials the last program of a column block loads at once (a power of two, <= 4096 / block_n
    values per split so the tile stays in registers). Ungated only: on the H200 it saves 2.3 us on the
    11008->4096 down projection and costs 7 us on the fused gate+up op (benchmarks/NOTES.md v9)."""
    return max(1, min(triton.next_power_of_2(n_splits), 4096 // block_n))


def select_warps(block_d: int) -> int:
    return 4 if block_d <= 4096 else 8


SELECT_IMPLS = ("hist", "bisect", "bisect2", "packed")


SELECT_IMPL = "packed"  # default select (v10: 13-25 % faster than "bisect" on the H200, benchmarks/NOTES.md)


# v13: windowed select around the previous token's threshold; v25: 2^5 patterns (2 + 5 counts), +0.2-0.4 % end to
# end over v13's 2^6 for LaRoSA at p = 0.4 / 0.5 / 0.75 (H200, two alternations, `results/history/window-v25`), on
# random weights, whose thresholds stay in a 2^5 window for 80-100 % of tokens. v29: on a trained model (SmolLM2-135M,
# `benchmarks/guess_miss.py`) they stay in it for 27-35 % of tokens at p = 0.5, in 2^7 for 73-83 %. Timed in the
# step (`graph_timeline.py`, LaRoSA LLaMA2-7B p = 0.5, each width always hit / never hit): 2^5 3561 / 3749 us, 2^7
# 3583 / 3748, 2^8 3604 / 3751, no hints 3691. At SmolLM2's hit shares that is ~3689 us for 2^5 and ~3618 for 2^7
# (-1.9 %); on random weights 2^7 costs +0.6 %. The default serves trained models: 2^7.
HINT_WINDOW = 7


def select_window() -> int:
    """Width (log2 patterns) of the hinted search window, or 0 for none: `HINT_WINDOW`, or
    `LAROSA_SELECT_WINDOW` (0-14)."""
    raw = os.environ.get("LAROSA_SELECT_WINDOW", str(HINT_WINDOW))
    if not raw.strip().isdigit() or not 0 <= int(raw) <= 14:
        raise ValueError(f"LAROSA_SELECT_WINDOW={raw!r}: use an integer from 0 (off) to 14")
    return int(raw)


def _hint_args(hint: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """(hint buffer, WINDOW) for a select launch: a hint needs the packed select and must be a contiguous
    int32 buffer on the rows' device; one with fewer slots than rows (a decode engine's hints, sized for its
    batch, during a multi-row prefill) is not used."""
    if hint is None or select_window() == 0:
        return None, 0
    if hint.dtype != torch.int32 or not hint.is_contiguous() or hint.device != x.device:
        raise ValueError(f"hint must be a contiguous int32 buffer on {x.device}, got {tuple(hint.shape)} "
                         f"{hint.dtype} on {hint.device}")
    return (hint, select_window()) if hint.numel() >= x.shape[0] else (None, 0)


# v30: the kernel that writes a select's row (the gate/up GEMV's finishers, before the down select) counts it into
# 2^(15 - HIST_BITS) bins of |x|'s 15-bit patterns; the select then searches the boundary bin: 2 + HIST_BITS counts
# instead of 15 (or 2 + the hint window's), exact with any counts (`_hist_window`, `_window_or_full`).
HIST_BITS = 4


def hist_bits() -> int:
    """Patterns per histogram bin, log2: `HIST_BITS`, or `LAROSA_HIST_BITS` (2-7, for A/B runs; set it before a
    decode engine is built, which sizes its buffers by it)."""
    raw = os.environ.get("LAROSA_HIST_BITS", str(HIST_BITS))
    if not raw.strip().isdigit() or not 2 <= int(raw) <= 7:
        raise ValueError(f"LAROSA_HIST_BITS={raw!r}: use an integer from 2 to 7")
    return int(raw)


# v30: the packed select's search (the hinted window's or the full 15 counts) runs as a loop (not unrolled) from
# this BLOCK_D up: the 16384-wide down select with x in its list spills 80 B of stack so, 304 B unrolled
# (`benchmarks/kernel_resources.py`), and beside the adapter's streaming those spills cost: LaRoSA's (un-hinted) down
# select 13.0 -> 10.3 us in the step, +1.1 / +1.5 / +3.1 % tok/s at p = 0.5 / 0.4 / 0.75 (LLaMA2-7B, H200,
# `results/history/v30-histab`).
SELECT_DYN_MIN = 16384


def select_dyn_from() -> int:
    """BLOCK_D from which the packed selects search in a run-time loop (`SELECT_DYN_MIN`; with `hist` the search is
    always one), 0 for none: `LAROSA_SELECT_DYN` (A/B runs) "1" everywhere, "0" nowhere, "N" from BLOCK_D N up."""
    raw = os.environ.get("LAROSA_SELECT_DYN", str(SELECT_DYN_MIN))
    if not raw.isdigit():
        raise ValueError(f"LAROSA_SELECT_DYN={raw!r}: use 0, 1 or a row width")
    return int(raw)


def select_dyn(block_d: int) -> bool:
    """Whether a packed select of BLOCK_D lanes searches in a run-time loop (`select_dyn_from`)."""
    n = select_dyn_from()
    return n > 0 and block_d >= n


def hist_trust() -> bool:
    """`LAROSA_HIST_TRUST=1` (A/B runs only): the select searches the histogram's boundary bin without checking that
    it holds t (4 counts instead of 6, no fallback search compiled): exact only where the histogram is the row's own,
    as the decode engine's always is. Default off (exact with any counts)."""
    raw = os.environ.get("LAROSA_HIST_TRUST", "0")
    if raw not in ("0", "1"):
        raise ValueError(f"LAROSA_HIST_TRUST={raw!r}: use 1 or 0")
    return raw == "1"


def hist_bins() -> int:
    """Bins per row of a select histogram (`select(hist=)`, `launch(hist_out=)`): 2^(15 - `hist_bits()`)."""
    return 1 << (15 - hist_bits())


def _hist_arg(hist: torch.Tensor | None, x: torch.Tensor, name: str) -> torch.Tensor | None:
    """A select histogram buffer checked like a hint (`_hint_args`): a contiguous int32 buffer on x's device,
    zeroed when first given; one with fewer than rows x `hist_bins()` entries (sized for a decode engine's batch,
    during a multi-row prefill) is not used."""
    if hist is None:
        return None
    if hist.dtype != torch.int32 or not hist.is_contiguous() or hist.device != x.device:
        raise ValueError(f"{name} must be a contiguous int32 buffer on {x.device}, got {tuple(hist.shape)} "
                         f"{hist.dtype} on {hist.device}")
    return hist if hist.numel() >= x.shape[0] * hist_bins() else None


class SideGemv(NamedTuple):
    """A dense GEMV run by extra programs of a Top-K op's launches: y[:, c0:c1] = x @ w[c0:c1].T, and
    y[:, :c0] = prev where given (the outputs an earlier launch's side programs computed). The select uses one
    SM per row for microseconds; these programs stream weights meanwhile, as extra programs of the tile /
    gathered GEMV launch that follows the select (v18, `side_in()` "gemv": they do not wait for the select,
    so x, w and prev must be complete before the select is launched, never the select's own output) or of the
    select launch itself (v16, "select"). The decode engine puts a layer's residual adapter x_mid R_l there
    (`DecodeEngine(overlap_adapters="select")`).
    x (rows, d) with unit stride; w (>= c1, d) output-major (F.linear's layout), contiguous; y (rows, >= c1);
    prev (rows, c0)."""

    x: torch.Tensor
    w: torch.Tensor
    y: torch.Tensor
    c0: int
    c1: int
    prev: torch.Tensor | None = None


SIDE_TILES = (16, 512, 2)  # side programs in a select launch (8 warps at d_in > 4096, 4 below)
SIDE_TILES_GEMV = (4, 1024, 2)  # in a tile / gathered GEMV launch (2 warps: 64 + 64 registers of tile and sums);
# v18, results/side-in-h200.json: LaRoSA p = 0.4 / 0.5 243.2 / 262.4 tok/s vs 239.3 / 257.6 at (8, 512, 2)
SIDE_IN = ("select", "gemv")
DEFAULT_SIDE_IN = "gemv"  # v18: LaRoSA +4.3 / +5.5 / +3.0 % at p = 0.4 / 0.5 / 0.75 over "select" (same run)


def side_in() -> str:
    """Which launch carries a `SideGemv` given to a Top-K op (`LAROSA_SIDE_IN`, default `DEFAULT_SIDE_IN`):
    "select", extra programs of the select launch (v16); or "gemv" (v18), extra programs of the tile or
    gathered GEMV launch that follows it as a programmatic dependent (PDL, Hopper on), which start at once
    while the GEMV's programs wait for the select (without PDL they overlap only the GEMV). The 16384-wide
    select kernel takes all 255 registers a thread may have at 8 warps (the whole register file of an SM per
    program, `benchmarks/kernel_resources.py`), so side programs in its launch run one per SM; in the 2-warp
    GEMV launch four fit on an SM. The split-K kernel has no side programs: there the select carries them
    either way."""
    v = os.environ.get("LAROSA_SIDE_IN", DEFAULT_SIDE_IN)
    if v not in SIDE_IN:
        raise ValueError(f"LAROSA_SIDE_IN={v!r}: use one of {', '.join(SIDE_IN)}")
    return v


def side_in_gemv(impl: str) -> bool:
    """Whether a `SideGemv` given to a Top-K op whose GEMV kernel is `impl` rides in the GEMV launch (tile and
    gathered kernels, `side_in()` "gemv"), not in the select launch."""
    return impl in ("tile", "gtile") and side_in() == "gemv"


def _route_side(side: SideGemv | None, impl: str, sel_given: bool, rows: int, n0: int,
                x: torch.Tensor) -> tuple[SideGemv | None, int, dict]:
    """Where a tile / gathered launch's side GEMV rides: (the side GEMV for its select launch, or None; grid
    slices along axis 1 and kernel arguments for the GEMV launch, `_side_gemv_kwargs`). Checked before
    anything is launched; with `sel` given (no select here) it can only ride in the GEMV launch."""
    in_gemv = side is not None and side_in_gemv(impl)
    if sel_given and side is not None and not in_gemv:
        raise ValueError("side= rides in the select this launch runs; with sel= give it to that select")
    m0, kw = _side_gemv_kwargs(side if in_gemv else None, rows, n0, x)
    return (None if in_gemv else side), m0, kw


def side_config(gemv: bool = False) -> dict:
    """Tiles of the side programs: A_BN outputs per program, the d inputs walked A_BK at a time, A_STAGES
    tiles loaded at once (`SIDE_TILES` in a select launch, `SIDE_TILES_GEMV` in a GEMV launch);
    `LAROSA_SIDE_TILES="A_BN,A_BK,A_STAGES"` overrides them (benchmarks/side_bench.py sweeps them)."""
    raw = os.environ.get("LAROSA_SIDE_TILES")
    tiles = SIDE_TILES_GEMV if gemv else SIDE_TILES
    if raw:
        try:
            tiles = tuple(int(v) for v in raw.split(","))
        except ValueError:
            tiles = ()
        if len(tiles) != 3 or any(v < 1 or v & (v - 1) for v in tiles[:2]) or not 1 <= tiles[2] <= 4:
            raise ValueError(f"LAROSA_SIDE_TILES={raw!r}: A_BN,A_BK (powers of two),A_STAGES (1-4)")
    return dict(zip(("A_BN", "A_BK", "A_STAGES"), tiles))


def _side_kwargs(side: SideGemv | None, rows: int, x: torch.Tensor) -> tuple[int, dict]:
    """(extra programs, kernel arguments) of a select launch's side GEMV; (0, {}) without one."""
    if side is None:
        return 0, {}
    n, kw = _side_args(side, rows, x, side_config())
    return n, dict(n_rows=rows, **kw)


def _side_gemv_kwargs(side: SideGemv | None, rows: int, n0: int, x: torch.Tensor) -> tuple[int, dict]:
    """(grid slices along axis 1, kernel arguments) of a side GEMV riding in a tile or gathered GEMV launch
    whose grid axis 0 has n0 programs (`_side_slice`: each row plane of the grid carries its own row's side
    programs); (0, {}) without one. Checks the side GEMV (call it before launching the select)."""
    if side is None:
        return 0, {}
    _, kw = _side_args(side, rows, x, side_config(gemv=True))
    m0 = triton.cdiv(kw["a_nb"], n0)
    return m0, dict(m0=m0, ROUND_BF16=_interpreted_bf16(side.x), **kw)


def check_side(side: SideGemv, rows: int, x: torch.Tensor) -> None:
    """Raise ValueError where `side` does not fit a launch over the rows x (before anything is launched)."""
    _side_args(side, rows, x, side_config())


def _side_args(side: SideGemv, rows: int, x: torch.Tensor, cfg: dict) -> tuple[int, dict]:
    """(side programs, kernel arguments but the launch's own) of a side GEMV, checked against the rows x."""
    sx, sw, sy, c0, c1, prev = side
    d = sx.shape[1]
    if sx.shape[0] != rows or sx.stride(1) != 1 or sw.dim() != 2 or sw.shape[1] != d or not sw.is_contiguous():
        raise ValueError(f"side GEMV: x {tuple(sx.shape)} must have the launch's {rows} rows and w (d_out x "
                         f"d_in, contiguous) its width, got w {tuple(sw.shape)}")
    if not 0 <= c0 < c1 <= min(sw.shape[0], sy.shape[1]) or sy.shape[0] != rows or sy.stride(1) != 1:
        raise ValueError(f"side GEMV: columns [{c0}, {c1}) of y {tuple(sy.shape)} and w {tuple(sw.shape)}")
    if (prev is None) != (c0 == 0) or (prev is not None and (prev.shape != (rows, c0) or prev.stride(1) != 1)):
        raise ValueError(f"side GEMV: prev must be (rows, c0) = {(rows, c0)} exactly when c0 > 0, got "
                         f"{None if prev is None else tuple(prev.shape)}")
    if not sx.device == sw.device == sy.device == x.device or not sx.dtype == sw.dtype == sy.dtype:
        raise ValueError("side GEMV: x, w and y must share the rows' device and one dtype")
    nb = triton.cdiv(c1 - c0, cfg["A_BN"])
    return rows * nb, dict(ax_ptr=sx, aw_ptr=sw, ay_ptr=sy, ap_ptr=prev if prev is not None else sy,
                           a_d=d, a_c0=c0, a_c1=c1, a_nb=nb, stride_ax=sx.stride(0), stride_aw=sw.stride(0),
                           stride_ay=sy.stride(0), stride_ap=prev.stride(0) if prev is not None else 0,
                           SIDE=True, HAS_PREV=prev is not None, **cfg)


COMPACT_STORES = ("tl", "asm", "asm32")
DEFAULT_COMPACT_STORE = "asm32"  # v19


def compact_store() -> str:
    """How compiled compacting selects store the kept list (`LAROSA_COMPACT_STORE`, default
    `DEFAULT_COMPACT_STORE`): "asm32", "asm" or "tl" (see `_compact_mode`)."""
    store = os.environ.get("LAROSA_COMPACT_STORE", DEFAULT_COMPACT_STORE)
    if store not in COMPACT_STORES:
        raise ValueError(f"LAROSA_COMPACT_STORE={store!r}: use one of {', '.join(COMPACT_STORES)}")
    return store


GATHER_X = True  # default since v24: +1.1-1.6 % end to end (H200, `results/history/gather-x-v24`)


def gather_x_setting() -> bool | int:
    """`LAROSA_GATHER_X`: "1" (True: every row's kept list carries x), "0" (False: none), or a width N (v25, for A/B
    runs: only rows up to N wide, e.g. 8192 leaves out the 11008-14336-wide down selects, whose compacting select
    spills 304 B of stack with x in its list and 24 B without, `results/kernel-resources-sm90.json`).
    Default `GATHER_X`."""
    raw = os.environ.get("LAROSA_GATHER_X", "1" if GATHER_X else "0")
    if raw in ("0", "1"):
        return raw == "1"
    if not raw.isdigit():
        raise ValueError(f"LAROSA_GATHER_X={raw!r}: use 1, 0, or a row width (only rows up to it carry x)")
    return int(raw)


def gather_x(d_in: int) -> bool:
    """Whether the compacting select of a d_in-wide row stores x with each kept position, so that the gathered GEMV
    reads both in one load (`gather_x_setting`; `_packed_select`'s PACK_X)."""
    setting = gather_x_setting()
    return setting if isinstance(setting, bool) else d_in <= setting


def _pack_kw(pack_x: bool, compact: bool) -> dict:
    """The PACK_X constexpr of a select launch: only with a kept list."""
    if pack_x and not compact:
        raise ValueError("pack_x= packs x into the kept list: it needs compact=True")
    return {"PACK_X": True} if pack_x else {}


def _compact_mode(compact: bool) -> int:
    """The COMPACT constexpr of a select launch: 0 (no list), 4 (the list stored by predicated inline PTX from
    32-bit offsets, `_scatter_i32_at`: the default on compiled kernels since v19, `LAROSA_COMPACT_STORE=asm32`),
    3 (the same from 64-bit pointers, `_scatter_i32`: the default of v16-v18, 11.9 vs 13.5 us per select at
    d_in = 11008 against `tl.store`, `results/select-compact-h200.json`; `LAROSA_COMPACT_STORE=asm`) or 1 (the
    same list by `tl.store`: under the interpreter, which runs no PTX, or with `LAROSA_COMPACT_STORE=tl`)."""
    if not compact:
        return 0
    store = compact_store()
    if store == "tl" or os.environ.get("TRITON_INTERPRET") == "1":
        return 1
    return 4 if store == "asm32" else 3


def _check_compact(compact: bool, d_in: int) -> None:
    if compact and d_in >= 1 << 15:  # the compacting prefix sum counts entries above t in 16 signed bits
        raise ValueError(f"the compacting select takes rows up to 32767 wide, got {d_in}; use impl='tile'")


def _compact_k(k: int, d_in: int) -> int:
    """k of a compacting select or gathered launch: at least 1, at most d_in (the list has d_in places)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return min(k, d_in)


def select(x: torch.Tensor, k: int, num_warps: int | None = None, impl: str = SELECT_IMPL,
           pdl: bool = False, hint: torch.Tensor | None = None, compact: bool = False,
           side: SideGemv | None = None, prefetch: Prefetch | None = None, pack_x: bool = False,
           hist: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, 2) int32: threshold pattern and cutoff index of each row's exact Top-k. `pdl`: the next
    launch is a programmatic dependent. `hint` (int32, a slot per row, any values): each row's threshold
    from the previous call, to search near first; updated in place. It changes the time, never the result
    (packed select only, both). `compact` (packed select only): (rows, 2 + k), each row's k kept positions
    (ascending) after its (t, cutoff), for `impl="gtile"`. `side` (packed select only): a dense GEMV computed
    by extra programs of the same launch (`SideGemv`). `prefetch` (packed select with a hint, one row): extra
    programs of the launch prefetch the GEMV's likely weight rows into L2 (`triton_prefetch`; the result is
    the same). `pack_x` (with `compact`): each list entry is (x's 16 bits << 16) | position (`gather_x`).
    `hist` (packed select only, v30): each row's histogram of x (int32, `hist_bins()` per row) as counted by the
    launch that wrote x (`launch(hist_out=)`), zeroed in place by this launch; it takes the place of `hint`
    (neither read nor written then) and of `prefetch`. Like the hint it changes the time, never the result."""
    rows, d_in = x.shape
    if (compact or side is not None or prefetch is not None or hist is not None) and impl != "packed":
        raise ValueError(f"compact=True, side=, prefetch= and hist= need the packed select, not {impl!r}")
    _check_compact(compact, d_in)
    k = _compact_k(k, d_in) if compact else k
    sel = torch.empty(rows, 2 + k if compact else 2, dtype=torch.int32, device=x.device)
    block_d = max(2, triton.next_power_of_2(d_in))  # the packed select pairs entries
    kernel = {"hist": select_kernel, "bisect": select_bisect_kernel, "bisect2": select_bisect2_kernel,
              "packed": select_packed_kernel}[impl]
    warps = num_warps or select_warps(block_d)
    if impl != "packed":
        kernel[(rows,)](x, sel, d_in, k, x.stride(0), BLOCK_D=block_d, num_warps=warps)
        return sel
    hist = _hist_arg(hist, x, "hist")
    hint, window = (None, 0) if hist is not None else _hint_args(hint, x)
    extra, side_kw = _side_kwargs(side, rows, x)
    if side is not None:
        side_kw["ROUND_BF16"] = _interpreted_bf16(side.x)
    n_pf, pf_kw = prefetch_kwargs(prefetch if hint is not None else None, x, warps, rows + extra)
    slots = hist if hist is not None else hint
    kernel[(rows + extra + n_pf,)](x, sel, slots if slots is not None else sel, d_in, k, x.stride(0), BLOCK_D=block_d,
                                   num_warps=warps, WINDOW=window, COMPACT=_compact_mode(compact),
                                   **({"PDL": True} if pdl else {}), **_wait_kw(x),
                                   **side_kw, **pf_kw, **_pack_kw(pack_x, compact),
                                   **({"HIST": hist_bits(), "HIST_TRUST": hist_trust()} if hist is not None else {}),
                                   **({"DYN": True} if select_dyn(block_d) and hist is None else {}))
    return sel


def _interpreted_bf16(x: torch.Tensor) -> bool:
    """bf16 under the interpreter, whose fp32 -> bf16 cast truncates (`_round`)."""
    return x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


PDL = True  # programmatic dependent launch of the GEMV after its select where the GPU supports it


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    return HAVE_GDC and torch.cuda.get_device_capability(device_index)[0] >= 9


def _pdl_possible(x: torch.Tensor) -> bool:
    """Compiled kernels on a CUDA device of compute capability >= 9 (Hopper), with a Triton that has grid
    dependency control."""
    if not x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _pdl_capable(x.device.index if x.device.index is not None else torch.cuda.current_device())


def pdl_default(x: torch.Tensor) -> bool:
    """PDL wherever it is possible, unless `LAROSA_KERNEL_PDL=0`."""
    return PDL and os.environ.get("LAROSA_KERNEL_PDL") != "0" and _pdl_possible(x)


def _use_pdl(x: torch.Tensor, pdl: bool | None) -> bool:
    """The caller's choice (default: `pdl_default`), never where it is not possible."""
    return pdl_default(x) if pdl is None else bool(pdl) and _pdl_possible(x)


def _wait_kw(x: torch.Tensor) -> dict:
    """A packed select's launch as a programmatic dependent of the kernel before (v20, `WAIT`): with
    `LAROSA_SELECT_WAIT=1` where PDL is possible (`pdl_default`). Off by default: end to end (LLaMA2-7B,
    results/chains-h200.json) LaRoSA +1.1 % tok/s at p = 0.5 but -2.7 % at 0.75, un-rotated Top-K +0.2 %."""
    if os.environ.get("LAROSA_SELECT_WAIT", "0") != "1" or not pdl_default(x):
        return {}
    return {"WAIT": True, "launch_pdl": True}


def _select_then_pdl(x: torch.Tensor, pdl: bool | None, mode: int, select_impl: str) -> bool:
    """Whether a select kernel runs and launches the GEMV as its programmatic dependent: Top-K mode, the
    packed select (the one that triggers its dependents), and PDL wanted and possible."""
    return mode == 0 and select_impl == "packed" and _use_pdl(x, pdl)


GATHER = False  # default: masked loads (v4). True = compact the kept rows first (v6, slower untuned: NOTES.md)


def select_compact(x: torch.Tensor, k: int, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (rows, k) int32 ascending, values (rows, k) fp32) of each row's exact Top-k: the compacting
    packed select's list (`select(..., compact=True)`) and x at it, for the split-K gather mode (v6)."""
    idx = select(x, k, num_warps, compact=True)[:, 2:].contiguous()
    return idx, x.gather(1, idx.long()).float()


IMPLS = ("split", "inline", "fused", "tile", "gtile", "spec", "auto")
IMPL = "auto"  # default for exact Top-K: gtile where k <= GTILE_MAX_KEEP * d_in, else tile (NOTES.md v15)
# v16 (the list stored by inline PTX), per op with its select (`results/gtile-ab-default-h200.json`): gathered
# rows win or tie from 40 % sparsity up on every LLaMA2-7B op (v15, with `tl.store`: only from 60 %)
GTILE_MAX_KEEP = 0.6


THRESHOLD_IMPL = "split"  # threshold mode (TEAL baseline): split-K was faster end to end (NOTES.md v11)


def default_impl(mode: int = 0) -> str:
    """The package default for a kernel mode, or `LAROSA_KERNEL_IMPL` (for benchmarking the alternatives
    end to end). "gtile" gathers exact Top-K rows and "auto" picks it or "tile" by k (`resolve_impl`); in
    the threshold mode "auto" is that mode's default and "gtile" is "tile"; in the dense mode both are
    "tile"."""
    impl = os.environ.get("LAROSA_KERNEL_IMPL", THRESHOLD_IMPL if mode == 1 else IMPL)
    if impl not in IMPLS:
        raise ValueError(f"LAROSA_KERNEL_IMPL={impl!r}; choose from {', '.join(IMPLS)}")
    if impl == "auto" and mode == 1:
        return THRESHOLD_IMPL
    return "tile" if impl in ("gtile", "auto") and mode != 0 else impl


def resolve_impl(impl: str | None, mode: int, d_in: int, k: int | None = None) -> str:
    """The kernel a `launch` runs: the caller's, else the default for the mode. "auto" is "gtile" for exact
    Top-K keeping at most GTILE_MAX_KEEP of the rows (k known), "tile" otherwise ("auto" itself where k is
    not given, for workspace sizing); "gtile" on rows of 32768 or more is "tile" (the compacting select
    counts in 16 bits)."""
    impl = default_impl(mode) if impl is None else impl
    if impl == "auto" and mode == 1:
        return THRESHOLD_IMPL
    wide = d_in >= 1 << 15
    if impl in ("gtile", "spec"):
        return "tile" if wide or (impl == "spec" and mode != 0) else impl
    if impl != "auto" or (k is None and mode == 0 and not wide):
        return impl
    return "gtile" if mode == 0 and k is not None and k <= GTILE_MAX_KEEP * d_in and not wide else "tile"


def launch(x, wt, y, k: int, *, wt2=None, bias=None, threshold: float = 0.0, mode: int = 0,
           impl: str | None = None, gather: bool | None = None,
           counters: torch.Tensor | None = None, select_impl: str = SELECT_IMPL, select_num_warps: int | None = None,
           block_k: int | None = None, block_n: int | None = None,
           rows_per_split: int | None = None, num_warps: int | None = None,
           num_stages: int | None = None, pdl: bool | None = None,
           block_m: int | None = None, sel: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, hint: torch.Tensor | None = None,
           side: SideGemv | None = None, hist: torch.Tensor | None = None,
           hist_out: torch.Tensor | None = None) -> None:
    """x (B, d_in) contiguous rows, wt (d_in, d_out) contiguous, y (B, d_out).

    `counters` (int32 zeros, at least `counters_needed` entries for these tiles) may be passed to reuse a
    buffer; the kernel leaves it zeroed. Without it a zeroed buffer is allocated per call.
    `pdl`: launch the GEMV as a programmatic dependent of its select (default `pdl_default(x)`).
    `sel`: Top-K mode with x's (t, cutoff) already found by the kernel launched just before (`rmsnorm_select`,
    which also wrote x): no select launch; with `pdl` the GEMV is that kernel's dependent. The "inline" and
    "fused" implementations find the selection themselves and ignore it.
    `residual` (rows, d_out), ungated only: y = residual + ..., added in fp32 in the epilogue before the one
    rounding (the "fused" implementation adds it afterwards: one more rounding).
    `hint`: the select's per-row threshold hint (`select`); the select kernel reads and updates it. The
    "inline" and "fused" implementations (no select kernel) ignore it.
    `side`: a dense GEMV run by extra programs of the select launch (`SideGemv`; Top-K mode with the packed
    select launched here, i.e. without `sel`), or of the tile / gathered GEMV launch (`side_in()` "gemv",
    with or without `sel`; its inputs must not come from the kernel that produced `sel`: the side programs
    do not wait for it).
    `hist` / `hist_out` (v30, tile and gathered kernels only): x's histogram for the select (`select(hist=)`,
    Top-K mode without `sel`), and a zeroed buffer of `hist_bins()` per row into which the finishers count y for
    the next select (`_finish_block`). Neither changes the result.
    """
    impl = resolve_impl(impl, mode, x.shape[1], k)
    if (hist is not None or hist_out is not None) and impl not in ("tile", "gtile"):
        raise ValueError(f"hist= and hist_out= are for the tile and gathered kernels, not impl={impl!r}")
    if side is not None and (mode != 0 or select_impl != "packed" or impl in ("inline", "fused")
                             or (sel is not None and not side_in_gemv(impl))):
        raise ValueError("side= rides in the packed select this launch runs (Top-K mode, no sel=, impl split / "
                         "tile / gtile), or with LAROSA_SIDE_IN=gemv in the tile / gtile GEMV launch")
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if impl in ("tile", "gtile"):  # they check the residual themselves
        unused = [n for n, v in (("gather", gather), ("block_k", block_k), ("rows_per_split", rows_per_split)) if v]
        if unused:
            raise ValueError(f"impl={impl!r} takes none of {', '.join(unused)} (split-K options)")
    if impl == "spec":
        from .triton_spec import launch_spec  # (imports this module)
        unused = [n for n, v in (("wt2", wt2), ("sel", sel), ("gather", gather), ("block_k", block_k),
                                 ("rows_per_split", rows_per_split), ("block_m", block_m)) if v is not None]
        if unused or mode != 0 or select_impl != "packed":
            raise ValueError(f"impl='spec' is exact Top-K (mode=0) with its own select, ungated; it takes none of "
                             f"{', '.join(unused) or 'these options'}")
        _check_residual(residual, y, None)
        launch_spec(x, wt, y, k, hint=hint, bias=bias, residual=residual, side=side, pdl=pdl)
        return
    guess = 0
    if mode == 0 and hint is not None and sel is None and x.shape[0] == 1 and impl in ("tile", "gtile") \
            and select_impl == "packed":
        guess = guess_sites().get(decode_site(x.shape[1], wt.shape[1], wt2 is not None), 0)
    if guess:  # v31 A/B: the tile kernel loading its guessed rows before the wait
        return launch_tile(x, wt, y, k, wt2=wt2, bias=bias, counters=counters, pdl=pdl, block_n=block_n,
                           num_warps=num_warps, block_m=block_m, select_num_warps=select_num_warps,
                           num_stages=num_stages, residual=residual, hint=hint, side=side, hist=hist,
                           hist_out=hist_out, guess=guess)
    if impl == "gtile":
        if mode != 0:
            raise ValueError("impl='gtile' gathers exact Top-K rows (mode=0); use impl='tile' for mode "
                             f"{mode}")
        if select_impl != "packed":
            raise ValueError(f"impl='gtile' compacts in the packed select, not {select_impl!r}")
        return launch_gtile(x, wt, y, k, wt2=wt2, bias=bias, counters=counters, pdl=pdl, block_m=block_m,
                            block_n=block_n, num_warps=num_warps, select_num_warps=select_num_warps, sel=sel,
                            residual=residual, hint=hint, side=side, hist=hist, hist_out=hist_out)
    if impl == "tile":
        return launch_tile(x, wt, y, k, wt2=wt2, bias=bias, threshold=threshold, mode=mode, counters=counters,
                           pdl=pdl, block_n=block_n, num_warps=num_warps, block_m=block_m,
                           select_num_warps=select_num_warps, select_impl=select_impl, num_stages=num_stages,
                           sel=sel, residual=residual, hint=hint, side=side, hist=hist, hist_out=hist_out)
    _check_residual(residual, y, wt2)
    if impl == "fused":
        launch_fused(x, wt, y, k, wt2=wt2, bias=bias, threshold=threshold, mode=mode, block_n=block_n,
                     block_k=block_k, num_warps=num_warps, num_stages=num_stages)
        if residual is not None:
            y.copy_(y.float() + residual.float())
        return
    rows, d_in = x.shape
    d_out = wt.shape[1]
    gather = GATHER if gather is None else gather
    presel = sel is not None and _check_presel(x, sel, mode) and impl == "split"
    if mode == 0 and gather and not presel:
        if side is not None:
            raise ValueError("side= does not ride in the gather mode's select")
        idx, xv = select_compact(x, k, select_num_warps)
        x, d_in, mode = xv, k, 3
    cfg = default_config(d_in, d_out)
    block_n = block_n or cfg["block_n"]
    block_k = block_k or cfg["block_k"]
    rps = rows_per_split or cfg["rows_per_split"]
    rps = max(block_k, min(rps, triton.next_power_of_2(d_in)))
    n_blocks = triton.cdiv(d_out, block_n)
    n_splits = triton.cdiv(d_in, rps)
    inline = impl == "inline" and mode == 0
    n_parts = 2 if wt2 is not None else 1
    counters = _zeroed_buffer(counters, rows * n_blocks, x.device)
    part = torch.empty(rows * n_parts * n_splits * d_out, dtype=torch.float32, device=x.device)
    # the select is launched last, right before the GEMV (a counter memset in between would take the
    # place of the select as the GEMV's programmatic predecessor)
    if presel:  # the split-K programs load x after waiting for (t, cutoff): safe as a dependent
        pdl = _use_pdl(x, pdl)
    else:
        pdl = not inline and _select_then_pdl(x, pdl, mode, select_impl)
        if mode == 0 and not inline:
            sel = select(x, k, select_num_warps, select_impl, pdl=pdl, hint=hint, side=side)
        else:  # the selection happens inside the GEMV programs (inline) or is not needed
            sel = idx if mode == 3 else x
    grid = (n_blocks, n_splits, rows)
    sparse_gemv_kernel[grid](
        x, wt, wt2 if wt2 is not None else wt, bias if bias is not None else wt, y, sel, part, counters,
        d_in, d_out, k, float(threshold), x.stride(0), y.stride(0), n_splits,
        residual if residual is not None else y, residual.stride(0) if residual is not None else 0,
        MODE=mode, GATED=wt2 is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        BLOCK_K=block_k, BLOCK_N=block_n, ROWS_PER_SPLIT=rps,
        INLINE=inline, BLOCK_D=triton.next_power_of_2(d_in) if inline else 16,
        SPLIT_CHUNK=1 if wt2 is not None else split_chunk(n_splits, block_n),
        **({"PDL": True, "launch_pdl": True} if pdl else {}),
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"])
