"""Module swaps that apply a sparsity plan (plain PyTorch reference path; runs on every device).

Every swap is explicit: a module found by its registry name is replaced by a wrapper that holds the
original module as `inner`. Nothing is monkey-patched.

  TopK          keep the k largest |x| per token (optionally only for single-token calls)
  SiteInput     norm -> [rotate by A] -> TopK: the shared sparse input of q/k/v or gate/up
  OfficialSite  norm -> (fp64) rotate by Q -> TopK -> rotate back: METHOD.md 5A, the released code
  SparseLinear  sparsifier -> linear: o_proj and down_proj inputs
  Threshold     keep |x| > t (TEAL-style), with optional realised-sparsity metering
  CatsAct       act(gate) with |act(gate)| <= t zeroed (CATS): skips up rows and down columns
  AdaptedLayer  decoder layer -> x R: the residual adapter Q_l^T Q_{l+1} of the fused form
"""

from __future__ import annotations

import torch
from torch import nn

from .sparsity import topk, topk_mask


class SparsityMeter:
    """Realised parameter-weighted sparsity per token: sparsifiers report skipped weight entries.

    Attached to a model by `attach_meter`; `flush()` after each forward pass closes a batch of tokens.
    """

    def __init__(self, total_weights: int):
        self.total = total_weights
        self.current: torch.Tensor | None = None
        self.per_token: list[torch.Tensor] = []

    def add(self, skipped: torch.Tensor) -> None:
        skipped = skipped.reshape(-1).double().cpu()
        self.current = skipped if self.current is None else self.current + skipped

    def flush(self) -> None:
        if self.current is not None:
            self.per_token.append(self.current / self.total)
        self.current = None

    def summary(self) -> dict:
        if not self.per_token:
            return {}
        v = torch.cat(self.per_token)
        q = torch.quantile(v, torch.tensor([0.01, 0.5, 0.99], dtype=v.dtype))
        return {"tokens": v.numel(), "mean": v.mean().item(), "std": v.std().item(), "min": v.min().item(),
                "p01": q[0].item(), "median": q[1].item(), "p99": q[2].item(), "max": v.max().item()}


def _meter(module: nn.Module, zeros: torch.Tensor) -> None:
    if module.meter is not None:
        module.meter.add(zeros.to(torch.float64) * module.weight_per_channel)


class TopK(nn.Module):
    def __init__(self, k: int, d: int, tie_rule: str = "exact", dense_prefill: bool = False):
        super().__init__()
        self.k, self.d, self.tie_rule, self.dense_prefill = int(k), int(d), tie_rule, dense_prefill
        self.meter: SparsityMeter | None = None
        self.weight_per_channel = 0
        self.register_buffer("score_scale", None)

    def set_score_scale(self, scale: torch.Tensor) -> None:
        """Rank entries by |x_i| * scale_i (WINA-style: scale = column norms of the consumer weights)."""
        self.score_scale = scale.detach().clone()

    def extra_repr(self) -> str:
        weighted = ", weighted" if self.score_scale is not None else ""
        return f"k={self.k}, d={self.d}, tie_rule={self.tie_rule}, dense_prefill={self.dense_prefill}{weighted}"

    def active(self, x: torch.Tensor) -> bool:
        if self.k >= self.d:
            return False
        return not (self.dense_prefill and x.dim() >= 2 and x.shape[-2] > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active(x):
            y = x
        elif self.score_scale is None:
            y = topk(x, self.k, self.tie_rule)
        else:
            y = x * topk_mask(x * self.score_scale.to(x.dtype), self.k, self.tie_rule)
        if self.meter is not None:
            _meter(self, (y == 0).sum(-1))
        return y


class Threshold(nn.Module):
    """TEAL-style magnitude threshold: keep |x| > t."""

    def __init__(self, threshold: float, d: int, dense_prefill: bool = False):
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.d, self.dense_prefill = int(d), dense_prefill
        self.meter: SparsityMeter | None = None
        self.weight_per_channel = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_prefill and x.dim() >= 2 and x.shape[-2] > 1:
            return x
        keep = x.abs() > self.threshold
        if self.meter is not None:
            _meter(self, (~keep).sum(-1))
        return x * keep


class CatsAct(nn.Module):
    """CATS: the MLP activation with |act(gate)| <= t zeroed, so up rows and down columns are skipped."""

    def __init__(self, act: nn.Module, threshold: float, d: int):
        super().__init__()
        self.inner = act
        self.sparsifier = Threshold(threshold, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparsifier(self.inner(x))


class SiteInput(nn.Module):
    """Fused-form block input: (gamma-free) norm, optional in-layer rotation A, then Top-K."""

    def __init__(self, norm: nn.Module, sparsifier: nn.Module, rotate: torch.Tensor | None = None):
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


class SparseLinear(nn.Module):
    """A sparsifier (Top-K or threshold) on the input, then the original linear layer (o_proj, down_proj)."""

    def __init__(self, linear: nn.Linear, sparsifier: nn.Module):
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
