"""The kept list carrying x with each position (`pack_x`, `LAROSA_GATHER_X`, v23): the gathered GEMV then reads x
from the list instead of gathering it. Compiled on a GPU, under TRITON_INTERPRET=1 on the CPU."""

import pytest
import torch

from larosa.kernels import HAVE_TRITON, rmsnorm_topk_ref, topk_gate_up_ref, topk_gemv_ref

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")

if HAVE_TRITON:
    from larosa.kernels import ops, triton_gemv

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_in,k", [(256, 100), (300, 37), (77, 77), (4096, 1638)])
def test_packed_list_is_positions_and_bits(dtype, d_in, k):
    """Each entry: the same ascending kept position as the plain list in its low 16 bits, x's own 16 bits (sign
    included) in the high 16; (t, cutoff) unchanged."""
    torch.manual_seed(d_in)
    x = torch.randn(2, d_in).to(DEV, dtype)
    x[0, 5:40] = x[0, 3]  # ties at the threshold
    plain = triton_gemv.select(x, k, compact=True)
    packed = triton_gemv.select(x, k, compact=True, pack_x=True)
    assert torch.equal(packed[:, :2], plain[:, :2])
    pos = packed[:, 2:] & 0xFFFF
    assert torch.equal(pos, plain[:, 2:])
    bits = (packed[:, 2:] >> 16).to(torch.int16)
    assert torch.equal(bits.view(dtype), torch.gather(x, 1, pos.long()))
    with pytest.raises(ValueError, match="compact"):
        triton_gemv.select(x, k, pack_x=True)


@pytest.mark.parametrize("gated", [False, True])
def test_gathered_gemv_reads_x_from_the_list(monkeypatch, gated):
    """launch_gtile with pack_x (explicitly, and from LAROSA_GATHER_X through the norm + select op): the Top-K
    product of the plain path, against the PyTorch reference; a malformed LAROSA_GATHER_X is refused."""
    torch.manual_seed(1)
    d_in, d_out, k = 384, 192, 150
    x = torch.randn(1, d_in).to(DEV, torch.bfloat16)
    wt = (torch.randn(d_in, d_out) * 0.05).to(DEV, torch.bfloat16)
    wt2 = (torch.randn(d_in, d_out) * 0.05).to(DEV, torch.bfloat16) if gated else None
    y = torch.empty(1, d_out, device=DEV, dtype=torch.bfloat16)
    y_plain = torch.empty(1, d_out, device=DEV, dtype=torch.bfloat16)
    triton_gemv.launch_gtile(x, wt, y, k, wt2=wt2, pack_x=True)
    triton_gemv.launch_gtile(x, wt, y_plain, k, wt2=wt2, pack_x=False)
    if gated:
        ref = topk_gate_up_ref(x, wt, wt2, k)
    else:
        ref = topk_gemv_ref(x, wt, k)
    assert _rel(y, ref) < 1e-2 and _rel(y_plain, ref) < 1e-2
    assert torch.equal(y, y_plain)  # the same kept x values, whichever way the GEMV reads them
    res = torch.randn(1, d_in).to(DEV, torch.bfloat16)
    norm_w = (torch.rand(d_in) + 0.5).to(DEV, torch.bfloat16)
    xs_ref, y_ref = rmsnorm_topk_ref(x, res, norm_w, 1e-5, wt, wt2, k)
    packed, real = [], triton_gemv.rmsnorm_select
    monkeypatch.setattr(triton_gemv, "rmsnorm_select", lambda *a, **kw: (packed.append(kw["pack_x"]), real(*a, **kw))[1])
    monkeypatch.setenv("LAROSA_GATHER_X", "0")
    xs_want, want = ops.rmsnorm_topk(x, res, norm_w, 1e-5, wt, wt2, k, impl="gtile")
    assert packed == [False] and _rel(want, y_ref) < 1e-2
    monkeypatch.setenv("LAROSA_GATHER_X", "1")
    xs_got, got = ops.rmsnorm_topk(x, res, norm_w, 1e-5, wt, wt2, k, impl="gtile")
    assert packed == [False, True] and _rel(got, y_ref) < 1e-2
    assert torch.equal(got, want)
    # the residual sum xs = x + res comes back either way (one bf16 rounding, as the reference's)
    assert torch.equal(xs_got, xs_ref) and torch.equal(xs_want, xs_ref)
    monkeypatch.setenv("LAROSA_GATHER_X", "yes")
    with pytest.raises(ValueError, match="LAROSA_GATHER_X"):
        triton_gemv.launch_gtile(x, wt, y, k)


def test_gather_x_by_row_width(monkeypatch):
    """LAROSA_GATHER_X=N (v25, A/B runs): only rows up to N wide carry x in their kept list; both kinds of row
    still give the Top-K product (the stand-alone select and the norm + select paths, whose select and GEMV must
    agree on the list's form)."""
    torch.manual_seed(2)
    monkeypatch.setenv("LAROSA_GATHER_X", "256")
    assert triton_gemv.gather_x_setting() == 256 and ops.gather_x() == 256
    assert triton_gemv.gather_x(256) and not triton_gemv.gather_x(257)
    packed, real = [], triton_gemv.select
    monkeypatch.setattr(triton_gemv, "select", lambda *a, **kw: (packed.append(kw["pack_x"]), real(*a, **kw))[1])
    real_norm = triton_gemv.rmsnorm_select
    monkeypatch.setattr(triton_gemv, "rmsnorm_select",
                        lambda *a, **kw: (packed.append(kw["pack_x"]), real_norm(*a, **kw))[1])
    d_out = 96
    for d_in, k in ((200, 70), (384, 150)):
        x = torch.randn(1, d_in).to(DEV, torch.bfloat16)
        wt = (torch.randn(d_in, d_out) * 0.05).to(DEV, torch.bfloat16)
        y = torch.empty(1, d_out, device=DEV, dtype=torch.bfloat16)
        triton_gemv.launch_gtile(x, wt, y, k)
        assert _rel(y, topk_gemv_ref(x, wt, k)) < 1e-2
        res = torch.randn(1, d_in).to(DEV, torch.bfloat16)
        norm_w = (torch.rand(d_in) + 0.5).to(DEV, torch.bfloat16)
        _, got = ops.rmsnorm_topk(x, res, norm_w, 1e-5, wt, wt, k, impl="gtile")
        assert _rel(got, rmsnorm_topk_ref(x, res, norm_w, 1e-5, wt, wt, k)[1]) < 1e-2
    assert packed == [True, True, False, False]
    for bad in ("yes", "-5", "1.5"):
        monkeypatch.setenv("LAROSA_GATHER_X", bad)
        with pytest.raises(ValueError, match="LAROSA_GATHER_X"):
            triton_gemv.gather_x(100)
