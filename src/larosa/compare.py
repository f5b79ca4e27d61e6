"""`larosa compare`: every method on one model, one protocol, at equal parameter-weighted sparsity.

Methods: dense, larosa-official, larosa-fused, topk (un-rotated Top-K), teal (uniform thresholds),
cats (MLP only). For each target parameter-weighted sparsity the method's own knob is solved for:
LaRoSA's nominal p under the paper split (bisection), TEAL's uniform s (= target), CATS' s (only up
rows and down columns are skippable, so high targets are out of its reach and reported as such).
Each (method, target) cell is written to `<out>/cells/` as soon as it is done; a re-run skips finished
cells, so an interrupted comparison resumes; several runs on one folder (one per core, methods in another
order) share the work, each skipping cells another run finished meanwhile. Outputs: `results.json`, `table.md`, `ppl.png`.
Realised sparsity is metered per token on the evaluation data (Top-K is constant by construction,
thresholds drift).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from .baselines import (apply_cats, apply_teal, attach_meter, cats_sparsity_for, collect_thresholds,
                        larosa_plan_for, projection_weights, Thresholds)
from .calibrate import model_fingerprint
from .data import calibration_batches, load_wikitext, tokenize_source
from .errors import LarosaError
from .evaluate import perplexity_from_ids
from .modules import SparsityMeter
from .record import run_record, write_json
from .report import markdown_table
from .sparsity import SITES
from .transform import LarosaConfig, apply

METHODS = ("dense", "larosa-official", "larosa-fused", "topk", "teal", "cats",
           # issue 7 variants (fused form): searched split, + weighted selection, + block-level Q,
           # per-layer greedy allocation; TEAL with its greedy per-layer allocation
           "larosa-searched", "larosa-searched-weighted", "larosa-searched-weighted-block", "larosa-greedy", "teal-greedy",
           "larosa-fused-gammaq", "larosa-fused-weighted", "topk-weighted",
           # the rotated paper form or un-rotated Top-K, whichever has the lower held-out calibration PPL
           "larosa-auto")
FUSED_VARIANTS = {  # method: (rotation level, selection, how the per-site sparsities are chosen)
    "larosa-searched": ("layer", "magnitude", "search"),
    "larosa-searched-weighted": ("layer", "weighted", "search"),
    "larosa-searched-weighted-block": ("block", "weighted", "search"),
    "larosa-greedy": ("layer", "magnitude", "greedy"),
}

FIXED_SPLIT = {  # method: (form, Q basis, selection) at the paper's fixed 0.8/1.2 split
    "larosa-official": ("official", "gamma", "magnitude"),  # the released code: Q of the gamma-scaled input
    "larosa-fused": ("fused", "free", "magnitude"),
    "topk": ("topk", "free", "magnitude"),
    "larosa-fused-gammaq": ("fused", "gamma", "magnitude"),  # Q from the gamma-scaled input (issue 7)
    "larosa-fused-weighted": ("fused", "free", "weighted"),  # |z| * column norm, fixed split (issue 7)
    "topk-weighted": ("topk", "free", "weighted"),  # no rotation, WINA-style ranking, fixed split
}

HELD_OUT = (4, 512)  # calibration sequences x tokens for the split search and greedy allocations


def _thresholds(lm, nsamples, seqlen, seed, data_dir, progress):
    from .api import calibration_source
    from .arch import spec_for
    from .models import cache_dir

    fp = model_fingerprint(lm.model, spec_for(lm.model))
    path = cache_dir() / "thresholds" / f"{fp['class']}-{fp['norm_hash']}-{nsamples}x{seqlen}-seed{seed}.safetensors"
    if path.is_file():
        return Thresholds.load(path, lm.model)
    source = calibration_source(None, data_dir)
    ids = tokenize_source(lm.tokenizer, source)
    thr = collect_thresholds(lm.model, calibration_batches(ids, nsamples, seqlen, seed), seed=seed,
                             progress=progress, data=source.describe())
    thr.save(path)
    return thr


AUTO_FORM_METHOD = {"fused": "larosa-fused", "topk": "topk"}  # the fixed-split method each auto choice equals


def _same_model_cell(cells_dir: Path, cell: dict, target: float) -> dict | None:
    """The finished cell of the fixed-split method whose model `larosa-auto` chose (same plan), if any."""
    choice = cell.get("form_choice")
    if cell["method"] != "larosa-auto" or not choice:
        return None
    f = cells_dir / f"{AUTO_FORM_METHOD[choice['form']]}-{target:.3f}.json"
    if not f.is_file():
        return None
    other = json.loads(f.read_text())
    return other if other.get("sites") == cell.get("sites") and other.get("ppl") is not None else None


def build(method: str, base, target: float, rot, thr, held_out=None, progress: bool = False):
    """(model, description) for one cell; model is None when the target is out of the method's reach.

    `held_out`: calibration tokens (n, T) for the split search and the greedy allocations (never test)."""
    if method == "dense":
        return base, {"knob": None}
    if method in FUSED_VARIANTS:
        from .allocate import greedy_allocation, topk_setter
        from .search import search_split

        level, selection, how = FUSED_VARIANTS[method]
        plan = larosa_plan_for(base, target)
        net = apply(copy.deepcopy(base), LarosaConfig("fused", level, plan, selection=selection), rot)
        if how == "search":
            res = search_split(net, target, held_out, progress=progress)
            a = "/".join(f"{v:.3f}" for v in res.best)
            return net, {"knob": f"a={a} (paper 0.8), p={res.plan.nominal:.4f}", "sites": res.plan.sites,
                         "search": res.to_dict()}
        alloc = greedy_allocation(net, held_out, target, topk_setter(), progress=progress)
        return net, {"knob": "greedy per layer", "layers": {str(i): v for i, v in alloc.items()}}
    if method == "larosa-auto":
        from .search import choose_form

        plan = larosa_plan_for(base, target)
        net, choice = choose_form(base, plan, rot, held_out, progress=progress)
        obj = ", ".join(f"{f} {v:.3f}" for f, v in choice.objective.items())
        return net, {"knob": f"{choice.form} (held-out ppl {obj}), p={plan.nominal:.4f}", "sites": plan.sites,
                     "form_choice": choice.to_dict()}
    if method == "teal-greedy":
        from .allocate import greedy_allocation, teal_setter

        net = apply_teal(copy.deepcopy(base), thr, {s: 0.0 for s in SITES})
        alloc = greedy_allocation(net, held_out, target, teal_setter(thr), progress=progress)
        return net, {"knob": "greedy per layer", "layers": {str(i): v for i, v in alloc.items()}}
    if method in FIXED_SPLIT:
        form, q_basis, selection = FIXED_SPLIT[method]
        plan = larosa_plan_for(base, target, tie_rule="ge" if form == "official" else "exact")
        cfg = LarosaConfig(form, "layer", plan, selection=selection, q_basis=q_basis)
        net = apply(copy.deepcopy(base), cfg, rot)
        return net, {"knob": f"p={plan.nominal:.4f}", "sites": plan.sites}
    if method == "teal":
        sites = {s: target for s in SITES}
        return apply_teal(copy.deepcopy(base), thr, sites), {"knob": f"s={target:.4f}", "sites": sites}
    if method == "cats":
        s = cats_sparsity_for(base, target)
        if s is None:
            return None, {"knob": "out of reach (only up rows + down columns are skippable)"}
        return apply_cats(copy.deepcopy(base), thr, s), {"knob": f"s={s:.4f}", "sites": {"mlp_act": s}}
    raise LarosaError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def run_compare(model: str, methods: tuple[str, ...], targets: tuple[float, ...], out_dir: str | Path,
                windows: int | None = 40, seqlen: int = 2048, cal_samples: int = 16, cal_seqlen: int = 2048,
                cal_seed: int = 0, data_dir=None, device: str = "auto", dtype: str = "auto",
                progress: bool = True, zeroshot_limit: int = 0, zeroshot_batch: int = 8,
                held_out: tuple[int, int] | None = None, render_only: bool = False) -> dict:
    from .api import cached_rotations
    from .models import load_model

    for m in methods:
        if m not in METHODS:
            raise LarosaError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    out = Path(out_dir)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    setup = {"model": model, "windows": windows, "seqlen": seqlen, "cal_samples": cal_samples,
             "cal_seqlen": cal_seqlen, "cal_seed": cal_seed, "protocol": "paper ppl (non-overlapping windows)"}
    setup_file = out / "setup.json"
    if setup_file.is_file() and json.loads(setup_file.read_text()) != setup:
        raise LarosaError(f"{out} holds a comparison with another setup ({setup_file}); use another --out")
    write_json(setup_file, setup)

    todo = [(m, t) for m in methods for t in ((0.0,) if m == "dense" else targets)]
    zs_name = lambda m, t: f"zs-{m}-{t:.3f}-limit{zeroshot_limit}.json"  # noqa: E731
    pending = [(m, t) for m, t in todo if not (cells_dir / f"{m}-{t:.3f}.json").is_file()
               or (zeroshot_limit > 0 and not (cells_dir / zs_name(m, t)).is_file())]
    if render_only:  # tables and plot from the finished cells only; nothing is computed
        todo = [(m, t) for m, t in todo if (cells_dir / f"{m}-{t:.3f}.json").is_file()]
        pending = []
        if not todo:
            raise LarosaError(f"{out} holds no finished cells for these methods and targets")
    lm = ids = rot = thr = held_out_ids = None
    ho = tuple(held_out) if held_out is not None else HELD_OUT
    if pending:
        lm = load_model(model, device=device, dtype=dtype)
        ids = tokenize_source(lm.tokenizer, load_wikitext("test", data_dir))
        if any(m.startswith("larosa") for m, _ in pending):
            rot = cached_rotations(lm, cal_samples, cal_seqlen, cal_seed, None, data_dir, None, progress)
        if any(m in ("teal", "cats", "teal-greedy") for m, _ in pending):
            thr = _thresholds(lm, cal_samples, cal_seqlen, cal_seed, data_dir, progress)
        if any(m in FUSED_VARIANTS or m in ("teal-greedy", "larosa-auto") for m, _ in pending):
            from .api import calibration_source

            cal_ids = tokenize_source(lm.tokenizer, calibration_source(None, data_dir))
            held_out_ids = calibration_batches(cal_ids, ho[0], ho[1], cal_seed + 1)
        weights = projection_weights(lm.model)["total"]
    for m, t in tqdm(pending, desc="compare", unit="cell", disable=not progress):
        if (cells_dir / f"{m}-{t:.3f}.json").is_file() and (
                zeroshot_limit <= 0 or (cells_dir / zs_name(m, t)).is_file()):
            continue  # finished meanwhile by another `larosa compare` on the same folder
        t0 = time.perf_counter()
        net, desc = build(m, lm.model, t, rot, thr, held_out_ids, progress)
        cell = {"method": m, "target_pw": t, **desc}
        if m in FUSED_VARIANTS or m in ("teal-greedy", "larosa-auto"):
            cell["held_out"] = {"sequences": ho[0], "seqlen": ho[1], "seed": cal_seed + 1,
                                "split": "calibration split (train if present, else validation; never test)"}
        if zeroshot_limit > 0 and not (cells_dir / zs_name(m, t)).is_file():
            from .zeroshot import evaluate_zeroshot

            zs = None if net is None else evaluate_zeroshot(net, lm.tokenizer, limit=zeroshot_limit,
                                                            batch_size=zeroshot_batch, data_dir=data_dir)
            write_json(cells_dir / zs_name(m, t), {"method": m, "target_pw": t, "zeroshot": zs})
        if (cells_dir / f"{m}-{t:.3f}.json").is_file():
            continue
        same = _same_model_cell(cells_dir, cell, t)
        if net is None:
            cell.update({"ppl": None})
        elif same is not None:  # larosa-auto built exactly the model of a measured cell: reuse its figures
            cell.update({k: same[k] for k in ("ppl", "windows", "realised_pw")},
                        ppl_from=f"{same['method']}-{t:.3f}.json (identical model: same form, plan and rotations)",
                        seconds=round(time.perf_counter() - t0, 1))
        else:
            meter = attach_meter(net, SparsityMeter(weights))
            res = perplexity_from_ids(net, ids, seqlen=seqlen, n_windows=windows, progress=progress,
                                      on_window=meter.flush)
            real = meter.summary()
            cell.update({"ppl": res.ppl, "windows": f"{res.windows_used} of {res.windows_total}",
                         "realised_pw": real, "seconds": round(time.perf_counter() - t0, 1)})
            if net is not lm.model:
                del net
        write_json(cells_dir / f"{m}-{t:.3f}.json", cell)
    cells = [json.loads((cells_dir / f"{m}-{t:.3f}.json").read_text()) for m, t in todo]
    for c, (m, t) in zip(cells, todo):
        zf = cells_dir / zs_name(m, t)
        if zeroshot_limit > 0 and zf.is_file():
            c["zeroshot"] = json.loads(zf.read_text())["zeroshot"]
    rows = []
    for c in cells:
        r = c.get("realised_pw") or {}
        realised = round(r["mean"], 4) if r else (0.0 if c["method"] == "dense" else "n/a")
        rows.append({"method": c["method"], "target_pw": c["target_pw"], "knob": c["knob"],
                     "realised_pw_mean": realised,
                     "per_token_p01-p99": f"{r['p01']:.3f}-{r['p99']:.3f}" if r else "-",
                     "ppl": round(c["ppl"], 3) if c["ppl"] is not None else "n/a"})
        if zeroshot_limit > 0:
            zs = c.get("zeroshot")
            rows[-1][f"0-shot mean (limit {zeroshot_limit})"] = round(100 * zs["mean"], 2) if zs else "n/a"
    table = markdown_table(rows)
    (out / "table.md").write_text(table + "\n")
    record = run_record("compare", setup, cells=cells)
    write_json(out / "results.json", record)
    plot(cells, out / "ppl.png", model)
    return {"rows": rows, "table": table, "out": out}


def ppl_at_realised(cells: list[dict], pw: float, method: str = "teal") -> float | None:
    """`method`'s perplexity at realised parameter-weighted sparsity `pw`, log-linear between its measured
    cells (the dense cell is its 0 point): the fair reference for a method whose realised sparsity
    differs from its target (thresholds drift on test data). None outside the measured range."""
    pts = sorted((c["realised_pw"]["mean"], c["ppl"]) for c in cells
                 if c["method"] == method and c.get("ppl") is not None and c.get("realised_pw"))
    dense = next((c["ppl"] for c in cells if c["method"] == "dense" and c.get("ppl") is not None), None)
    if dense is not None:
        pts = [(0.0, dense)] + pts
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= pw <= x1 and x1 > x0:
            f = (pw - x0) / (x1 - x0)
            return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))
    return None


def plot(cells: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    with_zs = any(c.get("zeroshot") for c in cells)
    fig, axes = plt.subplots(1, 2 if with_zs else 1, figsize=(11 if with_zs else 6, 4), squeeze=False)
    ax = axes[0][0]
    dense = next((c for c in cells if c["method"] == "dense"), None)
    present = [m for m in METHODS[1:] if any(c["method"] == m for c in cells)]
    cmap = matplotlib.colormaps["tab10" if len(present) <= 10 else "tab20"]
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(present)}  # one colour per method in both panels
    for m in present:
        pts = [(c["realised_pw"]["mean"], c["ppl"]) for c in cells
               if c["method"] == m and c["ppl"] is not None and c.get("realised_pw")]
        if pts:
            ax.plot(*zip(*sorted(pts)), "o-", label=m, color=colour[m])
    if dense is not None and dense.get("ppl") is not None:
        ax.axhline(dense["ppl"], color="k", ls="--", label="dense")
    ax.set_xlabel("realised parameter-weighted sparsity")
    ax.set_ylabel("WikiText-2 PPL (log scale)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(title)
    ax.legend(fontsize=8)
    if with_zs:  # zero-shot mean vs sparsity, same methods and colours
        az = axes[0][1]
        for m in present:
            pts = [(c["realised_pw"]["mean"], 100 * c["zeroshot"]["mean"]) for c in cells
                   if c["method"] == m and c.get("zeroshot") and c.get("realised_pw")]
            if pts:
                az.plot(*zip(*sorted(pts)), "o-", label=m, color=colour[m])
        if dense is not None and dense.get("zeroshot"):
            az.axhline(100 * dense["zeroshot"]["mean"], color="k", ls="--", label="dense")
        limit = next(c["zeroshot"]["limit"] for c in cells if c.get("zeroshot"))
        az.set_xlabel("realised parameter-weighted sparsity")
        az.set_ylabel(f"7-task zero-shot mean, % (first {limit} items per task)")
        az.set_title(f"{title}: zero-shot")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
