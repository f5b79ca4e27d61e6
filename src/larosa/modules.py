"""Module swaps that apply a sparsity plan (plain PyTorch reference path; runs on every device).

Every swap is explicit: a module found by its registry name is replaced by a wrapper that holds the
original module as `inner`. Nothing is monkey-patched.

  TopK          keep the k largest |x| per token (optionally only for single-token calls)
  SiteInput     norm -> [rotate by A] -> TopK: the shared sparse input of q/k/v or gate/up
  OfficialSite  norm -> (fp64) rotate by Q -> TopK -> rotate back: METHOD.md 5A, the released code
  TopKLinear    TopK -> linear: o_proj and down_proj inputs
  AdaptedLayer  decoder layer -> x R: the residual adapter Q_l^T Q_{l+1} of the fused form
"""

from __future__ import annotations

import torch
from torch import nn

from .sparsity import topk


class TopK(nn.Module):
    def __init__(self, k: int, d: int, tie_rule: str = "exact", dense_prefill: bool = False):
        super().__init__()
        self.k, self.d, self.tie_rule, self.dense_prefill = int(k), int(d), tie_rule, dense_prefill

    def extra_repr(self) -> str:
        return f"k={self.k}, d={self.d}, tie_rule={self.tie_rule}, dense_prefill={self.dense_prefill}"

    def active(self, x: torch.Tensor) -> bool:
        if self.k >= self.d:
            return False
        return not (self.dense_prefill and x.dim() >= 2 and x.shape[-2] > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return topk(x, self.k, self.tie_rule) if self.active(x) else x


class SiteInput(nn.Module):
    """Fused-form block input: (gamma-free) norm, optional in-layer rotation A, then Top-K."""

    def __init__(self, norm: nn.Module, sparsifier: TopK, rotate: torch.Tensor | None = None):
        super().__init__()
        self.inner = norm
        self.sparsifier = sparsifier
        if rotate is not None:
            self.rotate = nn.Parameter(rotate, requires_grad=False)
        else:
            self.register_parameter("rotate", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        if self.rotate is not None:
            h = h @ self.rotate
        return self.sparsifier(h)


class OfficialSite(nn.Module):
    """Official simulation (METHOD.md 5A): TopK((gamma * norm(x)) Q) Q^T in float64, original weights."""

    def __init__(self, norm: nn.Module, q: torch.Tensor, sparsifier: TopK):
        super().__init__()
        self.inner = norm
        self.sparsifier = sparsifier
        self.register_buffer("q", q.to(torch.float64), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        if not self.sparsifier.active(h):
            return h
        z = self.sparsifier(h.to(torch.float64) @ self.q)
        return (z @ self.q.T).to(h.dtype)


class TopKLinear(nn.Module):
    """Top-K of the input, then the original linear layer (o_proj, down_proj)."""

    def __init__(self, linear: nn.Linear, sparsifier: TopK):
        super().__init__()
        self.inner = linear
        self.sparsifier = sparsifier

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.sparsifier(x))


class AdaptedLayer(nn.Module):
    """A decoder layer followed by the residual adapter: out <- out @ R (R = Q_l^T Q_{l+1})."""

    def __init__(self, layer: nn.Module, adapter: torch.Tensor):
        super().__init__()
        self.inner = layer
        self.adapter = nn.Parameter(adapter, requires_grad=False)
        if hasattr(layer, "attention_type"):  # read by some HF model loops (sliding-window masks)
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.inner(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] @ self.adapter, *out[1:])
        return out @ self.adapter


def unwrap(module: nn.Module) -> nn.Module:
    """The original module under any number of wrappers."""
    while hasattr(module, "inner") and isinstance(module.inner, nn.Module):
        module = module.inner
    return module
