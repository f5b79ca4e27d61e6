"""benchmarks/persistent.py's one-launch step (v33) against PyTorch: in the interpreter (CPU) with one program, and with
several programs whose barriers give up at once (the interpreter runs programs one after another), which checks the
even split of each site's rows among programs. On a GPU the same tests run compiled, the fixed-list ones with every
program resident, and (marker `gpu`) the real dataflow with several resident programs, where the barriers order the
finish phases."""

import sys
from pathlib import Path

import pytest
import torch

from larosa.kernels import HAVE_TRITON
from larosa.shapes import Shape

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = [pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton"), pytest.mark.usefixtures("kernel_device")]

SH = Shape(hidden=64, intermediate=160, layers=2, heads=2, kv_heads=1, vocab=32)
KS = {"qkv": 40, "o": 27, "gate_up": 40, "down": 93}


@pytest.fixture(scope="module")
def P():
    import persistent

    return persistent


def _gen():
    return torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(3)


def _tiles(step, seg=True):
    step.cfg = {"BM": 16, "BN": 32, "BMG": 16, "BNG": 32, "num_warps": 2, "SEG": seg,
                "UNROLL": 2 if seg else 1}  # several column blocks and row chunks


@pytest.mark.parametrize("adapter,seg", [("none", True), ("down", True), ("gu", False), ("split", True),
                                          ("split", False)])
def test_dependent_step_matches_pytorch(P, adapter, seg):
    step = P.Persistent(SH, KS, _gen(), adapter=adapter, dep=True)
    _tiles(step, seg)
    for _ in range(2):  # the second step starts from the sums and squares the first one zeroed
        step()
    ref, got = step.reference(), step.outputs()
    for name in ("yq", "yo", "act", "yd"):
        torch.testing.assert_close(got[name].float(), ref[name].float(), rtol=2e-2, atol=2e-3, msg=name)
    assert int(step.err.item()) == 0
    assert not step.acc["q"].any() and not step.acc["d"].any()  # zeroed by the finish phases


@pytest.mark.parametrize("programs,seg", [(1, True), (3, True), (7, True), (7, False)])
def test_free_step_sums_each_site_once(P, programs, seg):
    """Fixed lists carrying x: one step from zeroed sums leaves each layer's sums = x_list @ W^T[positions]. With
    several programs in the interpreter every barrier gives up (the error flag is set), which the numbers do not
    depend on: what is checked is that the programs' shares cover each site's units exactly once."""
    step = P.Persistent(SH, KS, _gen(), adapter="split", dep=False)
    _tiles(step, seg)
    step.programs = programs
    if programs > 1 and not torch.cuda.is_available():
        step.spin_limit = 1
    step()
    pos, x = {}, {}
    for s, t in step.lists.items():
        pos[s], x[s] = P.list_x(t)
    for i in range(SH.layers):
        w = step.w
        want = {"q": x["qkv"] @ w["q"][i][pos["qkv"]].float(), "o": x["o"] @ w["o"][i][pos["o"]].float(),
                "g": torch.cat([x["gate_up"] @ w["g"][i][pos["gate_up"]].float(),
                                x["gate_up"] @ w["u"][i][pos["gate_up"]].float()]),
                "d": x["down"] @ w["d"][i][pos["down"]].float() + x["adapter"] @ w["a"][i][pos["adapter"]].float()}
        for n, v in want.items():
            torch.testing.assert_close(step.acc[n][i], v, rtol=1e-4, atol=1e-5, msg=f"layer {i} {n}")
    assert int(step.err.item()) == int(programs > 1 and not torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (co-resident programs)")
@pytest.mark.parametrize("seg", [True, False])
def test_dependent_step_with_resident_programs_matches_pytorch(P, seg):
    step = P.Persistent(SH, KS, _gen(), adapter="split", dep=True)
    _tiles(step, seg)
    step.programs = torch.cuda.get_device_properties(0).multi_processor_count  # one per SM: all resident
    for _ in range(3):
        step()
    ref, got = step.reference(), step.outputs()
    for name in ("yq", "yo", "act", "yd"):
        torch.testing.assert_close(got[name].float(), ref[name].float(), rtol=2e-2, atol=2e-3, msg=name)
    assert int(step.err.item()) == 0 and int(step.cnt.item()) == 3 * step.barriers() * step.programs


def test_read_bytes_and_bad_input(P):
    step = P.Persistent(SH, KS, _gen(), adapter="down", dep=False)
    nq = 4 * SH.head_dim * 1  # 2 q heads + 1 k + 1 v of 32
    per = KS["qkv"] * nq + KS["o"] * 64 + 2 * KS["gate_up"] * 160 + KS["down"] * 64 + 64 * 64
    assert step.read_bytes() == 2 * per * SH.layers
    with pytest.raises(ValueError, match="adapter site"):
        P.Persistent(SH, KS, _gen(), adapter="attn")
    with pytest.raises(ValueError, match="exceed"):
        P.Persistent(SH, {**KS, "o": 65}, _gen())


def test_site_times_and_configs(P):
    stamps = torch.tensor([0, 1000, 3000, 6000, 10000, 11000, 13000, 16000], dtype=torch.int64)  # ns, 2 layers
    assert P.site_times(stamps, 2) == {"qkv": 4.0, "o": 1.0, "gate_up": 2.0, "down": 3.0}
    assert P.parse_configs("w4x2:64x256:64x128")[0] == {"num_warps": 4, "per_sm": 2, "BM": 64, "BN": 256, "BMG": 64,
                                                        "BNG": 128, "SEG": True, "UNROLL": 1,
                                                        "name": "w4x2:64x256:64x128"}
    c = P.parse_configs("w2x4:64x128:64x64:u3:chunk")[0]
    assert (c["SEG"], c["UNROLL"]) == (False, 3)
    with pytest.raises(SystemExit, match="bad config"):
        P.parse_configs("w4:64x256")
    with pytest.raises(SystemExit, match="bad config"):
        P.parse_configs("w4x2:64x256:64x128:fast")


def test_budget_is_what_the_bar_leaves_beyond_the_ideal_step(P):
    sh = Shape(hidden=64, intermediate=160, layers=2, heads=2, kv_heads=2, vocab=32)
    ks = P.kept_counts(sh, 0.5)
    assert ks == {"qkv": 38, "o": 25, "gate_up": 38, "down": 64}  # 0.6 / 0.4 of 64 and 160 kept, floored (k_for)
    nb = P.step_bytes(sh, ks, adapter=True)
    assert nb == 2 * 2 * (38 * 192 + 25 * 64 + 2 * 38 * 160 + 64 * 64 + 64 * 64)
    engine, chain, chain_bytes = 1000.0, 800.0, 1_600_000  # 2000 bytes per us; a rest of 200 us
    (row,) = P.budget(sh, engine, chain, chain_bytes, [0.5], bars={0.5: 1.5})
    ideal = 200.0 + nb / 2000
    assert row["ideal_us"] == round(ideal, 1) and row["bar_us"] == round(1000 / 1.5, 1)
    assert row["left_per_select_us"] == round((1000 / 1.5 - ideal) / 8, 3)  # four selects per layer, two layers
    (row,) = P.budget(sh, engine, chain, chain_bytes, [0.25], bars={0.5: 1.5})
    assert "bar" not in row and row["ideal_speedup"] == round(1000 / (200.0 + P.step_bytes(
        sh, P.kept_counts(sh, 0.25), adapter=True) / 2000), 3)
