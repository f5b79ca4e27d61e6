"""A lean decode engine: static KV cache, prefill, then a compiled, graph-captured decode step.

The engine holds plain tensors (no HF modules) and one pure function per decoder layer, so the same
code runs every model the package produces:

  dense         F.linear on the original (or fused) weights
  LaRoSA fused  Top-K sparse GEMV kernels (`larosa::topk_linear`, `larosa::topk_gate_up`) on the
                rotated weights, residual adapters R_l between layers, optional in-layer rotation
  un-rotated    the same kernels without rotations
  TEAL          magnitude thresholds applied in the producer (fused by the compiler) and the
                threshold-mode kernel skipping the zeroed inputs

Models come from an HF model (dense or transformed by `larosa.transform`, read through the `ArchSpec`
registry) or from a shape with random weights (`larosa.shapes`), for speed work where only shapes matter.

On CUDA the per-layer function is compiled with `torch.compile` (one graph reused by every layer with
the same static signature) and the whole decode step (embedding, layers, head, sampling, cache write,
position update) is captured in one CUDA graph: generating n tokens is n graph replays, no host sync
per token. The decode position's attention is `larosa::decode_attention` (reads only the filled cache
positions), and each residual adapter GEMV runs in extra programs of a launch of its layer's MLP half (the
gate/up or down GEMV launch with the tile and gathered kernels, `triton_gemv.side_in`, else the select
launch), on the SMs that launch leaves idle (`mlp_block_side`; or on a side stream, or in order:
`DecodeEngine(overlap_adapters=...)`). On the CPU everything runs eagerly (tests); the custom ops fall
back to their PyTorch references there, so the CPU path is the plain-PyTorch reference of the GPU path.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arch import decoder_layers, get_submodule, layer_body, spec_for
from .errors import LarosaError
from .kernels import ops as _ops  # noqa: F401  (registers torch.ops.larosa.*)
from .kernels.reference import rmsnorm_ref, rotate_half


class Site(NamedTuple):
    """Static sparsity of one site: mode and kept inputs (Top-K) per token, and the Top-K GEMV kernel
    (`triton_gemv.IMPLS`; None = the package default; set by the engine)."""

    mode: str = "dense"
    k: int = 0
    kernel: Optional[str] = None


class LayerStatic(NamedTuple):
    """Everything about a layer that is a Python constant (the compiled function specialises on it)."""

    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    eps: float
    attn_in: Site
    attn_out: Site
    mlp_in: Site
    mlp_out: Site
    qk_norm: bool
    rotate_mlp: bool
    adapter: bool
    q_size: int
    kv_size: int
    # Top-K block inputs: the RMSNorm and the select in one kernel (`larosa::rmsnorm_topk`); set by the engine
    fused_norm: bool = False
    # Top-K o and down projections: the residual add in the GEMV's epilogue; set by the engine
    fused_residual: bool = False
    # bit i set: site i's select (0 q/k/v, 1 o, 2 gate/up, 3 down) keeps a threshold hint; set by the engine
    hint_sites: int = 0b1111
    # adapters in the selects (`mlp_block_side`): adapter columns computed in the gate/up select's launch
    adapter_cols: int = 0
    # decode: RoPE, the cache write and attention in one op (`larosa::rope_decode_attention`); set by the engine
    fused_rope: bool = False
    # dense sites: `larosa::dense_linear` (the block's norm, bias, SiLU * up and residual in the GEMV launch, its
    # first weight tiles loaded before it waits for its input); set by the engine
    dense_kernel: bool = False
    # v30: the gate/up GEMV counts its output into the layer's histogram, where the down select starts; set by the
    # engine (`DecodeEngine(down_hist=)`)
    down_hist: bool = False
    # both block-input norm weights are all ones (folded into the projections, as LaRoSA's fused form and the
    # random-weight shapes have them): `dense_linear` then scales by the rms alone, without loading them
    unit_norms: bool = False


@dataclass
class LayerWeights:
    """Tensors of one layer. Projection weights are (d_out, d_in) for dense sites and input-major
    (d_in, d_out) for sparse sites (a kept input channel is one contiguous row)."""

    attn_norm: torch.Tensor
    wqkv: torch.Tensor
    bqkv: Optional[torch.Tensor]
    wo: torch.Tensor
    bo: Optional[torch.Tensor]
    mlp_norm: torch.Tensor
    wgate: torch.Tensor
    wup: torch.Tensor
    wdown: torch.Tensor
    q_norm: Optional[torch.Tensor] = None
    k_norm: Optional[torch.Tensor] = None
    rotate_mlp: Optional[torch.Tensor] = None
    # residual adapter R_l as F.linear's weight (R_l^T, contiguous: each output's weights in one row): the layer
    # returns x_mid R_l + down'(m), with R_l already folded into `wdown`
    adapter: Optional[torch.Tensor] = None
    # TEAL: thresholds of (attn_in, attn_out, mlp_in, mlp_out) as a tensor, so layers share one graph
    thresholds: Optional[torch.Tensor] = None
    # weighted selection: x -> x * s before ranking (the weights' input rows were divided by s)
    scale_attn_out: Optional[torch.Tensor] = None
    scale_mlp_out: Optional[torch.Tensor] = None
    # zeroed int32 workspace of the GEMV kernels (counters, fp32 sums; left zeroed): no memset per projection
    counters: Optional[torch.Tensor] = None

    def tensors(self) -> tuple:
        return (self.attn_norm, self.wqkv, self.bqkv, self.wo, self.bo, self.mlp_norm, self.wgate, self.wup,
                self.wdown, self.q_norm, self.k_norm, self.rotate_mlp, self.adapter, self.thresholds,
                self.scale_attn_out, self.scale_mlp_out, self.counters)

    def to(self, device=None, dtype=None) -> "LayerWeights":
        def mv(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() and t.dim() > 0 else t.dtype)
        return LayerWeights(*[mv(t) for t in self.tensors()])

    def add_counters(self, rows: int = 8) -> "LayerWeights":
        """Give the sparse kernels a zeroed counter workspace (up to `rows` rows of the widest output)."""
        widest = max(max(w.shape) for w in (self.wqkv, self.wo, self.wgate, self.wdown))
        self.counters = _ops.counter_workspace(rows, widest, self.wqkv.device)
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


_rms = rmsnorm_ref  # HF's RMSNorm arithmetic (the fused norm + select op computes the same)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd); cos/sin (T, hd): HF's rotate-half convention, in x's dtype."""
    return x * cos[None, :, None, :] + rotate_half(x) * sin[None, :, None, :]


def _apply_threshold(x: torch.Tensor, thr: Optional[torch.Tensor], i: int, site: Site) -> torch.Tensor:
    if site.mode != "threshold":
        return x
    return x * (x.abs() > thr[i]).to(x.dtype)


def _site_input(x: torch.Tensor, scale, probe, thr, i: int, site: Site) -> torch.Tensor:
    """A site's input on its way to the projection: weighted-selection scale, probe, TEAL threshold."""
    if scale is not None:
        x = x * scale
    if probe is not None:
        probe(i, x)
    return _apply_threshold(x, thr, i, site)


def _hint(hints: Optional[torch.Tensor], site: int, st: LayerStatic) -> Optional[torch.Tensor]:
    """The select's threshold hints of one site (a slot per row), or None (no hints, or not at this site)."""
    return None if hints is None or not (st.hint_sites >> site) & 1 else hints[site]


def _residual_linear(r: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], site: Site,
                     cnt: Optional[torch.Tensor], st: LayerStatic, hint: Optional[torch.Tensor] = None,
                     hist: Optional[torch.Tensor] = None) -> torch.Tensor:
    """r + the site's projection of x; the add happens in the kernel's epilogue at Top-K sites with
    `st.fused_residual` and at dense sites with `st.dense_kernel`."""
    if w.dim() == 3:  # the speculative GEMV's blocked weight (`DecodeEngine(spec=True)`)
        return torch.ops.larosa.spec_linear(x, w, site.k, r, b, hint)
    if st.fused_residual and site.mode == "topk":
        return torch.ops.larosa.topk_linear(x, w, site.k, b, cnt, r, hint, site.kernel, hist)
    if st.dense_kernel and site.mode == "dense":
        return torch.ops.larosa.dense_linear(x, w, None, b, r)
    return r + _linear(x, w, b, site, cnt, hint, hist)


def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], site: Site,
            cnt: Optional[torch.Tensor] = None, hint: Optional[torch.Tensor] = None,
            hist: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x's projection at a site; `hint`, `hist`: the Top-K select's (speed only, `larosa::topk_linear`)."""
    if site.mode == "dense":
        return F.linear(x, w, b)
    if site.mode == "topk":
        return torch.ops.larosa.topk_linear(x, w, site.k, b, cnt, None, hint, site.kernel, hist)
    y = torch.ops.larosa.threshold_linear(x, w, 0.0, cnt)  # inputs already thresholded: skip the zeros
    return y if b is None else y + b


def _gate_up(h: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, site: Site,
             cnt: Optional[torch.Tensor] = None, hint: Optional[torch.Tensor] = None,
             hist: Optional[torch.Tensor] = None) -> torch.Tensor:
    if site.mode == "dense":
        return F.silu(F.linear(h, wg)) * F.linear(h, wu)
    if site.mode == "topk":
        return torch.ops.larosa.topk_gate_up(h, wg, wu, site.k, cnt, hint, site.kernel, hist)
    return (F.silu(torch.ops.larosa.threshold_linear(h, wg, 0.0, cnt))
            * torch.ops.larosa.threshold_linear(h, wu, 0.0, cnt))


def _attention(q, kc, vc, mask, pos, st: LayerStatic) -> torch.Tensor:
    """q (B, T, H, hd) against the whole static cache (B, KVH, L, hd); GQA without repeating K/V:
    the G query heads of a KV head are laid out as G*T query rows of that head. One position (decode)
    takes `larosa::decode_attention`, which reads only the cache positions 0..pos."""
    b, t = q.shape[0], q.shape[1]
    g = st.heads // st.kv_heads
    qg = q.view(b, t, st.kv_heads, g, st.head_dim).permute(0, 2, 3, 1, 4).reshape(b, st.kv_heads, g * t,
                                                                                  st.head_dim)
    if t == 1:
        o = torch.ops.larosa.decode_attention(qg, kc, vc, pos, st.scaling)
    else:
        m = mask.repeat(g, 1)[None, None]
        o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=m, scale=st.scaling)
    return o.view(b, st.kv_heads, g, t, st.head_dim).permute(0, 3, 1, 2, 4).reshape(b, t, st.heads * st.head_dim)


def attn_block(x: torch.Tensor, res: Optional[torch.Tensor], pos: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, mask: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, w: tuple,
               st: LayerStatic, probe: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """The attention half of a layer: returns the mid-layer residual x + o(attn(norm(x))), writing K/V.

    `res` (or None) is added to x first: the previous layer's adapted residual x_mid R_l when the adapter
    GEMV was split off the layer (on a side stream or in the select launches, see `DecodeEngine`)."""
    (attn_norm, wqkv, bqkv, wo, bo, _mlp_norm, _wgate, _wup, _wdown, q_norm, k_norm, _rotate_mlp, _adapter,
     thr, s_ao, _s_mo, cnt, hints, attn_cnt, _hist) = w
    b, t, _ = x.shape
    if st.fused_norm and st.attn_in.mode == "topk" and probe is None:
        xs, qkv = torch.ops.larosa.rmsnorm_topk(x, res, attn_norm, st.eps, wqkv, None, st.attn_in.k, bqkv, cnt,
                                                _hint(hints, 0, st), st.attn_in.kernel)
        x = x if res is None else xs
    else:
        if res is not None:
            x = x + res
        if st.dense_kernel and st.attn_in.mode == "dense" and probe is None:
            qkv = torch.ops.larosa.dense_linear(x, wqkv, None, bqkv, None, None if st.unit_norms else attn_norm,
                                                st.eps, True)
        else:
            h = _site_input(_rms(x, attn_norm, st.eps), None, probe, thr, 0, st.attn_in)
            qkv = _linear(h, wqkv, bqkv, st.attn_in, cnt, _hint(hints, 0, st))
    if st.fused_rope and t == 1 and not st.qk_norm:
        # v20: a programmatic dependent only where our dense o projection follows (results/chains-h200.json:
        # +0.5 % dense tok/s; before a Top-K select -1.3 to -2.4 %)
        o = torch.ops.larosa.rope_decode_attention(qkv.reshape(b, -1), kc, vc, pos, cos.reshape(-1),
                                                   sin.reshape(-1), st.scaling, attn_cnt,
                                                   st.dense_kernel and st.attn_out.mode == "dense")
        a = _site_input(o.view(b, 1, st.heads * st.head_dim), s_ao, probe, thr, 1, st.attn_out)
        return _residual_linear(x, a, wo, bo, st.attn_out, cnt, st, _hint(hints, 1, st))
    q, k, v = qkv.split([st.q_size, st.kv_size, st.kv_size], dim=-1)
    q = q.view(b, t, st.heads, st.head_dim)
    k = k.view(b, t, st.kv_heads, st.head_dim)
    v = v.view(b, t, st.kv_heads, st.head_dim)
    if st.qk_norm:
        q, k = _rms(q, q_norm, st.eps), _rms(k, k_norm, st.eps)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    kc.index_copy_(2, pos, k.transpose(1, 2))
    vc.index_copy_(2, pos, v.transpose(1, 2))
    a = _site_input(_attention(q, kc, vc, mask, pos, st), s_ao, probe, thr, 1, st.attn_out)
    return _residual_linear(x, a, wo, bo, st.attn_out, cnt, st, _hint(hints, 1, st))


def mlp_block(x: torch.Tensor, w: tuple, st: LayerStatic,
              probe: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """The MLP half on the mid-layer residual x: x + down(...) without an adapter; with one, only
    down(...), already in the next layer's basis (R_l folded into the down projection, `fold_adapter`),
    and the caller adds x @ R_l."""
    (_attn_norm, _wqkv, _bqkv, _wo, _bo, mlp_norm, wgate, wup, wdown, _q_norm, _k_norm, rotate_mlp, _adapter,
     thr, _s_ao, s_mo, cnt, hints, _attn_cnt, hist) = w
    hist = hist if st.down_hist and probe is None else None
    if st.fused_norm and st.mlp_in.mode == "topk" and not st.rotate_mlp and probe is None:
        act = torch.ops.larosa.rmsnorm_topk(x, None, mlp_norm, st.eps, wgate, wup, st.mlp_in.k, None, cnt,
                                            _hint(hints, 2, st), st.mlp_in.kernel, hist)[1]
    elif st.dense_kernel and st.mlp_in.mode == "dense" and not st.rotate_mlp and probe is None:
        act = torch.ops.larosa.dense_linear(x, wgate, wup, None, None, None if st.unit_norms else mlp_norm, st.eps,
                                            True)
    else:
        h = _rms(x, mlp_norm, st.eps)
        if st.rotate_mlp:
            h = h @ rotate_mlp
        h = _site_input(h, None, probe, thr, 2, st.mlp_in)
        act = _gate_up(h, wgate, wup, st.mlp_in, cnt, _hint(hints, 2, st), hist)
    act = _site_input(act, s_mo, probe, thr, 3, st.mlp_out)
    if st.adapter:
        return _linear(act, wdown, None, st.mlp_out, cnt, _hint(hints, 3, st), hist)
    return _residual_linear(x, act, wdown, None, st.mlp_out, cnt, st, _hint(hints, 3, st), hist)


def decoder_layer(x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                  kc: torch.Tensor, vc: torch.Tensor, w: tuple, st: LayerStatic,
                  probe: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """One decoder layer on x (B, T, D) at positions `pos` (T,), writing K/V into the cache in place.

    With an adapter R_l the layer returns (x_mid + down(m)) R_l computed as x_mid R_l + down'(m), where
    down' = down R_l is folded into the weights. `probe(site_index, x)` (eager use only) sees the four
    site inputs before sparsification."""
    x = attn_block(x, None, pos, cos, sin, mask, kc, vc, w, st, probe)
    y = mlp_block(x, w, st, probe)
    return F.linear(x, w[12]) + y if st.adapter else y


def mlp_block_side(x: torch.Tensor, w: tuple, st: LayerStatic) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP half of a layer with an adapter, and the adapter GEMV x_mid R_l run by extra programs of the
    MLP half's launches (`larosa::rmsnorm_topk_side` computes the first `st.adapter_cols` columns with the
    gate/up projection, `larosa::topk_linear_side` the rest with the down projection; since v18 in the GEMV
    launch that waits for the select, `triton_gemv.side_in`, before in the select launch itself). Returns
    (down'(m), x_mid R_l), as `mlp_block` and the adapter GEMV would. Sites that are not Top-K (or a gate/up
    input that is not norm + select fused) take the plain path."""
    (_attn_norm, _wqkv, _bqkv, _wo, _bo, mlp_norm, wgate, wup, wdown, _q_norm, _k_norm, rotate_mlp, adapter,
     thr, _s_ao, s_mo, cnt, hints, _attn_cnt, hist) = w
    if st.mlp_out.mode != "topk":
        return mlp_block(x, w, st), F.linear(x, adapter)
    prev = None
    if st.fused_norm and st.mlp_in.mode == "topk" and not st.rotate_mlp:
        act, prev = torch.ops.larosa.rmsnorm_topk_side(x, mlp_norm, st.eps, wgate, wup, st.mlp_in.k, adapter,
                                                       st.adapter_cols, cnt, _hint(hints, 2, st), st.mlp_in.kernel,
                                                       hist)
    else:
        h = _rms(x, mlp_norm, st.eps)
        if st.rotate_mlp:
            h = h @ rotate_mlp
        act = _gate_up(_site_input(h, None, None, thr, 2, st.mlp_in), wgate, wup, st.mlp_in, cnt, _hint(hints, 2, st),
                       hist)
    act = _site_input(act, s_mo, None, thr, 3, st.mlp_out)
    return torch.ops.larosa.topk_linear_side(act, wdown, st.mlp_out.k, x, adapter, prev, cnt, _hint(hints, 3, st),
                                             st.mlp_out.kernel, hist)


def fold_adapter(wdown: torch.Tensor, adapter: torch.Tensor, site: Site) -> torch.Tensor:
    """The down projection followed by the residual adapter R as one weight: down(m) R = m W' with
    W' = W^T R (input-major layout: W R; (d_out, d_in) layout: R^T W). Accumulated in fp32 (fp64 on
    the CPU and for fp64 weights), rounded once to the weight dtype."""
    acc = torch.float64 if wdown.device.type == "cpu" else torch.promote_types(wdown.dtype, torch.float32)
    if site.mode == "dense":
        return (adapter.to(acc).t() @ wdown.to(acc)).to(wdown.dtype).contiguous()
    return (wdown.to(acc) @ adapter.to(acc)).to(wdown.dtype).contiguous()


@dataclass
class ModelWeights:
    """A whole model for the engine: embedding, layers, final norm, head, rotary tables."""

    embed: torch.Tensor
    layers: list[LayerWeights]
    statics: list[LayerStatic]
    final_norm: torch.Tensor
    final_eps: float
    head: torch.Tensor
    inv_freq: torch.Tensor
    rope_scaling: float = 1.0
    meta: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def to(self, device=None, dtype=None) -> "ModelWeights":
        return replace(self, embed=self.embed.to(device=device, dtype=dtype),
                       layers=[lw.to(device, dtype) for lw in self.layers],
                       final_norm=self.final_norm.to(device=device, dtype=dtype),
                       head=self.head.to(device=device, dtype=dtype), inv_freq=self.inv_freq.to(device))

    def nbytes(self) -> int:
        """Bytes the model's tensors occupy (every layer, embedding, head, norms, tables)."""
        tops = (self.embed, self.final_norm, self.head, self.inv_freq)
        return sum(lw.nbytes() for lw in self.layers) + sum(t.numel() * t.element_size() for t in tops)

    def bytes_per_token(self, context: int = 0, batch: int = 1) -> dict:
        """Bytes one decode step reads at batch 1: kept weight rows of every projection (Top-K sites:
        k of d_in rows), norms, adapters, head, one embedding row, and `context` positions of the KV
        cache per row. Threshold sites read a varying number of rows: `weights` is None then. With
        batch > 1 the rows' kept sets differ, so Top-K weight bytes are a lower bound."""
        elt = self.embed.element_size()
        weights = 0
        for lw, st in zip(self.layers, self.statics):
            for site, ws in ((st.attn_in, [lw.wqkv]), (st.attn_out, [lw.wo]), (st.mlp_in, [lw.wgate, lw.wup]),
                             (st.mlp_out, [lw.wdown])):
                full = sum(w.numel() for w in ws)
                d_in = ws[0].shape[0] if site.mode != "dense" else ws[0].shape[1]
                frac = site.k / d_in if site.mode == "topk" else 1.0
                weights += int(full * frac) * elt
            extra = [lw.attn_norm, lw.mlp_norm, lw.bqkv, lw.bo, lw.q_norm, lw.k_norm, lw.rotate_mlp, lw.adapter]
            weights += sum(t.numel() * t.element_size() for t in extra if t is not None)
        head = self.head.numel() * elt
        st = self.statics[0]
        kv = 2 * len(self.layers) * st.kv_heads * st.head_dim * context * elt * batch
        if any(s.mode == "threshold" for st_ in self.statics for s in (st_.attn_in, st_.attn_out, st_.mlp_in,
                                                                      st_.mlp_out)):
            return {"weights": None, "adapters": 0, "head": head, "kv": kv, "total": None}
        adapters = sum(lw.adapter.numel() * elt for lw in self.layers if lw.adapter is not None)
        return {"weights": weights + head + self.embed.shape[1] * elt, "adapters": adapters, "head": head,
                "kv": kv, "total": weights + head + self.embed.shape[1] * elt + kv}


# ---------- reading an HF model (dense or transformed) ------------------------------------------------

def _site_of(sparsifier: Optional[nn.Module], d: int, layer: int, what: str) -> tuple[Site, Optional[float],
                                                                                     Optional[torch.Tensor]]:
    """(Site, threshold, score scale) of a sparsifier module (None: dense)."""
    from .modules import Threshold, TopK

    if sparsifier is None:
        return Site("dense", d), None, None
    if isinstance(sparsifier, TopK):
        if sparsifier.k >= d:
            return Site("dense", d), None, None
        return Site("topk", sparsifier.k), None, sparsifier.score_scale
    if isinstance(sparsifier, Threshold):
        return Site("threshold", 0), float(sparsifier.threshold), None
    raise LarosaError(f"layer {layer} {what}: the engine cannot run a {type(sparsifier).__name__} sparsifier")


def _unwrap_site(mod: nn.Module, layer: int, what: str):
    from .modules import OfficialSite, SiteInput

    if isinstance(mod, OfficialSite):
        raise LarosaError("the official form is a float64 simulation, not deployable: build the fused form "
                          "(larosa sparsify --form fused) to run it in the engine")
    if isinstance(mod, SiteInput):
        return mod.inner, mod.sparsifier, mod.rotate
    return mod, None, None


def _lin(body: nn.Module, path: str):
    from .modules import SparseLinear

    mod = get_submodule(body, path)
    if isinstance(mod, SparseLinear):
        return mod.inner, mod.sparsifier
    return mod, None


def _orient(w: torch.Tensor, site: Site, in_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(d_out, d_in) HF weight -> the engine layout of `site`; weighted selection divides input rows."""
    w = w.detach()
    if in_scale is not None:
        w = (w.double() / in_scale.double()[None, :]).to(w.dtype)
    return w.contiguous() if site.mode == "dense" else w.t().contiguous()


@torch.no_grad()
def from_hf(model: nn.Module) -> ModelWeights:
    """Engine weights of an HF causal LM (dense, LaRoSA fused, un-rotated Top-K or TEAL)."""
    from .modules import CatsAct

    spec = spec_for(model)
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        raise LarosaError(f"the engine's gated MLP is SiLU-gated; {type(model).__name__} uses {cfg.hidden_act}")
    if not spec.rotation_invariant:
        raise LarosaError(f"the decode engine runs Llama-layout decoders (pre-norm blocks only); "
                          f"{type(model).__name__} is not one ({spec.name})")
    layers, statics = [], []
    dense_prefill = False
    for i, layer in enumerate(decoder_layers(model, spec)):
        body = layer_body(layer)
        if isinstance(get_submodule(body, spec.act_fn), CatsAct):
            raise LarosaError("CATS is a simulation baseline here; the engine runs dense, LaRoSA and TEAL")
        a_norm, a_sp, _ = _unwrap_site(get_submodule(body, spec.attn_norm), i, "attn_in")
        m_norm, m_sp, rot = _unwrap_site(get_submodule(body, spec.mlp_norm), i, "mlp_in")
        lins = [_lin(body, p) for p in spec.attn_in]
        o_lin, o_sp = _lin(body, spec.attn_out)
        g_lin, _ = _lin(body, spec.mlp_in[0])
        u_lin, _ = _lin(body, spec.mlp_in[1])
        d_lin, d_sp = _lin(body, spec.mlp_out)
        d = lins[0][0].in_features
        s_ai, t_ai, sc_ai = _site_of(a_sp, d, i, "attn_in")
        s_ao, t_ao, sc_ao = _site_of(o_sp, o_lin.in_features, i, "attn_out")
        s_mi, t_mi, sc_mi = _site_of(m_sp, d, i, "mlp_in")
        s_mo, t_mo, sc_mo = _site_of(d_sp, d_lin.in_features, i, "mlp_out")
        attn = get_submodule(body, spec.attn_in[0].rpartition(".")[0])
        head_dim = int(getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
        qn = kn = None
        if spec.qk_norm is not None:
            qn = get_submodule(body, spec.qk_norm[0]).weight.detach()
            kn = get_submodule(body, spec.qk_norm[1]).weight.detach()
        from .arch import norm_eps

        a_gamma = a_norm.weight.detach()
        m_gamma = m_norm.weight.detach()
        if sc_ai is not None:  # fold the score scale into the norm output: x' = x * s, W' = W / s
            a_gamma = (a_gamma.double() * sc_ai.double()).to(a_gamma.dtype)
        dense_prefill = dense_prefill or any(getattr(sp, "dense_prefill", False) for sp in (a_sp, o_sp, m_sp, d_sp))
        if sc_mi is not None and rot is not None:  # block-level Q: scale the rotation's output columns
            rot = (rot.detach().double() * sc_mi.double()[None, :]).to(rot.dtype)
        elif sc_mi is not None:
            m_gamma = (m_gamma.double() * sc_mi.double()).to(m_gamma.dtype)
        wqkv = torch.cat([lin.weight.detach() for lin, _ in lins], 0)
        biases = [lin.bias for lin, _ in lins]
        bqkv = torch.cat([b.detach() for b in biases], 0) if all(b is not None for b in biases) else None
        if bqkv is None and any(b is not None for b in biases):
            raise LarosaError("q/k/v must all have biases or none")
        thr = None
        if "threshold" in (s_ai.mode, s_ao.mode, s_mi.mode, s_mo.mode):
            thr = torch.tensor([t if t is not None else -1.0 for t in (t_ai, t_ao, t_mi, t_mo)],
                               dtype=a_gamma.dtype)
        lw = LayerWeights(
            attn_norm=a_gamma, wqkv=_orient(wqkv, s_ai, sc_ai), bqkv=bqkv,
            wo=_orient(o_lin.weight, s_ao, sc_ao), bo=None if o_lin.bias is None else o_lin.bias.detach(),
            mlp_norm=m_gamma, wgate=_orient(g_lin.weight, s_mi, sc_mi), wup=_orient(u_lin.weight, s_mi, sc_mi),
            wdown=_orient(d_lin.weight, s_mo, sc_mo), q_norm=qn, k_norm=kn,
            rotate_mlp=None if rot is None else rot.detach(),
            adapter=layer.adapter.detach().t().contiguous() if hasattr(layer, "adapter") else None, thresholds=thr,
            scale_attn_out=None if sc_ao is None else sc_ao.to(a_gamma.dtype),
            scale_mlp_out=None if sc_mo is None else sc_mo.to(a_gamma.dtype))
        if lw.adapter is not None:
            lw.wdown = fold_adapter(lw.wdown, lw.adapter.t(), s_mo)
        if any(site.mode != "dense" for site in (s_ai, s_ao, s_mi, s_mo)):
            lw.add_counters()
        if any(getattr(lin, "bias", None) is not None for lin in (g_lin, u_lin, d_lin)):
            raise LarosaError("MLP biases are not supported by the engine")
        statics.append(LayerStatic(
            heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=head_dim, scaling=scaling,
            eps=norm_eps(a_norm, spec), attn_in=s_ai, attn_out=s_ao, mlp_in=s_mi, mlp_out=s_mo,
            qk_norm=qn is not None, rotate_mlp=rot is not None, adapter=lw.adapter is not None,
            q_size=cfg.num_attention_heads * head_dim, kv_size=cfg.num_key_value_heads * head_dim))
        layers.append(lw)
    rotary = get_submodule(model, spec.rotary)
    inv_freq = rotary.inv_freq.detach().float().clone()
    fnorm = get_submodule(model, spec.final_norm)
    return ModelWeights(
        embed=get_submodule(model, spec.embed).weight.detach(), layers=layers, statics=statics,
        final_norm=fnorm.weight.detach(), final_eps=norm_eps(fnorm, spec),
        head=get_submodule(model, spec.head).weight.detach(), inv_freq=inv_freq,
        rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        meta={"source": type(model).__name__, "sliding_window": _sliding_window(cfg),
              "dense_prefill": dense_prefill})


def _sliding_window(cfg) -> Optional[int]:
    """The attention window if any layer uses one (Mistral: `sliding_window` alone; Qwen2: only with
    `use_sliding_window`; newer configs: `layer_types`)."""
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return int(window) if any(t == "sliding_attention" for t in types) else None
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(window)


def _all_inputs_kept(st: LayerStatic, w: tuple) -> LayerStatic:
    """The same layer with every sparse site keeping all of its inputs (dense prefill)."""
    wqkv, wo, wgate, wdown = w[1], w[3], w[6], w[8]
    def kept(site: Site, wt: torch.Tensor) -> Site:
        return site if site.mode == "dense" else Site("topk", wt.shape[-2])  # d_in (a blocked spec weight too)
    return st._replace(attn_in=kept(st.attn_in, wqkv), attn_out=kept(st.attn_out, wo),
                       mlp_in=kept(st.mlp_in, wgate), mlp_out=kept(st.mlp_out, wdown))


def _compile_limits():
    """Dynamo's recompile limit raised for the engine's calls only: one graph per distinct LayerStatic
    (k values, adapters; every layer of a per-layer plan can differ), which would otherwise exceed the
    default of 8 and fall back to eager."""
    import torch._dynamo as dynamo

    names = [n for n in ("recompile_limit", "cache_size_limit") if hasattr(dynamo.config, n)]
    if not names:
        return contextlib.nullcontext()
    return dynamo.config.patch({n: max(getattr(dynamo.config, n), 512) for n in names})


# ---------- the engine ----------------------------------------------------------------------------

SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
# a model keeping at most this share of its Top-K weight bytes gathers rows. v16 with the kept list stored by
# inline PTX (benchmarks/results/compact-store-h200.json, LLaMA2-7B LaRoSA): gathered 232.9 / 249.5 / 313.8
# tok/s vs masked 232.0 / 242.0 / 284.3 at p = 0.4 / 0.5 / 0.75 (kept shares ~0.57 / 0.48 / 0.24); v15 (tl.store): 0.35;
# v16-v25: 0.65. v26 (results/history/gtile-low-v26): at p = 0.25 (kept share ~0.77) gathered rows give LaRoSA 236.0
# vs masked 224.6 tok/s and Top-K 241.0 vs 234.2 (LLaMA2-7B), so the gathered kernel now covers it; shares above 0.8
# (p < 0.2) are not measured and keep the masked kernel
GTILE_MODEL_MAX_KEEP = 0.8


def kept_share(weights: "ModelWeights") -> Optional[float]:
    """The share of the Top-K sites' weight bytes a token reads (kept rows x columns over all), or None
    without Top-K sites."""
    kept = total = 0
    for lw, st in zip(weights.layers, weights.statics):
        for site, wts in ((st.attn_in, (lw.wqkv,)), (st.attn_out, (lw.wo,)), (st.mlp_in, (lw.wgate, lw.wup)),
                          (st.mlp_out, (lw.wdown,))):
            if site.mode == "topk":
                for w in wts:  # input-major (d_in, d_out) at Top-K sites
                    kept += min(site.k, w.shape[0]) * w.shape[1]
                    total += w.numel()
    return kept / total if total else None


def _parse_sites(raw: str, name: str) -> tuple[int, ...]:
    """Sites from a comma-separated list of 0 (q/k/v) .. 3 (down), or "none"; anything else is refused."""
    if raw.strip() == "none":
        return ()
    try:
        sites = tuple(int(t) for t in raw.split(","))
    except ValueError:
        sites = None
    if sites is None or not set(sites) <= {0, 1, 2, 3}:
        raise LarosaError(f"{name}={raw!r}: use sites among 0 (q/k/v), 1 (o), 2 (gate/up), 3 (down), e.g. 0,1,2, "
                          "or none")
    return sites


def topk_kernel(weights: "ModelWeights") -> Optional[str]:
    """The engine's default Top-K kernel: "gtile" (gathered rows) for a model keeping at most
    GTILE_MODEL_MAX_KEEP of its Top-K weight bytes, else "tile" (masked rows); None (the ops' own default,
    `LAROSA_KERNEL_IMPL` included) without Top-K sites or where that variable names a kernel (not "auto").
    Rows of 32768 or more run "tile" either way (`triton_gemv.resolve_impl`). One kernel for the
    whole model: end to end on the H200 (benchmarks/NOTES.md v15) the per-op choice by k, which mixed
    them at p = 0.5, was slower than either (0.96x vs 1.04x / 1.01x); since the PTX-stored list (v16) gtile
    everywhere wins or ties from p = 0.4 up, and since v26 it covers p = 0.25 too (+5 % there)."""
    share = kept_share(weights)
    if share is None or os.environ.get("LAROSA_KERNEL_IMPL", "auto") != "auto":
        return None
    return "gtile" if share <= GTILE_MODEL_MAX_KEEP else "tile"


ADAPTER_MODES = ("inline", "stream", "select")
# share of the adapter's columns computed in the gate/up launches (the rest: the down ones). 0: all in the down
# launches, measured fastest end to end (v16, benchmarks/results/adapter-modes-h200.json: 242.7 vs 237.4 tok/s
# at 0.375, LLaMA2-7B p = 0.5; v18 with the programs in the GEMV launches, results/side-in-h200.json: 262.4 vs
# 247.0 at (8, 512, 2))
ADAPTER_SPLIT = 0.0
DEFAULT_FUSE_ROPE = True  # v17: RoPE and the cache write in the attention launch (see DecodeEngine)
DEFAULT_ATTN_COMBINE = "last"  # v18: the attention's last split program combines (one launch fewer per layer;
# +0.1-0.3 % tok/s sparse, +-0 dense, results/attn-combine-h200.json)
# v22: the o projection (a stand-alone select) in the speculative GEMV (`triton_spec`): its weights (blocked,
# `spec_layout`) stream while the select runs, guessed from the site's previous threshold, corrected by the select's
# fix list. Off: per op it beats the gathered GEMV at o (LLaMA2-7B p = 0.5: 13.86 vs 15.08 us, its select included),
# but end to end LaRoSA lost 1.5 % at p = 0.5 and 3 % at 0.75 with it (274.1 -> 270.1, 337.9 -> 327.7 tok/s; +0.4 %
# at 0.25), in two alternations (benchmarks/results/history/spec-v22a/run4-final, NOTES v22). The down projection
# was not put there: per op it ties at p = 0.5 and loses at 0.75 (26.6 vs 27.1 us, 23.3 vs 17.4 us).
SPEC_DEFAULT = False
# v30: the gate/up GEMV's finishers count its output into a histogram (2^11 bins of |x|'s bf16 pattern), and the
# down select searches only the boundary bin (`triton_gemv.HIST_BITS`): 6 counts instead of 15. Exact either way.
# Off: LaRoSA's down select 13.0 -> 8.8 us in the step, but the gate/up GEMV +1.4 us (the atomics) and the down GEMV
# +2.7 us (the adapter's programs in its launch now stream beside it): 283.0 -> 283.1 tok/s at p = 0.5, +0.4 / +2.8 %
# at 0.4 / 0.75, against +1.1 / +1.5 / +3.1 % for the loop search alone (`triton_gemv.SELECT_DYN_MIN`; LLaMA2-7B,
# H200, `benchmarks/results/history/v30-histab`).
DOWN_HIST_DEFAULT = False
DEFAULT_ADAPTERS = "select"  # v16: +3.7 to +5.1 % tok/s over the side stream (same run)


def _adapter_mode(overlap_adapters, has_adapters: bool, graphs: bool) -> str:
    """Where the residual adapter GEMVs run: "inline" (in order, after the MLP half), "stream" (a side
    stream), "select" (extra programs of the MLP half's Top-K launches). None: `DEFAULT_ADAPTERS` with CUDA
    graphs, else "inline"."""
    if overlap_adapters is None:
        mode = DEFAULT_ADAPTERS if graphs else "inline"
    elif isinstance(overlap_adapters, bool):
        mode = "stream" if overlap_adapters else "inline"
    else:
        mode = overlap_adapters
    if mode not in ADAPTER_MODES:
        raise LarosaError(f"overlap_adapters must be None, a bool or one of {', '.join(ADAPTER_MODES)}, got "
                          f"{overlap_adapters!r}")
    return mode if has_adapters else "inline"


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, n_new) generated ids
    prefill_s: float
    step_ms: list[float]  # per decode step (CUDA events on the GPU, wall clock on the CPU)


def _hist_layer(st: LayerStatic, lw: LayerWeights) -> bool:
    """Whether a layer's down select can start from the gate/up output's histogram (`DecodeEngine(down_hist=)`):
    both MLP sites Top-K on the kernels' path (the layer has counters), and the down input is the gate/up output
    itself (no weighted-selection scale)."""
    return (st.mlp_in.mode == "topk" and st.mlp_out.mode == "topk" and lw.scale_mlp_out is None
            and lw.counters is not None)


def _env_flag(name: str, default: bool) -> bool:
    """An A/B switch from the environment: unset = `default`, "1" = on, "0" = off, anything else an error."""
    raw = os.environ.get(name, "").strip()
    if raw not in ("", "0", "1"):
        raise LarosaError(f"{name}={raw!r}: use 1 (on) or 0 (off)")
    return default if raw == "" else raw == "1"


def _check_sampling(temperature: float, top_k: int) -> None:
    if not temperature >= 0:  # also NaN
        raise LarosaError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise LarosaError(f"top_k must be an int >= 0 (0 = no cut), got {top_k!r}")


class DecodeEngine:
    """Static-cache decoder for `ModelWeights`: `prefill`, then `step` one token at a time.

    compile: None = on CUDA only. graphs: None = on CUDA only (the decode step is one CUDA graph).
    overlap_adapters: where the residual adapter GEMVs x_mid R_l of the decode step run (the MLP half does
    not need them: R_l is folded into the down projection, and the next layer adds the two). "select" (v16):
    extra programs of the MLP half's Top-K launches compute it while the one-program-per-row selects leave
    SMs idle (`mlp_block_side`; since v18 in the GEMV launch that waits for the select, before in the select
    launch, `triton_gemv.side_in`; `adapter_split` of the columns with the gate/up projection, the rest with
    the down one). "stream" (or True): a second stream, concurrent with the MLP half. "inline" (or False):
    in order. None = `DEFAULT_ADAPTERS` with CUDA graphs, else "inline". On the CPU "stream" runs the same split step
    in order (tests); prefill always runs the plain layer.
    capture_priority: CUDA stream priority of the captured step (None: the highest with the adapters on the
    side stream, else the default).
    fuse_norm_select: Top-K block inputs (q/k/v and gate/up sites, without an in-layer MLP rotation) take
    `larosa::rmsnorm_topk`: the residual add, the RMSNorm and the Top-K select in one kernel, then the GEMV
    without a select launch. Same function (the norm within one rounding of HF's; tested).
    fuse_residual: Top-K o and down projections (the down one where no adapter follows) add the residual in
    the GEMV's epilogue, in fp32 before the one rounding (the plain step rounds the GEMV output, then adds):
    no separate add kernel.
    Both None = on with CUDA (measured together: +0.9 % LaRoSA, +3 % un-rotated Top-K tokens/s on the
    H200, `benchmarks/results/fusions-h200.json`), off on the CPU (where they only change the rounding).
    select_hints: each Top-K select keeps its row's threshold in an engine-owned slot and, at the next token,
    searches a small window around it first (`triton_gemv.select`; exact either way). None = on.
    hint_sites: with select_hints, the sites whose selects keep hints (0 q/k/v, 1 o, 2 gate/up, 3 down); the
    hinted selects of one-row launches also prefetch their GEMV's likely rows into L2 (v23, `prefetch_mb`).
    None = all four where no adapter overlaps (un-rotated Top-K: +3.5 % tok/s at p = 0.5 on the H200,
    `benchmarks/results/select-window-h200.json`), else (v19) the norm + select sites only, q/k/v and gate/up:
    with the adapter programs in the GEMV launches LaRoSA gains 1.4 / 1.5 / 2.0 % at p = 0.4 / 0.5 / 0.75 over
    no hints, while hints at all four sites gain nothing (+0.1 / -0.1 / -1.8 %,
    `benchmarks/results/hint-sites-h200.json`; the stand-alone o and down selects run slower with hints
    beside the adapter's streaming, `profile-asm32-llama2-7b-p0.5.*`), and the o site too where the selects
    prefetch (`prefetch_mb` > 0: the budget `LAROSA_PREFETCH_MB` on a GPU of compute capability 9+, else 0;
    `triton_prefetch`). `LAROSA_HINT_SITES` ("0,1,2,3", "none"; for A/B runs) stands in for None where set.
    kernel: the Top-K GEMV kernel of every site (`triton_gemv.IMPLS`); None = `topk_kernel(weights)`.
    fuse_rope: the decode step's RoPE and K/V cache write happen in the attention launch
    (`larosa::rope_decode_attention`; layers without q/k norms). None = `DEFAULT_FUSE_ROPE` with CUDA,
    off on the CPU (same function there; the op's reference rounds RoPE once, in fp32).
    attn_combine: with fuse_rope, "last" (`DEFAULT_ATTN_COMBINE`, v18: the last split program of each KV head
    combines the cache splits, one launch fewer per layer) or "launch" (a second launch combines them).
    dense_kernel: dense sites (every site of a dense model) and the head take `larosa::dense_linear` (v20): the
    block input's RMSNorm, the bias, SiLU * up and the residual add in the GEMV launch, which loads its first
    weight tiles before waiting for its input (PDL), so a dense decode step is a chain of such launches and the
    attention (then itself a programmatic dependent). None = where PDL is possible (`ops.dense_kernel_default`:
    CUDA, compute capability >= 9), else off (the plain step: cuBLAS and compiled glue). On the CPU (tests) the op
    runs the interpreted kernel for bf16 under TRITON_INTERPRET=1, else HF's arithmetic.
    spec: the Top-K o projections in the speculative GEMV (v22, `larosa::spec_linear`, `triton_spec`): its
    programs stream the rows guessed from the site's previous threshold while the select runs, then correct
    by the select's fix list (exact). The engine keeps a blocked copy of those weights (`spec_layout`) and the
    o site's select hint. None = `LAROSA_SPEC` ("1" / "0", A/B runs) if set, else `SPEC_DEFAULT`.
    dense_head: the head (with the final norm) in `larosa::dense_linear`. None = `LAROSA_DENSE_HEAD` ("1" / "0",
    for A/B runs) if set, else with `dense_kernel`.
    head_pdl: the head in `dense_linear` launched as a programmatic dependent. None = only where no site is Top-K
    (v28, `benchmarks/results/head-default-h200.json`, LLaMA2-7B p = 0.5, tok/s for the head on cuBLAS / in
    `dense_linear` with PDL / without (`LAROSA_DENSE_PDL=0`: for the dense model that is every dense GEMV, not the
    head alone): dense 272.5 / 274.3 / 262.3, TEAL 252.2 / 261.7 / 253.4, LaRoSA 284.6 / 257.4 / 285.7, un-rotated
    Top-K 295.3 / 289.2 / 296.5). With the gathered Top-K GEMVs in the step, a head
    launched as a programmatic dependent makes the o and down GEMVs of every layer 5-6.5 us slower inside the graph
    replay (`benchmarks/results/timeline-llama2-7b.*`; why is not understood, the graph's edges are the same).
    down_hist (v30): where both MLP sites are Top-K (and no weighted selection scales the down input), the gate/up
    GEMV counts its output into an engine-owned histogram per layer and the down select starts from its boundary
    bin (`larosa::topk_gate_up(hist_out=)`, `topk_linear(hist=)`; exact with any counts, so speed only), in place of
    a down hint (`hint_sites` 3). None =
    `LAROSA_DOWN_HIST` ("1" / "0", A/B runs) if set, else `DOWN_HIST_DEFAULT`; off without Triton.
    """

    def __init__(self, weights: ModelWeights, max_len: int, batch: int = 1, compile: Optional[bool] = None,
                 graphs: Optional[bool] = None, overlap_adapters: Optional[bool | str] = None,
                 capture_priority: Optional[int] = None, fuse_norm_select: Optional[bool] = None,
                 fuse_residual: Optional[bool] = None, select_hints: Optional[bool] = None,
                 hint_sites: Optional[Sequence[int]] = None, kernel: Optional[str] = None,
                 adapter_split: float = ADAPTER_SPLIT, fuse_rope: Optional[bool] = None,
                 attn_combine: str = DEFAULT_ATTN_COMBINE, dense_kernel: Optional[bool] = None,
                 dense_head: Optional[bool] = None, spec: Optional[bool] = None, head_pdl: Optional[bool] = None,
                 down_hist: Optional[bool] = None):
        self.w = weights
        cuda = weights.device.type == "cuda"
        self.dense_kernel = (_ops.dense_kernel_default(weights.device) if dense_kernel is None
                             else bool(dense_kernel))
        self.fuse_norm_select = cuda if fuse_norm_select is None else bool(fuse_norm_select)
        self.fuse_residual = cuda if fuse_residual is None else bool(fuse_residual)
        self.fuse_rope = (cuda and DEFAULT_FUSE_ROPE) if fuse_rope is None else bool(fuse_rope)
        if attn_combine not in ("launch", "last"):
            raise LarosaError(f"attn_combine must be 'launch' or 'last', got {attn_combine!r}")
        self.attn_combine = attn_combine if self.fuse_rope else "launch"
        self.graphs = cuda if graphs is None else graphs
        if self.graphs and not cuda:
            raise LarosaError("CUDA graphs need a CUDA device")
        self.adapter_mode = _adapter_mode(overlap_adapters, any(st.adapter for st in weights.statics), self.graphs)
        if spec is None:
            spec = _env_flag("LAROSA_SPEC", SPEC_DEFAULT)
        self.spec = bool(spec) and _ops.HAVE_TRITON and any(st.attn_out.mode == "topk" for st in weights.statics)
        self.select_hints = True if select_hints is None else bool(select_hints)
        self.prefetch_mb = _ops.prefetch_mb(weights.device) if self.select_hints else 0.0
        if hint_sites is None and os.environ.get("LAROSA_HINT_SITES"):  # A/B runs: "0,1,2,3", "none"
            hint_sites = _parse_sites(os.environ["LAROSA_HINT_SITES"], "LAROSA_HINT_SITES")
        if hint_sites is None:  # v19: where adapters overlap, hints only at the norm + select sites
            hint_sites = (0, 1, 2, 3) if self.adapter_mode == "inline" else (0, 2)
            if self.prefetch_mb > 0:  # v23: and at the o site, whose select's L2 prefetch guesses from its hint
                hint_sites = hint_sites + (1,)
        if not self.select_hints:
            hint_sites = ()
        if self.spec:  # the speculative GEMV's guess is its site's hint
            hint_sites = tuple(hint_sites) + (1,)
        self.hint_sites = tuple(sorted(set(int(i) for i in hint_sites)))
        if not set(self.hint_sites) <= {0, 1, 2, 3}:
            raise LarosaError(f"hint_sites must be among 0 (q/k/v), 1 (o), 2 (gate/up), 3 (down), got {hint_sites}")
        if down_hist is None:
            down_hist = _env_flag("LAROSA_DOWN_HIST", DOWN_HIST_DEFAULT)
        self.down_hist = bool(down_hist) and _ops.HAVE_TRITON
        self.kernel = topk_kernel(weights) if kernel is None else kernel
        if self.kernel is not None and _ops.HAVE_TRITON and self.kernel not in _ops.KERNEL_IMPLS:
            raise LarosaError(f"kernel must be one of {', '.join(_ops.KERNEL_IMPLS)}, got {kernel!r}")
        self._statics = [st._replace(fused_norm=self.fuse_norm_select, fused_residual=self.fuse_residual,
                                     fused_rope=self.fuse_rope, dense_kernel=self.dense_kernel,
                                     unit_norms=bool((lw.attn_norm == 1).all() and (lw.mlp_norm == 1).all()),
                                     hint_sites=sum(1 << i for i in self.hint_sites),
                                     down_hist=self.down_hist and _hist_layer(st, lw),
                                     **{n: getattr(st, n)._replace(kernel=self.kernel) for n in SITES})
                         for st, lw in zip(weights.statics, weights.layers)]
        self._unit_final_norm = bool((weights.final_norm == 1).all())
        # the head in `dense_linear` too; with Top-K sites launched in order (v28: as a programmatic dependent it
        # slows the gathered GEMVs, the cost v20-v27 saw as "the dense head" with LaRoSA's split-off adapters)
        if dense_head is None and os.environ.get("LAROSA_DENSE_HEAD"):
            dense_head = _env_flag("LAROSA_DENSE_HEAD", False)
        self.dense_head = self.dense_kernel if dense_head is None else bool(dense_head)
        self.head_pdl = (kept_share(weights) is None) if head_pdl is None else bool(head_pdl)  # no Top-K site
        self.device = weights.device
        self.dtype = weights.dtype
        self.compile = cuda if compile is None else compile
        sw = weights.meta.get("sliding_window")
        if sw is not None and max_len > sw:
            raise LarosaError(f"this model uses sliding-window attention ({sw} tokens); the engine supports "
                              f"contexts up to the window only (asked for {max_len})")
        self.max_len, self.batch = int(max_len), int(batch)
        st = weights.statics[0]
        shape = (self.batch, st.kv_heads, self.max_len, st.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in weights.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in weights.layers]
        pos = torch.arange(self.max_len, device=self.device, dtype=torch.float32)
        freqs = torch.outer(pos, weights.inv_freq.to(self.device).float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * weights.rope_scaling).to(self.dtype)
        self.sin = (emb.sin() * weights.rope_scaling).to(self.dtype)
        self.positions = torch.arange(self.max_len, device=self.device)
        self._layer_fn: Callable = decoder_layer
        self._attn_fn: Callable = attn_block
        self._mlp_fn: Callable = mlp_block
        self._mlp_side_fn: Callable = mlp_block_side
        if self.compile:
            self._layer_fn = torch.compile(decoder_layer, fullgraph=True, dynamic=False)
            self._attn_fn = torch.compile(attn_block, fullgraph=True, dynamic=False)
            self._mlp_fn = torch.compile(mlp_block, fullgraph=True, dynamic=False)
            self._mlp_side_fn = torch.compile(mlp_block_side, fullgraph=True, dynamic=False)
        self.overlap = self.adapter_mode != "inline"
        if not 0.0 <= adapter_split <= 1.0:
            raise LarosaError(f"adapter_split must be in [0, 1], got {adapter_split}")
        cols = int(round(adapter_split * weights.embed.shape[1] / 8)) * 8  # 16-byte aligned column split
        self._statics = [st._replace(adapter_cols=min(cols, weights.embed.shape[1])) for st in self._statics]
        # per layer: its tensors, then the select hints of its four sites (a slot per row: each Top-K select
        # searches near the row's previous threshold first; speed only, see `triton_gemv.select`)
        # and (attn_combine="last") the attention kernel's zeroed counters, a slot per (row, KV head), and (down_hist)
        # the down select's zeroed histogram, `hist_bins()` per row (counted by gate/up, used up by the select)
        self._tensors = [self._layer_tensors(lw, st) + (
                             torch.zeros(4, self.batch, dtype=torch.int32, device=self.device)
                             if self.hint_sites and lw.counters is not None else None,
                             torch.zeros(self.batch * st.kv_heads, dtype=torch.int32, device=self.device)
                             if self.attn_combine == "last" else None,
                             torch.zeros(self.batch * _ops.triton_gemv.hist_bins(), dtype=torch.int32,
                                         device=self.device) if est.down_hist else None)
                         for lw, st, est in zip(weights.layers, weights.statics, self._statics)]
        self._side = torch.cuda.Stream(self.device) if self.adapter_mode == "stream" and cuda else None
        # capture the step on a high-priority stream, so the side stream's adapter GEMVs fill gaps only
        if capture_priority is None:
            capture_priority = torch.cuda.Stream.priority_range()[1] if self._side is not None else 0
        self.capture_priority = capture_priority
        # x_mid R_l lands in one static buffer: the next layer's attention half reads it before that
        # layer forks the side stream to overwrite it
        self._res = (torch.zeros(self.batch, 1, weights.embed.shape[1], dtype=self.dtype, device=self.device)
                     if self.adapter_mode == "stream" else None)
        # decode-step state (static buffers, so a captured graph can read and update them)
        self.tok = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._next_pos = 0
        self.out = torch.zeros(self.batch, self.max_len, dtype=torch.long, device=self.device)
        self.logits_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.logits = torch.zeros(self.batch, weights.head.shape[0], dtype=self.logits_dtype, device=self.device)
        self._graph = None
        self._graph_key = None

    def _layer_tensors(self, lw: LayerWeights, st: LayerStatic) -> tuple:
        """A layer's tensors as its functions take them: with `spec`, a Top-K o projection's weight in the
        speculative GEMV's blocked layout (a copy: the model's weights are left as they are)."""
        t = lw.tensors()
        if self.spec and st.attn_out.mode == "topk":
            t = t[:3] + (_ops.triton_spec.spec_layout(lw.wo),) + t[4:]
        return t

    @property
    def hint_buffers(self) -> list:
        """Per layer: the select hints of its four sites ((4, batch) int32), or None without hints."""
        return [t[-3] for t in self._tensors]

    @property
    def attn_counters(self) -> list:
        """Per layer: the attention kernel's zeroed counters (attn_combine="last"), or None."""
        return [t[-2] for t in self._tensors]

    @property
    def hist_buffers(self) -> list:
        """Per layer: the down select's histogram (batch x `hist_bins()` int32, zero between steps) where the
        layer runs `down_hist`, else None."""
        return [t[-1] for t in self._tensors]

    # -- forward ------------------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, layer_fn: Callable, dense: bool = False,
                 probe=None):
        """Logits of the last position; ids (B, T) at positions pos (T,)."""
        x, cos, sin, mask = self._inputs(ids, pos)
        for i, (lw, st, kc, vc) in enumerate(zip(self._tensors, self._statics, self.k_cache, self.v_cache)):
            if dense:
                st = _all_inputs_kept(st, lw)
            layer_probe = None if probe is None else (lambda site, t, i=i: probe(i, site, t))
            x = layer_fn(x, pos, cos, sin, mask, kc, vc, lw, st, layer_probe)
        return self._head(x)

    def _inputs(self, ids: torch.Tensor, pos: torch.Tensor):
        """Embedded ids, the rotary rows and the causal mask over the static cache for positions pos."""
        return F.embedding(ids, self.w.embed), self.cos[pos], self.sin[pos], self.positions[None, :] <= pos[:, None]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_head:
            y = torch.ops.larosa.dense_linear(x[:, -1:], self.w.head, None, None, None,
                                              None if self._unit_final_norm else self.w.final_norm,
                                              self.w.final_eps, True, self.head_pdl)
        else:
            y = F.linear(_rms(x[:, -1:], self.w.final_norm, self.w.final_eps), self.w.head)
        return y[:, 0].to(self.logits_dtype)

    def _forward_overlapped(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode position (ids (B, 1)) with each adapter GEMV x_mid R_l on the side stream, concurrent
        with the MLP half of its layer, or inside the MLP half's selects (`mlp_block_side`); the next
        layer's attention half adds it to the residual."""
        x, cos, sin, mask = self._inputs(ids, pos)
        side = self._side
        main = torch.cuda.current_stream(self.device) if side is not None else None
        res = None
        for lw, st, kc, vc in zip(self._tensors, self._statics, self.k_cache, self.v_cache):
            x = self._attn_fn(x, res, pos, cos, sin, mask, kc, vc, lw, st)  # reads res before the fork below
            if not st.adapter:
                x, res = self._mlp_fn(x, lw, st), None
                continue
            if self.adapter_mode == "select":
                x, res = self._mlp_side_fn(x, lw, st)
                continue
            if side is not None:
                side.wait_stream(main)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                torch.mm(x.view(-1, x.shape[-1]), lw[12].t(), out=self._res.view(-1, self._res.shape[-1]))
            y = self._mlp_fn(x, lw, st)
            if side is not None:
                main.wait_stream(side)  # before x (read by the side stream) can be freed, and res read
            x, res = y, self._res
        if res is not None:
            x = x + res
        return self._head(x)

    def reset(self) -> None:
        for c in self.k_cache + self.v_cache:
            c.zero_()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, probe=None) -> torch.Tensor:
        """Run the prompt (B, T) through the model from position 0; returns last-position logits.

        Plans made with `dense_prefill` run the prompt with every input kept. `probe(layer, site, x)`
        sees the site inputs (calibration of TEAL thresholds on random-weight shapes)."""
        ids = ids.to(self.device)
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise LarosaError(f"prompt must be (batch={self.batch}, T), got {tuple(ids.shape)}")
        if ids.shape[1] >= self.max_len:
            raise LarosaError(f"prompt of {ids.shape[1]} tokens does not fit max_len={self.max_len}")
        self.reset()
        logits = self._forward(ids, self.positions[: ids.shape[1]], decoder_layer,
                               dense=bool(self.w.meta.get("dense_prefill")), probe=probe)
        self.pos.fill_(ids.shape[1])
        self._next_pos = ids.shape[1]  # host copy of `pos`: bounds-checks `step` without a device sync
        self.out[:, : ids.shape[1]] = ids
        return logits

    def _sample(self, logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1, keepdim=True)
        logits = logits / temperature
        if top_k:
            v = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = torch.where(logits < v, torch.full_like(logits, -float("inf")), logits)
        probs = torch.softmax(logits, dim=-1)
        # exponential race: argmax p_i / E_i with E_i ~ Exp(1) samples from p, without a host sync
        return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)

    def _step_body(self, temperature: float, top_k: int) -> None:
        """Decode the token in `self.tok` at `self.pos`; write the next token; advance pos."""
        if self.overlap:
            logits = self._forward_overlapped(self.tok, self.pos)
        else:
            logits = self._forward(self.tok, self.pos, self._layer_fn)
        self.logits.copy_(logits)
        nxt = self._sample(logits, temperature, top_k)
        self.tok.copy_(nxt)
        self.out.index_copy_(1, self.pos + 1, nxt)
        self.pos.add_(1)

    def _capture(self, temperature: float, top_k: int, debug_path: Optional[str] = None) -> None:
        key = (temperature, top_k)
        if self._graph is not None and self._graph_key == key and debug_path is None:
            return
        saved = (self.tok.clone(), self.pos.clone(), self.out.clone(), [c.clone() for c in self.k_cache],
                 [c.clone() for c in self.v_cache])
        self.pos.zero_()
        s = torch.cuda.Stream(self.device, priority=self.capture_priority)
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), _compile_limits():
            for _ in range(2):  # compile + warm up outside the graph
                self._step_body(temperature, top_k)
        torch.cuda.current_stream().wait_stream(s)
        # a debug dump needs the cudaGraph_t, which torch destroys at instantiation unless asked to keep it
        g = torch.cuda.CUDAGraph(keep_graph=True) if debug_path is not None else torch.cuda.CUDAGraph()
        if debug_path is not None:
            g.enable_debug_mode()
        with torch.cuda.graph(g, stream=s):
            self._step_body(temperature, top_k)
        if debug_path is not None:
            g.instantiate()
            g.debug_dump(debug_path)
            if not os.path.exists(debug_path):
                raise LarosaError(f"the CUDA graph debug dump wrote nothing to {debug_path}")
        self._graph, self._graph_key = g, key
        self.tok.copy_(saved[0])
        self.pos.copy_(saved[1])
        self.out.copy_(saved[2])
        for c, v in zip(self.k_cache + self.v_cache, saved[3] + saved[4]):
            c.copy_(v)

    @torch.no_grad()
    def dump_graph(self, path: str, temperature: float = 0.0, top_k: int = 0) -> str:
        """Capture the decode step again and write its CUDA graph as Graphviz dot (CUDA's own debug dump:
        kernel nodes with their launch parameters, and the edges between them) to `path`."""
        if not self.graphs:
            raise LarosaError("dump_graph needs the CUDA-graph engine (graphs=True on a CUDA device)")
        _check_sampling(temperature, top_k)
        self._capture(temperature, top_k, debug_path=str(path))
        return str(path)

    @property
    def captured_graph(self) -> Optional["torch.cuda.CUDAGraph"]:
        """The step's captured torch CUDAGraph (None before the first step or without graphs). After
        `dump_graph` it keeps its cudaGraph_t, so `raw_cuda_graph()` can be read through the driver API."""
        return self._graph

    @torch.no_grad()
    def step(self, temperature: float = 0.0, top_k: int = 0) -> None:
        """Decode one token (the one in `tok`, at `pos`); writes the next token into `out` and advances `pos`.
        The step writes `out[:, pos + 1]`, so it refuses to run once that would pass `max_len`."""
        if self._next_pos + 1 >= self.max_len:
            raise LarosaError(f"the KV cache is full: position {self._next_pos} + 1 would pass max_len={self.max_len}")
        _check_sampling(temperature, top_k)
        self._advance(temperature, top_k)

    def _advance(self, temperature: float, top_k: int) -> None:
        """`step` without its checks: `generate` checked the bounds and the sampling arguments once."""
        self._next_pos += 1
        if self.graphs:
            self._capture(temperature, top_k)
            self._graph.replay()
        else:
            with _compile_limits():
                self._step_body(temperature, top_k)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 seed: Optional[int] = None, on_tokens: Optional[Callable[[torch.Tensor], bool]] = None,
                 chunk: int = 16, timing: bool = False) -> GenerationResult:
        """Prefill `ids` (B, T), then decode `max_new_tokens` tokens.

        `on_tokens(new_ids)` is called every `chunk` tokens (every token on the CPU) with the ids
        produced since the last call; returning True stops early (e.g. all rows hit EOS). With
        `timing`, per-step latencies are measured (CUDA events; no sync until the end).
        """
        import time

        if max_new_tokens < 1:
            raise LarosaError("max_new_tokens must be >= 1")
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise LarosaError(f"ids must be (batch, T) with T >= 1, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise LarosaError(f"ids must be integer token ids, got {ids.dtype}")
        _check_sampling(temperature, top_k)
        if chunk < 1:
            raise LarosaError(f"chunk must be >= 1, got {chunk}")
        t = ids.shape[1]
        if t + max_new_tokens > self.max_len:
            raise LarosaError(f"prompt ({t}) + new tokens ({max_new_tokens}) exceed max_len={self.max_len}")
        cuda = self.device.type == "cuda"
        if self.graphs:
            self._capture(temperature, top_k)  # before seeding: warm-up steps draw random numbers
        if seed is not None:
            torch.manual_seed(seed)
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        first = self._sample(logits, temperature, top_k)
        self.tok.copy_(first)
        self.out[:, t] = first[:, 0]
        if cuda:
            torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        step_ms: list[float] = []
        events = []
        done_upto = t
        if on_tokens is not None and on_tokens(self.out[:, t:t + 1].cpu().clone()):
            return GenerationResult(self.out[:, t:t + 1].cpu().clone(), prefill_s, step_ms)
        done_upto = t + 1
        chunk = chunk if cuda else 1
        n = 1
        while n < max_new_tokens:
            if timing and cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            w0 = time.perf_counter()
            self._advance(temperature, top_k)
            if timing and cuda:
                e1.record()
                events.append((e0, e1))
            elif timing:
                step_ms.append(1000 * (time.perf_counter() - w0))
            n += 1
            if on_tokens is not None and (n % chunk == 0 or n == max_new_tokens):
                new = self.out[:, done_upto:t + n].cpu().clone()
                done_upto = t + n
                if on_tokens(new):
                    break
        if cuda:
            torch.cuda.synchronize()
            step_ms = [a.elapsed_time(b) for a, b in events]
        return GenerationResult(self.out[:, t:t + n].cpu().clone(), prefill_s, step_ms)
