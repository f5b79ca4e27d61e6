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

BLOCK_L = 64
TARGET_PROGRAMS = 256  # about two programs per SM on an H100/H200


@triton.jit
def decode_attn_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, o_ptr, L, chunk, scale,
                  G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, BLOCK: tl.constexpr,
                  DOT_F32: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    nsplit = tl.num_programs(1)
    n_valid = tl.load(pos_ptr).to(tl.int32) + 1
    start = sp * chunk
    end = tl.minimum(tl.minimum(start + chunk, n_valid), L)  # never past the cache
    rg = tl.arange(0, GP)
    rd = tl.arange(0, HD)
    q = tl.load(q_ptr + bh * G * HD + rg[:, None] * HD + rd[None, :], mask=(rg < G)[:, None], other=0.0)
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    den = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, HD], dtype=tl.float32)
    kbase = k_ptr + bh * L * HD
    vbase = v_ptr + bh * L * HD
    for j in range(start, end, BLOCK):
        rl = j + tl.arange(0, BLOCK)
        valid = rl < end
        offs = rl.to(tl.int64)[:, None] * HD + rd[None, :]
        k = tl.load(kbase + offs, mask=valid[:, None], other=0.0)
        if DOT_F32:  # the interpreter's tl.dot misreads bf16 operands (triton 3.9): multiply in fp32
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        den = den * alpha + tl.sum(p, 1)
        v = tl.load(vbase + offs, mask=valid[:, None], other=0.0)
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


@triton.jit
def decode_attn_combine_kernel(m_ptr, l_ptr, o_ptr, out_ptr, nsplit, G: tl.constexpr, GP: tl.constexpr,
                    GR: tl.constexpr, NSP: tl.constexpr, HD: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    rs = tl.arange(0, NSP)
    rg = tl.arange(0, GR)
    stats = (bh * nsplit + rs[:, None]) * GP + rg[None, :]
    ms = tl.load(m_ptr + stats, mask=(rs < nsplit)[:, None], other=float("-inf"))
    mx = tl.max(ms, 0)  # split 0 always holds position 0: finite
    rd = tl.arange(0, HD)
    den = tl.zeros([GR], dtype=tl.float32)
    acc = tl.zeros([GR, HD], dtype=tl.float32)
    for s in range(nsplit):
        row = (bh * nsplit + s) * GP + rg
        w = tl.exp(tl.load(m_ptr + row) - mx)  # empty splits: exp(-inf) = 0
        den += w * tl.load(l_ptr + row)
        acc += w[:, None] * tl.load(o_ptr + row[:, None] * HD + rd[None, :])
    out = acc / den[:, None]
    tl.store(out_ptr + bh * G * HD + rg[:, None] * HD + rd[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rg < G)[:, None])


def plan(batch: int, kv_heads: int, cache_len: int) -> tuple[int, int]:
    """(splits, positions per split): about TARGET_PROGRAMS programs, chunks a multiple of BLOCK_L."""
    blocks = triton.cdiv(cache_len, BLOCK_L)
    want = max(1, min(blocks, TARGET_PROGRAMS // max(1, batch * kv_heads)))
    chunk = triton.cdiv(blocks, want) * BLOCK_L
    return triton.cdiv(cache_len, chunk), chunk


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    b, kvh, g, hd = q.shape
    L = k_cache.shape[2]
    nsplit, chunk = plan(b, kvh, L)
    gp = max(16, triton.next_power_of_2(g))  # tl.dot needs 16 rows
    m = torch.empty(b * kvh * nsplit * gp, dtype=torch.float32, device=q.device)
    den = torch.empty_like(m)
    o = torch.empty(b * kvh * nsplit * gp, hd, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    decode_attn_split_kernel[(b * kvh, nsplit)](q, k_cache, v_cache, pos, m, den, o, L, chunk, scale,
                                     G=g, GP=gp, HD=hd, BLOCK=BLOCK_L,
                                     DOT_F32=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4)
    decode_attn_combine_kernel[(b * kvh,)](m, den, o, out, nsplit, G=g, GP=gp, GR=triton.next_power_of_2(g),
                                NSP=triton.next_power_of_2(nsplit), HD=hd, num_warps=4)
    return out
