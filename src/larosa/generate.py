"""`larosa generate`: stream text from the decode engine."""

from __future__ import annotations

import statistics
from typing import Callable, Optional

import torch


def stream_generate(model: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                    seed: int = 0, sparsity: Optional[float] = None, cal_samples: int = 4, device: str = "auto",
                    dtype: str = "auto", write: Callable[[str], object] = print) -> dict:
    """Load `model` (optionally sparsify it), then write the continuation piece by piece as it decodes."""
    from .engine import DecodeEngine, from_hf
    from .models import load_model

    lm = load_model(model, device=device, dtype=dtype)
    net, what = lm.model, "as loaded"
    if sparsity is not None:
        from .api import apply, cached_rotations
        from .sparsity import SparsityPlan
        from .transform import LarosaConfig

        rot = cached_rotations(lm, cal_samples, 2048)
        net = apply(net, LarosaConfig("fused", "layer", SparsityPlan.from_nominal(sparsity)), rot)
        what = f"LaRoSA fused p={sparsity}"
    tok = lm.tokenizer
    ids = tok(prompt, return_tensors="pt").input_ids
    eng = DecodeEngine(from_hf(net), max_len=ids.shape[1] + max_new_tokens + 1)
    eos = tok.eos_token_id
    produced: list[int] = []
    shown = ""

    def on_tokens(new: torch.Tensor) -> bool:
        nonlocal shown
        stop = False
        for t in new[0].tolist():
            if eos is not None and t == eos:
                stop = True
                break
            produced.append(t)
        text = tok.decode(produced, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            write(text[len(shown):])
            shown = text
        return stop

    write(prompt)
    res = eng.generate(ids, max_new_tokens, temperature, top_k, seed, on_tokens=on_tokens, timing=True)
    steps = res.step_ms
    return {"tokens": len(produced), "prefill_ms": 1000 * res.prefill_s,
            "tok_s": 1000 / statistics.fmean(steps) if steps else float("nan"), "what": what}
