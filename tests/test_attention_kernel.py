"""The split-cache decode attention kernel vs the PyTorch reference (sdpa with a position mask):
compiled on a GPU, under TRITON_INTERPRET=1 on the CPU (tests/conftest.py)."""

import pytest
import torch

from larosa.kernels import HAVE_TRITON, ops
from larosa.kernels.reference import decode_attention_ref, rope_decode_attention_ref

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(b, kvh, g, hd, L, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, kvh, g, hd, generator=gen).to(DEV, dtype)
    kc = torch.randn(b, kvh, L, hd, generator=gen).to(DEV, dtype)
    vc = torch.randn(b, kvh, L, hd, generator=gen).to(DEV, dtype)
    return q, kc, vc


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,kvh,g,hd,L,pos", [(1, 2, 1, 64, 200, 0), (1, 2, 4, 64, 200, 130), (2, 1, 3, 32, 70, 69),
                                              (1, 3, 2, 128, 129, 64), (1, 1, 8, 16, 1000, 999)])
def test_decode_attention_matches_reference(dtype, b, kvh, g, hd, L, pos):
    q, kc, vc = _case(b, kvh, g, hd, L, dtype)
    p = torch.tensor([pos], device=DEV)
    scale = hd ** -0.5
    got = ops.triton_attention.decode_attention(q, kc, vc, p, scale)
    want = decode_attention_ref(q.double(), kc.double(), vc.double(), p, scale)
    assert got.shape == q.shape and got.dtype == dtype
    # 16-bit inputs, fp32 accumulation, probabilities rounded to 16 bits before the value product
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    # positions after pos are never read: garbage there changes nothing
    kc[:, :, pos + 1:] = float("nan")
    vc[:, :, pos + 1:] = float("nan")
    assert torch.equal(ops.triton_attention.decode_attention(q, kc, vc, p, scale), got)


def test_decode_attention_op_dispatch(monkeypatch):
    q, kc, vc = _case(1, 2, 2, 64, 96, torch.bfloat16)
    p = torch.tensor([40], device=DEV)
    calls = []
    real = ops.triton_attention.decode_attention
    monkeypatch.setattr(ops.triton_attention, "decode_attention", lambda *a: (calls.append(1), real(*a))[1])
    y = torch.ops.larosa.decode_attention(q, kc, vc, p, 0.125)
    assert calls == [1]
    exact = decode_attention_ref(q.double(), kc.double(), vc.double(), p, 0.125)  # fp64, same 16-bit inputs
    torch.testing.assert_close(y.double(), exact, atol=2e-2, rtol=2e-2)
    monkeypatch.setenv("LAROSA_ATTENTION", "sdpa")
    torch.testing.assert_close(torch.ops.larosa.decode_attention(q, kc, vc, p, 0.125), y, atol=2e-2, rtol=2e-2)
    assert calls == [1]
    # fp32 and head sizes that are not a power of two take the reference
    q32, k32, v32 = (t.float() for t in (q, kc, vc))
    y32 = torch.ops.larosa.decode_attention(q32, k32, v32, p, 0.125)
    assert y32.is_contiguous()  # as the fake implementation promises the compiler
    assert y32.shape == q.shape and y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), exact, atol=1e-5, rtol=1e-5)  # fp32 inputs exact in fp64
    y48 = torch.ops.larosa.decode_attention(q[..., :48], kc[..., :48], vc[..., :48], p, 0.125)
    assert y48.shape == q[..., :48].shape and y48.dtype == torch.bfloat16
    want48 = decode_attention_ref(q[..., :48].double(), kc[..., :48].double(), vc[..., :48].double(), p, 0.125)
    torch.testing.assert_close(y48.double(), want48, atol=2e-2, rtol=2e-2)
    assert calls == [1]
    monkeypatch.setenv("LAROSA_ATTENTION", "flash")
    for args in ((q, kc, vc), (q32, k32, v32)):  # refused on the kernel path and on the reference path
        with pytest.raises(ValueError, match="LAROSA_ATTENTION"):
            torch.ops.larosa.decode_attention(*args, p, 0.125)
    with pytest.raises(ValueError, match="expected"):
        torch.ops.larosa.decode_attention(q, kc[:, :1], vc[:, :1], p, 0.125)


def test_split_plan_covers_the_cache(monkeypatch):
    """Every plan covers the cache in chunks of whole blocks; LAROSA_ATTN_PROGRAMS (checked) sets how many
    programs it aims at: more programs, more and shorter splits (never shorter than a block)."""
    for programs in (None, 64, 1024, 65536):
        for b, kvh, L in [(1, 32, 320), (1, 8, 2048), (4, 8, 64), (1, 1, 5000), (1, 32, 2176)]:
            n, chunk = ops.triton_attention.plan(b, kvh, L, programs)
            assert n * chunk >= L > (n - 1) * chunk and chunk % ops.triton_attention.BLOCK_L == 0
    assert ops.triton_attention.plan(1, 32, 2176) == ops.triton_attention.plan(1, 32, 2176, 256) == (7, 320)
    assert ops.triton_attention.plan(1, 32, 2176, 1024) == (17, 128)
    monkeypatch.setenv("LAROSA_ATTN_PROGRAMS", "4096")
    assert ops.triton_attention.plan(1, 32, 2176) == (34, 64)
    for bad in ("0", "x", "100000"):
        monkeypatch.setenv("LAROSA_ATTN_PROGRAMS", bad)
        with pytest.raises(ValueError, match="LAROSA_ATTN_PROGRAMS"):
            ops.triton_attention.plan(1, 32, 2176)


@pytest.mark.parametrize("programs", ["1", "64", "4096"])
def test_decode_attention_any_split_count(monkeypatch, programs):
    """One split per KV head up to a block per split: the same attention (the combine takes every split)."""
    monkeypatch.setenv("LAROSA_ATTN_PROGRAMS", programs)
    q, kc, vc = _case(1, 2, 4, 64, 700, torch.bfloat16, seed=3)
    p = torch.tensor([650], device=DEV)
    want = decode_attention_ref(q.double(), kc.double(), vc.double(), p, 0.125)
    torch.testing.assert_close(ops.triton_attention.decode_attention(q, kc, vc, p, 0.125).double(), want,
                               atol=2e-2, rtol=2e-2)
    qkv, kc2, vc2, cos, sin = _rope_case(1, 2, 4, 64, 700, torch.bfloat16)
    cnt = torch.zeros(2, dtype=torch.int32, device=DEV)
    monkeypatch.setenv("LAROSA_ATTN_PROGRAMS", "256")
    k_ref, v_ref = kc2.clone(), vc2.clone()
    ref = ops.triton_attention.rope_decode_attention(qkv, k_ref, v_ref, p, cos, sin, 0.125)
    monkeypatch.setenv("LAROSA_ATTN_PROGRAMS", programs)
    got = torch.ops.larosa.rope_decode_attention(qkv, kc2, vc2, p, cos, sin, 0.125, cnt)
    torch.testing.assert_close(got.double(), ref.double(), atol=2e-2, rtol=2e-2)
    assert torch.equal(kc2, k_ref) and torch.equal(vc2, v_ref) and not cnt.any()



@pytest.mark.parametrize("pos", [0, 63, 64, 300, 511, 699])
def test_balanced_splits_divide_the_filled_positions(monkeypatch, pos):
    """LAROSA_ATTN_BALANCED=1 (v24): the splits divide positions 0..pos at run time instead of the cache. Same
    attention as the reference, the new key and value written at pos as with the cache-wide splits (RoPE form),
    positions past pos never read, the combine's counters left zeroed; a malformed value is refused."""
    monkeypatch.setenv("LAROSA_ATTN_PROGRAMS", "16")  # 6 splits of at most 128 positions over a 700-position cache
    assert ops.triton_attention.plan(1, 2, 700) == (6, 128)
    monkeypatch.setenv("LAROSA_ATTN_BALANCED", "1")
    assert ops.triton_attention.balanced() and ops.attention_balanced()
    q, kc, vc = _case(1, 2, 4, 64, 700, torch.bfloat16, seed=4)
    kc[:, :, pos + 1:] = float("nan")
    vc[:, :, pos + 1:] = float("nan")
    p = torch.tensor([pos], device=DEV)
    want = decode_attention_ref(q.double(), kc[:, :, :pos + 1].double(), vc[:, :, :pos + 1].double(), p, 0.125)
    torch.testing.assert_close(ops.triton_attention.decode_attention(q, kc, vc, p, 0.125).double(), want,
                               atol=2e-2, rtol=2e-2)
    kc2 = _rope_same_with(monkeypatch, "LAROSA_ATTN_BALANCED", "0", "1", 700, p, seed=5)
    assert not torch.equal(kc2[:, :, pos], _rope_case(1, 2, 4, 64, 700, torch.bfloat16, seed=5)[1][:, :, pos])
    monkeypatch.setenv("LAROSA_ATTN_BALANCED", "yes")
    with pytest.raises(ValueError, match="LAROSA_ATTN_BALANCED"):
        ops.triton_attention.decode_attention(q, kc, vc, p, 0.125)


def _rope_same_with(monkeypatch, var: str, base: str, new: str, L: int, p, seed: int):
    """The RoPE form (one batch row, 2 KV heads of 4 query heads, head dim 64, an L-position cache) with `var`=new,
    combined by its last program, against the same call with `var`=base: the same attention and the same caches
    written, the counters left zeroed. Returns the key cache written."""
    qkv, kc, vc, cos, sin = _rope_case(1, 2, 4, 64, L, torch.bfloat16, seed=seed)
    monkeypatch.setenv(var, base)
    k_ref, v_ref = kc.clone(), vc.clone()
    ref = ops.triton_attention.rope_decode_attention(qkv, k_ref, v_ref, p, cos, sin, 0.125)
    monkeypatch.setenv(var, new)
    cnt = torch.zeros(2, dtype=torch.int32, device=DEV)
    got = ops.triton_attention.rope_decode_attention(qkv, kc, vc, p, cos, sin, 0.125, counters=cnt)
    torch.testing.assert_close(got.double(), ref.double(), atol=2e-2, rtol=2e-2)
    assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref) and not cnt.any()
    return kc


def _rope_case(b, kvh, g, hd, L, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, (kvh * g + 2 * kvh) * hd, generator=gen).to(DEV, dtype)
    kc = torch.randn(b, kvh, L, hd, generator=gen).to(DEV, dtype)
    vc = torch.randn(b, kvh, L, hd, generator=gen).to(DEV, dtype)
    ang = torch.rand(hd // 2, generator=gen) * 6.0
    cos, sin = torch.cat([ang.cos()] * 2).to(DEV, dtype), torch.cat([ang.sin()] * 2).to(DEV, dtype)
    return qkv, kc, vc, cos, sin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,kvh,g,hd,L,pos", [(1, 2, 1, 64, 200, 0), (1, 2, 4, 64, 200, 130), (2, 1, 3, 32, 70, 69),
                                              (1, 3, 2, 128, 129, 64), (1, 1, 8, 16, 1000, 999), (1, 2, 2, 64, 300, 255)])
def test_rope_decode_attention_matches_reference(dtype, b, kvh, g, hd, L, pos):
    """RoPE, the cache write and attention in one launch: the same caches as the reference (k within one
    rounding of the fp32 rotation, v exact, every other position untouched) and the same output."""
    from larosa.kernels.reference import rope_decode_attention_ref

    qkv, kc, vc, cos, sin = _rope_case(b, kvh, g, hd, L, dtype)
    p = torch.tensor([pos], device=DEV)
    scale = hd ** -0.5
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = rope_decode_attention_ref(qkv, kc_ref, vc_ref, p, cos, sin, scale)
    got = ops.triton_attention.rope_decode_attention(qkv, kc, vc, p, cos, sin, scale)
    assert got.shape == (b, kvh, g, hd) and got.dtype == dtype
    others = torch.arange(L, device=DEV) != pos
    assert torch.equal(kc[:, :, others], kc_ref[:, :, others]) and torch.equal(vc, vc_ref)
    torch.testing.assert_close(kc[:, :, pos].double(), kc_ref[:, :, pos].double(), atol=2e-2, rtol=1e-2)
    # against fp64 attention on the written caches, and against the reference op
    exact = decode_attention_ref(_rotated_q(qkv, kvh, g, hd, cos, sin), kc.double(), vc.double(), p, scale)
    torch.testing.assert_close(got.double(), exact, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.double(), want.double(), atol=3e-2, rtol=3e-2)


def _rotated_q(qkv, kvh, g, hd, cos, sin):
    """q of the fused op in fp64: rotate-half RoPE of the q heads, (B, KVH, G, HD)."""
    q = qkv.double()[:, : kvh * g * hd].view(qkv.shape[0], kvh, g, hd)
    rot = torch.cat((-q[..., hd // 2:], q[..., : hd // 2]), dim=-1)
    return q * cos.double() + rot * sin.double()


def test_rope_decode_attention_op(monkeypatch):
    """The op runs the kernel on the kernel path and the reference elsewhere (fp32, LAROSA_ATTENTION=sdpa),
    both writing the caches; bad shapes are refused."""
    qkv, kc, vc, cos, sin = _rope_case(1, 2, 2, 64, 96, torch.bfloat16)
    p = torch.tensor([40], device=DEV)
    calls = []
    real = ops.triton_attention.rope_decode_attention
    monkeypatch.setattr(ops.triton_attention, "rope_decode_attention", lambda *a: (calls.append(1), real(*a))[1])
    k1, v1 = kc.clone(), vc.clone()
    y = torch.ops.larosa.rope_decode_attention(qkv, k1, v1, p, cos, sin, 0.125)
    assert calls == [1] and y.shape == (1, 2, 2, 64)
    monkeypatch.setenv("LAROSA_ATTENTION", "sdpa")
    k2, v2 = kc.clone(), vc.clone()
    torch.testing.assert_close(torch.ops.larosa.rope_decode_attention(qkv, k2, v2, p, cos, sin, 0.125), y,
                               atol=2e-2, rtol=2e-2)
    assert calls == [1] and torch.equal(v2, v1)
    torch.testing.assert_close(k2, k1, atol=2e-2, rtol=1e-2)
    assert not torch.equal(k2[:, :, 40], kc[:, :, 40])  # written
    monkeypatch.delenv("LAROSA_ATTENTION")
    k32, v32 = kc.float(), vc.float()
    y32 = torch.ops.larosa.rope_decode_attention(qkv.float(), k32, v32, p, cos.float(), sin.float(), 0.125)
    assert calls == [1] and y32.is_contiguous() and y32.dtype == torch.float32 and y32.shape == y.shape
    # the fp32 reference path: the reference op's output and caches, fp64 attention on them, and the kernel's y
    k32r, v32r = kc.float(), vc.float()
    want32 = rope_decode_attention_ref(qkv.float(), k32r, v32r, p, cos.float(), sin.float(), 0.125)
    assert torch.equal(k32, k32r) and torch.equal(v32, v32r) and not torch.equal(k32[:, :, 40], kc[:, :, 40].float())
    torch.testing.assert_close(y32, want32)
    exact = decode_attention_ref(_rotated_q(qkv, 2, 2, 64, cos, sin), k32.double(), v32.double(), p, 0.125)
    torch.testing.assert_close(y32.double(), exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y32, y.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="features"):
        torch.ops.larosa.rope_decode_attention(qkv[:, :100], kc, vc, p, cos, sin, 0.125)
    with pytest.raises(ValueError, match="cos/sin"):
        torch.ops.larosa.rope_decode_attention(qkv, kc, vc, p, cos[:32], sin, 0.125)
    with pytest.raises(ValueError, match="caches"):
        torch.ops.larosa.rope_decode_attention(qkv, kc, vc[:, :1], p, cos, sin, 0.125)


@pytest.mark.parametrize("b,kvh,g,hd,L,pos", [(1, 2, 4, 64, 200, 130), (2, 1, 3, 32, 70, 0), (1, 8, 4, 128, 320, 255)])
def test_rope_decode_attention_last_program_combines(b, kvh, g, hd, L, pos):
    """With `counters` the last split program of each KV head combines (no second launch): the same output
    and caches as the two-launch form, and the counters are left zeroed for the next call."""
    qkv, kc, vc, cos, sin = _rope_case(b, kvh, g, hd, L, torch.bfloat16)
    p = torch.tensor([pos], device=DEV)
    k2, v2 = kc.clone(), vc.clone()
    want = ops.triton_attention.rope_decode_attention(qkv, kc, vc, p, cos, sin, hd ** -0.5)
    cnt = torch.zeros(b * kvh + 3, dtype=torch.int32, device=DEV)
    for _ in range(2):  # twice: the counters must be reusable
        got = torch.ops.larosa.rope_decode_attention(qkv, k2, v2, p, cos, sin, hd ** -0.5, cnt)
        assert torch.equal(got, want) and torch.equal(k2, kc) and torch.equal(v2, vc)
        assert not cnt.any()
    with pytest.raises(ValueError, match="counters"):
        ops.triton_attention.rope_decode_attention(qkv, k2, v2, p, cos, sin, 0.1, cnt[: b * kvh - 1])


@pytest.mark.parametrize("pos", [0, 100, 299])
def test_values_loaded_with_keys_give_the_same_attention(monkeypatch, pos):
    """LAROSA_ATTN_V_EARLY=1 (v31): each block's values loaded before its scores. The same attention as the
    reference, in both forms (the RoPE form writing the new key and value and combining by its last program, with
    the splits over several blocks each), the same caches as the default order; a malformed value is refused."""
    monkeypatch.setenv("LAROSA_ATTN_PROGRAMS", "4")  # two splits of up to 192 positions: loops of several blocks
    monkeypatch.setenv("LAROSA_ATTN_V_EARLY", "1")
    assert ops.triton_attention.v_early() and ops.attention_v_early()
    q, kc, vc = _case(1, 2, 4, 64, 300, torch.bfloat16, seed=6)
    p = torch.tensor([pos], device=DEV)
    want = decode_attention_ref(q.double(), kc[:, :, :pos + 1].double(), vc[:, :, :pos + 1].double(), p, 0.125)
    torch.testing.assert_close(ops.triton_attention.decode_attention(q, kc, vc, p, 0.125).double(), want,
                               atol=2e-2, rtol=2e-2)
    _rope_same_with(monkeypatch, "LAROSA_ATTN_V_EARLY", "0", "1", 300, p, seed=7)
    monkeypatch.setenv("LAROSA_ATTN_V_EARLY", "yes")
    with pytest.raises(ValueError, match="LAROSA_ATTN_V_EARLY"):
        ops.triton_attention.decode_attention(q, kc, vc, p, 0.125)
