"""The gathered GEMV with a prefix taken whole (v32 A/B, `LAROSA_PREFIX`): its first slices load the weight rows of
input positions 0 .. PREFIX - 1 before the wait for the select and mask them with the exact (t, cutoff) after it; the
other slices gather the kept list's entries at positions >= PREFIX. Exact for any prefix; compiled on a GPU, under
TRITON_INTERPRET=1 on the CPU."""

import pytest
import torch

from larosa.kernels import HAVE_TRITON, ops, topk_gate_up_ref, topk_gemv_ref

pytestmark = [pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed"),
              pytest.mark.usefixtures("kernel_device")]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("prefix", [0, 64, 200, 384])
@pytest.mark.parametrize("gated", [False, True])
def test_prefix_gives_the_topk_product(prefix, gated):
    """Prefixes of none, one tile, a partial tile (rounded down to 192) and every input: the Top-K product of the
    select run here, the residual added; and from a norm + select's list (x written by that kernel, packed)."""
    tg = ops.triton_gemv
    torch.manual_seed(3)
    d_in, d_out, k = 384, 320, 150
    x = torch.randn(1, d_in).to(torch.bfloat16)
    x[0, :40] *= 4  # the front is kept more often, as in a static order
    wt = (torch.randn(d_in, d_out) * 0.05).to(torch.bfloat16)
    wt2 = (torch.randn(d_in, d_out) * 0.05).to(torch.bfloat16) if gated else None
    res = None if gated else torch.randn(1, d_out).to(torch.bfloat16)
    want = topk_gate_up_ref(x, wt, wt2, k) if gated else topk_gemv_ref(x, wt, k, residual=res)
    y = torch.empty(1, d_out, dtype=torch.bfloat16)
    tg.launch_gtile(x, wt, y, k, wt2=wt2, residual=res, block_m=64, prefix=prefix)
    assert _rel(y, want) < 1e-2
    g = torch.ones(d_in, dtype=torch.bfloat16)
    _, h, sel = tg.rmsnorm_select(x, None, g, 1e-6, k, compact=True, pack_x=True)
    want = topk_gate_up_ref(h, wt, wt2, k) if gated else topk_gemv_ref(h, wt, k, residual=res)
    y2 = torch.empty(1, d_out, dtype=torch.bfloat16)
    tg.launch_gtile(h, wt, y2, k, wt2=wt2, residual=res, block_m=64, sel=sel, pack_x=True, prefix=prefix)
    assert _rel(y2, want) < 1e-2


def test_prefix_refuses_bad_values():
    tg = ops.triton_gemv
    x = torch.randn(1, 64).to(torch.bfloat16)
    wt = torch.randn(64, 32).to(torch.bfloat16)
    y = torch.empty(1, 32, dtype=torch.bfloat16)
    for kw in ({"prefix": 65}, {"prefix": -1},
               {"prefix": 32, "late_wait": True, "sel": torch.zeros(1, 22, dtype=torch.int32)}):
        with pytest.raises(ValueError, match="prefix"):
            tg.launch_gtile(x, wt, y, 20, **kw)


def test_prefix_sites_from_the_environment(monkeypatch):
    """LAROSA_PREFIX="site=ROWS;..." gives those sites' one-row gathered launches the prefix (capped at d_in), the
    others none; bad values are refused."""
    tg = ops.triton_gemv
    assert tg.prefix_sites() == {}
    monkeypatch.setenv("LAROSA_PREFIX", "o=128; down=64")
    assert tg.prefix_sites() == {"o": 128, "down": 64}
    seen = []
    real = tg.launch_gtile

    def spy(*a, **kw):
        seen.append(kw.get("prefix", 0))
        return real(*a, **kw)

    monkeypatch.setattr(tg, "launch_gtile", spy)
    torch.manual_seed(4)
    for d_out in (256, 512):  # o (square): prefixed; q/k/v (wider): not named
        x = torch.randn(1, 256).to(torch.bfloat16)
        wt = (torch.randn(256, d_out) * 0.05).to(torch.bfloat16)
        y = torch.empty(1, d_out, dtype=torch.bfloat16)
        tg.launch(x, wt, y, 100, impl="gtile")
        assert _rel(y, topk_gemv_ref(x, wt, 100)) < 1e-2
    assert seen == [128, 0]
    for bad in ("o=0", "head=4", "o=x"):
        monkeypatch.setenv("LAROSA_PREFIX", bad)
        with pytest.raises(ValueError, match="LAROSA_PREFIX"):
            tg.prefix_sites()
