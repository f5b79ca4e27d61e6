"""Decode attention (one query position per row) over a static KV cache, split along the cache.

The engine's cache is static (max_len positions) and filled up to `pos`; a general attention kernel
with a mask reads all max_len positions and runs one program per (batch, head) tile. Here the current
position is read from device memory, so only positions 0..pos are loaded (no host sync, graph-safe),
and the cache is split into chunks handled by separate programs (flash-decoding): each writes its
running max, denominator and unnormalised output per query row, and a second launch combines them.

Layout: q (B, KVH, G, HD) (the G query heads that share a KV head), caches (B, KVH, L, HD), pos (1,)
int64. Output (B, KVH, G, HD) in q's dtype, which is the engine's (B, 1, H * HD) head order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_gemv import _use_pdl, gdc_launch_dependents, gdc_wait

BLOCK_L = 64
TARGET_PROGRAMS = 256  # about two programs per SM on an H100/H200
BALANCED = True  # v24: splits sized by the filled length at run time (`balanced`): +1.6-2.9 % tok/s at 2048 tokens


@triton.jit
def decode_attn_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, o_ptr, L, chunk, scale,
                             G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, BLOCK: tl.constexpr,
                             DOT_F32: tl.constexpr, ROPE: tl.constexpr = False, cos_ptr=None, sin_ptr=None,
                             stride_qkv=0, kv_off=0, v_off=0, KVH: tl.constexpr = 1,
                             COMBINE: tl.constexpr = False, cnt_ptr=None, out_ptr=None, GR: tl.constexpr = 1,
                             NSP: tl.constexpr = 1, PDL: tl.constexpr = False, BALANCED: tl.constexpr = False,
                             V_EARLY: tl.constexpr = False):
    """One (batch, KV head) x one chunk of cache positions. With ROPE (`rope_decode_attention`) q_ptr is
    the q/k/v projection's output (B, 1, q + 2 kv features): the program applies the rotary embedding
    (HF's rotate-half, cos/sin rows of the position) to its G query heads and to the new key, takes the
    new key and value for position pos from registers instead of the cache, and the program whose chunk
    holds pos writes them to the cache (the engine's RoPE and two cache-write kernels, folded in).
    COMBINE (`counters=` of `rope_decode_attention`, the engine's default since v18): the last program of
    each (batch, KV head) to finish (a counter in the caller's zeroed buffer, left zeroed) combines the
    splits, so no combine launch follows. PDL (v20): launched as a programmatic dependent, the program lets its
    own dependents launch (the next projection's programs load their weights meanwhile, `triton_dense`), then
    waits for the kernel before it, before any load. BALANCED (v24, `balanced`): the splits divide the filled
    positions 0..pos (whole blocks each) instead of the whole cache, so every split has work at every position
    past the first few blocks; `chunk` is then only the plan's upper bound. V_EARLY (v31, `v_early`): each block's
    values are loaded before its scores are computed, so the key and value loads are in flight together."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    bh = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    nsplit = tl.num_programs(1)
    pos = tl.load(pos_ptr).to(tl.int32)
    n_valid = pos + 1
    if BALANCED:
        chunk = tl.cdiv(tl.cdiv(n_valid, nsplit), BLOCK) * BLOCK
    start = sp * chunk
    end = tl.minimum(tl.minimum(start + chunk, n_valid), L)  # never past the cache
    rg = tl.arange(0, GP)
    rd = tl.arange(0, HD)
    kbase = k_ptr + bh * L * HD
    vbase = v_ptr + bh * L * HD
    if ROPE:
        row = q_ptr + (bh // KVH) * stride_qkv
        h = bh % KVH
        rot = (rd + HD // 2) % HD  # rotate-half: out[d] = x[d] cos[d] + sign[d] x[rot[d]] sin[d]
        sgn = tl.where(rd < HD // 2, -1.0, 1.0)
        cs = tl.load(cos_ptr + rd).to(tl.float32)
        sn = tl.load(sin_ptr + rd).to(tl.float32) * sgn
        qh = row + (h * G + rg)[:, None] * HD
        gm = (rg < G)[:, None]
        qa = tl.load(qh + rd[None, :], mask=gm, other=0.0).to(tl.float32)
        qb = tl.load(qh + rot[None, :], mask=gm, other=0.0).to(tl.float32)
        q = (qa * cs[None, :] + qb * sn[None, :]).to(q_ptr.dtype.element_ty)
        kh = row + kv_off + h * HD
        k_new = (tl.load(kh + rd).to(tl.float32) * cs + tl.load(kh + rot).to(tl.float32) * sn).to(
            k_ptr.dtype.element_ty)
        v_new = tl.load(row + v_off + h * HD + rd).to(v_ptr.dtype.element_ty)
        if (pos >= start) & (pos < start + chunk):
            tl.store(kbase + pos.to(tl.int64) * HD + rd, k_new)
            tl.store(vbase + pos.to(tl.int64) * HD + rd, v_new)
    else:
        q = tl.load(q_ptr + bh * G * HD + rg[:, None] * HD + rd[None, :], mask=(rg < G)[:, None], other=0.0)
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    den = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, HD], dtype=tl.float32)
    for j in range(start, end, BLOCK):
        rl = j + tl.arange(0, BLOCK)
        valid = rl < end
        offs = rl.to(tl.int64)[:, None] * HD + rd[None, :]
        k = tl.load(kbase + offs, mask=valid[:, None], other=0.0)
        if V_EARLY:
            v = tl.load(vbase + offs, mask=valid[:, None], other=0.0)
        if ROPE:  # position pos from registers (this launch may be writing it)
            k = tl.where((rl == pos)[:, None], k_new[None, :], k)
        if DOT_F32:  # the interpreter's tl.dot misreads bf16 operands (triton 3.9): multiply in fp32
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        den = den * alpha + tl.sum(p, 1)
        if not V_EARLY:
            v = tl.load(vbase + offs, mask=valid[:, None], other=0.0)
        if ROPE:
            v = tl.where((rl == pos)[:, None], v_new[None, :], v)
        if DOT_F32:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    ws = (bh * nsplit + sp) * GP + rg
    tl.store(m_ptr + ws, m)
    tl.store(l_ptr + ws, den)
    tl.store(o_ptr + ws[:, None] * HD + rd[None, :], acc)
    if COMBINE:
        tl.debug_barrier()  # every thread's stores before the release below (as in the GEMV finishers)
        if tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel") == nsplit - 1:
            tl.atomic_xchg(cnt_ptr + bh, 0)
            _combine_bh(bh, m_ptr, l_ptr, o_ptr, out_ptr, nsplit, G, GP, GR, NSP, HD, ".cg")


@triton.jit
def _combine_bh(bh, m_ptr, l_ptr, o_ptr, out_ptr, nsplit, G: tl.constexpr, GP: tl.constexpr, GR: tl.constexpr,
                NSP: tl.constexpr, HD: tl.constexpr, CACHE: tl.constexpr):
    """The output rows of (batch, KV head) bh from every split's max, denominator and unnormalised output
    (CACHE ".cg" where other programs of the same launch wrote them: read past L1)."""
    rs = tl.arange(0, NSP)
    rg = tl.arange(0, GR)
    stats = (bh * nsplit + rs[:, None]) * GP + rg[None, :]
    ms = tl.load(m_ptr + stats, mask=(rs < nsplit)[:, None], other=float("-inf"), cache_modifier=CACHE)
    mx = tl.max(ms, 0)  # split 0 always holds position 0: finite
    rd = tl.arange(0, HD)
    den = tl.zeros([GR], dtype=tl.float32)
    acc = tl.zeros([GR, HD], dtype=tl.float32)
    for s in range(nsplit):
        row = (bh * nsplit + s) * GP + rg
        w = tl.exp(tl.load(m_ptr + row, cache_modifier=CACHE) - mx)  # empty splits: exp(-inf) = 0
        den += w * tl.load(l_ptr + row, cache_modifier=CACHE)
        acc += w[:, None] * tl.load(o_ptr + row[:, None] * HD + rd[None, :], cache_modifier=CACHE)
    out = acc / den[:, None]
    tl.store(out_ptr + bh * G * HD + rg[:, None] * HD + rd[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rg < G)[:, None])


@triton.jit
def decode_attn_combine_kernel(m_ptr, l_ptr, o_ptr, out_ptr, nsplit, G: tl.constexpr, GP: tl.constexpr,
                    GR: tl.constexpr, NSP: tl.constexpr, HD: tl.constexpr):
    _combine_bh(tl.program_id(0).to(tl.int64), m_ptr, l_ptr, o_ptr, out_ptr, nsplit, G, GP, GR, NSP, HD, "")


def target_programs() -> int:
    """Programs the split launch aims at (`LAROSA_ATTN_PROGRAMS`, default `TARGET_PROGRAMS`; 1-65536). Without
    `balanced` the splits cover the whole cache, so at position pos only (pos + 1) / chunk of them per KV head have
    work (sweeps: `h200_session.sh attnprograms`, v24: 256 beat 1024 and 4096 at 2048 tokens)."""
    raw = os.environ.get("LAROSA_ATTN_PROGRAMS", str(TARGET_PROGRAMS))
    if not raw.strip().isdigit() or not 1 <= int(raw) <= 65536:
        raise ValueError(f"LAROSA_ATTN_PROGRAMS={raw!r}: use an integer from 1 to 65536")
    return int(raw)


def balanced() -> bool:
    """Whether the splits divide the filled positions at run time instead of the whole cache
    (`LAROSA_ATTN_BALANCED` "1" / "0", default `BALANCED`; `decode_attn_split_kernel`'s BALANCED)."""
    raw = os.environ.get("LAROSA_ATTN_BALANCED", "1" if BALANCED else "0")
    if raw not in ("0", "1"):
        raise ValueError(f"LAROSA_ATTN_BALANCED={raw!r}: use 1 or 0")
    return raw == "1"


V_EARLY = False  # v31 A/B (`LAROSA_ATTN_V_EARLY`): value loads issued with the key loads


def v_early() -> bool:
    """Whether the split kernel loads each block's values before computing its scores (`LAROSA_ATTN_V_EARLY` "1" /
    "0", default `V_EARLY`; `decode_attn_split_kernel`'s V_EARLY). Same result, other load order."""
    raw = os.environ.get("LAROSA_ATTN_V_EARLY", "1" if V_EARLY else "0")
    if raw not in ("0", "1"):
        raise ValueError(f"LAROSA_ATTN_V_EARLY={raw!r}: use 1 or 0")
    return raw == "1"


def plan(batch: int, kv_heads: int, cache_len: int, programs: int | None = None) -> tuple[int, int]:
    """(splits, positions per split): about `programs` (default `target_programs()`) programs, chunks a
    multiple of BLOCK_L."""
    blocks = triton.cdiv(cache_len, BLOCK_L)
    programs = target_programs() if programs is None else programs
    want = max(1, min(blocks, programs // max(1, batch * kv_heads)))
    chunk = triton.cdiv(blocks, want) * BLOCK_L
    return triton.cdiv(cache_len, chunk), chunk


def _workspace(b: int, kvh: int, nsplit: int, gp: int, hd: int, device) -> tuple:
    m = torch.empty(b * kvh * nsplit * gp, dtype=torch.float32, device=device)
    return m, torch.empty_like(m), torch.empty(b * kvh * nsplit * gp, hd, dtype=torch.float32, device=device)


def _combine(m, den, o, out, b: int, kvh: int, g: int, gp: int, hd: int, nsplit: int) -> torch.Tensor:
    decode_attn_combine_kernel[(b * kvh,)](m, den, o, out, nsplit, G=g, GP=gp, GR=triton.next_power_of_2(g),
                                           NSP=triton.next_power_of_2(nsplit), HD=hd, num_warps=4)
    return out


def _dot_f32() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    b, kvh, g, hd = q.shape
    L = k_cache.shape[2]
    nsplit, chunk = plan(b, kvh, L)
    gp = max(16, triton.next_power_of_2(g))  # tl.dot needs 16 rows
    m, den, o = _workspace(b, kvh, nsplit, gp, hd, q.device)
    decode_attn_split_kernel[(b * kvh, nsplit)](q, k_cache, v_cache, pos, m, den, o, L, chunk, scale,
                                                G=g, GP=gp, HD=hd, BLOCK=BLOCK_L, DOT_F32=_dot_f32(),
                                                BALANCED=balanced(), V_EARLY=v_early(), num_warps=4)
    return _combine(m, den, o, torch.empty_like(q), b, kvh, g, gp, hd, nsplit)


def rope_decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, scale: float,
                          counters: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """qkv (B, F) with F = (KVH * G + 2 * KVH) * HD (q heads, then k, then v; rows contiguous), cos/sin (HD,)
    rows of the position: RoPE on q and the new key, the new key and value written to the caches at pos,
    and attention over positions 0..pos. Returns (B, KVH, G, HD) in qkv's dtype. `counters` (a zeroed int32
    buffer of at least B * KVH entries, left zeroed): the splits are combined by the last program of each
    (batch, KV head) instead of a second launch. `pdl`: launch as a programmatic dependent where possible
    (v20: in the dense step, whose o projection then loads its weights during the attention)."""
    b, kvh, L, hd = k_cache.shape
    g = qkv.shape[1] // hd // kvh - 2
    nsplit, chunk = plan(b, kvh, L)
    gp = max(16, triton.next_power_of_2(g))
    m, den, o = _workspace(b, kvh, nsplit, gp, hd, qkv.device)
    out = qkv.new_empty(b, kvh, g, hd)
    combine = counters is not None
    if combine and (counters.dtype != torch.int32 or counters.numel() < b * kvh or counters.device != qkv.device):
        raise ValueError(f"counters must be int32 on {qkv.device} with at least {b * kvh} entries")
    decode_attn_split_kernel[(b * kvh, nsplit)](qkv, k_cache, v_cache, pos, m, den, o, L, chunk, scale,
                                                G=g, GP=gp, HD=hd, BLOCK=BLOCK_L, DOT_F32=_dot_f32(), ROPE=True,
                                                cos_ptr=cos, sin_ptr=sin, stride_qkv=qkv.stride(0),
                                                kv_off=kvh * g * hd, v_off=kvh * (g + 1) * hd, KVH=kvh,
                                                COMBINE=combine, cnt_ptr=counters, out_ptr=out,
                                                GR=triton.next_power_of_2(g), NSP=triton.next_power_of_2(nsplit),
                                                BALANCED=balanced(), V_EARLY=v_early(), num_warps=4,
                                                **({"PDL": True, "launch_pdl": True}
                                                   if pdl and _use_pdl(qkv, None) else {}))
    return out if combine else _combine(m, den, o, out, b, kvh, g, gp, hd, nsplit)
