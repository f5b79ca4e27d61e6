"""Sparsity plans (the only place that knows k) and the plain PyTorch Top-K reference.

A plan gives every site of every layer a sparsity s; the site keeps k = int((1 - s) * d_in) inputs per
token (METHOD.md sec. 2-3). The paper's default splits one nominal level p as 0.8 p on the block inputs
(attn_in, mlp_in) and 1.2 p on the block-internal inputs (attn_out, mlp_out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .arch import SITES
from .errors import LarosaError

PAPER_SPLIT = (0.8, 1.2)


def check_sparsity(s: float, what: str = "sparsity") -> float:
    s = float(s)
    if not (0.0 <= s < 1.0):
        raise LarosaError(f"{what} must be in [0, 1), got {s}")
    return s


def k_for(sparsity: float, d_in: int) -> int:
    """Kept inputs per token: int((1 - s) * d_in), at least 1 (rounded to 6 decimals first, so that
    s = 1 - k / d_in gives back exactly k despite float error)."""
    return max(1, int(round((1.0 - sparsity) * d_in, 6)))


@dataclass
class SparsityPlan:
    """Per-site sparsities, uniform over layers unless `layers` overrides a layer.

    `nominal` and `split` record how the plan was made (None for explicit plans).
    """

    sites: dict[str, float]
    layers: dict[int, dict[str, float]] = field(default_factory=dict)
    nominal: float | None = None
    split: tuple[float, float] | None = None
    tie_rule: str = "exact"  # "exact": keep exactly k, ties to lower indices; "ge": keep all |x| >= k-th (released code)
    dense_prefill: bool = False  # leave multi-token calls (prefill) dense

    def __post_init__(self) -> None:
        unknown = set(self.sites) - set(SITES)
        if unknown:
            raise LarosaError(f"unknown sites {sorted(unknown)}; sites are {', '.join(SITES)}")
        for site in SITES:
            self.sites[site] = check_sparsity(self.sites.get(site, 0.0), f"sparsity of {site}")
        self.layers = {int(i): {s: check_sparsity(v, f"sparsity of layer {i} {s}") for s, v in d.items()}
                       for i, d in self.layers.items()}
        if self.tie_rule not in ("exact", "ge"):
            raise LarosaError(f"tie_rule must be 'exact' or 'ge', got {self.tie_rule!r}")

    @classmethod
    def from_nominal(cls, p: float, split: tuple[float, float] = PAPER_SPLIT, **kw) -> "SparsityPlan":
        p = check_sparsity(p, "nominal sparsity")
        a, b = split
        s_in, s_mid = a * p, b * p
        if s_mid >= 1.0 or s_in >= 1.0:
            raise LarosaError(f"nominal sparsity {p} with split {split} gives a site sparsity >= 1")
        return cls({"attn_in": s_in, "attn_out": s_mid, "mlp_in": s_in, "mlp_out": s_mid},
                   nominal=p, split=(a, b), **kw)

    @classmethod
    def dense(cls) -> "SparsityPlan":
        return cls({s: 0.0 for s in SITES}, nominal=0.0)

    def sparsity(self, site: str, layer: int | None = None) -> float:
        if layer is not None and layer in self.layers and site in self.layers[layer]:
            return self.layers[layer][site]
        return self.sites[site]

    def k(self, site: str, d_in: int, layer: int | None = None) -> int:
        return k_for(self.sparsity(site, layer), d_in)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = {str(i): v for i, v in self.layers.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SparsityPlan":
        d = dict(d)
        d["layers"] = {int(i): v for i, v in d.get("layers", {}).items()}
        if d.get("split") is not None:
            d["split"] = tuple(d["split"])
        return cls(**d)

    def unweighted(self) -> float:
        """Unweighted mean of the four site sparsities (the paper's nominal convention)."""
        return sum(self.sites.values()) / len(SITES)


def parameter_weighted(plan: SparsityPlan, shapes: list[dict[str, tuple[int, int]]]) -> float:
    """Fraction of the 7 projections' weight entries skipped per token (speed follows this)."""
    skipped = total = 0
    for i, row in enumerate(shapes):
        for site, (d_in, d_out) in row.items():
            skipped += (d_in - plan.k(site, d_in, i)) * d_out
            total += d_in * d_out
    return skipped / total


def llama_shapes(d: int, f: int, n_layers: int, n_heads: int | None = None,
                 n_kv: int | None = None) -> list[dict[str, tuple[int, int]]]:
    """Projection shapes of a Llama-style model from its dimensions (for reporting without weights)."""
    head = d // (n_heads or 1) if n_heads else None
    kv = (n_kv or n_heads) * head if n_heads else d
    row = {"attn_in": (d, d + 2 * kv), "attn_out": (d, d), "mlp_in": (d, 2 * f), "mlp_out": (f, d)}
    return [dict(row) for _ in range(n_layers)]


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value along the last dim (keepdim), from whichever side needs the smaller
    `topk`: the k largest, or the d - k + 1 smallest (faster on the CPU when k > d / 2)."""
    d = mag.shape[-1]
    if k > d - k + 1:
        return mag.topk(d - k + 1, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)
    return mag.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)


def topk_mask(x: torch.Tensor, k: int, tie_rule: str = "exact") -> torch.Tensor:
    """Boolean mask of the k largest |x| entries along the last dim (reference implementation)."""
    d = x.shape[-1]
    if k >= d:
        return torch.ones_like(x, dtype=torch.bool)
    mag = x.abs()
    kth = kth_largest(mag, k)
    ge = mag >= kth
    if tie_rule == "ge":
        return ge
    # exactly k, and among entries equal to the k-th largest the lower indices win: the same rule as
    # the kernels (ties are real: with GQA, the heads of a group output identical vectors at position 0).
    # Without ties at the k-th magnitude `ge` holds exactly k entries per row already (eager-only check).
    if not bool((ge.sum(dim=-1) > k).any()):
        return ge
    above = mag > kth
    eq = mag == kth
    need = k - above.sum(dim=-1, keepdim=True)
    return above | (eq & (eq.cumsum(dim=-1) <= need))


def topk(x: torch.Tensor, k: int, tie_rule: str = "exact") -> torch.Tensor:
    """x with all but the k largest-magnitude entries (per row) set to zero."""
    if k >= x.shape[-1]:
        return x
    return x * topk_mask(x, k, tie_rule)
