"""benchmarks/select_under_load.py's pieces on the CPU: the hog and chase kernels (Triton interpreter) against plain
PyTorch, the chase's cycle, and which trace events count."""

import sys
from pathlib import Path

import pytest
import torch

from larosa.kernels import HAVE_TRITON

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = [pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed"),
              pytest.mark.usefixtures("kernel_device")]


def test_hog_sums_each_programs_slice_reps_times():
    from select_under_load import hog
    src = torch.randn(4 * 64 + 10).to(torch.bfloat16)  # the tail beyond programs * whole blocks is not read
    out = torch.zeros(4)
    assert hog(src, out, 4, 3, block=32) == 3 * 4 * 64 * 2  # bytes read: 3 passes over 4 x 64 bf16
    want = 3 * src[: 4 * 64].float().reshape(4, 64).sum(1)
    assert torch.allclose(out.cpu(), want.cpu(), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="too few"):
        hog(src, out, 16, 1, block=32)


def test_chase_follows_one_cycle_through_every_slot():
    from select_under_load import chase, cycle
    nxt = cycle(50, seed=3)
    j, seen = 0, set()
    for _ in range(50):
        seen.add(j)
        j = int(nxt[j])
    assert j == 0 and seen == set(range(50))  # one cycle of length 50
    out = torch.zeros(1, dtype=torch.int32)
    chase(nxt.to(out.device), out, 7, start=5)
    j = 5
    for _ in range(7):
        j = int(nxt[j])
    assert int(out[0]) == j
    chase(nxt.to(out.device), out, 4, advance=True)  # on from where the call before stopped
    for _ in range(4):
        j = int(nxt[j])
    assert int(out[0]) == j


def test_inside_keeps_named_kernels_wholly_within_the_window():
    from select_under_load import inside, kernels
    trace = {"traceEvents": [
        {"cat": "kernel", "name": "select_packed_kernel", "ts": 10.0, "dur": 5.0},
        {"cat": "kernel", "name": "select_packed_kernel", "ts": 98.0, "dur": 5.0},  # ends after the window
        {"cat": "kernel", "name": "chase_kernel", "ts": 20.0, "dur": 5.0},
        {"cat": "cpu_op", "name": "select_packed_kernel", "ts": 30.0, "dur": 1.0},
        {"cat": "kernel", "name": "hog_kernel", "ts": 0.0},  # no duration: dropped
    ]}
    ev = kernels(trace)
    assert len(ev) == 3
    assert inside(ev, "select_packed", 0.0, 100.0) == [5.0]
    assert inside(ev, "chase", 0.0, 100.0) == [5.0]
