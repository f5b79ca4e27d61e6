"""Tiny random HF models and a word-level tokenizer for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]


def tiny_config(arch: str = "llama", **overrides):
    from transformers import AutoConfig

    base = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
    if arch == "qwen3":
        base["head_dim"] = 8
    base.update(overrides)
    return AutoConfig.for_model(arch, **base)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    # random (non-unit) norm scales so that norm folding is actually exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny_hf_dir(path: Path, arch: str = "llama") -> Path:
    tiny_model(arch).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_wikitext(tmp_path: Path, monkeypatch, words: int, lines: int) -> Path:
    """A fake WikiText-2 (test + validation) of `lines` lines of `words` words under tmp_path/data,
    accepted by the byte check, with the larosa cache in tmp_path/cache. Returns the --data-dir."""
    from larosa.data import rows_from_raw, rows_num_bytes

    data = tmp_path / "data" / "wikitext2"
    data.mkdir(parents=True)
    text = " \n" + (" " + " ".join(f"w{i}" for i in range(1, words + 1)) + " \n") * lines
    for name in ("wiki.test.raw", "wiki.valid.raw"):
        (data / name).write_text(text)
    nbytes = rows_num_bytes(rows_from_raw(text))
    monkeypatch.setattr("larosa.data._NUM_BYTES", {"test": nbytes, "validation": nbytes, "train": -1})
    monkeypatch.setenv("LAROSA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "data"
