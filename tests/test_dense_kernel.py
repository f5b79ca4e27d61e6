"""The experimental dense GEMV (`triton_dense.dense_gemv`) vs fp64 matmul: compiled on a GPU, under
TRITON_INTERPRET=1 on the CPU (tests/conftest.py)."""

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
    for tiles in ((3, 64, 2), (4, 8, 2), (4, 64, 3)):
        with pytest.raises(ValueError, match="tiles"):
            dense_gemv(x, w, tiles=tiles)
    with pytest.raises(ValueError, match="out"):
        dense_gemv(x, w, out=torch.empty(1, 9, device=DEV))
