"""Turn a dense model into a LaRoSA model: the official simulation or the deployable fused form.

official (METHOD.md 5A): original weights; at each block input TopK((gamma * norm(x)) Q) Q^T in float64;
    plain Top-K on the o_proj and down_proj inputs. Reproduces the released code's arithmetic.
fused (METHOD.md 5B): norm scales folded into their consumers, Q_l absorbed into the weights, the residual
    stream of layer l carried in the Q_l basis with adapters R_l = Q_l^T Q_{l+1} between layers;
    Top-K on the rotated, gamma-free block input. Rotation granularity:
      layer: one Q per layer for h1 and h3 (the paper's default)
      block: separate Q for h1 and h3; the MLP input is turned by A = Q_attn^T Q_mlp inside the layer
      model: one Q for every layer, no adapters
topk: no rotation, plain Top-K on all 7 projection inputs (an ablation baseline).

All weight arithmetic is done in float64 and cast once to the model's dtype.
`build_structure` makes the same module layout with placeholder tensors, so a saved model can be
rebuilt from its config and then filled from safetensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .arch import (ArchSpec, decoder_layers, get_submodule, layer_body, require_invariant, set_submodule,
                   spec_for)
from .calibrate import Rotations
from .errors import LarosaError
from .modules import AdaptedLayer, OfficialSite, SiteInput, TopK, SparseLinear
from .sparsity import SparsityPlan

FORMS = ("official", "fused", "topk")
ROTATION_LEVELS = ("layer", "block", "model")
SELECTIONS = ("magnitude", "weighted")


@dataclass
class LarosaConfig:
    """Everything needed to rebuild a transformed model from its dense config (stored in config.json)."""

    form: str = "fused"
    rotation: str = "layer"
    plan: SparsityPlan = field(default_factory=SparsityPlan.dense)
    provenance: dict = field(default_factory=dict)
    selection: str = "magnitude"  # or "weighted": rank by |z_i| * ||column i of the consumer weights||
    q_basis: str = "free"  # fused form: Q from the gamma-free ("free") or gamma-scaled ("gamma") input

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise LarosaError(f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}")
        if self.q_basis not in ("free", "gamma"):
            raise LarosaError(f"unknown Q basis {self.q_basis!r}; choose free or gamma")
        if self.selection == "weighted" and self.form == "official":
            raise LarosaError("weighted selection is defined for the fused and topk forms only")
        if self.form not in FORMS:
            raise LarosaError(f"unknown form {self.form!r}; choose one of {', '.join(FORMS)}")
        if self.rotation not in ROTATION_LEVELS:
            raise LarosaError(f"unknown rotation level {self.rotation!r}; choose one of {', '.join(ROTATION_LEVELS)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LarosaConfig":
        d = dict(d)
        d["plan"] = SparsityPlan.from_dict(d["plan"])
        return cls(**d)


def _topk(plan: SparsityPlan, site: str, d: int, layer: int) -> TopK:
    return TopK(plan.k(site, d, layer), d, plan.tie_rule, plan.dense_prefill)


def _linear_in(layer: nn.Module, path: str) -> int:
    return get_submodule(layer, path).in_features


def _wrap_mid_sites(layer: nn.Module, spec: ArchSpec, plan: SparsityPlan, i: int) -> None:
    for site, path in (("attn_out", spec.attn_out), ("mlp_out", spec.mlp_out)):
        lin = get_submodule(layer, path)
        set_submodule(layer, path, SparseLinear(lin, _topk(plan, site, lin.in_features, i)))


def _q(rot: Rotations | None, i: int, site: str, basis: str, level: str, d: int) -> torch.Tensor:
    if rot is None:  # structure only: placeholder, filled by load_state_dict
        return torch.eye(d, dtype=torch.float64)
    if level == "model":
        return rot.get(None, site).to(torch.float64)
    if level == "layer":
        site = "attn_in"  # one Q per layer, from h1 (the released code reuses it for h3)
    return rot.get(i, site, basis).to(torch.float64)


def apply_official(model: nn.Module, rot: Rotations | None, plan: SparsityPlan) -> nn.Module:
    spec = spec_for(model)
    d = model.config.hidden_size
    for i, layer in enumerate(decoder_layers(model, spec)):
        q = _q(rot, i, "attn_in", "gamma", "layer", d)
        for site in ("attn_in", "mlp_in"):
            path = spec.site_norm(site)
            set_submodule(layer, path, OfficialSite(get_submodule(layer, path), q, _topk(plan, site, d, i)))
        _wrap_mid_sites(layer, spec, plan, i)
    return model


def apply_topk_only(model: nn.Module, plan: SparsityPlan) -> nn.Module:
    spec = spec_for(model)
    d = model.config.hidden_size
    for i, layer in enumerate(decoder_layers(model, spec)):
        for site in ("attn_in", "mlp_in"):
            path = spec.site_norm(site)
            set_submodule(layer, path, SiteInput(get_submodule(layer, path), _topk(plan, site, d, i)))
        _wrap_mid_sites(layer, spec, plan, i)
    return model


def _untie(model: nn.Module, spec: ArchSpec) -> None:
    head = get_submodule(model, spec.head)
    emb = get_submodule(model, spec.embed)
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None  # noqa: SLF001 - keeps save/load from re-tying


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(dtype=param.dtype, device=param.device))


def _norm_scale(norm: nn.Module) -> torch.Tensor:
    return norm.weight.detach().to(torch.float64).cpu()


@torch.no_grad()
def _fold_in(lin: nn.Linear, gamma: torch.Tensor, q: torch.Tensor) -> None:
    """W <- W diag(gamma) Q (input side)."""
    w = lin.weight.detach().to(torch.float64).cpu()
    _set(lin.weight, (w * gamma[None, :]) @ q)


@torch.no_grad()
def _fold_out(lin: nn.Linear, q: torch.Tensor) -> None:
    """W <- Q^T W, b <- b Q (output side, into the rotated residual stream)."""
    _set(lin.weight, q.T @ lin.weight.detach().to(torch.float64).cpu())
    if lin.bias is not None:
        _set(lin.bias, lin.bias.detach().to(torch.float64).cpu() @ q)


def _ones(norm: nn.Module) -> None:
    with torch.no_grad():
        norm.weight.fill_(1.0)


def apply_fused(model: nn.Module, rot: Rotations | None, plan: SparsityPlan, level: str = "layer",
                q_basis: str = "free") -> nn.Module:
    """Rewrite weights (when `rot` is given) and swap in the fused-form modules."""
    spec = spec_for(model)
    require_invariant(spec)
    d = model.config.hidden_size
    layers = decoder_layers(model, spec)
    n = len(layers)
    _untie(model, spec)
    qa = [_q(rot, i, "attn_in", q_basis, level, d) for i in range(n)]
    qm = [_q(rot, i, "mlp_in", q_basis, level, d) for i in range(n)] if level == "block" else qa
    if rot is not None:
        with torch.no_grad():
            emb = get_submodule(model, spec.embed)
            _set(emb.weight, emb.weight.detach().to(torch.float64).cpu() @ qa[0])
            head = get_submodule(model, spec.head)
            _fold_in(head, _norm_scale(get_submodule(model, spec.final_norm)), qa[-1])
            _ones(get_submodule(model, spec.final_norm))
    for i in range(n):
        layer = layers[i]
        if rot is not None:
            with torch.no_grad():
                for site, q_site in (("attn_in", qa[i]), ("mlp_in", qm[i])):
                    norm = get_submodule(layer, spec.site_norm(site))
                    gamma = _norm_scale(norm)
                    for path in spec.consumers(site):
                        _fold_in(get_submodule(layer, path), gamma, q_site)
                    _ones(norm)
                for path in (spec.attn_out, spec.mlp_out):  # outputs into the residual (Q_attn basis)
                    _fold_out(get_submodule(layer, path), qa[i])
        # swaps
        a_norm = get_submodule(layer, spec.attn_norm)
        set_submodule(layer, spec.attn_norm, SiteInput(a_norm, _topk(plan, "attn_in", d, i)))
        m_norm = get_submodule(layer, spec.mlp_norm)
        inner_rot = (qa[i].T @ qm[i]).to(m_norm.weight.dtype) if level == "block" else None
        set_submodule(layer, spec.mlp_norm, SiteInput(m_norm, _topk(plan, "mlp_in", d, i), inner_rot))
        _wrap_mid_sites(layer, spec, plan, i)
    if level != "model":
        dtype = get_submodule(model, spec.embed).weight.dtype
        for i in range(n - 1):
            layers[i] = AdaptedLayer(layers[i], (qa[i].T @ qa[i + 1]).to(dtype))
    device = get_submodule(model, spec.embed).weight.device
    model.to(device)
    return model


def apply(model: nn.Module, cfg: LarosaConfig, rot: Rotations | None) -> nn.Module:
    """Apply a LarosaConfig in place (rot=None builds the structure only, for loading)."""
    if cfg.form == "official":
        return apply_official(model, rot, cfg.plan)
    if cfg.form == "fused":
        apply_fused(model, rot, cfg.plan, cfg.rotation, cfg.q_basis)
    else:
        apply_topk_only(model, cfg.plan)
    if cfg.selection == "weighted":
        attach_scores(model)
    return model


@torch.no_grad()
def attach_scores(model: nn.Module) -> None:
    """WINA-style selection: every sparsifier ranks by |x_i| * ||column i of its consumers' weights||.

    Computed once from the (already fused) weights; for a structure-only model the values are
    placeholders that loading overwrites.
    """
    spec = spec_for(model)
    for layer in decoder_layers(model, spec):
        body = layer_body(layer)
        for site in ("attn_in", "mlp_in"):
            w = torch.cat([get_submodule(body, p).weight.detach().float() for p in spec.consumers(site)], 0)
            site_mod = get_submodule(body, spec.site_norm(site))
            site_mod.sparsifier.set_score_scale(w.norm(dim=0))
        for path in (spec.attn_out, spec.mlp_out):
            mod = get_submodule(body, path)
            mod.sparsifier.set_score_scale(mod.inner.weight.detach().float().norm(dim=0))


def build_structure(model: nn.Module, cfg: LarosaConfig) -> nn.Module:
    return apply(model, cfg, None)


def set_plan(model: nn.Module, plan: SparsityPlan) -> None:
    """Change the sparsity of an already transformed model in place (same structure, new k)."""
    spec = spec_for(model)
    for i, layer in enumerate(decoder_layers(model, spec)):
        layer = layer_body(layer)
        mods = [(site, get_submodule(layer, spec.site_norm(site))) for site in ("attn_in", "mlp_in")]
        mods += [("attn_out", get_submodule(layer, spec.attn_out)), ("mlp_out", get_submodule(layer, spec.mlp_out))]
        for site, mod in mods:  # k changes in place: score scales and meters stay attached
            sp = mod.sparsifier
            sp.k, sp.tie_rule, sp.dense_prefill = plan.k(site, sp.d, i), plan.tie_rule, plan.dense_prefill
