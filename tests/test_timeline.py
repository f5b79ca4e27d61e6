"""The graph timeline's arithmetic (`benchmarks/graph_timeline.py`, whose per-layer table the README quotes): a step's
kernels in start order split into exposed time and idle gaps that add up to the step, on synthetic CUPTI traces."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import graph_timeline as gt  # noqa: E402


def _trace(steps, corr=True):
    """Chrome-trace kernel events: steps is a list of [(name, start, dur), ...] per replay."""
    ev = [{"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 0.0, "dur": 1.0}]  # not a kernel: ignored
    for i, step in enumerate(steps):
        for name, ts, dur in step:
            ev.append({"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
                       "args": {"correlation": 100 + i if corr else 0}})
    return {"traceEvents": ev}


# one layer: a select (5 us), a GEMV launched early as its programmatic dependent (starts at 2, ends at 20), a
# 1 us idle gap, the attention (21 -> 29)
STEP = [("select_packed_kernel", 0.0, 5.0), ("gtile_gemv_kernel", 2.0, 18.0), ("decode_attn_split_kernel", 21.0, 8.0)]


def test_critical_path_splits_a_step_into_exposed_time_and_gaps():
    rows = gt.critical_path([{"name": n, "ts": t, "dur": d} for n, t, d in STEP])
    assert [r["exposed"] for r in rows] == [5.0, 15.0, 8.0]  # the GEMV adds only what ends after the select
    assert [r["overlap"] for r in rows] == [0.0, 3.0, 0.0]
    assert [r["gap"] for r in rows] == [0.0, 0.0, 1.0]
    assert sum(r["exposed"] + r["gap"] for r in rows) == 29.0  # the step's span


@pytest.mark.parametrize("corr", [True, False])
def test_steps_grouped_by_replay_and_summarised(corr):
    """Kernels of a replay share its graph launch's correlation id; without one, equal counts split the trace.
    Medians per position, per kernel name and role (the name's occurrences in layer order), per kind."""
    shifted = [[(n, t + 1000.0, d * 1.5) for n, t, d in STEP], [(n, t + 2000.0, d) for n, t, d in STEP],
               [(n, t + 3000.0, d) for n, t, d in STEP]]
    steps = gt._steps_from_trace(_trace(shifted, corr), 3)
    assert [len(s) for s in steps] == [3, 3, 3] and steps[0][0]["ts"] == 1000.0
    r = gt.summarize(steps)
    assert r["kernels_per_step"] == 3 and r["span_us_median"] == 29.0
    assert r["sum_exposed_us"] == 28.0 and r["sum_gap_us"] == 1.0
    assert r["per_name"]["gtile_gemv_kernel"]["by_role"][0]["exposed"] == 15.0
    assert r["by_kind"]["select"]["exposed"] == 5.0 and r["by_kind"]["attention"]["launches"] == 1
    assert gt.diff(r, r)[0]["delta"] == 0.0


def test_roles_per_layer_leave_the_kernels_after_the_layers_out():
    """Dense: 4 GEMVs per layer, then the head (the same kernel): roles from the layers' occurrences only."""
    def layer(t0):
        return [("dense_gemv_kernel", t0, 2.0), ("decode_attn_split_kernel", t0 + 2, 1.0)] + [
            ("dense_gemv_kernel", t0 + 3 + 4 * i, 1.0 + i) for i in range(3)]

    step = layer(0.0) + layer(20.0) + [("dense_gemv_kernel", 40.0, 9.0)]
    r = gt.summarize(gt._steps_from_trace(_trace([step]), 1))
    g = r["per_name"]["dense_gemv_kernel"]
    assert g["n"] == 9 and [x["dur"] for x in g["by_role"]] == [2.0, 1.0, 2.0, 3.0]
    assert [x["dur"] for x in g["after_the_layers"]] == [9.0]


def test_a_trace_that_does_not_split_into_steps_is_refused():
    with pytest.raises(RuntimeError, match="cannot split"):
        gt._steps_from_trace(_trace([STEP, STEP[:2]], corr=False), 2)
