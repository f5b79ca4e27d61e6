"""benchmarks/handoff.py's arithmetic on the CPU (its kernels stamp %globaltimer and run on a GPU only; they are
compiled for sm_90 in tests/test_kernels_compile.py)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from handoff import handoffs, summary, timer_step_ns  # noqa: E402


def test_handoff_is_first_release_minus_last_arrival():
    first = torch.tensor([[1000, 5000, 3000], [0, 0, 64000]])  # ns
    second = torch.tensor([[9000, 6000], [70000, 66000]])
    assert handoffs(first, second) == [1.0, 2.0]  # 6000 - 5000, 66000 - 64000 ns, in us


def test_timer_step_and_summary():
    assert timer_step_ns(torch.tensor([[0, 64, 64], [128, 32, 0]])) == 32
    assert timer_step_ns(torch.tensor([[5, 5]])) == 0
    s = summary([float(v) for v in range(1, 11)])
    assert (s["median_us"], s["mean_us"], s["p10_us"], s["p90_us"], s["n"]) == (5.5, 5.5, 2.0, 10.0, 10)
