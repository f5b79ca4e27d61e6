"""The L2 prefetch riding in the selects (v23, `triton_prefetch`): it must not change any result, and its guess
(which weight rows it fetches) is the rows at or above the previous threshold below the budget's row limit.
Compiled on a GPU (the guess recorded beside the real prefetch, mode 3), under TRITON_INTERPRET=1 on the CPU
(mode 2: the interpreter runs no PTX, so only the recorded guess)."""

import pytest
import torch

from larosa.kernels import HAVE_TRITON, topk_gemv_ref
from larosa.kernels.reference import rmsnorm_ref

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")

if HAVE_TRITON:
    from larosa.kernels import ops as _ops
    from larosa.kernels import triton_gemv, triton_prefetch
    from larosa.kernels.triton_prefetch import Prefetch

CUDA = torch.cuda.is_available()
MODE = 3 if CUDA else 2  # compiled: prefetch and record; interpreted: record only


@pytest.fixture(autouse=True)
def _device(monkeypatch):
    monkeypatch.delenv("LAROSA_PREFETCH_MB", raising=False)
    torch.set_default_device("cuda" if CUDA else "cpu")
    yield
    torch.set_default_device("cpu")


def _pattern(x):
    return x.view(torch.int16).to(torch.int32) & 0x7FFF


def _kth_pattern(x, k):
    return _pattern(x).sort(-1, descending=True).values[..., k - 1]


def _expected_guess(h, guess, limit):
    want = (_pattern(h) >= guess).to(torch.int32)
    want[limit:] = -1  # rows past the limit are not looked at
    return want


def _guessed_from_either(rec, h, old, new, limit):
    """The select program overwrites the hint slot with the new threshold while the prefetch programs read it,
    so each of them guesses from the old or the new one (the interpreter runs the select first: the new)."""
    return bool(((rec == _expected_guess(h, old, limit)) | (rec == _expected_guess(h, new, limit))).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_in,d_out,k,limit", [(256, 96, 100, 256), (300, 64, 37, 171), (512, 136, 300, 1),
                                                (77, 40, 77, 0)])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("chunks", ["1", "8", "32"])
def test_select_prefetch_changes_nothing_and_guesses_the_hinted_rows(monkeypatch, dtype, d_in, d_out, k, limit,
                                                                     compact, chunks):
    """select(..., prefetch=): the same (t, cutoff) (and kept list), the same new hint; the programs past the row
    looked at rows [0, limit) and guessed exactly those whose pattern reaches the previous threshold (whatever
    the pieces per row, i.e. rows per program)."""
    monkeypatch.setenv("LAROSA_PREFETCH_CHUNKS", chunks)
    torch.manual_seed(d_in + k)
    x = torch.randn(1, d_in).to(dtype)
    wt = torch.randn(d_in, d_out).to(dtype)
    prev = _kth_pattern(x[0] * 1.1, k).view(1).to(torch.int32)
    h0, h1 = prev.clone(), prev.clone()
    want = triton_gemv.select(x, k, hint=h0, compact=compact)
    rec = torch.full((d_in,), -1, dtype=torch.int32)
    got = triton_gemv.select(x, k, hint=h1, compact=compact, prefetch=Prefetch(wt, None, limit, MODE, rec))
    assert torch.equal(got, want) and torch.equal(h1, h0)
    assert _guessed_from_either(rec, x[0], prev, h0, limit)
    assert 0 < int(rec[:limit].sum()) < limit or limit <= 1


@pytest.mark.parametrize("has_res", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_norm_select_prefetch_guesses_on_the_normalised_row(has_res, gated):
    """rmsnorm_select(..., prefetch=): xs, h and sel unchanged; the guess is made on w * RMSNorm(x + res),
    which the prefetch programs compute themselves (rounded once, so a row one pattern step from the threshold
    may go either way: only those may differ from the reference)."""
    torch.manual_seed(7)
    d_in, d_out, k = 320, 48, 131
    x = torch.randn(1, d_in).to(torch.bfloat16) * 3
    res = torch.randn(1, d_in).to(torch.bfloat16) if has_res else None
    w = (torch.rand(d_in) + 0.5).to(torch.bfloat16)
    wt = torch.randn(d_in, d_out).to(torch.bfloat16)
    h_ref = rmsnorm_ref(x if res is None else x + res, w, 1e-5)[0]
    prev = _kth_pattern(h_ref * 0.95, k).view(1).to(torch.int32)
    h0, h1 = prev.clone(), prev.clone()
    want = triton_gemv.rmsnorm_select(x, res, w, 1e-5, k, hint=h0, compact=True)
    rec = torch.full((d_in,), -1, dtype=torch.int32)
    got = triton_gemv.rmsnorm_select(x, res, w, 1e-5, k, hint=h1, compact=True,
                                     prefetch=Prefetch(wt, wt.clone() if gated else None, d_in, MODE, rec))
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(h1, h0)
    near = ((_pattern(h_ref) - prev).abs() <= 1) | ((_pattern(h_ref) - h0).abs() <= 1)
    assert _guessed_from_either(rec[~near], h_ref[~near], prev, h0, d_in)
    assert 0 < int(rec.sum()) < d_in and (rec >= 0).all()


def test_prefetch_needs_a_hint_and_one_row():
    """Without a hint there is no guess: the prefetch is dropped (same result); more than one row, bad shapes
    or a record of the wrong kind are refused before anything runs."""
    x = torch.randn(1, 64).to(torch.bfloat16)
    wt = torch.randn(64, 32).to(torch.bfloat16)
    rec = torch.full((64,), -1, dtype=torch.int32)
    sel = triton_gemv.select(x, 10, prefetch=Prefetch(wt, None, 64, MODE, rec))
    assert torch.equal(sel, triton_gemv.select(x, 10)) and (rec == -1).all()
    hint = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="one-row"):
        triton_gemv.select(torch.randn(2, 64).to(torch.bfloat16), 10, hint=hint,
                           prefetch=Prefetch(wt, None, 64, MODE, rec))
    for bad in (Prefetch(wt[:32], None, 32, MODE, rec), Prefetch(wt, wt[:, :16], 64, MODE, rec),
                Prefetch(wt, None, 65, MODE, rec), Prefetch(wt, None, 64, 2, None),
                Prefetch(wt, None, 64, 2, rec.float()), Prefetch(wt, None, 64, 4, rec)):
        with pytest.raises(ValueError, match="prefetch"):
            triton_gemv.select(x, 10, hint=hint[:1].clone(), prefetch=bad)
    with pytest.raises(ValueError, match="packed"):
        triton_gemv.select(x, 10, impl="bisect", hint=hint[:1].clone(), prefetch=Prefetch(wt, None, 64, MODE, rec))


def test_budget_and_plan(monkeypatch):
    """LAROSA_PREFETCH_MB parsed and checked; plan() only where a compiled one-row launch with a hint can
    prefetch, with the row limit that spends the budget on the rows expected kept."""
    assert triton_prefetch.prefetch_mb() == triton_prefetch.PREFETCH_MB
    for bad in ("x", "-1", "5000"):
        monkeypatch.setenv("LAROSA_PREFETCH_MB", bad)
        with pytest.raises(ValueError, match="LAROSA_PREFETCH_MB"):
            triton_prefetch.prefetch_mb()
    assert triton_prefetch.prefetch_chunks() == triton_prefetch.PF_CHUNKS
    for bad in ("3", "64", "0", "x"):
        monkeypatch.setenv("LAROSA_PREFETCH_CHUNKS", bad)
        with pytest.raises(ValueError, match="LAROSA_PREFETCH_CHUNKS"):
            triton_prefetch.prefetch_chunks()
    monkeypatch.delenv("LAROSA_PREFETCH_CHUNKS")
    monkeypatch.setenv("LAROSA_PREFETCH_MB", "1")
    x = torch.randn(1, 4096).to(torch.bfloat16)
    wt = torch.empty(4096, 4096, dtype=torch.bfloat16)
    hint = torch.zeros(1, dtype=torch.int32)
    assert triton_prefetch.plan(x, wt, None, 2048, None) is None
    assert triton_prefetch.plan(torch.randn(2, 4096).to(torch.bfloat16), wt, None, 2048, hint) is None
    real = triton_prefetch.can_prefetch(x.device)
    if not CUDA or torch.cuda.get_device_capability()[0] < 9:
        assert not real  # the interpreter and pre-Hopper GPUs run no bulk prefetch
    assert (triton_prefetch.plan(x, wt, None, 2048, hint) is not None) == real
    assert _ops.prefetch_mb(x.device) == (1.0 if real else 0.0)
    # The budget arithmetic below needs a device that can prefetch: stand one in (on the CPU too), so the row
    # limit is checked everywhere, not only on Hopper.
    monkeypatch.setattr(triton_prefetch, "can_prefetch", lambda device: True)
    assert _ops.prefetch_mb(x.device) == 1.0
    assert triton_prefetch.plan(x, wt, None, 2048, None) is None  # still needs a hint slot ...
    assert triton_prefetch.plan(torch.randn(2, 4096).to(torch.bfloat16), wt, None, 2048, hint) is None  # ... one row
    assert triton_prefetch.plan(x, wt[:, 1:], None, 2048, hint) is None  # ... and 16-byte aligned rows
    assert triton_prefetch.plan(x, wt, wt[:, :-1], 2048, hint) is None
    # 1 MiB over 8 KiB rows, half of them kept: the first 256 rows
    pf = triton_prefetch.plan(x, wt, None, 2048, hint)
    assert pf is not None and pf.limit == 256 and pf.w1 is wt and pf.w2 is None and pf.mode == 1
    assert pf.record is None
    pf2 = triton_prefetch.plan(x, wt, wt, 2048, hint)  # gate and up: twice the bytes per row
    assert pf2.limit == 128 and pf2.w1 is wt and pf2.w2 is wt
    assert triton_prefetch.plan(x, wt, None, 1024, hint).limit == 512  # a quarter kept: twice the rows
    assert triton_prefetch.plan(x, wt, None, 10**6, hint).limit == 128  # k clamped to d_in: all kept
    narrow = torch.empty(4096, 2048, dtype=torch.bfloat16)
    assert triton_prefetch.plan(x, narrow, None, 2048, hint).limit == 512  # half the bytes per row
    monkeypatch.setenv("LAROSA_PREFETCH_MB", "1000")
    assert triton_prefetch.plan(x, wt, None, 2048, hint).limit == 4096  # capped at d_in
    monkeypatch.setenv("LAROSA_PREFETCH_MB", "0.001")
    assert triton_prefetch.plan(x, wt, None, 2048, hint) is None  # budget below one row: no launch
    monkeypatch.setenv("LAROSA_PREFETCH_MB", "0")
    assert triton_prefetch.plan(x, wt, None, 2048, hint) is None and _ops.prefetch_mb(x.device) == 0.0


def test_budget_by_site(monkeypatch):
    """v31 (A/B runs): LAROSA_PREFETCH_MB may name sites, "8,o=0" or "o=2"; a site's own budget, else the bare
    number, else the default; plan() spends the budget of the site it is given; unknown sites and bad numbers are
    refused."""
    monkeypatch.setenv("LAROSA_PREFETCH_MB", "8,o=0,down=2.5")
    assert triton_prefetch.prefetch_mb() == 8.0 and triton_prefetch.prefetch_mb("qkv") == 8.0
    assert triton_prefetch.prefetch_mb("o") == 0.0 and triton_prefetch.prefetch_mb("down") == 2.5
    monkeypatch.setenv("LAROSA_PREFETCH_MB", " gate_up = 1 ")
    assert triton_prefetch.prefetch_mb() == triton_prefetch.PREFETCH_MB
    assert triton_prefetch.prefetch_mb("gate_up") == 1.0 and triton_prefetch.prefetch_mb("o") == triton_prefetch.PREFETCH_MB
    for bad in ("head=1", "o=x", "o=-1", "8,q=1", "o=2000"):
        monkeypatch.setenv("LAROSA_PREFETCH_MB", bad)
        with pytest.raises(ValueError, match="LAROSA_PREFETCH_MB"):
            triton_prefetch.prefetch_mb("o")
    monkeypatch.setattr(triton_prefetch, "can_prefetch", lambda device: True)
    monkeypatch.setenv("LAROSA_PREFETCH_MB", "1,o=0,qkv=2")
    x = torch.randn(1, 4096).to(torch.bfloat16)
    wt = torch.empty(4096, 4096, dtype=torch.bfloat16)
    hint = torch.zeros(1, dtype=torch.int32)
    assert triton_prefetch.plan(x, wt, None, 2048, hint, "o") is None
    assert triton_prefetch.plan(x, wt, None, 2048, hint, "qkv").limit == 512  # 2 MiB over 8 KiB rows, half kept
    assert triton_prefetch.plan(x, wt, None, 2048, hint).limit == 256  # no site: the bare 1 MiB
    assert triton_prefetch.plan(x, wt, None, 2048, hint, "down").limit == 256


@pytest.mark.parametrize("impl", ["gtile", "tile"])
def test_each_launch_plans_with_its_own_site(monkeypatch, impl):
    """The launches name their decode site to plan() (so a per-site budget reaches the right select): o (square),
    q/k/v (wider), down (narrower) through topk_linear, gate/up and q/k/v through the norm + select op."""
    from larosa.kernels import triton_gemv

    seen = []

    def spy(x, wt, wt2, k, hint, site=None):
        seen.append(site)
        return None

    monkeypatch.setattr(triton_gemv, "plan_prefetch", spy)
    monkeypatch.setattr(triton_prefetch, "plan", spy)
    hint = torch.zeros(1, dtype=torch.int32)
    for d_out in (256, 512, 128):
        torch.ops.larosa.topk_linear(torch.randn(1, 256).to(torch.bfloat16),
                                     torch.randn(256, d_out).to(torch.bfloat16), 64, None, None, None, hint, impl)
    x, nw = torch.randn(1, 256).to(torch.bfloat16), torch.ones(256, dtype=torch.bfloat16)
    w = torch.randn(256, 128).to(torch.bfloat16)
    torch.ops.larosa.rmsnorm_topk(x, None, nw, 1e-6, w, w, 64, None, None, hint, impl)
    torch.ops.larosa.rmsnorm_topk(x, None, nw, 1e-6, torch.randn(256, 768).to(torch.bfloat16), None, 64, None, None,
                                  hint, impl)
    assert seen == ["o", "qkv", "down", "gate_up", "qkv"]


@pytest.mark.parametrize("impl", ["gtile", "tile"])
def test_topk_linear_with_the_budget_set_is_the_topk_product(monkeypatch, impl):
    """End to end through the op with a budget (on a GPU the prefetch then runs; elsewhere plan() declines):
    y is the exact Top-K product, call after call as the hint moves."""
    from larosa.kernels import topk_linear

    monkeypatch.setenv("LAROSA_PREFETCH_MB", "64")
    torch.manual_seed(3)
    d_in, d_out, k = 512, 256, 200
    wt = (torch.randn(d_in, d_out) * 0.05).to(torch.bfloat16)
    hint = torch.zeros(1, dtype=torch.int32)
    for step in range(3):
        x = torch.randn(1, d_in).to(torch.bfloat16)
        y = topk_linear(x, wt, k, hint=hint, impl=impl)
        ref = topk_gemv_ref(x, wt, k)
        assert (y.double() - ref.double()).norm() / ref.double().norm() < 1e-2, step
        assert int(hint[0]) == int(_kth_pattern(x[0], k))
