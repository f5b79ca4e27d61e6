"""The dense decode GEMV (`triton_dense.dense_gemv`, `larosa::dense_linear`) vs fp64 arithmetic and HF's: compiled
on a GPU, under TRITON_INTERPRET=1 on the CPU (tests/conftest.py)."""

import pytest
import torch

from larosa.kernels import HAVE_TRITON

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,d,n_out,tiles", [(1, 256, 64, (4, 64, 2)), (1, 300, 37, (4, 64, 2)),
                                                (2, 100, 9, (8, 32, 1)), (1, 2048, 16, (4, 1024, 2)),
                                                (1, 48, 5, (2, 32, 2))])
def test_dense_gemv_matches_matmul(dtype, rows, d, n_out, tiles):
    """Every output of every row within the input dtype's rounding of the fp64 product, for d below, at and
    above one step (STAGES tiles of BK), partial last tiles and output blocks."""
    from larosa.kernels.triton_dense import dense_gemv

    gen = torch.Generator().manual_seed(d + n_out)
    x = torch.randn(rows, d, generator=gen).to(DEV, dtype)
    w = (torch.randn(n_out, d, generator=gen) * d ** -0.5).to(DEV, dtype)
    got = dense_gemv(x, w, tiles=tiles)
    want = x.double() @ w.double().T
    assert got.shape == (rows, n_out) and got.dtype == dtype
    assert _rel(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    # into a given output, a strided row view included
    buf = torch.zeros(rows, n_out + 3, dtype=dtype, device=DEV)
    dense_gemv(x, w, out=buf[:, :n_out], tiles=tiles)
    assert torch.equal(buf[:, :n_out], got) and not buf[:, n_out:].any()


def test_dense_gemv_refuses_bad_input():
    from larosa.kernels.triton_dense import dense_gemv

    x = torch.randn(1, 64, device=DEV)
    w = torch.randn(8, 64, device=DEV)
    with pytest.raises(ValueError, match="expected"):
        dense_gemv(x, w[:, :32])
    with pytest.raises(ValueError, match="contiguous"):
        dense_gemv(x, w.T.contiguous().T)
    for tiles in ((3, 64, 2), (4, 8, 2), (4, 64, 3), (4, 64, 2, 3), (4, 64), (4, 64, 2, 4, 1)):
        with pytest.raises(ValueError, match="tiles"):
            dense_gemv(x, w, tiles=tiles)
    with pytest.raises(ValueError, match="out"):
        dense_gemv(x, w, out=torch.empty(1, 9, device=DEV))
    with pytest.raises(ValueError, match="w_up"):
        dense_gemv(x, w, w_up=w[:4])
    with pytest.raises(ValueError, match="bias is not supported"):
        dense_gemv(x, w, w_up=w, bias=torch.zeros(8, device=DEV))
    with pytest.raises(ValueError, match="norm_w"):
        dense_gemv(x, w, norm_w=torch.ones(63, device=DEV))
    with pytest.raises(ValueError, match="bias"):
        dense_gemv(x, w, bias=torch.ones(9, device=DEV))
    with pytest.raises(ValueError, match="residual"):
        dense_gemv(x, w, residual=torch.ones(1, 9, device=DEV))


def test_dense_pdl_switch(monkeypatch):
    """`LAROSA_DENSE_PDL` (v28 diagnostic) and `pdl=`: what the launch asks `_use_pdl` for (PDL itself never runs
    under the interpreter: it only changes the launch), and the same product either way; bad values refused."""
    from larosa.kernels import triton_dense
    from larosa.kernels.triton_dense import dense_gemv

    asked = []
    real = triton_dense._use_pdl
    monkeypatch.setattr(triton_dense, "_use_pdl", lambda x, p: (asked.append(p), real(x, p))[1])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 96, generator=gen).to(DEV)
    w = torch.randn(8, 96, generator=gen).to(DEV)
    monkeypatch.delenv("LAROSA_DENSE_PDL", raising=False)
    want = dense_gemv(x, w, tiles=(4, 32, 2))
    assert _rel(want, x.double() @ w.double().T) < 1e-5
    for mode, pdl, expect in (("1", None, None), ("0", None, False), ("noprefetch", None, None), ("0", True, True),
                              ("1", False, False)):
        monkeypatch.setenv("LAROSA_DENSE_PDL", mode)
        asked.clear()
        assert torch.equal(dense_gemv(x, w, tiles=(4, 32, 2), pdl=pdl), want)
        assert asked == [expect], (mode, pdl)
    monkeypatch.setenv("LAROSA_DENSE_PDL", "off")
    with pytest.raises(ValueError, match="LAROSA_DENSE_PDL"):
        dense_gemv(x, w)


def test_dense_tiles_by_site(monkeypatch):
    """Each decode-step shape maps to its site, and `LAROSA_DENSE_TILES` sets every site ("BN,BK,STAGES,WARPS",
    gate/up's BN halved: its programs read BN rows of each matrix) or the named ones; bad specs are refused."""
    from larosa.kernels import ops
    from larosa.kernels.triton_dense import SITE_TILES, dense_tiles, site_tiles
    from larosa.kernels.triton_gemv import DECODE_SITES, decode_site

    shapes = {(4096, 12288, False): "qkv", (4096, 4096, False): "o", (4096, 11008, True): "gate_up",
              (11008, 4096, False): "down", (4096, 32000, False): "head", (4096, 6144, False): "qkv",
              (14336, 4096, False): "down", (4096, 128256, False): "head", (3584, 4608, False): "qkv"}
    assert {k: decode_site(*k) for k in shapes} == shapes
    monkeypatch.delenv("LAROSA_DENSE_TILES", raising=False)
    assert site_tiles() == SITE_TILES and set(SITE_TILES) == set(DECODE_SITES)
    assert ops.dense_tiles() == SITE_TILES
    assert dense_tiles(11008, 4096) == SITE_TILES["down"]
    monkeypatch.setenv("LAROSA_DENSE_TILES", "8,256,2,2")
    assert site_tiles() == {s: (4 if s == "gate_up" else 8, 256, 2, 2) for s in DECODE_SITES}
    monkeypatch.setenv("LAROSA_DENSE_TILES", "down=16,256,2,4; gate_up=8,128,1,8")
    assert dense_tiles(11008, 4096) == (16, 256, 2, 4) and dense_tiles(4096, 11008, True) == (8, 128, 1, 8)
    assert dense_tiles(4096, 4096) == SITE_TILES["o"]
    for bad, msg in (("8,256,2", "BN,BK,STAGES,WARPS"), ("mlp=8,256,2,2", "unknown site"),
                     ("down=8,256", "BN,BK,STAGES,WARPS"), ("down=8,a,2,2", "BN,BK,STAGES,WARPS")):
        monkeypatch.setenv("LAROSA_DENSE_TILES", bad)
        with pytest.raises(ValueError, match=msg):
            site_tiles()


def _block_fp64(x, w, w_up, bias, res, g, eps):
    """The block in fp64 without intermediate roundings (what the kernel computes before its one rounding)."""
    x, w = x.double(), w.double()
    h = x if g is None else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g.double()
    y = h @ w.T
    if bias is not None:
        y = y + bias.double()
    if w_up is not None:
        y = torch.nn.functional.silu(y) * (h @ w_up.double().T)
    return y if res is None else y + res.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("parts", ["norm", "norm+bias", "res", "gate_up", "gate_up+res", "norm+bias+res",
                                   "gate_up+folded", "folded+bias"])
@pytest.mark.parametrize("rows,d,n_out,tiles", [(1, 300, 37, (2, 64, 2, 2)), (2, 256, 16, (1, 128, 2, 4)),
                                                (1, 96, 7, (4, 32, 1, 1))])
def test_dense_gemv_block_parts(dtype, parts, rows, d, n_out, tiles):
    """The norm prologue (sums of squares over several steps and a partial last tile), bias, SiLU * up and
    residual epilogues against the fp64 block: within the dtype's rounding."""
    from larosa.kernels.triton_dense import dense_gemv

    gen = torch.Generator().manual_seed(rows * d + n_out)
    x = (torch.randn(rows, d, generator=gen) * 3).to(DEV, dtype)
    w = (torch.randn(n_out, d, generator=gen) * d ** -0.5).to(DEV, dtype)
    w_up = (torch.randn(n_out, d, generator=gen) * d ** -0.5).to(DEV, dtype) if "gate_up" in parts else None
    bias = torch.randn(n_out, generator=gen).to(DEV, dtype) if "bias" in parts else None
    res = torch.randn(rows, n_out, generator=gen).to(DEV, dtype) if "res" in parts else None
    g = (1 + torch.rand(d, generator=gen)).to(DEV, dtype) if "norm" in parts or "gate_up" in parts else None
    kw = {"w_up": w_up, "norm_w": g}
    if "folded" in parts:  # the norm weight folded into w's columns by the caller: only the rms scaling here
        g = (1 + torch.rand(d, generator=gen)).to(DEV, dtype)
        w = (w.double() * g.double()).to(dtype)
        w_up = None if w_up is None else (w_up.double() * g.double()).to(dtype)
        kw = {"w_up": w_up, "rms": True}
    got = dense_gemv(x, w, tiles=tiles, bias=bias, residual=res, eps=1e-5, **kw)
    ones = torch.ones(d, device=DEV, dtype=dtype) if "folded" in parts else g
    want = _block_fp64(x, w, w_up, bias, res, ones, 1e-5)
    assert got.shape == (rows, n_out) and got.dtype == dtype
    assert _rel(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    if dtype == torch.bfloat16:  # one rounding of the fp32 result: nearly every output within one bf16 ulp
        ulp = want.abs().clamp_min(1e-30) * 2.0 ** -7
        assert ((got.double() - want).abs() <= ulp).double().mean() > 0.97


@pytest.mark.parametrize("parts", ["qkv", "o", "gate_up", "head", "head, norm weight of ones"])
def test_dense_linear_op_matches_hf_arithmetic(parts):
    """`larosa::dense_linear` (kernel: one row, bf16) within bf16 rounding of HF's arithmetic
    (`reference.dense_linear_ref`), and exactly it on the fallback paths (two rows, fp32); `rms` alone is a
    norm weight of ones."""
    from larosa.kernels.reference import dense_linear_ref

    gen = torch.Generator().manual_seed(len(parts))
    d, n = 192, 80
    x = torch.randn(2, 1, d, generator=gen)
    w = torch.randn(n, d, generator=gen) * d ** -0.5
    kw = {"qkv": dict(bias=torch.randn(n, generator=gen), norm_w=1 + torch.rand(d, generator=gen), eps=1e-6),
          "o": dict(residual=torch.randn(2, 1, n, generator=gen)),
          "gate_up": dict(w_up=torch.randn(n, d, generator=gen) * d ** -0.5, norm_w=1 + torch.rand(d, generator=gen),
                          eps=1e-6),
          "head": dict(norm_w=1 + torch.rand(d, generator=gen), eps=1e-5),
          "head, norm weight of ones": dict(rms=True, eps=1e-5)}[parts]
    bf = {k: v.to(DEV, torch.bfloat16) if torch.is_tensor(v) else v for k, v in kw.items()}
    xb, wb = x.to(DEV, torch.bfloat16), w.to(DEV, torch.bfloat16)
    one = {k: v[:1] if k == "residual" else v for k, v in bf.items()}
    got = torch.ops.larosa.dense_linear(xb[:1], wb, one.get("w_up"), one.get("bias"), one.get("residual"),
                                        one.get("norm_w"), one.get("eps", 0.0), one.get("rms", False))
    want = dense_linear_ref(xb[:1], wb, **one)
    if parts.endswith("ones"):  # the same as an explicit norm weight of ones
        assert torch.equal(want, dense_linear_ref(xb[:1], wb, norm_w=torch.ones(d, device=DEV, dtype=wb.dtype),
                                                  eps=1e-5))
    assert got.shape == want.shape == (1, 1, n)
    assert _rel(got, want) < 1e-2
    in_order = torch.ops.larosa.dense_linear(xb[:1], wb, one.get("w_up"), one.get("bias"), one.get("residual"),
                                             one.get("norm_w"), one.get("eps", 0.0), one.get("rms", False), False)
    assert torch.equal(in_order, got)  # pdl=False (the engine's head beside Top-K sites) changes only the launch
    # (that the op hands pdl=False to the kernel: tests/test_engine.py::test_dense_kernel_engine_runs_the_kernel_bf16)
    for xx, ww, kk in ((xb, wb, bf), (x.to(DEV), w.to(DEV), {k: v.to(DEV) if torch.is_tensor(v) else v
                                                               for k, v in kw.items()})):
        got = torch.ops.larosa.dense_linear(xx, ww, kk.get("w_up"), kk.get("bias"), kk.get("residual"),
                                            kk.get("norm_w"), kk.get("eps", 0.0), kk.get("rms", False))
        assert torch.equal(got, dense_linear_ref(xx, ww, **kk))
