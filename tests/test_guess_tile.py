"""The tile kernel's guessed rows (v31 A/B, `LAROSA_GUESS`): before its wait for the select, each program loads the
rows of its block at or above the previous threshold minus a margin; after it, it keeps the exact Top-K rows of
those and loads the kept rows the guess missed. Exact with any hint; compiled on a GPU, under TRITON_INTERPRET=1 on
the CPU."""

import pytest
import torch

from larosa.kernels import HAVE_TRITON, ops, topk_gate_up_ref, topk_gemv_ref

pytestmark = [pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed"),
              pytest.mark.usefixtures("kernel_device")]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _pattern(v: torch.Tensor) -> int:
    return int(v.view(torch.int16).to(torch.int32) & 0x7FFF)


@pytest.mark.parametrize("hint_at", ["exact", "above", "below", "zero"])
@pytest.mark.parametrize("gated", [False, True])
def test_guessed_rows_give_the_topk_product(hint_at, gated):
    """Hint at this row's threshold, far above it (every kept row missed by the guess), far below (every row
    guessed) or zero: the same Top-K product, the residual added; the select updates the hint to the exact
    threshold."""
    tg = ops.triton_gemv
    torch.manual_seed(1)
    d_in, d_out, k = 384, 320, 150
    x = torch.randn(1, d_in).to(torch.bfloat16)
    wt = (torch.randn(d_in, d_out) * 0.05).to(torch.bfloat16)
    wt2 = (torch.randn(d_in, d_out) * 0.05).to(torch.bfloat16) if gated else None
    res = None if gated else torch.randn(1, d_out).to(torch.bfloat16)
    kth = _pattern(x[0].float().abs().topk(k).values[-1].to(torch.bfloat16))
    hint = torch.tensor([{"exact": kth, "above": 0x7F00, "below": 1, "zero": 0}[hint_at]], dtype=torch.int32)
    y = torch.empty(1, d_out, dtype=torch.bfloat16)
    tg.launch_tile(x, wt, y, k, wt2=wt2, residual=res, hint=hint, guess=16)
    want = topk_gate_up_ref(x, wt, wt2, k) if gated else topk_gemv_ref(x, wt, k, residual=res)
    assert _rel(y, want) < 1e-2
    assert int(hint[0]) == kth


def test_guess_needs_a_hint_and_the_select_here():
    tg = ops.triton_gemv
    x = torch.randn(1, 64).to(torch.bfloat16)
    wt = torch.randn(64, 32).to(torch.bfloat16)
    y = torch.empty(1, 32, dtype=torch.bfloat16)
    hint = torch.zeros(1, dtype=torch.int32)
    for kw in ({}, {"hint": hint, "mode": 1}, {"hint": hint, "sel": torch.zeros(1, 2, dtype=torch.int32)},
               {"hint": hint, "guess_": 1 << 15}):
        g = kw.pop("guess_", 8)
        with pytest.raises(ValueError, match="guess="):
            tg.launch_tile(x, wt, y, 20, guess=g, **kw)


def test_guess_sites_from_the_environment(monkeypatch):
    """LAROSA_GUESS="site=MARGIN;..." routes those sites' one-row hinted launches to the guessing tile kernel
    (any requested implementation of tile or gathered rows), the others unchanged; bad values are refused."""
    tg = ops.triton_gemv
    assert tg.guess_sites() == {}
    monkeypatch.setenv("LAROSA_GUESS", "o=16; down=4")
    assert tg.guess_sites() == {"o": 16, "down": 4}
    seen = []
    real = tg.launch_tile

    def spy(*a, **kw):
        seen.append(kw.get("guess", 0))
        return real(*a, **kw)

    monkeypatch.setattr(tg, "launch_tile", spy)
    torch.manual_seed(2)
    hint = torch.zeros(1, dtype=torch.int32)
    for d_out in (256, 512):  # o (square): guessed; q/k/v (wider): not named, the gathered kernel as asked
        x = torch.randn(1, 256).to(torch.bfloat16)
        wt = (torch.randn(256, d_out) * 0.05).to(torch.bfloat16)
        y = torch.empty(1, d_out, dtype=torch.bfloat16)
        tg.launch(x, wt, y, 100, impl="gtile", hint=hint)
        assert _rel(y, topk_gemv_ref(x, wt, 100)) < 1e-2
    assert seen == [16]
    for bad in ("o=0", "o=40000", "head=4", "o=x"):
        monkeypatch.setenv("LAROSA_GUESS", bad)
        with pytest.raises(ValueError, match="LAROSA_GUESS"):
            tg.guess_sites()
