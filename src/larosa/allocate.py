"""Per-layer greedy allocation of sparsity among a layer's four sites (TEAL's block-wise greedy).

For each decoder layer in turn, on calibration sequences whose hidden states come from the model with
all earlier layers already sparsified: start with every site dense; repeatedly try raising each site's
sparsity by one step worth the same number of weight entries (`step` x the layer's projection weights),
and keep the candidate whose layer output moves least (relative L2 error against the same layer with
all sites dense, on the same inputs); stop when the layer's parameter-weighted sparsity reaches the
target (the last step is shortened to land on it). Every layer meets the target, so the model does too.

Works for any sparsifier with a settable sparsity: TEAL thresholds (the s-quantile of the calibration
|x| grid) and Top-K (k = int((1 - s) d)), through the `setter` callback.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import SITES, decoder_layers, get_submodule, layer_body, projection_shapes, spec_for
from .calibrate import _first, _layer_inputs
from .errors import LarosaError
from .sparsity import check_sparsity

Setter = Callable[[nn.Module, int, str, float], None]  # (site wrapper module, layer index, site, sparsity)


@torch.no_grad()
def greedy_allocation(model: nn.Module, batches: torch.Tensor, target: float, setter: Setter,
                      step: float = 0.05, max_site: float = 0.95, progress: bool = True) -> dict[int, dict[str, float]]:
    """Per-layer site sparsities {layer: {site: s}} meeting `target` in every layer; the model is left
    with them set."""
    target = check_sparsity(target, "target sparsity")
    if not 0 < step <= 0.5:
        raise LarosaError(f"step must be in (0, 0.5], got {step}")
    spec = spec_for(model)
    device = next(model.parameters()).device
    shapes = projection_shapes(model, spec)
    layers = decoder_layers(model, spec)
    def site_mod(body: nn.Module, site: str) -> nn.Module:
        path = spec.site_norm(site) if site in ("attn_in", "mlp_in") else spec.consumers(site)[0]
        return get_submodule(body, path)

    for i, layer in enumerate(layers):  # start dense
        for site in SITES:
            setter(site_mod(layer_body(layer), site), i, site, 0.0)
    hidden, call_args = _layer_inputs(model, spec, batches, device)
    out: dict[int, dict[str, float]] = {}
    for i in tqdm(range(len(layers)), desc=f"greedy allocation @{target}", unit="layer", disable=not progress):
        layer, body = layers[i], layer_body(layers[i])
        args, kwargs = call_args[i]
        w = {site: shapes[i][site][0] * shapes[i][site][1] for site in SITES}
        total = sum(w.values())

        def run(sites: dict[str, float]) -> list[torch.Tensor]:
            for site, s in sites.items():
                setter(site_mod(body, site), i, site, s)
            return [_first(layer(h.to(device), *args, **kwargs)) for h in hidden]

        ref = run({site: 0.0 for site in SITES})
        ref_norm = sum(r.float().pow(2).sum() for r in ref).sqrt()

        def error(sites: dict[str, float]) -> float:
            outs = run(sites)
            return (sum((o - r).float().pow(2).sum() for o, r in zip(outs, ref)).sqrt() / ref_norm).item()

        cur = {site: 0.0 for site in SITES}
        done = 0.0
        while done < target - 1e-12:
            amount = min(step, target - done) * total  # weight entries to skip in this step
            best = None
            for site in SITES:
                s_new = min(cur[site] + amount / w[site], max_site)  # a capped site takes what it can
                if s_new <= cur[site]:
                    continue
                cand = dict(cur, **{site: s_new})
                e = error(cand)
                if best is None or e < best[0]:
                    best = (e, cand)
            if best is None:
                raise LarosaError(f"layer {i}: target {target} not reachable with sites capped at {max_site}")
            cur = best[1]
            done = sum(cur[s] * w[s] for s in SITES) / total
        out[i] = cur
        hidden = run(cur)
        hidden = [h.cpu() for h in hidden]
    return out


def teal_setter(thresholds) -> Setter:
    """Set a TEAL model's thresholds to the s-quantiles of the calibration |x| grids."""
    from .modules import Threshold

    def set_(mod: nn.Module, i: int, site: str, s: float) -> None:
        sp = getattr(mod, "sparsifier", None)
        if not isinstance(sp, Threshold):
            raise LarosaError(f"layer {i} {site}: not a TEAL-transformed site")
        sp.threshold.fill_(thresholds.threshold(i, site, s))

    return set_


def topk_setter() -> Setter:
    """Set a Top-K model's kept count k = int((1 - s) d) per site."""
    from .modules import TopK
    from .sparsity import k_for

    def set_(mod: nn.Module, i: int, site: str, s: float) -> None:
        sp = getattr(mod, "sparsifier", None)
        if not isinstance(sp, TopK):
            raise LarosaError(f"layer {i} {site}: not a Top-K site")
        sp.k = k_for(s, sp.d)

    return set_
