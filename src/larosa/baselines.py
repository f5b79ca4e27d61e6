"""Baselines in the same harness: TEAL (magnitude thresholds on all 7 projection inputs) and CATS
(threshold on |act(gate)| in the MLP only), plus the arithmetic that puts every method at the same
parameter-weighted sparsity.

Thresholds come from the same calibration data and the same layer-by-layer streaming as LaRoSA's
rotations: for every (layer, site) a seeded sample of |x| is kept and summarised as a quantile grid,
so the threshold for sparsity s is the s-quantile of |x| (METHOD.md sec. 9).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import SITES, decoder_layers, get_submodule, layer_body, set_submodule, spec_for
from .calibrate import model_fingerprint, stream_layers
from .errors import LarosaError
from .modules import CatsAct, OfficialSite, SiteInput, SparseLinear, SparsityMeter, Threshold
from .sparsity import SparsityPlan, check_sparsity, parameter_weighted

STAT_SITES = SITES + ("cats",)
GRID = 1000  # quantile resolution: 0.1 %


@dataclass
class Thresholds:
    """quantiles[layer, site, j] = the (j / GRID)-quantile of |x| at that site (float32)."""

    quantiles: torch.Tensor
    meta: dict

    def threshold(self, layer: int, site: str, sparsity: float) -> float:
        s = check_sparsity(sparsity)
        if s == 0.0:
            return -1.0  # keep everything, zeros included
        grid = self.quantiles[layer, STAT_SITES.index(site)]
        pos = s * GRID
        lo = int(pos)
        hi = min(lo + 1, GRID)
        return float(grid[lo] + (grid[hi] - grid[lo]) * (pos - lo))

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"quantiles": self.quantiles.contiguous()}, str(tmp),
                  metadata={"larosa_thresholds": json.dumps(self.meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> "Thresholds":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["larosa_thresholds"])
                q = f.get_tensor("quantiles")
        except Exception as exc:
            raise LarosaError(f"thresholds file {path} is missing, truncated or not a larosa file ({exc})") from exc
        if model is not None and meta.get("model") != model_fingerprint(model, spec_for(model)):
            raise LarosaError(f"thresholds in {path} were calibrated on a different model")
        return cls(q, meta)


@torch.no_grad()
def collect_thresholds(model: nn.Module, batches: torch.Tensor, per_call: int = 8192, seed: int = 0,
                       progress: bool = True, data: dict | None = None) -> Thresholds:
    """|x| quantile grids of every (layer, site) of the dense model, streamed layer by layer."""
    spec = spec_for(model)
    n_layers = len(decoder_layers(model, spec))
    quant = torch.zeros(n_layers, len(STAT_SITES), GRID + 1)
    levels = torch.linspace(0, 1, GRID + 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    samples: dict[str, list[torch.Tensor]] = {}

    def keep(site: str, x: torch.Tensor) -> None:
        v = x.detach().abs().reshape(-1).float().cpu()
        if v.numel() > per_call:
            v = v[torch.randint(0, v.numel(), (per_call,), generator=gen)]
        samples[site].append(v)

    def attach(i: int, layer: nn.Module) -> list:
        samples.clear()
        for site in STAT_SITES:
            samples[site] = []
        hooks = [
            get_submodule(layer, spec.attn_norm).register_forward_hook(lambda m, a, o: keep("attn_in", o)),
            get_submodule(layer, spec.mlp_norm).register_forward_hook(lambda m, a, o: keep("mlp_in", o)),
            get_submodule(layer, spec.attn_out).register_forward_pre_hook(lambda m, a: keep("attn_out", a[0])),
            get_submodule(layer, spec.mlp_out).register_forward_pre_hook(lambda m, a: keep("mlp_out", a[0])),
            get_submodule(layer, spec.act_fn).register_forward_hook(lambda m, a, o: keep("cats", o)),
        ]
        return hooks

    def finish(i: int) -> None:
        for j, site in enumerate(STAT_SITES):
            v = torch.cat(samples[site]).double()
            quant[i, j] = torch.quantile(v, levels).float() if v.numel() <= 16_000_000 else \
                v.sort().values[(levels * (v.numel() - 1)).long()].float()

    stream_layers(model, batches, attach, finish, progress, "thresholds")
    meta = {"model": model_fingerprint(model, spec), "per_call": per_call, "seed": seed,
            "sequences": batches.shape[0], "seqlen": batches.shape[1], "data": data or {}}
    return Thresholds(quant, meta)


def apply_teal(model: nn.Module, thr: Thresholds, sites: dict[str, float], dense_prefill: bool = False) -> nn.Module:
    """TEAL: |x| > t_(layer, site) on the inputs of all 7 projections (uniform or per-site sparsities)."""
    spec = spec_for(model)
    d = model.config.hidden_size
    for i, layer in enumerate(decoder_layers(model, spec)):
        for site in ("attn_in", "mlp_in"):
            path = spec.site_norm(site)
            t = thr.threshold(i, site, sites[site])
            set_submodule(layer, path, SiteInput(get_submodule(layer, path), Threshold(t, d, dense_prefill)))
        for site, path in (("attn_out", spec.attn_out), ("mlp_out", spec.mlp_out)):
            lin = get_submodule(layer, path)
            t = thr.threshold(i, site, sites[site])
            set_submodule(layer, path, SparseLinear(lin, Threshold(t, lin.in_features, dense_prefill)))
    return model


def apply_cats(model: nn.Module, thr: Thresholds, sparsity: float) -> nn.Module:
    """CATS: zero |act(gate)| below its s-quantile; attention stays dense."""
    spec = spec_for(model)
    for i, layer in enumerate(decoder_layers(model, spec)):
        act = get_submodule(layer, spec.act_fn)
        f = get_submodule(layer, spec.mlp_out).in_features
        set_submodule(layer, spec.act_fn, CatsAct(act, thr.threshold(i, "cats", sparsity), f))
    return model


# ---------- equal footing ----------------------------------------------------------------------------

def projection_weights(model: nn.Module) -> dict[str, int]:
    """Total weight entries per site over all layers, and of up+down (what CATS can skip)."""
    from .arch import projection_shapes

    spec = spec_for(model)
    shapes = projection_shapes(model, spec)
    out = {site: sum(r[site][0] * r[site][1] for r in shapes) for site in SITES}
    up = sum(get_submodule(layer_body(lay), spec.mlp_in[-1]).weight.numel()
             for lay in decoder_layers(model, spec))
    out["cats"] = up + out["mlp_out"]
    out["total"] = sum(out[s] for s in SITES)
    return out


def larosa_plan_for(model: nn.Module, target: float, split: tuple[float, float] = (0.8, 1.2),
                    tie_rule: str = "exact") -> SparsityPlan:
    """The paper-split plan whose parameter-weighted sparsity is closest to `target` (bisection on p)."""
    from .arch import projection_shapes

    target = check_sparsity(target, "target sparsity")
    shapes = projection_shapes(model, spec_for(model))
    lo, hi = 0.0, min(0.999, 0.999 / max(split))
    for _ in range(50):
        mid = (lo + hi) / 2
        if parameter_weighted(SparsityPlan.from_nominal(mid, split), shapes) < target:
            lo = mid
        else:
            hi = mid
    return SparsityPlan.from_nominal(hi, split, tie_rule=tie_rule)


def cats_sparsity_for(model: nn.Module, target: float) -> float | None:
    """CATS sparsity s whose skipped up rows + down columns give `target` parameter-weighted; None if > 0.99."""
    w = projection_weights(model)
    s = target * w["total"] / w["cats"]
    return s if s <= 0.99 else None


def attach_meter(model: nn.Module, meter: SparsityMeter) -> SparsityMeter:
    """Point every sparsifier of a transformed model at `meter`, with its skipped weights per zero."""
    spec = spec_for(model)
    for layer in decoder_layers(model, spec):
        body = layer_body(layer)
        for site in ("attn_in", "mlp_in"):
            mod = get_submodule(body, spec.site_norm(site))
            if isinstance(mod, (SiteInput, OfficialSite)):
                mod.sparsifier.meter = meter
                mod.sparsifier.weight_per_channel = sum(
                    _linear(body, p).out_features for p in spec.consumers(site))
        for path in (spec.attn_out, spec.mlp_out):
            mod = get_submodule(body, path)
            if isinstance(mod, SparseLinear):
                mod.sparsifier.meter = meter
                mod.sparsifier.weight_per_channel = mod.inner.out_features
        act = get_submodule(body, spec.act_fn)
        if isinstance(act, CatsAct):
            act.sparsifier.meter = meter
            act.sparsifier.weight_per_channel = 2 * model.config.hidden_size  # an up row + a down column
    return meter


def _linear(body: nn.Module, path: str) -> nn.Module:
    mod = get_submodule(body, path)
    return getattr(mod, "inner", mod)
