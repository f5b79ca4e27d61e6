"""Kernel checks on a CUDA GPU (run with: PYTHONPATH=src python3 -m pytest -m gpu tests/test_kernels_gpu.py)."""

import pytest
import torch

from larosa.kernels import topk_gate_up, topk_gate_up_ref, topk_gemv_ref, topk_keep_mask, topk_linear

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _multi_row_kernel(monkeypatch):
    """Rows up to 4 run the per-row kernel (the default, 1, would send the 2- and 3-row cases to the
    dense fallback)."""
    monkeypatch.setenv("LAROSA_KERNEL_MAX_ROWS", "4")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_in,d_out", [(4096, 4096), (4096, 11008), (11008, 4096), (896, 4864),
                                        (18944, 3584), (1001, 77)])
@pytest.mark.parametrize("frac", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("impl", ["tile", "gtile"])
def test_kernel_matches_reference(monkeypatch, dtype, d_in, d_out, frac, impl):
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", impl)
    k = max(1, int(frac * d_in))
    for rows in (1, 3):
        x = torch.randn(rows, d_in, device="cuda", dtype=dtype)
        wt = torch.randn(d_in, d_out, device="cuda", dtype=dtype) * 0.02
        y = topk_linear(x, wt, k)
        exact = torch.where(topk_keep_mask(x, k), x, 0).double() @ wt.double()
        assert torch.isfinite(y).all()
        assert _rel(y, exact) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["tile", "gtile"])
def test_exact_selection_on_gpu(monkeypatch, dtype, impl):
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", impl)
    for d, k in ((4096, 1), (4096, 2457), (11008, 5724), (64, 63)):
        x = (torch.randn(2, d, device="cuda") * 3).round().to(dtype)
        y = topk_linear(x, torch.eye(d, device="cuda", dtype=dtype), k)
        assert torch.equal(y, torch.where(topk_keep_mask(x, k), x, 0))


@pytest.mark.parametrize("impl", ["tile", "gtile"])
def test_gate_up_on_gpu(monkeypatch, impl):
    monkeypatch.setenv("LAROSA_KERNEL_IMPL", impl)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16) * 0.02
    u = torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16) * 0.02
    assert _rel(topk_gate_up(x, g, u, 2785), topk_gate_up_ref(x, g, u, 2785)) < 1e-2


def test_compile_fullgraph_with_cuda_graphs():
    wt = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16) * 0.05

    def step(x):
        return torch.ops.larosa.topk_linear(torch.nn.functional.silu(x), wt, 300, None) + 1

    fn = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for _ in range(4):
        x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
        out = fn(x).clone()
        ref = topk_gemv_ref(torch.nn.functional.silu(x), wt, 300) + 1
        assert _rel(out, ref) < 1e-2


def test_opcheck_on_gpu():
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    wt = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.larosa.topk_linear.default, (x, wt, 100, None),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("impl", ["hist", "bisect", "bisect2"])
def test_select_impls_on_gpu(impl):
    from larosa.kernels import triton_gemv

    for d, k in ((4096, 1), (4096, 2048), (11008, 5504), (14336, 100), (18944, 9000)):
        x = (torch.randn(2, d, device="cuda") * 3).round().bfloat16()
        sel = triton_gemv.select(x, k, impl=impl)
        bits = x.view(torch.int16).to(torch.int32) & 0x7FFF
        idx = torch.arange(d, device="cuda")
        mask = (bits > sel[:, :1]) | ((bits == sel[:, :1]) & (idx < sel[:, 1:]))
        assert torch.equal(mask, topk_keep_mask(x, k))


@pytest.mark.parametrize("store,mode", [("asm", 3), ("asm32", 4)])
@pytest.mark.parametrize("d_in", [4096, 11008, 14336, 1001])
def test_compacting_select_ptx_stores_list_the_same_positions(monkeypatch, d_in, store, mode):
    """v16 (LAROSA_COMPACT_STORE=asm, 64-bit pointers) and v19 (asm32, the default: the addresses formed from
    32-bit offsets): the kept list stored by inline PTX equals `tl.store`'s, with heavy ties, for plain and norm +
    select launches; the gathered GEMV on it matches the reference."""
    from larosa.kernels import triton_gemv as tg

    x = torch.randn(2, d_in, device="cuda", dtype=torch.bfloat16)
    x[1, : d_in // 3] = x[1, 0]
    g = torch.rand(d_in, device="cuda", dtype=torch.bfloat16) + 0.5
    for k in (1, d_in // 4, d_in // 2, d_in - 1):
        monkeypatch.setenv("LAROSA_COMPACT_STORE", "tl")
        want = tg.select(x, k, compact=True)
        want_n = tg.rmsnorm_select(x, None, g, 1e-6, k, compact=True)[2]
        monkeypatch.setenv("LAROSA_COMPACT_STORE", store)
        assert tg._compact_mode(True) == mode
        assert torch.equal(tg.select(x, k, compact=True), want)
        assert torch.equal(tg.rmsnorm_select(x, None, g, 1e-6, k, compact=True)[2], want_n)
        wt = torch.randn(d_in, 256, device="cuda", dtype=torch.bfloat16) * 0.02
        y = topk_linear(x[:1], wt, k, impl="gtile")
        exact = torch.where(topk_keep_mask(x[:1], k), x[:1], 0).double() @ wt.double()
        assert _rel(y, exact) < 1e-2


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("d_in,share", [(4096, 0.6), (11008, 0.4), (14336, 0.1)])
def test_spec_gemv_in_sequence_on_gpu(d_in, share, blocked):
    """The speculative GEMV (`impl="spec"`) at real shapes, compiled, its GEMV launched as the select's programmatic
    dependent (PDL): a site's calls in sequence, each guessing from the threshold the one before left in the hint.
    Exact at every call (the GEMV's programs read the guess before or after the select stored the new one: either
    path), and the fix lists short once the hint is warm."""
    from larosa.kernels import triton_spec
    d_out, k = 4096, int(share * d_in)
    wt = torch.randn(d_in, d_out, device="cuda", dtype=torch.bfloat16) * 0.02
    w_in = triton_spec.spec_layout(wt) if blocked else wt  # blocked at the default tiles' BN
    res = torch.randn(1, d_out, device="cuda", dtype=torch.bfloat16)
    hint = torch.zeros(1, dtype=torch.int32, device="cuda")
    fixes = []
    for _ in range(6):
        x = torch.randn(1, d_in, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, d_out, device="cuda", dtype=torch.bfloat16)
        sel = triton_spec.launch_spec(x, w_in, y, k, hint=hint, residual=res)
        exact = torch.where(topk_keep_mask(x, k), x, 0).double() @ wt.double() + res.double()
        assert _rel(y, exact) < 1e-2
        fixes.append(sel[0, 3].item())
    assert fixes[0] == d_in - k and max(fixes[2:]) < d_in // 10, fixes
