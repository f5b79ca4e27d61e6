"""The speculative Top-K GEMV (`impl="spec"`, `triton_spec`) against the plain PyTorch reference: compiled on a
GPU (with PDL on Hopper), under TRITON_INTERPRET=1 on the CPU (tests/conftest.py)."""

import pytest
import torch

from larosa.kernels import HAVE_TRITON, topk_gemv_ref, topk_keep_mask, topk_linear

pytestmark = [pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed"),
              pytest.mark.usefixtures("kernel_device")]

if HAVE_TRITON:
    from larosa.kernels import triton_gemv, triton_spec


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _pattern(x):
    return x.view(torch.int16).to(torch.int32) & 0x7FFF


def _expected_fix(x, k, h):
    """Per row: the positions where exact Top-K and the guess pattern >= h differ, ascending."""
    keep = topk_keep_mask(x, k)
    guess = _pattern(x) >= h[:, None]
    return [torch.nonzero(keep[r] != guess[r]).flatten().to(torch.int32) for r in range(x.shape[0])]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_in,d_out,k", [(256, 96, 100), (300, 64, 37), (512, 130, 300), (77, 33, 77)])
@pytest.mark.parametrize("guess", ["previous", "stale", "zero", "none", "garbage"])
def test_spec_gemv_equals_topk_product(dtype, d_in, d_out, k, guess):
    """y = TopK_k(x) @ wt + bias + residual for any guess: the select's own (the fast path: the list), one the
    select did not use (the GEMV walks every row for its corrections), all rows (hint 0), none (hint 0x8000)
    and out-of-range values. The select's header is (t, cutoff) of the exact Top-K, the guess (the hint's low
    half) and the length of the fix list, the list the positions where the guess is wrong (with x there, its
    sign flipped where a guessed row is dropped), and the hint becomes (guess << 16) | t."""
    torch.manual_seed(d_in + k)
    rows = 2
    x = torch.randn(rows, d_in).to(dtype)
    x[0, 5:40] = x[0, 3]  # ties at the threshold
    wt = (torch.randn(d_in, d_out) * 0.05).to(dtype)
    bias = torch.randn(d_out).to(dtype)
    res = torch.randn(rows, d_out).to(dtype)
    prev = {"previous": _pattern(x * 1.1).sort(1, descending=True).values[:, k - 1],
            "stale": _pattern(x * 0.9).sort(1, descending=True).values[:, k - 1],
            "zero": torch.zeros(rows, dtype=torch.int32),
            "none": torch.full((rows,), 0x8000, dtype=torch.int32),
            "garbage": torch.tensor([-5, 1 << 20], dtype=torch.int32)}[guess].to(torch.int32).contiguous()
    hint = prev.clone()
    sel = triton_spec.select_spec(x, k, hint)
    want_sel = triton_gemv.select(x, k)
    assert torch.equal(sel[:, :2], want_sel)
    h = prev & 0xFFFF  # the guess: the slot's low half (0x8000 and above: no row)
    assert torch.equal(sel[:, 2], h) and torch.equal(hint, (h << 16) | sel[:, 0])  # guess, then t
    keep = topk_keep_mask(x, k)
    for r, fix in enumerate(_expected_fix(x, k, h)):
        assert sel[r, 3].item() == fix.numel()
        entries = sel[r, 4:4 + fix.numel()]
        assert torch.equal(entries & 0xFFFF, fix)
        # x at the position, its sign flipped where the guess took a row Top-K drops
        flip = torch.where(keep[r, fix.long()], 0, 0x8000).to(torch.int32)
        want_bits = (x[r, fix.long()].view(torch.int16).to(torch.int32) & 0xFFFF) ^ flip
        assert torch.equal((entries >> 16) & 0xFFFF, want_bits)
    want = topk_gemv_ref(x, wt, k, bias, res)
    exact = torch.where(topk_keep_mask(x, k), x, 0).double() @ wt.double() + bias.double() + res.double()
    if guess == "stale":  # the GEMV reads another guess than the select used: every row checked
        hint.copy_(((h ^ 1) << 16) | sel[:, 0])
    y = torch.empty(rows, d_out, dtype=dtype)
    triton_spec.launch_spec(x, wt, y, k, hint=hint, bias=bias, residual=res, sel=sel)
    assert _rel(y, exact) < 1e-2
    assert (y.float() - want.float()).abs().max() <= 2 * want.float().abs().max() * 2.0 ** -7


def test_spec_select_and_gemv_in_sequence_keep_the_hint():
    """Calls in sequence (as a decode step's site): each select reads the previous call's threshold and
    leaves its own; results exact at every call; the fix list stays short when the threshold barely moves."""
    torch.manual_seed(0)
    d_in, d_out, k = 1024, 64, 410
    wt = (torch.randn(d_in, d_out) * 0.05).to(torch.bfloat16)
    hint = torch.zeros(1, dtype=torch.int32)
    fixes = []
    for i in range(4):
        x = torch.randn(1, d_in).to(torch.bfloat16)
        y = torch.empty(1, d_out, dtype=torch.bfloat16)
        before = hint.clone()
        sel = triton_spec.launch_spec(x, wt, y, k, hint=hint)
        assert sel[0, 2].item() == before.item() & 0xFFFF
        assert hint.item() == (sel[0, 2].item() << 16) | sel[0, 0].item()
        fixes.append(sel[0, 3].item())
        exact = torch.where(topk_keep_mask(x, k), x, 0).double() @ wt.double()
        assert _rel(y, exact) < 1e-2
    assert fixes[0] == d_in - k  # hint 0 guesses every row: all the dropped ones are fixed
    assert max(fixes[1:]) < d_in // 8, fixes


def test_spec_side_gemv_and_op_routing(monkeypatch):
    """Through `topk_linear` / `topk_linear_side` with impl="spec": the side GEMV's programs in the launch give
    x_side @ w_side.T (with the earlier columns copied from prev), the GEMV the Top-K product (+ residual)."""
    from larosa.kernels import ops
    torch.manual_seed(1)
    d_in, d_out, k, n_side = 384, 96, 150, 72
    x = torch.randn(1, d_in).to(torch.bfloat16)
    wt = (torch.randn(d_in, d_out) * 0.05).to(torch.bfloat16)
    res = torch.randn(1, d_out).to(torch.bfloat16)
    hint = torch.zeros(1, dtype=torch.int32)
    launches = []
    real = triton_spec.launch_spec
    monkeypatch.setattr(triton_spec, "launch_spec", lambda *a, **kw: (launches.append(kw.get("side")), real(*a, **kw))[1])
    exact = torch.where(topk_keep_mask(x, k), x, 0).double() @ wt.double()
    y = topk_linear(x, wt, k, None, None, res, hint, "spec")
    assert _rel(y, exact + res.double()) < 1e-2 and len(launches) == 1 and hint.item() > 0
    ax = torch.randn(1, 128).to(torch.bfloat16)
    aw = (torch.randn(n_side, 128) * 0.1).to(torch.bfloat16)
    prev = (ax @ aw[:24].t()).contiguous()
    y2, r = ops.topk_linear_side(x, wt, k, ax, aw, prev, None, hint, "spec")
    assert launches[-1] is not None and launches[-1].c0 == 24
    assert _rel(y2, exact) < 1e-2
    assert _rel(r, ax.double() @ aw.double().t()) < 1e-2 and torch.equal(r[:, :24], prev)


def test_spec_refuses_what_it_does_not_do(monkeypatch):
    x = torch.randn(1, 64).to(torch.bfloat16)
    wt = torch.randn(64, 32).to(torch.bfloat16)
    y = torch.empty(1, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="spec"):
        triton_gemv.launch(x, wt, y, 8, wt2=wt, impl="spec")
    with pytest.raises(ValueError, match="hint"):
        triton_spec.launch_spec(x, wt, y, 8, hint=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="32767"):
        triton_spec.select_spec(torch.zeros(1, 1 << 15, dtype=torch.bfloat16), 8, torch.zeros(1, dtype=torch.int32))
    monkeypatch.setenv("LAROSA_SPEC_TILES", "3,128,2,4,64")
    with pytest.raises(ValueError, match="LAROSA_SPEC_TILES"):
        triton_spec.spec_tiles()
    monkeypatch.setenv("LAROSA_SPEC_TILES", "16,64,4,8,32")
    assert triton_spec.spec_tiles() == (16, 64, 4, 8, 32)
    assert triton_gemv.resolve_impl("spec", 0, 1 << 15, 8) == "tile"
    assert triton_gemv.counters_needed(1, 64, 32, impl="spec", k=8) == 0


@pytest.mark.parametrize("d_out,bn", [(96, 32), (70, 16)])
def test_spec_gemv_blocked_layout(d_out, bn):
    """The blocked weight layout (`spec_layout`: each program's columns one contiguous slab, columns past d_out zero)
    gives the input-major layout's result, on both correction paths."""
    torch.manual_seed(2)
    d_in, k = 320, 130
    x = torch.randn(1, d_in).to(torch.bfloat16)
    wt = (torch.randn(d_in, d_out) * 0.05).to(torch.bfloat16)
    blk = triton_spec.spec_layout(wt, bn)
    nb = -(-d_out // bn)
    assert blk.shape == (nb, d_in, bn) and blk.is_contiguous()
    # slab j holds columns [j * BN, (j + 1) * BN) of W^T, the last one zero-padded past d_out
    cols = blk.permute(1, 0, 2).reshape(d_in, nb * bn)
    assert torch.equal(cols[:, :d_out], wt) and not cols[:, d_out:].any()
    exact = torch.where(topk_keep_mask(x, k), x, 0).double() @ wt.double()
    want = topk_gemv_ref(x, wt, k)
    tiles = (bn, 64, 2, 4, 32)
    for stale in (False, True):
        hint = torch.full((1,), 100, dtype=torch.int32)
        sel = triton_spec.select_spec(x, k, hint)
        if stale:
            hint.fill_((99 << 16) | 100)
        y = torch.empty(1, d_out, dtype=torch.bfloat16)
        triton_spec.launch_spec(x, blk, y, k, hint=hint.clone(), tiles=tiles, sel=sel)
        y_im = torch.empty(1, d_out, dtype=torch.bfloat16)
        triton_spec.launch_spec(x, wt, y_im, k, hint=hint.clone(), tiles=tiles, sel=sel)  # input-major layout
        assert _rel(y, exact) < 1e-2 and _rel(y_im, exact) < 1e-2
        assert torch.equal(y, y_im), stale  # the same sums, only the weights' addresses differ
        assert (y.float() - want.float()).abs().max() <= 2 * want.float().abs().max() * 2.0 ** -7
    with pytest.raises(ValueError, match="blocked"):
        triton_spec.launch_spec(x, blk, y, k, tiles=(bn * 2, 64, 2, 4, 32))
