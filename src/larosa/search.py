"""Algorithm 1 of the paper: search how one sparsity budget is split between a block's inputs.

A split coefficient a gives the block inputs (attn_in, mlp_in) sparsity a * p and the block-internal
inputs (attn_out, mlp_out) (2 - a) * p; the paper's fixed split is a = 0.8. For a *parameter-weighted*
target, every a has exactly one p that meets it, so the search is one-dimensional: a grid over a (then
a finer grid around the best point), p solved for the target at each a, the objective evaluated on
held-out calibration tokens. With `per_block`, attention and MLP get their own coefficients (coordinate
search starting from the best shared a).

Objective: perplexity of the sparsified model on held-out calibration tokens (WikiText-2 validation
segments drawn with another seed than the rotation calibration, from the calibration split: train where
present, else validation; they may overlap the rotation calibration's segments; never the test split). Perplexity is
what the method is judged by, and end-to-end: per-site output errors do not say how errors at the
block inputs trade against errors at o_proj/down_proj after the following layers.

Plans are exact: each site's sparsity is stored as 1 - k / d_in for an integer k, so the
parameter-weighted sparsity of a searched plan is within one input channel per site of the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .arch import SITES
from .errors import LarosaError
from .sparsity import SparsityPlan, check_sparsity, k_for, parameter_weighted

DEFAULT_GRID = tuple(round(0.4 + 0.1 * i, 2) for i in range(11))  # 0.4 .. 1.4 (paper: 0.8)


def coef_sites(a_attn: float, a_mlp: float | None = None) -> dict[str, float]:
    """Per-site multipliers of the nominal p for split coefficient(s) a."""
    a_mlp = a_attn if a_mlp is None else a_mlp
    return {"attn_in": a_attn, "attn_out": 2.0 - a_attn, "mlp_in": a_mlp, "mlp_out": 2.0 - a_mlp}


def exact_sites(sites: dict[str, float], dims: dict[str, int]) -> dict[str, float]:
    """Sparsities snapped to integer kept counts: s = 1 - k / d_in (k = the plan's own k)."""
    return {s: 1.0 - k_for(v, dims[s]) / dims[s] for s, v in sites.items()}


def plan_for_target(shapes: list[dict[str, tuple[int, int]]], target: float, coefs: dict[str, float],
                    tie_rule: str = "exact") -> SparsityPlan:
    """The plan with site sparsities coefs[site] * p whose parameter-weighted sparsity is closest to
    `target` (bisection on p over integer kept counts)."""
    target = check_sparsity(target, "target sparsity")
    if any(c <= 0 for c in coefs.values()):
        raise LarosaError(f"split coefficients must be > 0, got {coefs}")
    dims = {s: shapes[0][s][0] for s in SITES}
    hi_p = 0.999 / max(coefs.values())

    def plan(p: float) -> SparsityPlan:
        return SparsityPlan(exact_sites({s: min(coefs[s] * p, 0.999) for s in SITES}, dims), nominal=p,
                            split=(coefs["attn_in"], coefs["attn_out"], coefs["mlp_in"], coefs["mlp_out"]),
                            tie_rule=tie_rule)

    if parameter_weighted(plan(hi_p), shapes) < target:
        raise LarosaError(f"target {target} is out of reach for split {coefs}")
    lo, hi = 0.0, hi_p
    for _ in range(60):
        mid = (lo + hi) / 2
        if parameter_weighted(plan(mid), shapes) < target:
            lo = mid
        else:
            hi = mid
    a, b = plan(lo), plan(hi)
    pa, pb = parameter_weighted(a, shapes), parameter_weighted(b, shapes)
    return a if abs(pa - target) <= abs(pb - target) else b


@dataclass
class SearchResult:
    best: tuple[float, ...]  # (a,) or (a_attn, a_mlp)
    plan: SparsityPlan
    objective: float
    table: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"best": list(self.best), "objective": self.objective, "plan": self.plan.to_dict(),
                "table": self.table}


def grid_search(objective: Callable[[float], float], grid: Iterable[float], refine: int = 2,
                step: float | None = None, lo: float = 0.05, hi: float = 1.95) -> tuple[float, list[tuple]]:
    """Minimise a 1-D objective: a grid, then `refine` rounds of a 3-point finer grid around the best
    (step halves each round). Returns (best x, [(x, value), ...] in evaluation order)."""
    seen: dict[float, float] = {}

    def f(x: float) -> float:
        x = round(x, 4)
        if x not in seen:
            seen[x] = objective(x)
        return seen[x]

    grid = sorted(set(round(g, 4) for g in grid))
    if not grid:
        raise LarosaError("empty search grid")
    for g in grid:
        f(g)
    step = step if step is not None else (min(b - a for a, b in zip(grid, grid[1:])) if len(grid) > 1 else 0.1)
    best = min(seen, key=seen.get)
    for _ in range(refine):
        step /= 2
        for x in (best - step, best + step):
            if lo <= x <= hi:
                f(x)
        best = min(seen, key=seen.get)
    return best, list(seen.items())


@torch.no_grad()
def held_out_ppl(model, ids: torch.Tensor) -> float:
    """Perplexity of `model` on (n, T) token sequences (each scored on its own)."""
    device = next(model.parameters()).device
    nll = 0.0
    count = 0
    for row in ids:
        x = row[None].to(device)
        logits = model(x).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
    return math.exp(nll / count)


def search_split(model, target: float, eval_ids: torch.Tensor, grid=DEFAULT_GRID, per_block: bool = False,
                 refine: int = 2, progress: bool = True,
                 objective: Callable | None = None) -> SearchResult:
    """Search the split for `target` on a transformed model (any Top-K form), changing k in place.

    `model` must already carry Top-K sparsifiers (e.g. `apply(..., LarosaConfig("fused", ...))`); its
    plan is left at the best plan found.
    """
    from .arch import projection_shapes, spec_for
    from .transform import set_plan

    shapes = projection_shapes(model, spec_for(model))
    tie = "exact"
    score = objective or held_out_ppl
    table: list[dict] = []
    bar = tqdm(desc=f"split search @{target}", unit="eval", disable=not progress)

    def evaluate(a_attn: float, a_mlp: float) -> float:
        try:
            plan = plan_for_target(shapes, target, coef_sites(a_attn, a_mlp), tie)
        except LarosaError:  # this split cannot reach the target (a site would exceed 0.999)
            table.append({"a_attn": a_attn, "a_mlp": a_mlp, "p": None, "sites": None, "param_weighted": None,
                          "objective": math.inf})
            return math.inf
        set_plan(model, plan)
        val = score(model, eval_ids)
        table.append({"a_attn": a_attn, "a_mlp": a_mlp, "p": plan.nominal, "sites": dict(plan.sites),
                      "param_weighted": parameter_weighted(plan, shapes), "objective": val})
        bar.update()
        bar.set_postfix(a=f"{a_attn:.3f}/{a_mlp:.3f}", obj=f"{val:.3f}")
        return val

    a, seen = grid_search(lambda x: evaluate(x, x), grid, refine)
    if all(math.isinf(v) for _, v in seen):
        raise LarosaError(f"no split in the grid reaches target {target}")
    best: tuple[float, ...] = (a,)
    if per_block:
        a_attn, _ = grid_search(lambda x: evaluate(x, a), grid, refine)
        a_mlp, _ = grid_search(lambda x: evaluate(a_attn, x), grid, refine)
        best = (a_attn, a_mlp)
    bar.close()
    coefs = coef_sites(*best) if len(best) == 2 else coef_sites(best[0])
    plan = plan_for_target(shapes, target, coefs, tie)
    set_plan(model, plan)
    done = [r for r in table if (r["a_attn"], r["a_mlp"]) == ((best[0], best[-1]) if per_block else (a, a))]
    return SearchResult(best, plan, done[-1]["objective"], table)


@dataclass
class FormChoice:
    """Which deployable form a model gets (`form`) and the held-out perplexity of every candidate."""

    form: str
    objective: dict[str, float]

    def to_dict(self) -> dict:
        return {"form": self.form, "objective": dict(self.objective),
                "criterion": "perplexity on held-out calibration tokens"}


AUTO_CANDIDATES = ("fused", "topk")  # the rotated paper form and un-rotated Top-K, same plan


def choose_form(base, plan: SparsityPlan, rot, eval_ids: torch.Tensor, candidates=AUTO_CANDIDATES,
                selection: str = "magnitude", progress: bool = True, objective: Callable | None = None,
                rotation: str = "layer", q_basis: str = "free"):
    """`form="auto"`: build every candidate form of `base` (a copy each) with the same `plan` (and the
    same rotation level, Q basis and selection as the model that will be deployed) and keep the one with
    the lowest held-out calibration perplexity. Whether the PCA rotation pays is model-dependent
    (README, ablation), so it is measured per model instead of assumed.
    Returns (transformed model, FormChoice)."""
    import copy

    from .transform import LarosaConfig, apply

    if not candidates:
        raise LarosaError("no candidate forms to choose from")
    score = objective or held_out_ppl
    best = None
    values: dict[str, float] = {}
    for form in tqdm(candidates, desc="choose form", unit="form", disable=not progress):
        net = apply(copy.deepcopy(base), LarosaConfig(form, rotation, plan, selection=selection, q_basis=q_basis), rot)
        values[form] = float(score(net, eval_ids))
        if best is None or values[form] < values[best[0]]:
            best = (form, net)
        else:
            del net
    return best[1], FormChoice(best[0], values)
