import math

import pytest
import torch
from torch import nn

from larosa.errors import LarosaError
from larosa.evaluate import perplexity_from_ids, window_nll


class TableLM(nn.Module):
    """Predicts a fixed next-token distribution: p(next = t) = probs[t], independent of input."""

    def __init__(self, probs: torch.Tensor, ctx: int = 64):
        super().__init__()
        self.logp = nn.Parameter(probs.log(), requires_grad=False)
        self.config = type("C", (), {"max_position_embeddings": ctx})()

    def forward(self, input_ids, use_cache=False):
        b, t = input_ids.shape
        return type("O", (), {"logits": self.logp.expand(b, t, -1).clone()})()


def test_uniform_model_has_ppl_equal_vocab():
    lm = TableLM(torch.full((7,), 1 / 7))
    res = perplexity_from_ids(lm, torch.randint(0, 7, (100,)), seqlen=10, progress=False)
    assert res.windows_total == 10 and res.windows_used == 10
    assert res.tokens_scored == 10 * 9
    assert res.ppl == pytest.approx(7.0, rel=1e-6)


def test_hand_computed_case():
    probs = torch.tensor([0.5, 0.25, 0.25])
    lm = TableLM(probs)
    ids = torch.tensor([0, 0, 1, 2, 0, 2, 9])  # tail token 9 dropped (2 windows of 3)
    # window 1 predicts [0, 1] -> -log(.5) - log(.25); window 2 predicts [0, 2] -> -log(.5) - log(.25)
    expected_mean = (2 * (math.log(2) + math.log(4))) / 4
    res = perplexity_from_ids(lm, ids, seqlen=3, progress=False)
    assert res.nll_mean == pytest.approx(expected_mean, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(expected_mean), rel=1e-6)
    first = perplexity_from_ids(lm, ids, seqlen=3, n_windows=1, progress=False)
    assert first.windows_used == 1 and first.windows_total == 2
    # batch size does not change the number
    assert perplexity_from_ids(lm, ids, seqlen=3, batch_size=2, progress=False).ppl == pytest.approx(res.ppl)


def test_seqlen_capped_at_context():
    lm = TableLM(torch.full((5,), 0.2), ctx=8)
    res = perplexity_from_ids(lm, torch.randint(0, 5, (100,)), seqlen=2048, progress=False)
    assert res.seqlen == 8 and res.windows_total == 12


def test_window_nll_matches_cross_entropy():
    logits = torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    ref = torch.stack([nn.functional.cross_entropy(logits[i, :-1], ids[i, 1:], reduction="sum")
                       for i in range(2)]).double()
    torch.testing.assert_close(window_nll(logits, ids), ref)


def test_bad_window_count():
    lm = TableLM(torch.full((5,), 0.2))
    with pytest.raises(LarosaError, match="--windows"):
        perplexity_from_ids(lm, torch.randint(0, 5, (50,)), seqlen=5, n_windows=0, progress=False)
