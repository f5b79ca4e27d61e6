"""Perplexity under the paper's protocol (METHOD.md sec. 7).

WikiText-2 raw test rows joined with "\\n\\n", tokenized once, cut into non-overlapping windows of
`seqlen` tokens (the tail is dropped), batch 1 by default; every window is scored on its own and the
result is exp(mean NLL over all predicted tokens), i.e. exp(sum NLL / (n_windows * (seqlen - 1))).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import TextSource, tokenize_source, windows
from .errors import LarosaError


@dataclass
class PPLResult:
    ppl: float
    nll_mean: float
    nll_sum: float
    tokens_scored: int
    windows_used: int
    windows_total: int
    seqlen: int
    batch_size: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def model_context(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per row: logits (B, T, V), ids (B, T) -> (B,) float64."""
    shift = logits[:, :-1].float()
    target = ids[:, 1:]
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(target.shape).double().sum(dim=1)


@torch.no_grad()
def perplexity_from_ids(model, ids: torch.Tensor, seqlen: int = 2048, n_windows: int | None = None,
                        batch_size: int = 1, progress: bool = True, on_window=None) -> PPLResult:
    """Paper-protocol perplexity of `model` on a 1-D token stream."""
    ctx = model_context(model)
    if ctx is not None and seqlen > ctx:
        seqlen = ctx
    if batch_size < 1:
        raise LarosaError(f"batch size must be >= 1, got {batch_size}")
    wins = windows(ids, seqlen)
    total = wins.shape[0]
    if n_windows is not None:
        if n_windows < 1:
            raise LarosaError(f"--windows must be >= 1, got {n_windows}")
        wins = wins[: min(n_windows, total)]
    device = next(model.parameters()).device
    nll_sum = 0.0
    start = time.perf_counter()
    bar = tqdm(total=wins.shape[0], desc="ppl", unit="win", disable=not progress)
    for i in range(0, wins.shape[0], batch_size):
        batch = wins[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll_sum += float(window_nll(logits, batch).sum())
        if on_window is not None:
            on_window()
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{math.exp(nll_sum / ((i + batch.shape[0]) * (seqlen - 1))):.3f}")
    bar.close()
    scored = wins.shape[0] * (seqlen - 1)
    mean = nll_sum / scored
    return PPLResult(ppl=math.exp(mean), nll_mean=mean, nll_sum=nll_sum, tokens_scored=scored,
                     windows_used=wins.shape[0], windows_total=total, seqlen=seqlen,
                     batch_size=batch_size, seconds=time.perf_counter() - start)


def perplexity(model, tokenizer, source: TextSource, **kw) -> PPLResult:
    return perplexity_from_ids(model, tokenize_source(tokenizer, source), **kw)
