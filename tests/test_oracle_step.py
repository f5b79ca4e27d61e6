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


@pytest.mark.parametrize("form", ["dense", "compact-adapter", "gather", "gather-adapter"])
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
    if form.endswith("adapter"):
        want += sh.hidden * sh.hidden * 2
    assert step.read_bytes() == want
