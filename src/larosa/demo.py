"""Pieces of `larosa demo`: greedy samples from the dense and the LaRoSA fused model."""

from __future__ import annotations

import copy

import torch

from .sparsity import SparsityPlan
from .transform import LarosaConfig, apply


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, new_tokens: int = 40) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generate_side_by_side(lm, rotations, sparsity: float, prompt: str, new_tokens: int = 40) -> str:
    fused = apply(copy.deepcopy(lm.model), LarosaConfig("fused", "layer", SparsityPlan.from_nominal(sparsity)),
                  rotations)
    lines = [f"prompt: {prompt!r}",
             f"  dense        : {greedy(lm.model, lm.tokenizer, prompt, new_tokens)!r}",
             f"  fused p={sparsity:<5}: {greedy(fused, lm.tokenizer, prompt, new_tokens)!r}"]
    return "\n".join(lines)
