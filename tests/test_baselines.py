import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from larosa import LarosaConfig, SparsityPlan, apply
from larosa.baselines import (Thresholds, apply_cats, apply_teal, attach_meter, cats_sparsity_for,
                              collect_thresholds, larosa_plan_for, projection_weights)
from larosa.calibrate import calibrate
from larosa.cli import app
from larosa.data import rows_from_raw, rows_num_bytes
from larosa.modules import CatsAct, SparsityMeter, Threshold
from larosa.sparsity import SITES, parameter_weighted

from tiny import save_tiny_hf_dir, tiny_model, tiny_wikitext


def test_threshold_is_the_s_quantile_of_magnitudes():
    # |x| uniform on a known grid: the s-quantile of |x| is s * max
    grid = torch.linspace(0, 2.0, 1001)
    thr = Thresholds(torch.stack([grid] * 5)[None].float(), {})
    for s in (0.25, 0.4, 0.5, 0.9):
        assert thr.threshold(0, "attn_in", s) == pytest.approx(2.0 * s, abs=1e-5)
    assert thr.threshold(0, "attn_in", 0.0) < 0  # sparsity 0 keeps zeros too


def test_collected_thresholds_give_the_target_sparsity_on_calibration_data():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    thr = collect_thresholds(model, ids, progress=False)
    teal = apply_teal(copy.deepcopy(model), thr, {s: 0.5 for s in SITES})
    meter = attach_meter(teal, SparsityMeter(projection_weights(model)["total"]))
    with torch.no_grad():
        teal(ids)
    meter.flush()
    assert meter.summary()["mean"] == pytest.approx(0.5, abs=0.03)
    # the per-site threshold is the quantile: half of layer-0 o_proj inputs fall below it
    seen = []
    h = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(ids)
    h.remove()
    frac = (seen[0].abs() <= thr.threshold(0, "attn_out", 0.5)).float().mean().item()
    assert frac == pytest.approx(0.5, abs=0.02)


def test_cats_touches_only_the_mlp():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    thr = collect_thresholds(model, ids, progress=False)
    cats = apply_cats(copy.deepcopy(model), thr, 0.5)
    layer = cats.model.layers[0]
    assert isinstance(layer.mlp.act_fn, CatsAct)
    for name, mod in cats.named_modules():
        if "self_attn" in name or "layernorm" in name:
            assert not isinstance(mod, (Threshold, CatsAct)), name
    # attention outputs identical to dense, MLP outputs differ
    outs = {}
    for tag, net in (("dense", model), ("cats", cats)):
        hooks = [net.model.layers[0].self_attn.register_forward_hook(lambda m, a, o, t=tag: outs.setdefault(t + "a", o[0])),
                 net.model.layers[0].mlp.register_forward_hook(lambda m, a, o, t=tag: outs.setdefault(t + "m", o))]
        with torch.no_grad():
            net(ids)
        for h in hooks:
            h.remove()
    torch.testing.assert_close(outs["densea"], outs["catsa"])
    assert not torch.allclose(outs["densem"], outs["catsm"])


def test_equal_footing_arithmetic():
    model = tiny_model("llama")
    for target in (0.25, 0.4):
        plan = larosa_plan_for(model, target)
        from larosa.arch import projection_shapes, spec_for

        pw = parameter_weighted(plan, projection_shapes(model, spec_for(model)))
        assert pw == pytest.approx(target, abs=0.03)  # tiny dims: k is coarse
    w = projection_weights(model)
    assert cats_sparsity_for(model, 0.25) == pytest.approx(0.25 * w["total"] / w["cats"])
    assert cats_sparsity_for(model, 0.9) is None


def test_topk_meter_is_constant_per_token():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    rot = calibrate(model, ids, progress=False)
    plan = SparsityPlan.from_nominal(0.4)
    net = apply(copy.deepcopy(model), LarosaConfig("fused", "layer", plan), rot)
    meter = attach_meter(net, SparsityMeter(projection_weights(model)["total"]))
    with torch.no_grad():
        net(ids)
    meter.flush()
    s = meter.summary()
    from larosa.arch import projection_shapes, spec_for

    assert s["std"] < 1e-12 and s["tokens"] == 60
    assert s["mean"] == pytest.approx(parameter_weighted(plan, projection_shapes(model, spec_for(model))))


def test_compare_is_resumable(tmp_path, monkeypatch):
    d = save_tiny_hf_dir(tmp_path / "tiny")
    tiny_wikitext(tmp_path, monkeypatch, 7, 300)
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(d), "--out", str(out), "--methods", "dense,larosa-fused,teal,cats",
            "--targets", "0.25,0.9", "--windows", "2", "--seqlen", "32", "--cal-samples", "2",
            "--cal-seqlen", "32", "--data-dir", str(tmp_path / "data")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert len(cells) == 7 and (out / "table.md").is_file() and (out / "results.json").is_file()
    assert json.loads((out / "cells" / "cats-0.900.json").read_text())["ppl"] is None
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    (out / "cells" / "teal-0.250.json").unlink()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    again = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    changed = {n for n in again if again[n] != stamp.get(n)}
    assert changed == {"teal-0.250.json"}  # only the missing cell was recomputed
    bad = CliRunner().invoke(app, [a if a != "2" else "3" for a in args])
    assert bad.exit_code == 2 and "another setup" in bad.output
    # --render-only: outputs rebuilt from the finished cells, a missing cell is left missing
    (out / "cells" / "teal-0.900.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    res = CliRunner().invoke(app, args + ["--render-only"])
    assert res.exit_code == 0, res.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == before
    rec = json.loads((out / "results.json").read_text())
    assert len(rec["cells"]) == 6 and ("teal", 0.9) not in {(c["method"], c["target_pw"]) for c in rec["cells"]}
    empty = CliRunner().invoke(app, [a if a != "dense,larosa-fused,teal,cats" else "topk" for a in args]
                               + ["--render-only"])
    assert empty.exit_code == 2 and "no finished cells" in empty.output


def test_compare_skips_cells_finished_meanwhile(tmp_path, monkeypatch):
    """Two runs on one folder: a cell another run wrote while this one worked is not rebuilt."""
    import larosa.compare as cmp

    d = save_tiny_hf_dir(tmp_path / "tiny")
    tiny_wikitext(tmp_path, monkeypatch, 7, 300)
    out = tmp_path / "cmp"
    real, built = cmp.build, []

    def build(method, *a, **k):
        built.append(method)
        if method == "dense":  # meanwhile, "another run" finishes the teal cell
            (out / "cells" / "teal-0.250.json").write_text(json.dumps(
                {"method": "teal", "target_pw": 0.25, "knob": "other run", "ppl": 1.5}))
        return real(method, *a, **k)

    monkeypatch.setattr(cmp, "build", build)
    args = ["compare", "--model", str(d), "--out", str(out), "--methods", "dense,teal", "--targets", "0.25",
            "--windows", "1", "--seqlen", "32", "--cal-samples", "2", "--cal-seqlen", "32",
            "--data-dir", str(tmp_path / "data")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert built == ["dense"]
    assert json.loads((out / "cells" / "teal-0.250.json").read_text())["knob"] == "other run"


def test_compare_runs_the_variant_methods(tmp_path, monkeypatch):
    d = save_tiny_hf_dir(tmp_path / "tiny")
    tiny_wikitext(tmp_path, monkeypatch, 9, 400)
    out = tmp_path / "cmp"
    methods = "larosa-searched,larosa-searched-weighted-block,larosa-greedy,teal-greedy"
    args = ["compare", "--model", str(d), "--out", str(out), "--methods", methods, "--targets", "0.3",
            "--held-out", "2x64",
            "--windows", "1", "--seqlen", "32", "--cal-samples", "2", "--cal-seqlen", "32",
            "--data-dir", str(tmp_path / "data")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    for m in methods.split(","):
        cell = json.loads((out / "cells" / f"{m}-0.300.json").read_text())
        assert cell["ppl"] > 0 and cell["held_out"]["sequences"] == 2
        # every variant lands on the target parameter-weighted sparsity. TEAL's thresholds are fitted on
        # calibration data, so on the eval window it only lands near it: here 0.3028 (off by 0.0028, and
        # deterministic); other tiny configs/targets gave |off| <= 0.012. 0.03 leaves ~10x margin here but
        # still catches a plan or threshold that misses the target (the old 0.2 accepted 0.1 .. 0.5).
        tol = 0.02 if m != "teal-greedy" else 0.03
        assert abs(cell["realised_pw"]["mean"] - 0.3) < tol, (m, cell["realised_pw"])
    searched = json.loads((out / "cells" / "larosa-searched-0.300.json").read_text())
    assert len(searched["search"]["table"]) >= 11 and "a=" in searched["knob"]


def test_compare_fixed_split_variants(tmp_path, monkeypatch):
    """Q from the gamma-scaled input and weighted selection at the paper's split: same budget, other model."""
    d = save_tiny_hf_dir(tmp_path / "tiny")
    tiny_wikitext(tmp_path, monkeypatch, 9, 400)
    out = tmp_path / "cmp"
    methods = ("larosa-fused", "larosa-fused-gammaq", "larosa-fused-weighted", "topk-weighted")
    args = ["compare", "--model", str(d), "--out", str(out), "--methods", ",".join(methods), "--targets", "0.4",
            "--windows", "1", "--seqlen", "32", "--cal-samples", "2", "--cal-seqlen", "32",
            "--data-dir", str(tmp_path / "data")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    cells = {m: json.loads((out / "cells" / f"{m}-0.400.json").read_text()) for m in methods}
    for m, c in cells.items():
        assert abs(c["realised_pw"]["mean"] - 0.4) < 0.02, (m, c["realised_pw"])
        assert c["sites"] == cells["larosa-fused"]["sites"]  # same per-site plan
    ppl = [cells[m]["ppl"] for m in methods]
    assert len(set(ppl)) == 4, ppl  # a different Q / a different ranking changes the model


def test_compare_with_zeroshot_cells(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (shared / "piqa").is_dir():
        pytest.skip("shared/data not present")
    from larosa.compare import run_compare

    d = save_tiny_hf_dir(tmp_path / "tiny")
    data = tmp_path / "data"
    (data / "wikitext2").mkdir(parents=True)
    text = " \n" + " w1 w2 w3 w4 w5 w6 w7 \n" * 300
    for name in ("wiki.test.raw", "wiki.valid.raw"):
        (data / "wikitext2" / name).write_text(text)
    for task in ("piqa", "arc_easy", "arc_challenge", "boolq", "openbookqa", "winogrande", "hellaswag"):
        (data / task).symlink_to(shared / task)
    nbytes = rows_num_bytes(rows_from_raw(text))
    monkeypatch.setattr("larosa.data._NUM_BYTES", {"test": nbytes, "validation": nbytes, "train": -1})
    monkeypatch.setenv("LAROSA_CACHE_DIR", str(tmp_path / "cache"))
    res = run_compare(str(d), ("dense", "teal"), (0.4,), tmp_path / "cmp", windows=1, seqlen=32, cal_samples=2,
                      cal_seqlen=32, data_dir=data, progress=False, zeroshot_limit=2, zeroshot_batch=4)
    zs = json.loads((tmp_path / "cmp" / "cells" / "teal-0.400-limit2.json".replace("teal", "zs-teal")).read_text())
    assert set(zs["zeroshot"]["tasks"]) == {"piqa", "arc_easy", "arc_challenge", "boolq", "openbookqa",
                                            "winogrande", "hellaswag"}
    assert all(r["items"] == 2 for r in zs["zeroshot"]["tasks"].values())
    assert "0-shot mean (limit 2)" in res["rows"][0]
    png = (tmp_path / "cmp" / "ppl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") > 1000  # PPL + zero-shot panels


def test_ppl_at_realised_interpolates_log_linearly_and_never_extrapolates():
    from larosa.compare import ppl_at_realised

    cells = [{"method": "dense", "ppl": 10.0},
             {"method": "teal", "ppl": 20.0, "realised_pw": {"mean": 0.2}},
             {"method": "teal", "ppl": 80.0, "realised_pw": {"mean": 0.6}},
             {"method": "cats", "ppl": 1e3, "realised_pw": {"mean": 0.4}}]
    assert ppl_at_realised(cells, 0.1) == pytest.approx(10 * 2 ** 0.5)   # between dense and the first cell
    assert ppl_at_realised(cells, 0.4) == pytest.approx(40.0)             # geometric midpoint of 20 and 80
    assert ppl_at_realised(cells, 0.6) == pytest.approx(80.0)
    assert ppl_at_realised(cells, 0.7) is None                             # beyond the measured cells
    assert ppl_at_realised(cells, 0.4, "cats") == pytest.approx(1e3)


def test_compare_auto_form_equals_the_form_it_chose(tmp_path, monkeypatch):
    """larosa-auto computed on its own equals the fixed-split cell of the form it chose; where that cell
    is already in the folder, auto reuses its figures (same model) and says so."""
    d = save_tiny_hf_dir(tmp_path / "tiny")
    tiny_wikitext(tmp_path, monkeypatch, 9, 400)

    def run(out, methods):
        args = ["compare", "--model", str(d), "--out", str(out), "--methods", ",".join(methods), "--targets", "0.4",
                "--held-out", "2x64", "--windows", "1", "--seqlen", "32", "--cal-samples", "2", "--cal-seqlen", "32",
                "--data-dir", str(tmp_path / "data")]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        return {m: json.loads((out / "cells" / f"{m}-0.400.json").read_text()) for m in methods}

    alone = run(tmp_path / "a", ("larosa-auto",))["larosa-auto"]
    assert "ppl_from" not in alone
    cells = run(tmp_path / "b", ("larosa-fused", "topk", "larosa-auto"))
    auto = cells["larosa-auto"]
    chosen = auto["form_choice"]["form"]
    assert chosen == alone["form_choice"]["form"]
    assert chosen == min(auto["form_choice"]["objective"], key=auto["form_choice"]["objective"].get)
    same = cells["larosa-fused" if chosen == "fused" else "topk"]
    assert auto["ppl_from"].startswith(same["method"])
    assert auto["ppl"] == same["ppl"] and auto["sites"] == same["sites"]
    assert alone["ppl"] == pytest.approx(same["ppl"], rel=1e-6)  # computed independently: the same model
    assert auto["knob"].startswith(chosen) and auto["held_out"]["sequences"] == 2
