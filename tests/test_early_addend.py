"""The finishers' bias and residual loaded beside the sums (`EARLY`, `LAROSA_EARLY_ADDEND`, v25): the tile and
gathered GEMVs give the same result either way, bit for bit (the adds keep their order), and the reference's
result. Compiled on a GPU, under TRITON_INTERPRET=1 on the CPU."""

import pytest
import torch

from larosa.kernels import HAVE_TRITON, topk_gate_up_ref, topk_gemv_ref

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")

if HAVE_TRITON:
    from larosa.kernels import triton_gemv

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("impl", ["tile", "gtile"])
@pytest.mark.parametrize("form", ["bias+residual", "residual", "gated"])
def test_early_addend_same_result(monkeypatch, impl, form):
    """Each form on and off on one buffer (left zeroed both times): equal outputs, equal to the reference; the
    launch passes EARLY only where there is something to add, and only when on."""
    torch.manual_seed(3)
    d_in, d_out, k = 320, 300, 130  # d_out not a multiple of the column blocks: a partly masked last block
    x = torch.randn(1, d_in).to(DEV, torch.bfloat16)
    wt = (torch.randn(d_in, d_out) * 0.05).to(DEV, torch.bfloat16)
    gated = form == "gated"
    wt2 = (torch.randn(d_in, d_out) * 0.05).to(DEV, torch.bfloat16) if gated else None
    b = torch.randn(d_out).to(DEV, torch.bfloat16) if form == "bias+residual" else None
    r = None if gated else (torch.randn(1, d_out) * 4).to(DEV, torch.bfloat16)
    buf = torch.zeros(triton_gemv.counters_needed(1, d_in, d_out, gated, impl=impl, k=k), dtype=torch.int32,
                      device=DEV)
    launch = triton_gemv.launch_gtile if impl == "gtile" else triton_gemv.launch_tile
    seen = []
    real = triton_gemv._early_kw
    monkeypatch.setattr(triton_gemv, "_early_kw", lambda *a: (lambda kw: (seen.append(kw), kw)[1])(real(*a)))
    out = {}
    for on in ("1", "0"):
        monkeypatch.setenv("LAROSA_EARLY_ADDEND", on)
        y = torch.empty(1, d_out, device=DEV, dtype=torch.bfloat16)
        launch(x, wt, y, k, wt2=wt2, bias=b, residual=r, counters=buf)
        assert not buf.any()
        out[on] = y
    assert seen == ([{}, {}] if gated else [{"EARLY": True}, {}])
    assert torch.equal(out["1"], out["0"])
    ref = topk_gate_up_ref(x, wt, wt2, k) if gated else topk_gemv_ref(x, wt, k, b, r)
    assert _rel(out["1"], ref) < 1e-2
    if r is not None:  # the residual dominates: a finisher that dropped it would be far off
        assert _rel(out["1"], r) < 0.5 and _rel(topk_gemv_ref(x, wt, k, b), ref) > 0.5


def test_early_addend_refuses_other_values(monkeypatch):
    monkeypatch.setenv("LAROSA_EARLY_ADDEND", "yes")
    with pytest.raises(ValueError, match="LAROSA_EARLY_ADDEND"):
        triton_gemv.early_addend()
    monkeypatch.delenv("LAROSA_EARLY_ADDEND")
    assert triton_gemv.early_addend() is triton_gemv.EARLY_ADDEND
