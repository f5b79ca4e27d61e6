"""lm-eval adapter: a hand-made task scored on a model forced to always predict one token."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from larosa.zeroshot import TASKS, evaluate_zeroshot, local_tasks, paper_mean, task_config  # noqa: E402

from tiny import VOCAB, tiny_model, tiny_tokenizer  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def forced_model(token: str):
    """Every position predicts `token`: layers write nothing, all embeddings equal, head picks one row."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        e = torch.randn(model.config.hidden_size)
        model.model.embed_tokens.weight.copy_(e.expand_as(model.model.embed_tokens.weight))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[VOCAB.index(token)] = 20 * e / e.pow(2).mean().sqrt()
    return model.eval()


def test_adapter_scores_hand_made_task(tmp_path):
    items = [{"query": "w1 w2", "choices": ["w5", "w9"], "gold": 0},
             {"query": "w3", "choices": ["w7", "w5"], "gold": 1},
             {"query": "w4 w4", "choices": ["w5", "w8"], "gold": 1}]  # forced model gets this one wrong
    f = tmp_path / "tiny.jsonl"
    f.write_text("".join(json.dumps(i) + "\n" for i in items))
    cfg = task_config("openbookqa", f)  # plain "{{query}}" prompt, acc + acc_norm
    cfg["task"] = "larosa_tinytask"
    res = evaluate_zeroshot(forced_model("w5"), tiny_tokenizer(), task_configs=[cfg], batch_size=2)
    r = res["tasks"]["tinytask"]
    assert r["acc"] == pytest.approx(2 / 3) and r["items"] == 3
    assert res["lm_eval_version"]
    # forced to a wrong choice of item 1; items 2 and 3 tie and lm-eval's argmax takes choice 0 (wrong)
    res = evaluate_zeroshot(forced_model("w9"), tiny_tokenizer(), task_configs=[cfg], batch_size=2)
    assert res["tasks"]["tinytask"]["acc"] == 0.0


def test_paper_mean_uses_acc_norm_where_present():
    per = {"piqa": {"acc": 0.5, "acc_norm": 0.7}, "boolq": {"acc": 0.6, "acc_norm": None}}
    assert paper_mean(per) == pytest.approx(0.65)


@pytest.mark.skipif(not (SHARED / "piqa").is_dir(), reason="shared/data not present")
def test_local_task_configs_cover_the_seven_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("LAROSA_CACHE_DIR", str(tmp_path))
    cfgs = local_tasks(TASKS, SHARED)
    assert [c["task"] for c in cfgs] == [f"larosa_{t}" for t in TASKS]
    for c in cfgs:
        assert Path(c["dataset_kwargs"]["data_files"]["test"]).is_file()
    lines = Path(cfgs[4]["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()
    assert len(lines) == 10042 and len(json.loads(lines[0])["choices"]) == 4
