"""The selection-free bounds of `benchmarks/oracle_step.py` (v31): each form of the step runs (here under the
interpreter, at a tiny shape) and counts the weight bytes it reads as the byte model does."""

import sys
from pathlib import Path

import pytest
import torch

from larosa.kernels import HAVE_TRITON

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")


@pytest.fixture(scope="module")
def oracle():
    import oracle_step

    return oracle_step


def _shape(oracle):
    return oracle.Shape(hidden=128, intermediate=256, layers=1, heads=2, kv_heads=2, vocab=64)


@pytest.mark.parametrize("form", ["dense", "compact-adapter", "gather", "gather-adapter-late"])
def test_each_form_runs_and_counts_the_bytes_it_reads(oracle, kernel_device, form):
    sh = _shape(oracle)
    gen = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(0)
    ks = {"qkv": 80, "o": 48, "gate_up": 80, "down": 96} if form != "dense" else \
        {"qkv": 128, "o": 128, "gate_up": 128, "down": 256}
    step = oracle.Step(form, sh, ks, 64, gen)
    y = step()
    assert y.shape == (1, sh.vocab) and torch.isfinite(y.float()).all()
    nq = 3 * sh.hidden  # q, k, v of two heads
    rows = {"qkv": nq, "o": sh.hidden, "gate_up": 2 * sh.intermediate, "down": sh.hidden}  # outputs per kept row
    want = sh.vocab * sh.hidden * 2 + sum(ks[site] * n * 2 for site, n in rows.items())
    if "adapter" in form:
        want += sh.hidden * sh.hidden * 2
    assert step.read_bytes() == want


def test_late_wait_is_the_same_product_and_needs_a_fixed_list(kernel_device):
    """The gathered kernel's LATE_WAIT (timing only) computes the same product from a list given before the launch, and
    is refused without one (after a select of the same launch it would read the list too early)."""
    from larosa.kernels import triton_gemv

    torch.manual_seed(0)
    x = torch.randn(1, 256).to(torch.bfloat16)
    wt = (torch.randn(256, 128) * 0.05).to(torch.bfloat16)
    res = torch.randn(1, 128).to(torch.bfloat16)
    sel = triton_gemv.select(x, 96, None, "packed", compact=True, pack_x=True)
    ys = []
    for late in (False, True):
        y = torch.empty(1, 128, dtype=torch.bfloat16)
        triton_gemv.launch_gtile(x, wt, y, 96, sel=sel, residual=res, pack_x=True, late_wait=late)
        ys.append(y)
    keep = torch.zeros(256, dtype=torch.bool)
    keep[x[0].float().abs().topk(96).indices] = True
    want = res.double() + (x.double() * keep) @ wt.double()
    for y in ys:  # (compiled, the atomics add in arrival order: the two may differ in the last bits)
        torch.testing.assert_close(y.double(), want, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="late_wait"):
        triton_gemv.launch_gtile(x, wt, torch.empty(1, 128, dtype=torch.bfloat16), 96, late_wait=True)
