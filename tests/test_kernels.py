"""Triton kernels vs the plain PyTorch reference: compiled on a GPU, under TRITON_INTERPRET=1 on the CPU
(tests/conftest.py sets it on machines without CUDA)."""

import os

import pytest
import torch

from larosa.kernels import (HAVE_TRITON, rmsnorm_ref, rmsnorm_topk_ref, threshold_gemv_ref,  # noqa: E402
                            threshold_linear, topk_gate_up, topk_gate_up_ref, topk_gemv_ref, topk_keep_mask,
                            topk_linear)
from larosa.kernels import ops  # noqa: E402

pytestmark = [pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed"),
              pytest.mark.usefixtures("kernel_device")]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _kernel_used(monkeypatch):
    calls = []
    real = ops.triton_gemv.launch
    monkeypatch.setattr(ops.triton_gemv, "launch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_in,d_out,k", [(96, 40, 17), (300, 70, 1), (1100, 33, 600), (2049, 65, 1024),
                                          (128, 96, 127)])
def test_topk_linear_matches_reference(monkeypatch, dtype, d_in, d_out, k):
    monkeypatch.setenv("LAROSA_KERNEL_MAX_ROWS", "4")  # per-row kernel for both rows
    calls = _kernel_used(monkeypatch)
    x = torch.randn(2, d_in).to(dtype)
    wt = torch.randn(d_in, d_out).to(dtype)
    y = topk_linear(x, wt, k)
    assert calls, "the Triton kernel did not run"
    ref64 = torch.where(topk_keep_mask(x, k), x, 0).double() @ wt.double()
    assert _rel(y, ref64) < 1e-2
    assert _rel(y, topk_gemv_ref(x, wt, k)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selection_is_exact_k_with_ties(dtype):
    # identity weights expose the kept entries; low-precision random data has many ties
    for d, k in ((64, 1), (64, 13), (200, 100), (200, 199), (64, 64)):
        x = (torch.randn(3, d) * 4).round().to(dtype)  # integers: heavy ties
        y = topk_linear(x, torch.eye(d, dtype=dtype), k)
        mask = topk_keep_mask(x, k)
        assert torch.equal(y, torch.where(mask, x, 0)), (d, k)
        assert ((y != 0) | (x == 0)).sum(-1).ge(k).all()


@pytest.mark.parametrize("d_out", [37, 64, 100])
def test_bias_and_leading_shape(d_out):
    """Output widths that leave a partial column group: compiled, the tile kernel's finisher once read zeroed
    sums there when a bias was added (fixed by a barrier between reading and zeroing the sums)."""
    x = torch.randn(1, 2, 150).bfloat16()
    wt = torch.randn(150, d_out).bfloat16()
    wu = torch.randn(150, d_out).bfloat16()
    b = torch.randn(d_out).bfloat16()
    buf = ops.counter_workspace(2, d_out)
    for _ in range(2):  # the second call reuses the sums the first one left zeroed
        y = topk_linear(x, wt, 60, b, buf)
        assert y.shape == (1, 2, d_out)
        assert _rel(y, topk_gemv_ref(x, wt, 60, b)) < 1e-2
        assert _rel(topk_gate_up(x, wt, wu, 60, buf), topk_gate_up_ref(x, wt, wu, 60)) < 1e-2
        assert not buf.any()


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
def test_any_batch_is_correct(monkeypatch, rows):
    calls = _kernel_used(monkeypatch)
    x = torch.randn(rows, 130).half()
    wt = torch.randn(130, 48).half()
    assert _rel(topk_linear(x, wt, 50), topk_gemv_ref(x, wt, 50)) < 1e-2
    assert bool(calls) == (rows <= ops.max_kernel_rows())


def test_kernel_rows_override(monkeypatch):
    monkeypatch.setenv("LAROSA_KERNEL_MAX_ROWS", "8")
    calls = _kernel_used(monkeypatch)
    x = torch.randn(5, 130).half()
    wt = torch.randn(130, 48).half()
    assert _rel(topk_linear(x, wt, 50), topk_gemv_ref(x, wt, 50)) < 1e-2 and calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_up_fused_epilogue(dtype):
    x = torch.randn(2, 200).to(dtype)
    g, u = torch.randn(200, 72).to(dtype), torch.randn(200, 72).to(dtype)
    for k in (1, 77, 200):
        assert _rel(topk_gate_up(x, g, u, k), topk_gate_up_ref(x, g, u, k)) < 1e-2


def test_threshold_kernel():
    x = torch.randn(2, 333).bfloat16()
    wt = torch.randn(333, 40).bfloat16()
    assert _rel(threshold_linear(x, wt, 0.6), threshold_gemv_ref(x, wt, 0.6)) < 1e-2


def test_dense_mode_matches_matmul():
    x = torch.randn(1, 257).bfloat16()
    wt = torch.randn(257, 31).bfloat16()
    assert _rel(ops.dense_linear_kernel(x, wt), x.double() @ wt.double()) < 1e-2


def test_fp32_and_bad_shapes_use_reference_or_fail():
    x = torch.randn(2, 50)
    wt = torch.randn(50, 7)
    torch.testing.assert_close(topk_linear(x, wt, 10), topk_gemv_ref(x, wt, 10))
    with pytest.raises(ValueError, match="does not match"):
        topk_linear(x, torch.randn(49, 7), 10)


def test_opcheck_and_compile_fullgraph():
    x = torch.randn(1, 64).bfloat16()
    wt = torch.randn(64, 16).bfloat16()
    torch.library.opcheck(torch.ops.larosa.topk_linear.default, (x, wt, 20, None),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.larosa.topk_gate_up.default, (x, wt, wt, 20),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda a, w: torch.ops.larosa.topk_linear(a, w, 20, None) * 2, fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(x, wt), topk_gemv_ref(x, wt, 20) * 2, rtol=1e-2, atol=1e-2)


def test_select_mask_matches_reference_and_prefill_path():
    x = (torch.randn(7, 300) * 3).round().bfloat16()
    assert torch.equal(ops.select_mask(x, 111), topk_keep_mask(x, 111))
    wt = torch.randn(300, 20).bfloat16()
    assert _rel(ops._dense_fallback(x, wt, 111, None), topk_gemv_ref(x, wt, 111)) < 1e-2


@pytest.mark.parametrize("impl", ops.triton_gemv.SELECT_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_select_implementations_agree(impl, dtype):
    for d, k in ((1, 1), (2, 1), (3, 2), (64, 1), (300, 111), (300, 300), (1025, 512), (4097, 2048)):
        x = (torch.randn(3, d) * 3).round().to(dtype)
        x[0, :20] = -0.0  # signed zeros: magnitude 0 like +0
        x[2] = torch.randn(d).to(dtype) * 1e3  # large magnitudes: the top pattern bits set
        sel = ops.triton_gemv.select(x, k, impl=impl)
        bits = x.view(torch.int16).to(torch.int32) & 0x7FFF
        idx = torch.arange(d)
        mask = (bits > sel[:, :1]) | ((bits == sel[:, :1]) & (idx < sel[:, 1:]))
        assert torch.equal(mask, topk_keep_mask(x, k)), (impl, d, k)


def test_select_compact_lists_exactly_the_kept_entries_in_order():
    for d, k in ((64, 1), (300, 111), (300, 300), (1025, 512)):
        x = (torch.randn(3, d) * 3).round().bfloat16()  # heavy ties
        idx, xv = ops.triton_gemv.select_compact(x, k)
        mask = topk_keep_mask(x, k)
        for r in range(3):
            want = mask[r].nonzero().flatten().to(torch.int32)
            assert torch.equal(idx[r], want), (d, k, r)
            assert torch.equal(xv[r], x[r, want.long()].float())


@pytest.mark.parametrize("norm", [False, True])
def test_compacting_select_lists_exactly_the_kept_entries_in_order(norm):
    """compact=True (the packed select and the norm + select): each row holds (t, cutoff) and then the k
    kept positions, ascending, the same entries the reference keeps (heavy ties, odd widths, k = d)."""
    for d, k in ((2, 1), (64, 1), (300, 111), (300, 300), (1025, 512), (4097, 2048)):
        x = (torch.randn(3, d) * 3).round().bfloat16()
        x[1, ::3] = x[1, 0].clone()  # heavy exact ties (a copy: CUDA refuses the overlapping write)
        if norm:  # the rows selected from are the kernel's h
            g = (torch.rand(d) + 0.5).bfloat16()
            _, _, plain = ops.triton_gemv.rmsnorm_select(x, None, g, 1e-6, k)
            _, x, sel = ops.triton_gemv.rmsnorm_select(x, None, g, 1e-6, k, compact=True)
        else:
            sel = ops.triton_gemv.select(x, k, compact=True)
            plain = ops.triton_gemv.select(x, k)
        assert sel.shape == (3, 2 + k) and torch.equal(sel[:, :2], plain)
        mask = topk_keep_mask(x, k)
        for r in range(3):
            assert torch.equal(sel[r, 2:], mask[r].nonzero().flatten().to(torch.int32)), (d, k, r)
    with pytest.raises(ValueError, match="packed"):
        ops.triton_gemv.select(x, 3, impl="bisect", compact=True)


@pytest.mark.parametrize("gated", [False, True])
def test_gathered_tile_kernel_matches_reference_and_leaves_the_buffer_zeroed(gated):
    """impl="gtile" (v15): programs walk only the kept rows the select listed; odd sizes (a partial last
    group of kept rows, a partial column block), two rows, twice on one buffer; bad calls are refused."""
    tiles = {"block_m": 16, "block_n": 32}  # 120 kept rows: 8 groups (last partial), 3 column blocks
    buf = torch.zeros(ops.triton_gemv.tile_workspace_needed(2, 70, True, 32), dtype=torch.int32)
    x, wt, y = _twice_on_one_buffer("gtile", tiles, buf, 0, gated,
                                    "the gathered tile kernel left its counters or sums non-zero")
    with pytest.raises(ValueError, match="mode=0"):
        ops.triton_gemv.launch(x, wt, y, 120, impl="gtile", mode=1, threshold=0.5)
    with pytest.raises(ValueError, match="packed"):
        ops.triton_gemv.launch(x, wt, y, 120, impl="gtile", select_impl="bisect")
    with pytest.raises(ValueError, match="compacting select"):
        ops.triton_gemv.launch(x, wt, y, 120, impl="gtile", sel=ops.triton_gemv.select(x, 120))


def test_auto_picks_gtile_by_k_and_leaves_very_wide_rows_to_the_tile_kernel(monkeypatch):
    """The default ("auto") gathers rows where at most GTILE_MAX_KEEP of them are kept, else masks them;
    the compacting select counts in 16 signed bits, so rows of 32768 or more run "tile"; asked for
    explicitly, the gathered kernel refuses them."""
    monkeypatch.delenv("LAROSA_KERNEL_IMPL", raising=False)
    tg = ops.triton_gemv
    cut = int(tg.GTILE_MAX_KEEP * 4096)
    assert [tg.resolve_impl(None, 0, 4096, k) for k in (1, cut, cut + 1, 4096)] == ["gtile", "gtile", "tile", "tile"]
    assert tg.resolve_impl("auto", 2, 4096, 100) == "tile" and tg.resolve_impl("tile", 0, 4096, 1) == "tile"
    calls = []
    for name in ("tile_gemv_kernel", "gtile_gemv_kernel"):
        monkeypatch.setattr(tg, name, _Recorder(name, calls))
    x, wt = torch.randn(1, 256).bfloat16(), torch.randn(256, 32).bfloat16()
    c = int(tg.GTILE_MAX_KEEP * 256)
    for k in (c - 1, c, 240):  # the cut, and well above it
        tg.launch(x, wt, torch.empty(1, 32, dtype=torch.bfloat16), k)
        torch.ops.larosa.rmsnorm_topk(x[None], None, torch.ones(256, dtype=torch.bfloat16), 1e-5, wt, None, k)
    assert [n for n, _ in calls] == ["gtile_gemv_kernel"] * 4 + ["tile_gemv_kernel"] * 2
    assert tg.resolve_impl(None, 0, 32767, 100) == "gtile" and tg.resolve_impl(None, 0, 32768, 100) == "tile"
    assert tg.resolve_impl("gtile", 0, 40000, 100) == "tile"  # asked for or not: too wide to compact
    assert tg.resolve_impl(None, 1, 4096, 100) == "split" and tg.resolve_impl("auto", 1, 4096, 100) == "split"
    with pytest.raises(ValueError, match="32767"):
        tg.select(torch.zeros(1, 1 << 15, dtype=torch.bfloat16), 5, compact=True)
    # workspace: without k, room for either kernel "auto" may pick (here gtile's 128 x 128 tiles need more)
    tall, wide = (tg.tile_workspace_needed(1, 12288, False, bn) for bn in (128, 256))
    assert tall > wide and tg.counters_needed(1, 4096, 12288) == tall
    assert tg.counters_needed(1, 4096, 12288, k=1000) == wide  # gtile, k * d_out < GTILE_TALL: 64 x 256
    assert tg.counters_needed(1, 4096, 12288, k=3000) == wide  # tile: 64 x 256
    assert tg.counters_needed(1, 4096, 12288, impl="gtile", k=3000) == tall
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", "auto")  # the same as unset, the threshold mode included
    assert tg.default_impl(0) == "auto" and tg.default_impl(1) == "split"


def test_explicit_kernel_under_another_default_and_k_beyond_the_row(monkeypatch):
    """An explicit impl sizes its own workspace whatever LAROSA_KERNEL_IMPL says, and the gathered kernel
    takes k > d_in as d_in (every row kept; the list has d_in places)."""
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", "split")
    x, wt = torch.randn(1, 1, 300).bfloat16(), torch.randn(300, 70).bfloat16()
    g = (torch.rand(300) + 0.5).bfloat16()
    for impl in ("tile", "gtile"):
        _, y = torch.ops.larosa.rmsnorm_topk(x, None, g, 1e-6, wt, None, 100, None, None, None, impl)
        assert _rel(y, rmsnorm_topk_ref(x, None, g, 1e-6, wt, None, 100)[1]) < 3e-2, impl
        buf = torch.zeros(ops.triton_gemv.counters_needed(1, 300, 70, impl=impl, k=100), dtype=torch.int32)
        assert _rel(topk_linear(x, wt, 100, None, buf, None, None, impl), topk_gemv_ref(x, wt, 100)) < 1e-2
        assert not buf.any()
    x2, y2 = x.view(1, 300), torch.empty(1, 70, dtype=torch.bfloat16)
    ops.triton_gemv.launch(x2, wt, y2, 305, impl="gtile")
    assert _rel(y2, x2.double() @ wt.double()) < 1e-2
    assert ops.triton_gemv.select(x2, 305, compact=True).shape == (1, 302)
    with pytest.raises(ValueError, match="k must be"):
        ops.triton_gemv.launch(x2, wt, y2, 0, impl="gtile")


def test_ops_take_an_explicit_kernel(monkeypatch):
    """impl= on the Top-K ops picks the kernel over the default (checked on every path, the reference ones
    too); the norm + select compacts exactly when the gathered kernel follows."""
    monkeypatch.delenv("LAROSA_KERNEL_IMPL", raising=False)
    tg = ops.triton_gemv
    calls = []
    for name in ("tile_gemv_kernel", "gtile_gemv_kernel", "rmsnorm_select_kernel"):
        monkeypatch.setattr(tg, name, _Recorder(name, calls))
    x, wt = torch.randn(1, 1, 256).bfloat16(), torch.randn(256, 32).bfloat16()
    g = torch.ones(256, dtype=torch.bfloat16)
    for impl in ("gtile", "tile"):
        topk_linear(x, wt, 200, impl=impl)  # k > 0.6 d_in: "auto" would mask
        torch.ops.larosa.topk_gate_up(x, wt, wt, 200, None, None, impl)
        torch.ops.larosa.rmsnorm_topk(x, None, g, 1e-5, wt, None, 200, None, None, None, impl)
    assert [n for n, _ in calls] == ["gtile_gemv_kernel"] * 2 + ["rmsnorm_select_kernel", "gtile_gemv_kernel"] \
        + ["tile_gemv_kernel"] * 2 + ["rmsnorm_select_kernel", "tile_gemv_kernel"]
    assert calls[2][1]["COMPACT"] == tg._compact_mode(True) and calls[6][1]["COMPACT"] == 0  # 0: no list
    with pytest.raises(ValueError, match="bogus"):
        topk_linear(x.float(), wt.float(), 20, impl="bogus")  # fp32: the reference path


def test_gtile_tiles_by_site(monkeypatch):
    """LAROSA_GTILE_TILES (v21 A/B runs) sets the gathered kernel's tiles of the named sites only, for the launch
    and its workspace; the result still equals the reference; bad specs are refused."""
    tg = ops.triton_gemv
    monkeypatch.delenv("LAROSA_GTILE_TILES", raising=False)
    plain_o = tg.gtile_config(64, 64)
    monkeypatch.setenv("LAROSA_GTILE_TILES", "down=32,64,4; gate_up=16,32,2")
    assert tg.gtile_config(512, 64) == {"block_m": 32, "block_n": 64, "num_warps": 4}
    assert tg.gtile_config(64, 96, True) == {"block_m": 16, "block_n": 32, "num_warps": 2}
    assert tg.gtile_config(64, 64) == plain_o
    assert tg.counters_needed(1, 512, 64, impl="gtile", k=100) == tg.tile_workspace_needed(1, 64, False, 64)
    calls = []
    real = tg.gtile_gemv_kernel
    monkeypatch.setattr(tg, "gtile_gemv_kernel", _Recorder("gtile_gemv_kernel", calls))
    x, wt = torch.randn(1, 512).bfloat16(), torch.randn(512, 64).bfloat16()
    tg.launch_gtile(x, wt, torch.empty(1, 64, dtype=torch.bfloat16), 100)
    assert (calls[0][1]["BLOCK_M"], calls[0][1]["BLOCK_N"], calls[0][1]["num_warps"]) == (32, 64, 4)
    monkeypatch.setattr(tg, "gtile_gemv_kernel", real)
    y = torch.empty(1, 64, dtype=torch.bfloat16)
    tg.launch_gtile(x, wt, y, 100)
    assert _rel(y, topk_gemv_ref(x, wt, 100)) < 1e-2
    for bad, msg in (("down=32,64", "BLOCK_M,BLOCK_N,WARPS"), ("head=32,64,2", "unknown site")):
        monkeypatch.setenv("LAROSA_GTILE_TILES", bad)
        with pytest.raises(ValueError, match=msg):
            tg.gtile_config(512, 64)


def test_gtile_env_keeps_the_other_modes_on_the_tile_kernel(monkeypatch):
    """LAROSA_KERNEL_IMPL=gtile switches exact Top-K only: threshold and dense modes take "tile"."""
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", "gtile")
    tg = ops.triton_gemv
    assert [tg.default_impl(m) for m in (0, 1, 2)] == ["gtile", "tile", "tile"]
    x, wt = torch.randn(1, 200).bfloat16(), torch.randn(200, 40).bfloat16()
    y = torch.empty(1, 40, dtype=torch.bfloat16)
    tg.launch(x, wt, y, 1, threshold=0.5, mode=1, counters=torch.zeros(tg.counters_needed(1, 200, 40, mode=1),
                                                                        dtype=torch.int32))
    assert _rel(y, threshold_gemv_ref(x, wt, 0.5)) < 1e-2


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_masked_and_gather_modes_agree_with_reference(gather, gated):
    for d_in, d_out, k in ((300, 70, 1), (1100, 33, 600), (257, 130, 256)):
        x = torch.randn(2, d_in).bfloat16()
        wt = torch.randn(d_in, d_out).bfloat16()
        wt2 = torch.randn(d_in, d_out).bfloat16() if gated else None
        y = torch.empty(2, d_out, dtype=torch.bfloat16)
        ops.triton_gemv.launch(x, wt, y, k, wt2=wt2, gather=gather, impl="split")
        ref = topk_gate_up_ref(x, wt, wt2, k) if gated else topk_gemv_ref(x, wt, k)
        assert _rel(y, ref) < 1e-2, (gather, gated, d_in, k)


def test_kernel_impl_env_override(monkeypatch):
    monkeypatch.delenv("LAROSA_KERNEL_IMPL", raising=False)
    # measured defaults (benchmarks/NOTES.md v15, v11): gathered or masked tiles by k for Top-K, split-K for TEAL
    assert ops.triton_gemv.default_impl(0) == "auto" and ops.triton_gemv.default_impl(1) == "split"
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", "inline")
    assert ops.triton_gemv.default_impl() == "inline" and ops.triton_gemv.default_impl(1) == "inline"
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", "bogus")
    with pytest.raises(ValueError, match="LAROSA_KERNEL_IMPL"):
        ops.triton_gemv.default_impl()


IMPL_TILES = {  # small tiles so the interpreter walks several blocks and splits
    "split": {"block_n": 32, "block_k": 16, "rows_per_split": 64},  # v4-v10 default: select launch + split-K
    "tile": {"block_m": 64, "block_n": 32},  # v11 default: one tile per program, fp32 atomics, counter finisher
    "gtile": {"block_m": 16, "block_n": 32},  # v15: the select lists the kept rows, programs take 16 of them
    "fused": {"block_n": 32, "block_k": 64},  # one launch, column-complete programs, no workspace
    "inline": {"block_n": 32, "block_k": 16, "rows_per_split": 64},  # split-K, each program selects itself
}


@pytest.mark.parametrize("impl", sorted(IMPL_TILES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [False, True])
def test_selecting_kernel_variants_agree_with_reference(impl, dtype, gated):
    """Every implementation on exact ties and both dtypes ("fused" / "inline": selection inside every
    program instead of a select launch)."""
    for d_in, d_out, k in ((300, 70, 1), (1100, 33, 600), (257, 130, 257), (96, 40, 17)):
        x = torch.randn(3, d_in).to(dtype)
        x[1, ::3] = x[1, 0]  # heavy exact ties: the lower index must win, as in the reference
        wt = torch.randn(d_in, d_out).to(dtype)
        wt2 = torch.randn(d_in, d_out).to(dtype) if gated else None
        y = torch.empty(3, d_out, dtype=dtype)
        ops.triton_gemv.launch(x, wt, y, k, wt2=wt2, impl=impl, **IMPL_TILES[impl])
        ref = topk_gate_up_ref(x, wt, wt2, k) if gated else topk_gemv_ref(x, wt, k)
        assert _rel(y, ref) < 1e-2, (impl, gated, d_in, k)


def test_fused_kernel_threshold_dense_and_bias_modes():
    x = torch.randn(2, 200).bfloat16()
    wt = torch.randn(200, 50).bfloat16()
    bias = torch.randn(50).bfloat16()
    for mode, ref in ((1, threshold_gemv_ref(x, wt, 0.7)), (2, x.float() @ wt.float())):
        y = torch.empty(2, 50, dtype=torch.bfloat16)
        ops.triton_gemv.launch(x, wt, y, 200, threshold=0.7, mode=mode, impl="fused", block_n=32, block_k=64)
        assert _rel(y, ref) < 1e-2, mode
    y = torch.empty(2, 50, dtype=torch.bfloat16)
    ops.triton_gemv.launch(x, wt, y, 60, bias=bias, impl="fused", block_n=32, block_k=64)
    assert _rel(y, topk_gemv_ref(x, wt, 60, bias)) < 1e-2
    with pytest.raises(ValueError, match="implementation"):
        ops.triton_gemv.launch(x, wt, y, 60, impl="bogus")


def test_caller_owned_counters_are_used_and_left_zeroed(monkeypatch):
    seen = []
    real = ops.triton_gemv.launch
    monkeypatch.setattr(ops.triton_gemv, "launch", lambda *a, **k: (seen.append(k.get("counters")), real(*a, **k))[1])
    x = torch.randn(2, 300).bfloat16()
    wt, wu = torch.randn(300, 130).bfloat16(), torch.randn(300, 130).bfloat16()
    cnt = ops.counter_workspace(2, 130)
    assert _rel(topk_linear(x, wt, 100, None, cnt), topk_gemv_ref(x, wt, 100)) < 1e-2
    assert _rel(topk_gate_up(x, wt, wu, 100, cnt), topk_gate_up_ref(x, wt, wu, 100)) < 1e-2
    assert _rel(threshold_linear(x, wt, 0.5, cnt), threshold_gemv_ref(x, wt, 0.5)) < 1e-2
    assert all(c is cnt for c in seen) and len(seen) == 3
    assert not cnt.any()  # the kernels leave the workspace zeroed for the next call
    small = torch.zeros(2, dtype=torch.int32)  # too small for 2 rows of counters and sums: the op allocates its own
    assert _rel(topk_linear(x, wt, 100, None, small), topk_gemv_ref(x, wt, 100)) < 1e-2 and seen[-1] is None


def test_counter_workspace_is_large_enough_and_launch_refuses_a_short_one(monkeypatch):
    for impl in ("tile", "split"):
        monkeypatch.setenv("LAROSA_KERNEL_IMPL", impl)
        for d_in, d_out in ((4096, 4096), (4096, 12288), (4096, 11008), (11008, 4096), (896, 151936)):
            for gated, mode in ((False, 0), (True, 0), (False, 1), (True, 2)):
                need = ops.triton_gemv.counters_needed(8, d_in, d_out, gated, mode=mode)
                assert ops.counter_workspace(8, d_out).numel() >= need, (impl, d_in, d_out, gated, mode)
    monkeypatch.delenv("LAROSA_KERNEL_IMPL")
    x, wt = torch.randn(1, 300).bfloat16(), torch.randn(300, 130).bfloat16()
    y = torch.empty(1, 130, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="counters"):
        ops.triton_gemv.launch(x, wt, y, 100, counters=torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("tiles", [{"block_n": 512, "block_k": 16, "rows_per_split": 16},   # 3 partial chunks
                                   {"block_n": 64, "block_k": 32, "rows_per_split": 32}])   # one masked chunk
@pytest.mark.parametrize("gated", [False, True])
def test_split_k_one_tile_per_program_and_chunked_partial_sums(tiles, gated):
    """v9 tiles: one weight tile per program; ungated, the last program sums the partials SPLIT_CHUNK
    at a time (more splits than one chunk holds, split counts that are not powers of two); gated, one
    split at a time."""
    for d_in, d_out, k in ((300, 70, 150), (1100, 33, 600), (257, 130, 1)):
        n_splits = -(-d_in // tiles["rows_per_split"])
        assert n_splits > 1
        x = torch.randn(2, d_in).bfloat16()
        wt = torch.randn(d_in, d_out).bfloat16()
        wt2 = torch.randn(d_in, d_out).bfloat16() if gated else None
        y = torch.empty(2, d_out, dtype=torch.bfloat16)
        ops.triton_gemv.launch(x, wt, y, k, wt2=wt2, impl="split", **tiles)
        ref = topk_gate_up_ref(x, wt, wt2, k) if gated else topk_gemv_ref(x, wt, k)
        assert _rel(y, ref) < 1e-2, (tiles, gated, d_in, k)
    assert ops.triton_gemv.split_chunk(19, 512) == 8 and ops.triton_gemv.split_chunk(35, 64) == 64


def _mode_case(rows, d_in, d_out, gated):
    """Fresh bf16 inputs for one launch: x, W^T, the up weight (gated) or a bias (not), a threshold."""
    x = torch.randn(rows, d_in).bfloat16()
    wt = torch.randn(d_in, d_out).bfloat16()
    wt2 = torch.randn(d_in, d_out).bfloat16() if gated else None
    bias = None if gated else torch.randn(d_out).bfloat16()
    return x, wt, wt2, bias, 0.7


def _mode_reference(x, wt, wt2, bias, k, thr, mode):
    """The PyTorch reference of one kernel mode: Top-K (0), |x| > thr (1), dense (2); gated or with bias."""
    if mode == 1:
        xs = torch.where(x.float().abs() > thr, x.float(), 0.0)
        return ((torch.nn.functional.silu(xs @ wt.float()) * (xs @ wt2.float())) if wt2 is not None
                else xs @ wt.float() + bias.float()).bfloat16()
    kk = k if mode == 0 else x.shape[-1]
    return topk_gate_up_ref(x, wt, wt2, kk) if wt2 is not None else topk_gemv_ref(x, wt, kk, bias)


def _twice_on_one_buffer(impl, tiles, buf, mode, gated, left_dirty):
    """Two calls with fresh inputs (2 rows, 300 -> 70, k = 120) on the same zeroed buffer: each output
    matches the reference and the kernel leaves the buffer zeroed. Returns the last (x, wt, y)."""
    d_in, d_out, k, rows = 300, 70, 120, 2
    for _ in range(2):
        x, wt, wt2, bias, thr = _mode_case(rows, d_in, d_out, gated)
        y = torch.empty(rows, d_out, dtype=torch.bfloat16)
        ops.triton_gemv.launch(x, wt, y, k, wt2=wt2, bias=bias, mode=mode, threshold=thr, impl=impl,
                               counters=buf, **tiles)
        ref = _mode_reference(x, wt, wt2, bias, k, thr, mode)
        assert _rel(y, ref) < 1e-2, (mode, gated)
        assert not buf.any(), left_dirty
    return x, wt, y


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("gated", [False, True])
def test_split_k_every_mode_matches_reference_and_leaves_the_buffer_zeroed(mode, gated):
    """impl="split": every split writes its partial, the last program of a column block sums them, writes
    the output and resets its counter, so the same buffer serves the next call (called twice with fresh
    inputs); Top-K, threshold and dense modes, gated or with bias."""
    tiles = {"block_n": 32, "block_k": 16, "rows_per_split": 32}  # 10 splits, 3 column blocks (last partial)
    buf = torch.zeros(2 * 3, dtype=torch.int32)
    _twice_on_one_buffer("split", tiles, buf, mode, gated, "the split-K kernel left its counters non-zero")


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("gated", [False, True])
def test_tile_kernel_matches_reference_and_leaves_the_buffer_zeroed(mode, gated):
    """impl="tile" (v11): one weight tile per program, fp32 atomics into sums kept in the counter buffer,
    turned into the output by the last program of each column block and zeroed again; odd sizes (partial
    row and column tiles), two rows, called twice on the same buffer with fresh inputs."""
    tiles = {"block_m": 64, "block_n": 32}  # 5 row tiles (last partial), 3 column blocks (last partial)
    buf = torch.zeros(ops.triton_gemv.tile_workspace_needed(2, 70, True, 32), dtype=torch.int32)
    x, wt, y = _twice_on_one_buffer("tile", tiles, buf, mode, gated,
                                    "the tile kernel left its counters or sums non-zero")
    with pytest.raises(ValueError, match="counters"):
        ops.triton_gemv.launch(x, wt, y, 120, impl="tile", counters=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows_per_split"):
        ops.triton_gemv.launch(x, wt, y, 120, impl="tile", rows_per_split=64)


def test_pdl_only_where_it_can_run(monkeypatch):
    """PDL needs compiled kernels on a Hopper (or newer) GPU: under the interpreter or on older GPUs asking for
    it changes nothing; where it can run it is the default unless LAROSA_KERNEL_PDL=0. Results are the same."""
    x, wt = torch.randn(1, 300).bfloat16(), torch.randn(300, 70).bfloat16()
    hopper = (x.is_cuda and ops.triton_gemv.HAVE_GDC and torch.cuda.get_device_capability()[0] >= 9
              and os.environ.get("TRITON_INTERPRET") != "1")
    assert ops.triton_gemv.pdl_default(x) == hopper and ops.triton_gemv._use_pdl(x, True) == hopper
    monkeypatch.setenv("LAROSA_KERNEL_PDL", "0")
    assert not ops.triton_gemv.pdl_default(x) and ops.triton_gemv._use_pdl(x, True) == hopper
    monkeypatch.delenv("LAROSA_KERNEL_PDL")
    for impl in ("tile", "split"):
        y = torch.empty(1, 70, dtype=torch.bfloat16)
        ops.triton_gemv.launch(x, wt, y, 100, impl=impl, pdl=True)
        assert _rel(y, topk_gemv_ref(x, wt, 100)) < 1e-2, impl


class _Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kw)` records kw."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *a, **kw: self.calls.append((self.name, kw))


def test_pdl_launch_flags(monkeypatch):
    """Where PDL can run, each select (and the norm + select) triggers its GEMV early (PDL) and is itself
    launched plainly, after the kernel that wrote x (with LAROSA_SELECT_WAIT=1, v20: as a programmatic
    dependent of that kernel, waiting for it first, WAIT); the GEMV after a select is its programmatic dependent
    (launch_pdl), the one after the norm + select waits before it loads h too (X_LATE); a threshold-mode
    GEMV has no select before it. (The kernels' arithmetic under PDL is checked compiled on the GPU by the
    other tests here; this checks what is asked of each launch.)"""
    tg = ops.triton_gemv
    calls = []
    monkeypatch.setattr(tg, "_pdl_possible", lambda x: True)
    for name in ("select_packed_kernel", "tile_gemv_kernel", "gtile_gemv_kernel", "sparse_gemv_kernel",
                 "rmsnorm_select_kernel"):
        monkeypatch.setattr(tg, name, _Recorder(name, calls))
    assert tg.pdl_default(torch.zeros(1))
    x, wt = torch.randn(1, 256).bfloat16(), torch.randn(256, 64).bfloat16()
    y = torch.empty(1, 64, dtype=torch.bfloat16)
    for impl in ("tile", "split", "gtile"):
        tg.launch(x, wt, y, 100, impl=impl)
    for impl in ("tile", "gtile"):
        monkeypatch.setenv("LAROSA_KERNEL_IMPL", impl)
        torch.ops.larosa.rmsnorm_topk(x[None], None, torch.ones(256, dtype=torch.bfloat16), 1e-5, wt, None, 100)
    tg.launch(x, wt, y, 100, impl="tile", threshold=0.5, mode=1)  # threshold mode: no select, still a GEMV
    names = [n for n, _ in calls]
    assert names == ["select_packed_kernel", "tile_gemv_kernel", "select_packed_kernel", "sparse_gemv_kernel",
                     "select_packed_kernel", "gtile_gemv_kernel", "rmsnorm_select_kernel", "tile_gemv_kernel",
                     "rmsnorm_select_kernel", "gtile_gemv_kernel", "tile_gemv_kernel"]
    after_norm = calls[7][1]  # the GEMV after the norm + select: its dependent, waiting before it loads h
    assert after_norm["launch_pdl"] is True and after_norm["X_LATE"] is True
    assert [kw["COMPACT"] for n, kw in calls if n.startswith(("select", "rmsnorm"))] == [False, False, True,
                                                                                          False, True]
    for name, kw in calls:
        if name in ("select_packed_kernel", "rmsnorm_select_kernel"):
            assert kw.get("PDL") is True and "WAIT" not in kw and "launch_pdl" not in kw
    assert all(kw.get("launch_pdl") is True for n, kw in calls[:10] if n.endswith("gemv_kernel"))  # gtile too
    assert "launch_pdl" not in calls[10][1]  # threshold mode: no select before it
    calls.clear()
    monkeypatch.setenv("LAROSA_SELECT_WAIT", "1")
    tg.launch(x, wt, y, 100, impl="gtile")
    torch.ops.larosa.rmsnorm_topk(x[None], None, torch.ones(256, dtype=torch.bfloat16), 1e-5, wt, None, 100)
    assert [n for n, _ in calls] == ["select_packed_kernel", "gtile_gemv_kernel", "rmsnorm_select_kernel",
                                     "gtile_gemv_kernel"]
    for i in (0, 2):
        assert calls[i][1]["WAIT"] is True and calls[i][1]["launch_pdl"] is True and calls[i][1]["PDL"] is True
    assert calls[1][1]["launch_pdl"] is True


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two 16-bit float tensors of the same sign."""
    ia, ib = a.view(torch.int16).to(torch.int32), b.view(torch.int16).to(torch.int32)
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,k", [(37, 5), (300, 150), (1025, 1), (2048, 1024)])
@pytest.mark.parametrize("with_res", [False, True])
def test_rmsnorm_select_kernel_matches_reference(dtype, d, k, with_res):
    """The select folded into the RMSNorm: xs = x + res exactly, h = HF's RMSNorm (bit for bit under the
    interpreter; compiled, the fp32 sum of squares adds in another order and rsqrt may differ in its last
    bit, so within two units in the last place of the 16-bit result), and (t, cutoff) exactly the
    selection of the kernel's own h."""
    x = (torch.randn(3, d) * 2).to(dtype)
    x[1, : d // 2] = x[1, 0]  # ties in |h|
    res = torch.randn(3, d).to(dtype) if with_res else None
    g = (torch.rand(d) + 0.5).to(dtype)
    xs, h, sel = ops.triton_gemv.rmsnorm_select(x, res, g, 1e-5, k)
    want_xs = x if res is None else x + res
    if with_res:
        assert torch.equal(xs, want_xs)
    else:
        assert xs is None
    assert _ulps(h, rmsnorm_ref(want_xs, g, 1e-5)) <= (0 if os.environ.get("TRITON_INTERPRET") == "1" else 2)
    bits = h.view(torch.int16).to(torch.int32) & 0x7FFF
    keep = (bits > sel[:, :1]) | ((bits == sel[:, :1]) & (torch.arange(d) < sel[:, 1:]))
    assert torch.equal(keep, topk_keep_mask(h, k))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_res", [False, True])
@pytest.mark.parametrize("impl", ["tile", "gtile", "split", "inline"])
def test_rmsnorm_topk_op_matches_its_parts(monkeypatch, gated, with_res, impl):
    """The op's output is the GEMV of the kernel's own h, under every GEMV implementation (the precomputed
    selection is used by tile and split, recomputed by inline), and close to the all-reference composition."""
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", impl)
    calls = _kernel_used(monkeypatch)
    d, d_out, k = 300, 70, 120
    x = torch.randn(1, 2, d).bfloat16()
    res = torch.randn(1, 2, d).bfloat16() if with_res else None
    g = (torch.rand(d) + 0.5).bfloat16()
    wt, wu = torch.randn(d, d_out).bfloat16(), torch.randn(d, d_out).bfloat16()
    b = None if gated else torch.randn(d_out).bfloat16()
    buf = ops.counter_workspace(2, d_out)
    xs, y = torch.ops.larosa.rmsnorm_topk(x, res, g, 1e-6, wt, wu if gated else None, k, b, buf)
    assert calls, "the Triton GEMV did not run"
    assert not buf.any(), "the workspace was not left zeroed"
    _, h, _ = ops.triton_gemv.rmsnorm_select(x.view(2, d), None if res is None else res.view(2, d), g, 1e-6, k)
    want = topk_gate_up_ref(h, wt, wu, k) if gated else topk_gemv_ref(h, wt, k, b)
    assert y.shape == (1, 2, d_out) and _rel(y.view(2, d_out), want) < 1e-2
    ref_xs, ref_y = rmsnorm_topk_ref(x, res, g, 1e-6, wt, wu if gated else None, k, b)
    assert _rel(y, ref_y) < 3e-2
    if with_res:
        assert torch.equal(xs, ref_xs)
    else:
        assert xs.numel() == 0


def test_rmsnorm_topk_reference_paths_and_errors():
    """fp32 (no kernel) and k >= d take the reference exactly; shape and argument errors are clear."""
    x, res, g = torch.randn(2, 40), torch.randn(2, 40), torch.rand(40) + 0.5
    wt, wu, b = torch.randn(40, 9), torch.randn(40, 9), torch.randn(9)
    for kk in (7, 40, 99):
        for wup, bias in ((None, b), (wu, None)):
            xs, y = torch.ops.larosa.rmsnorm_topk(x, res, g, 1e-6, wt, wup, kk, bias)
            rx, ry = rmsnorm_topk_ref(x, res, g, 1e-6, wt, wup, kk, bias)
            assert torch.equal(xs, rx)
            torch.testing.assert_close(y, ry)
    with pytest.raises(ValueError, match="no bias"):
        torch.ops.larosa.rmsnorm_topk(x, None, g, 1e-6, wt, wu, 7, b)
    with pytest.raises(ValueError, match="differ in shape"):
        torch.ops.larosa.rmsnorm_topk(x, None, g, 1e-6, wt, torch.randn(40, 8), 7)
    with pytest.raises(ValueError, match="res"):
        torch.ops.larosa.rmsnorm_topk(x, res[:1], g, 1e-6, wt, None, 7)
    with pytest.raises(ValueError, match="norm weight"):
        ops.triton_gemv.rmsnorm_select(x.bfloat16(), None, g[:39].bfloat16(), 1e-6, 7)
    with pytest.raises(ValueError, match="sel must be"):
        ops.triton_gemv.launch(x.bfloat16(), wt.bfloat16(), torch.empty(2, 9).bfloat16(), 7, impl="tile",
                               sel=torch.zeros(2, 3, dtype=torch.int32))


def test_rmsnorm_topk_opcheck_and_compile():
    x, res = torch.randn(1, 64).bfloat16(), torch.randn(1, 64).bfloat16()
    g, wt = (torch.rand(64) + 0.5).bfloat16(), torch.randn(64, 16).bfloat16()
    for r in (None, res):
        torch.library.opcheck(torch.ops.larosa.rmsnorm_topk.default, (x, r, g, 1e-6, wt, None, 20),
                              test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda a, b: torch.ops.larosa.rmsnorm_topk(a, b, g, 1e-6, wt, wt, 20)[1] * 2,
                       fullgraph=True, backend="aot_eager")
    _, h, _ = ops.triton_gemv.rmsnorm_select(x, res, g, 1e-6, 20)
    torch.testing.assert_close(fn(x, res), topk_gate_up_ref(h, wt, wt, 20) * 2, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("impl", ["tile", "gtile", "split", "inline", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_in_the_epilogue(monkeypatch, impl, dtype):
    """y = residual + TopK(x) @ W (+ bias): added in fp32 before the one rounding (tile, split, inline), after
    it for the one-launch kernel; the buffer is left zeroed. The residual dominates the sum, as in a layer."""
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", impl)
    calls = _kernel_used(monkeypatch)
    d_in, d_out, k = 300, 70, 120
    x = torch.randn(1, 2, d_in).to(dtype)
    wt = (torch.randn(d_in, d_out) * 0.05).to(dtype)
    b = torch.randn(d_out).to(dtype)
    r = (torch.randn(1, 2, d_out) * 8).to(dtype)
    buf = ops.counter_workspace(2, d_out)
    y = topk_linear(x, wt, k, b, buf, r)
    assert calls and not buf.any()
    want64 = (torch.where(topk_keep_mask(x, k), x, 0).double() @ wt.double() + b.double() + r.double())
    assert y.shape == r.shape and _rel(y, want64) < 4e-3
    assert _rel(y, topk_gemv_ref(x, wt, k, b, r)) < 4e-3
    # the residual dominates: a kernel that dropped it would be far off
    assert _rel(topk_linear(x, wt, k, b, buf), want64) > 0.5


def test_residual_reference_path_and_errors():
    x, wt, b, r = torch.randn(2, 40), torch.randn(40, 9), torch.randn(9), torch.randn(2, 9)
    torch.testing.assert_close(topk_linear(x, wt, 7, b, None, r), topk_gemv_ref(x, wt, 7, b) + r)
    with pytest.raises(ValueError, match="residual"):
        topk_linear(x, wt, 7, b, None, r[:1])
    xb, wb = x.bfloat16(), wt.bfloat16()
    with pytest.raises(ValueError, match="gated form takes no residual"):
        ops.triton_gemv.launch(xb, wb, torch.empty(2, 9).bfloat16(), 7, wt2=wb, residual=r.bfloat16())
    torch.library.opcheck(torch.ops.larosa.topk_linear.default, (xb, wb, 7, None, None, r.bfloat16()),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,k", [(37, 5), (300, 150), (1025, 1), (2048, 1024), (2048, 2048)])
def test_hinted_select_is_exact_for_any_hint(monkeypatch, dtype, d, k):
    """The windowed select (v13) returns the plain select's (t, cutoff) whatever the hint: in the window,
    just below or above it (fallback to the full search), at the pattern range's ends, garbage; and it
    leaves each row's threshold in its hint slot. LAROSA_SELECT_WINDOW=0 ignores the hint."""
    tg = ops.triton_gemv
    x = (torch.randn(3, d) * 3).to(dtype)
    x[1] = (x[1] * 2).round()  # heavy ties in one row
    want = tg.select(x, k)
    t = want[:, 0]
    for w in (1, 5, 7, 14):
        monkeypatch.setenv("LAROSA_SELECT_WINDOW", str(w))
        for h in (t, t + 1, t - 1, t + 40, t - 40, t + 100, t - 100,  # +-100: outside the default 2^7 window too
                  torch.zeros_like(t), torch.full_like(t, 0x7FFF), torch.full_like(t, -5), torch.full_like(t, 1 << 20)):
            hint = h.to(torch.int32).contiguous()
            assert torch.equal(tg.select(x, k, hint=hint), want), (w, h)
            assert torch.equal(hint, t)
    monkeypatch.setenv("LAROSA_SELECT_WINDOW", "0")
    hint = torch.full((3,), 7, dtype=torch.int32)
    assert torch.equal(tg.select(x, k, hint=hint), want) and (hint == 7).all()


def test_hinted_ops_compute_the_same_and_refuse_bad_hints(monkeypatch):
    """topk_linear / topk_gate_up / rmsnorm_topk with a hint compute what they compute without (the hint
    changes the time only) and update it; a hint of the wrong dtype or too few slots is an error, and so
    is a window out of range."""
    tg = ops.triton_gemv
    x, r = torch.randn(2, 300).bfloat16(), torch.randn(2, 300).bfloat16()
    wt, wu = torch.randn(300, 70).bfloat16(), torch.randn(300, 70).bfloat16()
    g = torch.rand(300).bfloat16() + 0.5
    # without a hint: the products of the reference, and the thresholds each op's select should leave
    lin, gu = topk_linear(x, wt, 120), topk_gate_up(x, wt, wu, 120)
    assert _rel(lin, topk_gemv_ref(x, wt, 120)) < 1e-2 and _rel(gu, topk_gate_up_ref(x, wt, wu, 120)) < 1e-2
    norm = {}
    for wup in (None, wu):
        norm[wup] = torch.ops.larosa.rmsnorm_topk(x, r, g, 1e-5, wt, wup, 120)
        ref = rmsnorm_topk_ref(x, r, g, 1e-5, wt, wup, 120)
        assert torch.equal(norm[wup][0], ref[0]) and _rel(norm[wup][1], ref[1]) < 1e-2
    t_x = tg.select(x, 120)[:, 0]  # x's rows (topk_linear, topk_gate_up)
    _, h, sel = tg.rmsnorm_select(x, r, g, 1e-5, 120)  # the normalised rows (rmsnorm_topk)
    t_h = sel[:, 0]
    assert torch.equal(t_h, tg.select(h, 120)[:, 0]) and not torch.equal(t_h, t_x)

    def hints(t):
        """Far from t (the full search), near it (the window), and with slots past the rows (left alone)."""
        i32 = torch.int32
        return (torch.zeros(2, dtype=i32), torch.full((4,), 0x3F00, dtype=i32), (t + 1).to(i32),
                torch.cat([t - 2, torch.tensor([5, 6])]).to(i32))

    def updated(hint, hint0, t):
        assert torch.equal(hint[:2], t) and torch.equal(hint[2:], hint0[2:]), (hint0, hint, t)

    for hint0 in hints(t_x):
        hint = hint0.clone()
        assert torch.equal(topk_linear(x, wt, 120, None, None, None, hint), lin)
        updated(hint, hint0, t_x)
        hint = hint0.clone()
        assert torch.equal(topk_gate_up(x, wt, wu, 120, None, hint), gu)
        updated(hint, hint0, t_x)
    for hint0 in hints(t_h):
        for wup in (None, wu):
            hint = hint0.clone()
            a = torch.ops.larosa.rmsnorm_topk(x, r, g, 1e-5, wt, wup, 120, None, None, hint)
            assert torch.equal(a[0], norm[wup][0]) and torch.equal(a[1], norm[wup][1])
            updated(hint, hint0, t_h)
    with pytest.raises(ValueError, match="hint"):
        tg.select(x, 120, hint=torch.zeros(2, dtype=torch.int64))
    short = torch.full((1,), 9, dtype=torch.int32)  # fewer slots than rows (an engine's, in a prefill): unused
    assert torch.equal(tg.select(x, 120, hint=short), tg.select(x, 120)) and short.item() == 9
    for bad in ("15", "six", "-1"):
        monkeypatch.setenv("LAROSA_SELECT_WINDOW", bad)
        with pytest.raises(ValueError, match="LAROSA_SELECT_WINDOW"):
            tg.select(x, 120, hint=torch.zeros(2, dtype=torch.int32))


def test_hinted_select_takes_the_window_path():
    """With the fallback search switched off (FALLBACK=False, a test-only switch), a hint near t still gives
    the exact threshold (the window search works on its own) and one far from it does not (the window
    check rejects it): so the window path is what runs when the hint is good."""
    tg = ops.triton_gemv
    x = torch.randn(2, 1000).bfloat16()
    k = 400
    want = tg.select(x, k)
    t = want[:, 0]
    bd = 1024

    def run(h, window=6):
        sel = torch.empty(2, 2, dtype=torch.int32)
        hint = h.to(torch.int32).contiguous()
        tg.select_packed_kernel[(2,)](x, sel, hint, 1000, k, x.stride(0), BLOCK_D=bd, num_warps=4,
                                      WINDOW=window, FALLBACK=False)
        return sel

    for off in (0, 5, -5, 32, -31):  # t in [h - 32, h + 32)
        assert torch.equal(run(t + off), want), off
    far = run(t + 500)
    assert not torch.equal(far[:, 0], t)


def _side_setup(dtype, rows=2, d=200, n=150, width=300):
    x = torch.randn(rows, width).to(dtype)
    x[0, : width // 3] = x[0, 0]  # ties
    ax = torch.randn(rows, d).to(dtype)
    aw = (torch.randn(n, d) / d ** 0.5).to(dtype)  # output-major, as F.linear's weight
    return x, ax, aw, ax.double() @ aw.double().T


def _close_to_matmul(y, want):
    """A 16-bit GEMV output vs the fp64 product: within the rounding of fp32 sums in another order."""
    assert _rel(y, want) < 1e-2 and (y.double() - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compact", [False, True])
def test_side_gemv_rides_in_the_select_and_changes_nothing_else(dtype, compact):
    """v16: extra programs of the select launch compute y[:, c0:c1] = x @ w[c0:c1].T (and copy prev into
    y[:, :c0]); the selection is bit-equal to the select without them, and no column outside [0, c1) is
    written."""
    x, ax, aw, want = _side_setup(dtype)
    plain = ops.triton_gemv.select(x, 37, compact=compact)
    y = torch.full((2, 150), float("nan")).to(dtype)
    sel = ops.triton_gemv.select(x, 37, compact=compact, side=ops.triton_gemv.SideGemv(ax, aw, y, 0, 70))
    assert torch.equal(sel, plain)
    _close_to_matmul(y[:, :70], want[:, :70])
    assert torch.isnan(y[:, 70:]).all()
    prev = y[:, :70].clone()
    y2 = torch.full((2, 150), float("nan")).to(dtype)
    sel = ops.triton_gemv.select(x, 37, compact=compact, side=ops.triton_gemv.SideGemv(ax, aw, y2, 70, 150, prev))
    assert torch.equal(sel, plain)
    assert torch.equal(y2[:, :70], prev)
    _close_to_matmul(y2, want)


@pytest.mark.parametrize("with_res", [False, True])
def test_side_gemv_rides_in_the_norm_select(with_res):
    x, ax, aw, want = _side_setup(torch.bfloat16)
    res = torch.randn(2, 300).bfloat16() if with_res else None
    g = (torch.rand(300) + 0.5).bfloat16()
    xs0, h0, sel0 = ops.triton_gemv.rmsnorm_select(x, res, g, 1e-6, 40)
    y = torch.full((2, 150), float("nan")).bfloat16()
    xs, h, sel = ops.triton_gemv.rmsnorm_select(x, res, g, 1e-6, 40, side=ops.triton_gemv.SideGemv(ax, aw, y, 0, 150))
    assert torch.equal(h, h0) and torch.equal(sel, sel0) and (xs is None) == (xs0 is None)
    if with_res:
        assert torch.equal(xs, xs0)
    _close_to_matmul(y, want)


@pytest.mark.parametrize("impl", ["tile", "gtile"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("presel", [False, True])
def test_side_gemv_rides_in_the_gemv_launch(monkeypatch, impl, gated, presel):
    """v18 (LAROSA_SIDE_IN=gemv): the side programs are the first slices of the tile / gathered GEMV launch;
    the GEMV's output is that of the launch without them (bit-equal under the interpreter: the same sums in
    the same order), the side product is right, prev is copied and no column past c1 is written; with the
    selection from a norm + select (sel=) too."""
    monkeypatch.setenv("LAROSA_SIDE_IN", "gemv")
    tg = ops.triton_gemv
    select_sides = _select_sides(monkeypatch)
    x, ax, aw, want = _side_setup(torch.bfloat16)
    g = (torch.rand(300) + 0.5).bfloat16()
    d_out = 300  # several column blocks (the side programs fill n0 programs per slice), two rows
    wt = (torch.randn(300, d_out) / 17).bfloat16()
    wt2 = (torch.randn(300, d_out) / 17).bfloat16() if gated else None
    k = 37

    def run(side):
        y = torch.empty(2, d_out).bfloat16()
        if presel:
            _, h, sel = tg.rmsnorm_select(x, None, g, 1e-6, k, compact=impl == "gtile")
            tg.launch(h, wt, y, k, wt2=wt2, impl=impl, sel=sel, side=side)
        else:
            tg.launch(x, wt, y, k, wt2=wt2, impl=impl, side=side)
        return y

    def same(y, plain):  # compiled, the fp32 atomics add in arrival order
        return torch.equal(y, plain) if not y.is_cuda else _rel(y, plain) < 1e-2

    plain = run(None)
    r = torch.full((2, 150), float("nan")).bfloat16()
    assert same(run(tg.SideGemv(ax, aw, r, 0, 70)), plain)
    _close_to_matmul(r[:, :70], want[:, :70])
    assert torch.isnan(r[:, 70:]).all()
    r2 = torch.full((2, 150), float("nan")).bfloat16()
    assert same(run(tg.SideGemv(ax, aw, r2, 70, 150, r[:, :70].clone())), plain)
    assert torch.equal(r2[:, :70], r[:, :70])
    _close_to_matmul(r2, want)
    if not presel:  # and the GEMV itself is the Top-K product
        assert _rel(plain, topk_gate_up_ref(x, wt, wt2, k) if gated else topk_gemv_ref(x, wt, k)) < 1e-2
    assert select_sides and all(sd is None for sd in select_sides)  # no select launch carried them


def _select_sides(monkeypatch):
    """The `side` given to every select / norm + select launch from here on."""
    tg, sides = ops.triton_gemv, []
    for name in ("select", "rmsnorm_select"):
        real = getattr(tg, name)
        monkeypatch.setattr(tg, name, lambda *a, real=real, **kw: (sides.append(kw.get("side")), real(*a, **kw))[1])
    return sides


def test_side_in_switch(monkeypatch):
    """LAROSA_SIDE_IN picks the launch that carries the side programs; a bad value is refused."""
    tg = ops.triton_gemv
    monkeypatch.delenv("LAROSA_SIDE_IN", raising=False)
    assert tg.side_in() == tg.DEFAULT_SIDE_IN
    monkeypatch.setenv("LAROSA_SIDE_IN", "gemv")
    assert tg.side_in() == "gemv"
    monkeypatch.setenv("LAROSA_SIDE_IN", "stream")
    with pytest.raises(ValueError, match="LAROSA_SIDE_IN"):
        tg.side_in()


def test_side_gemv_refuses_bad_arguments(monkeypatch):
    monkeypatch.setenv("LAROSA_SIDE_IN", "select")
    x, ax, aw, _ = _side_setup(torch.bfloat16)
    y = torch.empty(2, 150).bfloat16()
    SG = ops.triton_gemv.SideGemv
    bad = [(SG(ax[:1], aw, y, 0, 150), "rows"), (SG(ax, aw[:, :199], y, 0, 150), "rows"),
           (SG(ax, aw, y, 0, 151), "columns"), (SG(ax, aw, y, 70, 150), "prev"),
           (SG(ax, aw, y, 0, 70, y[:, :70]), "prev"), (SG(ax, aw.half(), y, 0, 70), "dtype")]
    for side, match in bad:
        with pytest.raises(ValueError, match=match):
            ops.triton_gemv.select(x, 9, side=side)
    with pytest.raises(ValueError, match="packed select"):
        ops.triton_gemv.select(x, 9, impl="bisect", side=SG(ax, aw, y, 0, 150))
    wt = torch.randn(300, 20).bfloat16()
    sel = ops.triton_gemv.select(x, 9)
    for impl in ("tile", "gtile", "split", "fused"):
        with pytest.raises(ValueError, match="side="):
            ops.triton_gemv.launch(x, wt, torch.empty(2, 20).bfloat16(), 9, impl=impl,
                                   sel=None if impl == "fused" else sel, side=SG(ax, aw, y, 0, 150))
    monkeypatch.setenv("LAROSA_SIDE_IN", "gemv")  # with sel= only the tile / gathered launches can carry it
    for impl in ("split", "fused", "inline"):
        with pytest.raises(ValueError, match="side="):
            ops.triton_gemv.launch(x, wt, torch.empty(2, 20).bfloat16(), 9, impl=impl, sel=sel,
                                   side=SG(ax, aw, y, 0, 150))


@pytest.mark.parametrize("impl", ["tile", "gtile", "split"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("side_in", ["select", "gemv"])
def test_side_ops_compute_their_parts(monkeypatch, impl, gated, side_in):
    """`rmsnorm_topk_side` then `topk_linear_side`: the GEMV outputs of the plain ops, bit for bit (the side
    programs do not touch them), and the side product x @ w split across the two launches (in the select
    launches, or in the tile / gathered GEMV launches: LAROSA_SIDE_IN)."""
    monkeypatch.setenv("LAROSA_SIDE_IN", side_in)
    calls = _kernel_used(monkeypatch)
    select_sides = _select_sides(monkeypatch)
    d, di = 128, 320
    x = torch.randn(1, 1, d).bfloat16()
    g = (torch.rand(d) + 0.5).bfloat16()
    wg, wu = (torch.randn(d, di) / d ** 0.5).bfloat16(), (torch.randn(d, di) / d ** 0.5).bfloat16()
    wd = (torch.randn(di, d) / di ** 0.5).bfloat16()
    r_w = torch.linalg.qr(torch.randn(d, d, device="cpu"))[0].to(x.device).bfloat16()
    want = x.view(1, d).double() @ r_w.double().T
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", "split")  # bit-reproducible sums for the plain vs side comparison
    wup = wu if gated else None
    for cols in (48, 0):
        y0 = torch.ops.larosa.rmsnorm_topk(x, None, g, 1e-6, wg, wup, 50)[1]
        y, r = torch.ops.larosa.rmsnorm_topk_side(x, g, 1e-6, wg, wup, 50, r_w, cols, None, None, impl)
        assert r.shape == (1, 1, cols)
        if impl == "split":
            assert torch.equal(y, y0)
        else:
            assert _rel(y, y0) < 1e-2
        if cols:
            _close_to_matmul(r.view(1, cols), want[:, :cols])
        h = y if gated else torch.nn.functional.silu(y)
        z0 = torch.ops.larosa.topk_linear(h, wd, 100, None, None, None, None, "split")
        z, rr = torch.ops.larosa.topk_linear_side(h, wd, 100, x, r_w, r, None, None, impl)  # r may be 0 wide
        assert rr.shape == (1, 1, d)
        if impl == "split":
            assert torch.equal(z, z0)
        else:
            assert _rel(z, z0) < 1e-2
        _close_to_matmul(rr.view(1, d), want)
        if cols:
            assert torch.equal(rr[..., :cols], r)
    assert calls
    # which launches carried the side programs: the selects, unless the tile / gathered GEMV launch does
    carried = [sd is not None for sd in select_sides]
    assert any(carried) == (side_in == "select" or impl == "split")
    # kernels without a select launch of their own compute the side product with a plain matmul
    for other in ("inline", "fused"):
        z, rr = torch.ops.larosa.topk_linear_side(h, wd, 100, x, r_w, None, None, None, other)
        assert _rel(z, z0) < 1e-2
        _close_to_matmul(rr.view(1, d), want)


def test_side_ops_reference_paths_errors_and_opcheck():
    """fp32 (no kernel): the side products are plain matmuls; shapes are checked; schema and fake agree."""
    x, g = torch.randn(2, 40), torch.rand(40) + 0.5
    wt, r_w = torch.randn(40, 9), torch.randn(40, 40)
    y, r = torch.ops.larosa.rmsnorm_topk_side(x, g, 1e-6, wt, None, 7, r_w, 16)
    torch.testing.assert_close(y, torch.ops.larosa.rmsnorm_topk(x, None, g, 1e-6, wt, None, 7)[1])
    torch.testing.assert_close(r, x @ r_w[:16].T)
    z, rr = torch.ops.larosa.topk_linear_side(torch.randn(2, 9), torch.randn(9, 5), 3, x, r_w, r)
    torch.testing.assert_close(rr, x @ r_w.T)
    with pytest.raises(ValueError, match="side weight"):
        torch.ops.larosa.rmsnorm_topk_side(x, g, 1e-6, wt, None, 7, r_w[:, :39], 16)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.larosa.rmsnorm_topk_side(x, g, 1e-6, wt, None, 7, r_w, 41)
    with pytest.raises(ValueError, match="prev"):
        torch.ops.larosa.topk_linear_side(torch.randn(2, 9), torch.randn(9, 5), 3, x, r_w, r[:1])
    with pytest.raises(ValueError, match="leading shape"):
        torch.ops.larosa.topk_linear_side(torch.randn(3, 9), torch.randn(9, 5), 3, x, r_w, None)
    with pytest.raises(ValueError, match="prev is"):
        torch.ops.larosa.topk_linear_side(torch.randn(2, 9), torch.randn(9, 5), 3, x, r_w, r.double())
    xb, gb, wb, rb = x[:1].bfloat16(), g.bfloat16(), wt.bfloat16(), r_w.bfloat16()
    torch.library.opcheck(torch.ops.larosa.rmsnorm_topk_side.default, (xb, gb, 1e-6, wb, None, 7, rb, 16),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.larosa.topk_linear_side.default,
                          (torch.randn(1, 9).bfloat16(), torch.randn(9, 5).bfloat16(), 3, xb, rb, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("tiles", ["32,64,3", "8,128,1", "16,512,4"])
def test_side_gemv_tiles_from_the_environment(monkeypatch, tiles):
    """LAROSA_SIDE_TILES (benchmarks/side_bench.py's sweep): any tiling computes the same product; a bad value
    is refused."""
    monkeypatch.setenv("LAROSA_SIDE_TILES", tiles)
    x, ax, aw, want = _side_setup(torch.bfloat16, d=300, n=70)
    y = torch.empty(2, 70).bfloat16()
    ops.triton_gemv.select(x, 37, side=ops.triton_gemv.SideGemv(ax, aw, y, 0, 70))
    _close_to_matmul(y, want)
    for bad in ("16,512", "12,512,2", "16,512,9", "a,b,c"):
        monkeypatch.setenv("LAROSA_SIDE_TILES", bad)
        with pytest.raises(ValueError, match="LAROSA_SIDE_TILES"):
            ops.triton_gemv.select(x, 37, side=ops.triton_gemv.SideGemv(ax, aw, y, 0, 70))


def test_compact_store_switch(monkeypatch):
    """LAROSA_COMPACT_STORE picks the compacting select's store (default inline PTX from 32-bit offsets, only on
    compiled kernels: the interpreter keeps `tl.store`); a bad value is refused."""
    tg = ops.triton_gemv
    compiled = os.environ.get("TRITON_INTERPRET") != "1"
    assert tg._compact_mode(False) == 0 and tg._compact_mode(True) == (4 if compiled else 1)  # PTX by default
    monkeypatch.setenv("LAROSA_COMPACT_STORE", "tl")
    assert tg._compact_mode(False) == 0 and tg._compact_mode(True) == 1
    monkeypatch.setenv("LAROSA_COMPACT_STORE", "asm")
    assert tg._compact_mode(False) == 0
    assert tg._compact_mode(True) == (3 if compiled else 1)
    x = torch.randn(1, 300).bfloat16()
    sel = tg.select(x, 40, compact=True)
    assert torch.equal(torch.sort(sel[0, 2:]).values, sel[0, 2:])  # ascending kept positions
    assert torch.equal(topk_keep_mask(x, 40)[0].nonzero()[:, 0].to(torch.int32), sel[0, 2:])
    monkeypatch.setenv("LAROSA_COMPACT_STORE", "asm32")  # the default (v19): PTX stores from 32-bit offsets
    assert tg._compact_mode(False) == 0 and tg._compact_mode(True) == (4 if compiled else 1)
    assert torch.equal(tg.select(x, 40, compact=True), sel)
    monkeypatch.setenv("LAROSA_COMPACT_STORE", "shared")
    with pytest.raises(ValueError, match="LAROSA_COMPACT_STORE"):
        tg.select(x, 40, compact=True)
