"""Plain PyTorch references of every kernel op (the definition the Triton kernels are tested against).

Selection rule shared by all ops: keep exactly k entries per row, those of largest |x|; among entries
of equal |x| at the threshold, the lower indices win (a deterministic, exact-k tie rule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def topk_keep_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact-k mask, ties broken towards lower indices (matches the kernels bit for bit)."""
    d = x.shape[-1]
    if k >= d:
        return torch.ones_like(x, dtype=torch.bool)
    mag = x.abs().to(_acc(x))
    # stable descending sort: equal magnitudes keep index order, so lower indices come first
    order = torch.sort(mag, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order, True)


def topk_gemv_ref(x: torch.Tensor, wt: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """y = TopK_k(x) @ wt (+ bias) (+ residual); x (..., d_in), wt = W^T (d_in, d_out). fp32 accumulate (fp64
    for fp64), rounded once."""
    xs = torch.where(topk_keep_mask(x, k), x, torch.zeros_like(x))
    acc = _acc(x)
    y = xs.to(acc) @ wt.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    if residual is not None:
        y = y + residual.to(acc)
    return y.to(x.dtype)


def threshold_gemv_ref(x: torch.Tensor, wt: torch.Tensor, threshold: float) -> torch.Tensor:
    """TEAL-style: y = (x * (|x| > t)) @ wt."""
    acc = _acc(x)
    xs = torch.where(x.abs().to(acc) > threshold, x, torch.zeros_like(x))  # compare in fp32 (fp64)
    return (xs.to(acc) @ wt.to(acc)).to(x.dtype)


def topk_gate_up_ref(x: torch.Tensor, wt_gate: torch.Tensor, wt_up: torch.Tensor, k: int) -> torch.Tensor:
    """h = silu(TopK(x) @ Wg^T) * (TopK(x) @ Wu^T), fp32 inside, cast once."""
    acc = _acc(x)
    xs = torch.where(topk_keep_mask(x, k), x, torch.zeros_like(x)).to(acc)
    return (F.silu(xs @ wt_gate.to(acc)) * (xs @ wt_up.to(acc))).to(x.dtype)


def rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm arithmetic: normalise in fp32 (fp64 inputs too, as HF does), cast back to x's dtype,
    then scale by w."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def dense_linear_ref(x: torch.Tensor, w: torch.Tensor, w_up: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                     norm_w: torch.Tensor | None = None, eps: float = 0.0, rms: bool = False) -> torch.Tensor:
    """The dense decode step's block in plain PyTorch (HF's arithmetic and roundings): h = RMSNorm(x) * norm_w
    (with `rms` and no norm_w a norm weight of ones; x without either), y = h @ w.T (+ bias), or
    silu(h @ w.T) * (h @ w_up.T) when w_up is given; + residual."""
    if rms and norm_w is None:
        norm_w = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    h = x if norm_w is None else rmsnorm_ref(x, norm_w, eps)
    y = torch.nn.functional.linear(h, w, bias)
    if w_up is not None:
        y = torch.nn.functional.silu(y) * torch.nn.functional.linear(h, w_up)
    return y if residual is None else residual + y


def rmsnorm_topk_ref(x: torch.Tensor, res: torch.Tensor | None, norm_w: torch.Tensor, eps: float,
                     wt: torch.Tensor, wt_up: torch.Tensor | None, k: int,
                     bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(xs, y): xs = x + res (x without res), h = RMSNorm(xs) * norm_w, y = TopK_k(h) @ wt (+ bias), or
    silu(TopK_k(h) @ wt) * (TopK_k(h) @ wt_up) when wt_up is given."""
    xs = x if res is None else x + res
    h = rmsnorm_ref(xs, norm_w, eps)
    if wt_up is None:
        return xs, topk_gemv_ref(h, wt, k, bias)
    if bias is not None:
        raise ValueError("the gated form takes no bias")
    return xs, topk_gate_up_ref(h, wt, wt_up, k)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """q (B, KVH, G, HD) of one position `pos` against cache positions 0..pos of (B, KVH, L, HD) caches."""
    keep = (torch.arange(k_cache.shape[2], device=q.device) <= pos.reshape(-1)[:1]).expand(q.shape[2], -1)
    return torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=keep, scale=scale)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's RoPE partner of x (..., HD): (-x[HD/2:], x[:HD/2])."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE of x (..., HD) with cos/sin rows (HD,), computed in fp32 and rounded once."""
    xf = x.float()
    return (xf * cos.float() + rotate_half(xf) * sin.float()).to(x.dtype)


def rope_decode_attention_ref(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                              cos: torch.Tensor, sin: torch.Tensor, scale: float) -> torch.Tensor:
    """The q/k/v projection's output qkv (B, (KVH * G + 2 * KVH) * HD) of position `pos`: RoPE on q and k,
    k and v written to the (B, KVH, L, HD) caches at pos (in place), then `decode_attention_ref`.
    Returns (B, KVH, G, HD)."""
    b, kvh, _, hd = k_cache.shape
    g = qkv.shape[1] // hd // kvh - 2
    q, k, v = qkv.view(b, kvh * (g + 2), hd).split([kvh * g, kvh, kvh], dim=1)
    q, k = rope_rotate_ref(q, cos, sin), rope_rotate_ref(k, cos, sin)
    k_cache.index_copy_(2, pos.reshape(-1)[:1], k[:, :, None].to(k_cache.dtype))
    v_cache.index_copy_(2, pos.reshape(-1)[:1], v[:, :, None].to(v_cache.dtype))
    return decode_attention_ref(q.reshape(b, kvh, g, hd), k_cache, v_cache, pos, scale)
