"""Real model shapes with random weights, for speed work (decode speed depends only on shapes).

    weights = random_model("llama2-7b", "larosa", sparsity=0.5, device="cuda")

Methods:
  dense   every projection dense (F.linear / cuBLAS)
  larosa  the deployable fused form: Top-K on all 7 projection inputs with the paper's 0.8/1.2 split of
          the nominal sparsity, random orthogonal residual adapters between layers (the real ones are
          dense orthogonal matrices too), unit norm scales (folded into the weights)
  topk    the same without adapters (un-rotated Top-K)
  teal    TEAL thresholds at a uniform sparsity, calibrated per (layer, site) on the model's own
          activations for a random prompt (random weights give Gaussian-like activations; real models'
          are heavier-tailed, so the realised sparsity per token spreads differently)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import LayerStatic, LayerWeights, ModelWeights, Site, fold_adapter
from .errors import LarosaError
from .sparsity import SparsityPlan


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES: dict[str, Shape] = {
    "llama2-7b": Shape(4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": Shape(4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0),
    "mistral-7b": Shape(4096, 14336, 32, 32, 8, 32768, rope_theta=1000000.0),
    "qwen2.5-7b": Shape(3584, 18944, 28, 28, 4, 152064, rope_theta=1000000.0, qkv_bias=True, eps=1e-6),
    "tiny": Shape(64, 160, 2, 4, 2, 96),  # for tests
}
METHODS = ("dense", "larosa", "topk", "teal")


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise LarosaError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def _orthogonal(d: int, gen: torch.Generator, device) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, device=device, dtype=torch.float32)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


@torch.no_grad()
def random_base(shape: Shape | str, dtype=torch.bfloat16, device="cpu", seed: int = 0) -> ModelWeights:
    """Dense random weights at a real shape (std 0.02 like an initialised model; unit norm scales)."""
    sh = get_shape(shape) if isinstance(shape, str) else shape
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*size):
        return (torch.randn(*size, generator=gen, device=dev, dtype=torch.float32) * 0.02).to(dtype)

    d, f, hd = sh.hidden, sh.intermediate, sh.head_dim
    q_size, kv_size = sh.heads * hd, sh.kv_heads * hd
    layers, statics = [], []
    for _ in range(sh.layers):
        layers.append(LayerWeights(
            attn_norm=torch.ones(d, dtype=dtype, device=dev), wqkv=rnd(q_size + 2 * kv_size, d),
            bqkv=rnd(q_size + 2 * kv_size) if sh.qkv_bias else None, wo=rnd(d, q_size), bo=None,
            mlp_norm=torch.ones(d, dtype=dtype, device=dev), wgate=rnd(f, d), wup=rnd(f, d), wdown=rnd(d, f)))
        statics.append(LayerStatic(sh.heads, sh.kv_heads, hd, hd ** -0.5, sh.eps, Site(), Site(), Site(), Site(),
                                   False, False, False, q_size, kv_size))
    inv_freq = 1.0 / (sh.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=dev) / hd))
    return ModelWeights(embed=rnd(sh.vocab, d), layers=layers, statics=statics,
                        final_norm=torch.ones(d, dtype=dtype, device=dev), final_eps=sh.eps,
                        head=rnd(sh.vocab, d), inv_freq=inv_freq, meta={"shape": sh.__dict__.copy()})


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


@torch.no_grad()
def sparse_variant(base: ModelWeights, method: str, sparsity: float, split=(0.8, 1.2), seed: int = 1,
                   thresholds: torch.Tensor | None = None) -> ModelWeights:
    """`base` (dense) turned into `method` at nominal `sparsity` (new input-major weight copies).

    teal needs `thresholds` (layers, 4): see `teal_thresholds`.
    """
    if method not in METHODS:
        raise LarosaError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "dense" or sparsity == 0:
        return base
    plan = SparsityPlan.from_nominal(sparsity, split)
    dev = base.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    layers, statics = [], []
    n = len(base.layers)
    for i, (lw, st) in enumerate(zip(base.layers, base.statics)):
        d = lw.wqkv.shape[1]
        if method in ("larosa", "topk"):
            sites = [Site("topk", plan.k(s, dim, i)) for s, dim in
                     (("attn_in", d), ("attn_out", st.q_size), ("mlp_in", d), ("mlp_out", lw.wdown.shape[1]))]
            thr = None
        else:
            if thresholds is None:
                raise LarosaError("teal needs thresholds (larosa.shapes.teal_thresholds)")
            sites = [Site("threshold")] * 4
            thr = thresholds[i].to(device=dev, dtype=base.dtype)
        adapter = None
        if method == "larosa" and i < n - 1:
            adapter = _orthogonal(d, gen, dev).to(base.dtype)
        wdown = _t(lw.wdown) if adapter is None else fold_adapter(_t(lw.wdown), adapter, sites[3])
        layers.append(LayerWeights(
            attn_norm=lw.attn_norm, wqkv=_t(lw.wqkv), bqkv=lw.bqkv, wo=_t(lw.wo), bo=lw.bo, mlp_norm=lw.mlp_norm,
            wgate=_t(lw.wgate), wup=_t(lw.wup), wdown=wdown, thresholds=thr,
            adapter=None if adapter is None else adapter.t().contiguous()).add_counters())
        statics.append(st._replace(attn_in=sites[0], attn_out=sites[1], mlp_in=sites[2], mlp_out=sites[3],
                                   adapter=adapter is not None))
    meta = dict(base.meta, method=method, sparsity=sparsity, split=list(split))
    return ModelWeights(base.embed, layers, statics, base.final_norm, base.final_eps, base.head, base.inv_freq,
                        base.rope_scaling, meta)


@torch.no_grad()
def teal_thresholds(base: ModelWeights, sparsity: float, prompt: torch.Tensor) -> torch.Tensor:
    """(layers, 4) magnitude thresholds: the `sparsity`-quantile of |x| per (layer, site) over the dense
    model's activations on `prompt` (B, T)."""
    from .engine import DecodeEngine

    eng = DecodeEngine(base, max_len=prompt.shape[1] + 1, batch=prompt.shape[0], compile=False, graphs=False)
    thr = torch.zeros(len(base.layers), 4)

    def probe(layer: int, site: int, x: torch.Tensor) -> None:
        v = x.detach().abs().float().reshape(-1)
        if v.numel() > 4_000_000:
            v = v[torch.randperm(v.numel(), device=v.device)[:4_000_000]]
        thr[layer, site] = torch.quantile(v, sparsity).item()

    eng.prefill(prompt, probe=probe)
    del eng
    return thr
