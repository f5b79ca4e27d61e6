"""Python API: the functions the CLI calls, usable directly.

    import larosa
    lm = larosa.load_model("smollm2-135m")
    rot = larosa.calibrate(lm, nsamples=16, seqlen=2048)
    cfg = larosa.LarosaConfig(form="fused", plan=larosa.SparsityPlan.from_nominal(0.4))
    larosa.apply(lm.model, cfg, rot)
    larosa.save(lm.model, lm.tokenizer, "smollm2-larosa-40", cfg)
    same = larosa.load("smollm2-larosa-40")
"""

from __future__ import annotations

import copy
import os
import sys
import time

from .arch import projection_shapes, spec_for
from .calibrate import CalibrationConfig, Rotations, calibrate as _calibrate, model_fingerprint
from .data import calibration_batches, load_wikitext, tokenize_source
from .errors import LarosaError
from .evaluate import perplexity_from_ids
from .models import LoadedModel, cache_dir, load_model
from .record import run_record, write_json
from .report import markdown_table
from .sparsity import SparsityPlan, parameter_weighted
from .transform import FORMS, LarosaConfig, apply as _apply, set_plan


def calibration_source(split: str | None, data_dir=None):
    """WikiText-2 train, else validation (never test): local files first, the hub only when neither
    split is available locally (an offline machine then does not wait on hub retries)."""
    if split is not None:
        return load_wikitext(split, data_dir)
    for name, hub in (("train", False), ("validation", False), ("train", True), ("validation", True)):
        try:
            source = load_wikitext(name, data_dir, allow_hub=hub)
        except LarosaError:
            continue
        if name == "validation":
            print("calibration: no WikiText-2 train split here; using validation (evaluation uses test)",
                  file=sys.stderr)
        return source
    return load_wikitext("validation", data_dir)  # raises with the list of places tried


def calibrate(lm: LoadedModel, nsamples: int = 16, seqlen: int = 2048, seed: int = 0,
              split: str | None = None, data_dir=None, progress: bool = True) -> Rotations:
    """Calibrate rotations on the dense model `lm` (see larosa.calibrate for the algorithm)."""
    source = calibration_source(split, data_dir)
    cfg = CalibrationConfig(nsamples=nsamples, seqlen=seqlen, seed=seed, split=source.split)
    ids = tokenize_source(lm.tokenizer, source)
    batches = calibration_batches(ids, nsamples, seqlen, seed)
    return _calibrate(lm.model, batches, cfg, progress=progress, data=source.describe())


def cached_rotations(lm: LoadedModel, nsamples: int = 16, seqlen: int = 2048, seed: int = 0,
                     split: str | None = None, data_dir=None, path=None, progress: bool = True) -> Rotations:
    """Rotations from `path`, else from the user cache, else calibrated now (and cached)."""
    if path is not None:
        return Rotations.load(path, lm.model)
    fp = model_fingerprint(lm.model, spec_for(lm.model))
    key = f"{fp['class']}-{fp['norm_hash']}-{nsamples}x{seqlen}-seed{seed}-{split or 'auto'}.safetensors"
    cached = cache_dir() / "rotations" / key
    if cached.is_file():
        return Rotations.load(cached, lm.model)
    rot = calibrate(lm, nsamples, seqlen, seed, split, data_dir, progress)
    rot.save(cached)
    return rot


def sparsity_report(model, plan: SparsityPlan) -> dict:
    shapes = projection_shapes(model, spec_for(model))
    return {"nominal": plan.nominal, "unweighted": round(plan.unweighted(), 4),
            "param_weighted": round(parameter_weighted(plan, shapes), 4),
            "sites": {k: round(v, 4) for k, v in plan.sites.items()}}


def apply(model, cfg: LarosaConfig, rotations: Rotations | None):
    """Transform `model` in place (see larosa.transform)."""
    if cfg.form in ("official", "fused") and rotations is None:
        raise LarosaError(f"the {cfg.form} form needs rotations: run larosa.calibrate first")
    return _apply(model, cfg, rotations)


def make_plan(sparsity: float, split: tuple[float, float] = (0.8, 1.2), sites: dict | None = None,
              tie_rule: str = "exact", dense_prefill: bool = False) -> SparsityPlan:
    if sites:
        return SparsityPlan(dict(sites), tie_rule=tie_rule, dense_prefill=dense_prefill)
    return SparsityPlan.from_nominal(sparsity, split, tie_rule=tie_rule, dense_prefill=dense_prefill)


def evaluate_ppl(model: str = "smollm2-135m", windows: int | None = None, seqlen: int = 2048,
                 batch_size: int = 1, split: str = "test", device: str = "auto", dtype: str = "auto",
                 data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                 progress: bool = True, forms: tuple[str, ...] = ("dense",),
                 sparsities: tuple[float, ...] = (0.0,), rotation: str = "layer",
                 split_coef: tuple[float, float] = (0.8, 1.2), rotations_path=None,
                 cal_samples: int = 16, cal_seqlen: int = 2048, cal_seed: int = 0,
                 dense_prefill: bool = False, loaded: LoadedModel | None = None, selection: str = "magnitude",
                 q_basis: str = "free") -> dict:
    """Perplexity of the dense model and/or LaRoSA forms at several sparsities, one table."""
    t0 = time.perf_counter()
    source = load_wikitext(split, data_dir)
    base = loaded or load_model(model, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    ids = tokenize_source(base.tokenizer, source)
    rot = None
    if any(f in ("official", "fused") for f in forms):
        rot = cached_rotations(base, cal_samples, cal_seqlen, cal_seed, None, data_dir, rotations_path,
                               progress)
    rows, results = [], []
    for form in forms:
        levels = [0.0] if form == "dense" else list(sparsities)
        transformed = None
        for p in levels:
            if form == "dense":
                net, plan = base.model, SparsityPlan.dense()
            else:
                tie = "ge" if form == "official" else "exact"
                plan = make_plan(p, split_coef, tie_rule=tie, dense_prefill=dense_prefill)
                if transformed is None:
                    cfg = LarosaConfig(form, rotation, plan, selection=selection, q_basis=q_basis)
                    transformed = apply(copy.deepcopy(base.model), cfg, rot)
                else:
                    set_plan(transformed, plan)
                net = transformed
            res = perplexity_from_ids(net, ids, seqlen=seqlen, n_windows=windows, batch_size=batch_size,
                                      progress=progress)
            rep = sparsity_report(base.model, plan)
            label = form if form in ("dense", "official", "topk") else f"fused/{rotation}"
            if form != "dense" and selection != "magnitude":
                label += f"/{selection}"
            if form == "fused" and q_basis != "free":
                label += f"/Q-{q_basis}"
            rows.append({"form": label, "p": p, "unweighted": rep["unweighted"],
                         "param_weighted": rep["param_weighted"],
                         "windows": f"{res.windows_used} of {res.windows_total}", "ppl": round(res.ppl, 4),
                         "eval_s": round(res.seconds, 1)})
            results.append({"form": form, "rotation": rotation, "plan": plan.to_dict(), "sparsity": rep,
                            "result": res.to_dict()})
        del transformed
    record = run_record(
        "eval ppl",
        {"model": model, "windows": windows, "seqlen": seqlen, "batch_size": batch_size, "split": split,
         "device": base.info.get("device"), "dtype": base.info.get("dtype"), "forms": list(forms),
         "sparsities": list(sparsities), "rotation": rotation, "split_coef": list(split_coef),
         "selection": selection, "q_basis": q_basis,
         "dense_prefill": dense_prefill,
         "calibration": rot.meta if rot is not None else None},
        protocol="wikitext2 raw, rows joined with '\\n\\n', non-overlapping windows, mean NLL over all "
                 "predicted tokens, every position sparsified" + (" except prefill" if dense_prefill else ""),
        model=base.describe(), data=source.describe(), rows=rows, results=results,
        load_seconds=load_s, wall_seconds=time.perf_counter() - t0,
    )
    path = write_json(out, record) if out is not None else None
    header = f"{model} | {base.info.get('dtype')} on {base.info.get('device')} | WikiText-2 {split}"
    return {"rows": rows, "record": record, "table": header + "\n" + markdown_table(rows), "path": path,
            "loaded": base, "rotations": rot}


def sparsify(model: str, out: str | os.PathLike, sparsity: float = 0.4, form: str = "auto",
             rotation: str = "layer", split_coef: tuple[float, float] = (0.8, 1.2), sites: dict | None = None,
             rotations_path=None, cal_samples: int = 16, cal_seqlen: int = 2048, cal_seed: int = 0,
             dense_prefill: bool = False, device: str = "auto", dtype: str = "auto", data_dir=None,
             progress: bool = True, selection: str = "magnitude", q_basis: str = "free",
             target_pw: float | None = None, search: bool = False, per_block: bool = False,
             held_out: tuple[int, int] = (4, 512)) -> dict:
    """Calibrate (or reuse rotations), transform and save a model folder.

    target_pw: solve the plan for this parameter-weighted sparsity (split `split_coef`) instead of p.
    search: Algorithm 1, the split searched for `target_pw` on held-out calibration tokens
    (`held_out` sequences x tokens, never the test split); per_block: attention and MLP separately.
    form="auto": the rotated fused form or un-rotated Top-K, whichever has the lower perplexity on the
    same held-out calibration tokens with this plan (`search.choose_form`); the split search, if asked,
    then runs on the chosen form.
    """
    from .search import choose_form, plan_for_target, search_split

    lm = load_model(model, device=device, dtype=dtype)
    tie = "ge" if form == "official" else "exact"
    shapes = projection_shapes(lm.model, spec_for(lm.model))
    if target_pw is not None and sites:
        raise LarosaError("give either explicit --sites or --target-pw, not both")
    if search and target_pw is None:
        raise LarosaError("the split search needs a parameter-weighted target (--target-pw)")
    if search and form == "official":
        raise LarosaError("the split search runs on the deployable forms (fused, topk, auto)")
    if form not in FORMS + ("auto",):
        raise LarosaError(f"unknown form {form!r}; choose one of {', '.join(FORMS + ('auto',))}")
    if target_pw is not None:
        a, b = split_coef
        plan = plan_for_target(shapes, target_pw, {"attn_in": a, "attn_out": b, "mlp_in": a, "mlp_out": b}, tie)
        plan.dense_prefill = dense_prefill
    else:
        plan = make_plan(sparsity, split_coef, sites, tie_rule=tie, dense_prefill=dense_prefill)
    rot = None
    if form in ("official", "fused", "auto"):
        rot = cached_rotations(lm, cal_samples, cal_seqlen, cal_seed, None, data_dir, rotations_path, progress)
    held_out_ids = None
    if form == "auto" or search:
        ids = tokenize_source(lm.tokenizer, calibration_source(None, data_dir))
        held_out_ids = calibration_batches(ids, held_out[0], held_out[1], cal_seed + 1)
    choice = chosen = None
    if form == "auto":
        chosen, choice = choose_form(lm.model, plan, rot, held_out_ids, selection=selection, progress=progress,
                                     rotation=rotation, q_basis=q_basis)
        form = choice.form
        if form != "fused":
            rot = None
        if search:  # the plan changes: the chosen candidate is rebuilt below
            chosen = None
    searched = None
    if search:
        net = _apply(copy.deepcopy(lm.model), LarosaConfig(form, rotation, plan, selection=selection,
                                                           q_basis=q_basis), rot)
        searched = search_split(net, target_pw, held_out_ids, per_block=per_block, progress=progress)
        plan = searched.plan
        plan.dense_prefill = dense_prefill
        del net
    report = sparsity_report(lm.model, plan)
    cfg = LarosaConfig(form, rotation, plan, provenance={
        "base_model": lm.describe(), "calibration": rot.meta if rot else None, "sparsity": report,
        "split_search": None if searched is None else {
            "best": list(searched.best), "objective": "perplexity on held-out calibration tokens",
            "held_out": list(held_out), "table": searched.table},
        "form_choice": None if choice is None else {**choice.to_dict(), "held_out": list(held_out)}},
        selection=selection, q_basis=q_basis)
    if chosen is not None:  # the candidate `auto` kept was built from this same config: no second build
        lm.model = chosen
    else:
        apply(lm.model, cfg, rot)
    path = _save(lm.model, lm.tokenizer, out, cfg)
    return {"path": path, "config": cfg, "sparsity": report, "loaded": lm, "search": searched, "form_choice": choice}


def _save(model, tokenizer, out, cfg):
    from .io import save

    return save(model, tokenizer, out, cfg)
