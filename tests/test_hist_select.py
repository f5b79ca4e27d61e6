"""The histogram-started select (v30): the kernel that writes a row counts it into bins of |x|'s 15-bit patterns
(`launch(hist_out=)`, the tile / gathered finishers), and the next select searches only the boundary bin
(`select(hist=)`). Exact with any counts; compiled on a GPU, under TRITON_INTERPRET=1 on the CPU."""

import pytest
import torch

from larosa.kernels import HAVE_TRITON, ops, topk_gate_up_ref, topk_gemv_ref

pytestmark = [pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed"),
              pytest.mark.usefixtures("kernel_device")]


def _hist(x: torch.Tensor) -> torch.Tensor:
    """The reference histogram: per row, counts of (|x|'s 15-bit pattern >> HIST_BITS)."""
    tg = ops.triton_gemv
    bins = (x.view(torch.int16).to(torch.int64) & 0x7FFF) >> tg.hist_bits()
    nb = tg.hist_bins()
    out = torch.zeros(x.shape[0], nb, dtype=torch.int64, device=x.device)
    out.scatter_add_(1, bins, torch.ones_like(bins))
    return out.to(torch.int32)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("bits", [None, "2", "7"])
def test_hist_bits_from_the_environment(monkeypatch, bits):
    """LAROSA_HIST_BITS sets the bins' width (2-7; A/B runs); the select is exact at every width; bad values are
    refused."""
    tg = ops.triton_gemv
    if bits is not None:
        monkeypatch.setenv("LAROSA_HIST_BITS", bits)
    assert tg.hist_bins() == 1 << (15 - (tg.HIST_BITS if bits is None else int(bits)))
    x = torch.randn(2, 700).bfloat16()
    hist = _hist(x)
    assert hist.shape == (2, tg.hist_bins())
    assert torch.equal(tg.select(x, 300, hist=hist), tg.select(x, 300)) and not hist.any()
    for bad in ("1", "8", "x"):
        monkeypatch.setenv("LAROSA_HIST_BITS", bad)
        with pytest.raises(ValueError, match="LAROSA_HIST_BITS"):
            tg.hist_bins()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,k,compact", [(37, 5, False), (300, 150, True), (1025, 1, False), (2048, 1024, True),
                                         (2048, 2048, False)])
def test_hist_select_is_exact_for_any_counts(dtype, d, k, compact):
    """With the row's own histogram, an empty one, one off by a bin or random counts, the select returns what
    it returns without (the kept list too) and leaves the histogram zeroed for the next producer."""
    tg = ops.triton_gemv
    x = (torch.randn(3, d) * 3).to(dtype)
    x[1] = (x[1] * 2).round()  # heavy ties in one row
    want = tg.select(x, k, compact=compact)
    true = _hist(x)
    for h in (true, torch.zeros_like(true), true.roll(1, 1), true.roll(-1, 1),
              torch.randint(0, 50, true.shape, dtype=torch.int32)):
        hist = h.clone()
        assert torch.equal(tg.select(x, k, compact=compact, hist=hist), want)
        assert not hist.any()


def test_hist_select_searches_the_boundary_bin():
    """With the fallback search off (FALLBACK=False, a test-only switch) the row's own histogram still gives the
    exact threshold and an empty one does not: the window is the boundary bin."""
    tg = ops.triton_gemv
    x = torch.randn(2, 1000).bfloat16() * 5
    k = 400
    want = tg.select(x, k)

    def run(hist):
        sel = torch.empty(2, 2, dtype=torch.int32)
        tg.select_packed_kernel[(2,)](x, sel, hist, 1000, k, x.stride(0), BLOCK_D=1024, num_warps=4,
                                      FALLBACK=False, HIST=tg.hist_bits())
        return sel

    assert torch.equal(run(_hist(x)), want)
    assert not torch.equal(run(torch.zeros(2, tg.hist_bins(), dtype=torch.int32))[:, 0], want[:, 0])


@pytest.mark.parametrize("impl", ["tile", "gtile"])
@pytest.mark.parametrize("gated", [False, True])
def test_finishers_count_their_outputs(impl, gated):
    """The tile and gathered kernels with `hist_out` compute the same y and count exactly y's patterns, per row."""
    tg = ops.triton_gemv
    rows, d_in, d_out, k = 2, 300, 333, 120
    x = torch.randn(rows, d_in).bfloat16()
    wt, wu = torch.randn(d_in, d_out).bfloat16(), torch.randn(d_in, d_out).bfloat16()
    res = None if gated else torch.randn(rows, d_out).bfloat16()
    bias = None if gated else torch.randn(d_out).bfloat16()
    y0, y1 = (torch.empty(rows, d_out).bfloat16() for _ in range(2))
    kw = dict(wt2=wu if gated else None, impl=impl, residual=res, bias=bias)
    tg.launch(x, wt, y0, k, **kw)
    hist = torch.zeros(rows * tg.hist_bins(), dtype=torch.int32)
    tg.launch(x, wt, y1, k, hist_out=hist, **kw)
    assert torch.equal(y0, y1)
    assert torch.equal(hist.view(rows, -1), _hist(y1))


def test_ops_pass_the_histogram_from_gate_up_to_down():
    """topk_gate_up / rmsnorm_topk(_side) count their output for topk_linear(_side)'s select: the same results as
    without, the histogram used up (zeroed); bad buffers are refused, and the other kernels take none."""
    tg = ops.triton_gemv
    x = torch.randn(1, 256).bfloat16()
    wg, wu = torch.randn(256, 600).bfloat16(), torch.randn(256, 600).bfloat16()
    wd = torch.randn(600, 256).bfloat16()
    g = torch.rand(256).bfloat16() + 0.5
    side_w = torch.randn(256, 256).bfloat16()
    hist = torch.zeros(tg.hist_bins(), dtype=torch.int32)
    for impl in ("tile", "gtile"):
        act = torch.ops.larosa.topk_gate_up(x, wg, wu, 150, None, None, impl)
        assert _rel(act, topk_gate_up_ref(x, wg, wu, 150)) < 1e-2
        assert torch.equal(torch.ops.larosa.topk_gate_up(x, wg, wu, 150, None, None, impl, hist), act)
        assert torch.equal(hist.view(1, -1), _hist(act))
        y = torch.ops.larosa.topk_linear(act, wd, 240, None, None, x, None, impl)
        assert _rel(y, topk_gemv_ref(act, wd, 240) + x) < 1e-2
        assert torch.equal(torch.ops.larosa.topk_linear(act, wd, 240, None, None, x, None, impl, hist), y)
        assert not hist.any()
        # the fused norm + select producer and the side consumer (LaRoSA's MLP half)
        a0, r0 = torch.ops.larosa.rmsnorm_topk_side(x, g, 1e-5, wg, wu, 150, side_w, 64, None, None, impl)
        a1, r1 = torch.ops.larosa.rmsnorm_topk_side(x, g, 1e-5, wg, wu, 150, side_w, 64, None, None, impl, hist)
        assert torch.equal(a0, a1) and torch.equal(r0, r1) and torch.equal(hist.view(1, -1), _hist(a1))
        d0, s0 = torch.ops.larosa.topk_linear_side(a0, wd, 240, x, side_w, r0, None, None, impl)
        d1, s1 = torch.ops.larosa.topk_linear_side(a1, wd, 240, x, side_w, r1, None, None, impl, hist)
        assert torch.equal(d0, d1) and torch.equal(s0, s1) and not hist.any()
    with pytest.raises(ValueError, match="hist"):
        tg.select(act.view(1, -1), 240, hist=torch.zeros(tg.hist_bins(), dtype=torch.int64))
    with pytest.raises(ValueError, match="hist"):
        tg.launch(x, wg, torch.empty(1, 600).bfloat16(), 150, impl="split", hist_out=hist)
    # the split-K kernel takes no histogram: the ops leave it out (and the buffer alone)
    hist.fill_(3)
    assert torch.equal(torch.ops.larosa.topk_gate_up(x, wg, wu, 150, None, None, "split", hist),
                       torch.ops.larosa.topk_gate_up(x, wg, wu, 150, None, None, "split"))
    assert (hist == 3).all()
    short = torch.full((5,), 7, dtype=torch.int32)  # too few entries for the rows (an engine's, in a prefill)
    assert torch.equal(tg.select(act.view(1, -1), 240, hist=short), tg.select(act.view(1, -1), 240))
    assert (short == 7).all()
    # the schemas with the new argument (given, it is written undeclared, like a hint: see the ops' module notes)
    torch.library.opcheck(torch.ops.larosa.topk_gate_up.default, (x, wg, wu, 150, None, None, "gtile", None),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.larosa.topk_linear.default, (act, wd, 240, None, None, x, None, "gtile", None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("compact", [False, True])
def test_loop_searches_and_trusted_histograms_are_exact(monkeypatch, compact):
    """The A/B switches: LAROSA_SELECT_DYN (the un-hinted search as a run-time loop, at every width or from a width
    up) and LAROSA_HIST_TRUST (the boundary bin searched unchecked, given the row's own histogram) select what the
    default selects; malformed values are refused."""
    tg = ops.triton_gemv
    x = (torch.randn(2, 3000) * 2).bfloat16()
    x[1] = x[1].round()  # ties
    want = tg.select(x, 1234, compact=compact)
    assert tg.select_dyn(16384) and not tg.select_dyn(4096)  # the default: the 11008-14336-wide down selects
    t = want[:, 0]
    for dyn in ("1", "2048", "8192", "0"):
        monkeypatch.setenv("LAROSA_SELECT_DYN", dyn)
        assert tg.select_dyn(4096) == (dyn in ("1", "2048"))
        assert torch.equal(tg.select(x, 1234, compact=compact), want)
        for h in (t, t + 3, t - 70, t + 900, torch.zeros_like(t)):  # hinted: in the window, and off it (fallback)
            hint = h.to(torch.int32).contiguous()
            assert torch.equal(tg.select(x, 1234, compact=compact, hint=hint), want) and torch.equal(hint, t)
    monkeypatch.setenv("LAROSA_HIST_TRUST", "1")
    hist = _hist(x)
    assert torch.equal(tg.select(x, 1234, compact=compact, hist=hist), want) and not hist.any()
    for name, bad in (("LAROSA_SELECT_DYN", "x"), ("LAROSA_HIST_TRUST", "2")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            tg.select(x, 1234, compact=compact, hist=_hist(x) if name == "LAROSA_HIST_TRUST" else None)
        monkeypatch.delenv(name)
