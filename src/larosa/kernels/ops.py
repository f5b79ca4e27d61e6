"""`torch.library` custom ops around the Triton kernels, with fake implementations.

    torch.ops.larosa.topk_linear(x, wt, k, bias, residual=r)
                                                         y = TopK_k(x) @ wt (+ bias) (+ r)
    torch.ops.larosa.topk_gate_up(x, wt_gate, wt_up, k)  h = silu(TopK_k(x) @ wt_gate) * (TopK_k(x) @ wt_up)
    torch.ops.larosa.spec_linear(x, wblk, k, r, bias, hint)
                                                         y = TopK_k(x) @ wt (+ bias) + r, the speculative GEMV
                                                         on W^T in its blocked layout (`triton_spec.spec_layout`)
    torch.ops.larosa.threshold_linear(x, wt, t)          y = (x * (|x| > t)) @ wt   (TEAL-style baseline)
    torch.ops.larosa.rmsnorm_topk(x, res, g, eps, wt, wt_up, k, bias)
                                                         the block input's RMSNorm with the select folded in
    torch.ops.larosa.rmsnorm_topk_side(x, g, eps, wt, wt_up, k, w, c)
                                                         ... and r = x @ w[:c].T in the same launch
    torch.ops.larosa.topk_linear_side(x, wt, k, a, w, prev)
                                                         TopK_k(x) @ wt, and r = a @ w.T (first columns: prev)
    torch.ops.larosa.dense_linear(x, w, w_up, bias, residual, norm_w, eps, rms)
                                                         y = RMSNorm(x) @ w.T (+ bias) (+ residual), or
                                                         silu(. @ w.T) * (. @ w_up.T): dense decode sites
    torch.ops.larosa.decode_attention(q, kc, vc, pos, s) one position against cache positions 0..pos
    torch.ops.larosa.rope_decode_attention(qkv, kc, vc, pos, cos, sin, s, counters)  the same from the q/k/v output:
                                                   RoPE and the cache write in the same launch

The side GEMVs' weights w are output-major (F.linear's layout, d_out x d_in), unlike `wt`.

Each takes an optional `counters`: a zeroed int32 buffer owned by the caller (a decode engine), used by
the kernels for their per-column-block counters (and the tile kernel's fp32 sums) and left zeroed;
without it every call allocates a zeroed buffer (one memset launch). It does not change what is computed.
The Top-K ops also take an optional `hint`: an int32 slot per row, owned by the caller, one per call site,
where the select kernel keeps the row's last threshold and searches near it first (`triton_gemv.select`).
It too changes only the time, never the result, which is why the ops do not declare it mutated (declared,
torch.compile would functionalise it: copies every step); tests/test_engine_gpu.py checks that the
captured graph's selects do write the engine's hint buffers. `hist_out` (gate/up ops) and `hist` (`topk_linear`,
`topk_linear_side`) are the same kind of buffer (v30): a histogram of the gate/up output that its GEMV counts and the
down select uses up; like the hint they change only the time (tests/test_hist_select.py).

`wt` is the weight stored input-major (W^T, shape d_in x d_out, contiguous). x may have any leading
shape; rows are flattened. Up to `max_kernel_rows()` rows run the Triton kernel with per-row selection;
more rows (prefill) take the exact same selection in PyTorch followed by a dense cuBLAS matmul, which
is faster there (see benchmarks/NOTES.md for the measured crossover). fp32 inputs and devices where
Triton cannot run use the PyTorch reference. Every path computes the same function.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from . import reference as ref

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton missing or broken (a broken install can raise more than ImportError)
    HAVE_TRITON = False
if HAVE_TRITON:  # our own kernel modules: an error in them must surface, not turn the kernels off
    from . import triton_attention, triton_dense, triton_gemv, triton_prefetch, triton_spec

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_IMPLS = triton_gemv.IMPLS if HAVE_TRITON else ()  # without Triton no kernel runs: `impl` is not checked
_DEFAULT_MAX_ROWS = 1  # measured crossover on the H200: see benchmarks/NOTES.md


def side_placement(kernel: Optional[str] = None) -> dict | None:
    """Where a side GEMV given to the Top-K ops with GEMV kernel `kernel` rides and its tiles
    (`triton_gemv.side_in`, `side_config`: the tile and gathered kernels carry it where `side_in()` says, the
    split-K kernel leaves it to its select); None without Triton. Benchmark rows record it."""
    if not HAVE_TRITON:
        return None
    where = "gemv" if kernel is not None and triton_gemv.side_in_gemv(kernel) else "select"
    return {"side_in": where, "side_tiles": triton_gemv.side_config(gemv=where == "gemv")}


def compact_store() -> Optional[str]:
    """How the compacting selects store the kept list (`triton_gemv.compact_store`); None without Triton.
    Benchmark rows record it."""
    return triton_gemv.compact_store() if HAVE_TRITON else None


def gather_x() -> Optional[Union[bool, int]]:
    """Whether the gathered-rows path's kept lists carry x, or up to which row width (`triton_gemv.gather_x_setting`);
    None without Triton."""
    return triton_gemv.gather_x_setting() if HAVE_TRITON else None


def select_loop_from() -> Optional[int]:
    """The row width (BLOCK_D) from which the packed selects search in a run-time loop (`triton_gemv.select_dyn`,
    v30); 1 = everywhere, 0 = nowhere; None without Triton. Benchmark rows record it."""
    return triton_gemv.select_dyn_from() if HAVE_TRITON else None


def prefetch_mb(device: torch.device) -> float:
    """The L2 prefetch budget of the hinted selects on `device`, MiB per launch (`triton_prefetch.prefetch_mb`,
    checked wherever it is set); 0 where no prefetch runs: without Triton, under the interpreter, off CUDA or
    below compute capability 9 (no bulk prefetch)."""
    if not HAVE_TRITON:
        return 0.0
    mb = triton_prefetch.prefetch_mb()  # checked first: a malformed budget is refused on every device
    return mb if triton_prefetch.can_prefetch(device) else 0.0


def dense_tiles() -> Optional[dict]:
    """The dense GEMV's tiles by site (`triton_dense.site_tiles`); None without Triton. Benchmark rows record
    them."""
    return triton_dense.site_tiles() if HAVE_TRITON else None


def max_kernel_rows() -> int:
    """Rows up to which the Top-K GEMV kernels run (more rows: exact selection + one dense matmul);
    `LAROSA_KERNEL_MAX_ROWS` (an integer >= 0) overrides the measured default."""
    raw = os.environ.get("LAROSA_KERNEL_MAX_ROWS", str(_DEFAULT_MAX_ROWS))
    if not raw.strip().isdigit():
        raise ValueError(f"LAROSA_KERNEL_MAX_ROWS={raw!r}: use an integer >= 0")
    return int(raw)


def _use_kernel(x: torch.Tensor, rows: int) -> bool:
    if not HAVE_TRITON or x.dtype not in KERNEL_DTYPES or rows > max_kernel_rows():
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def select_mask(x2: torch.Tensor, k: int) -> torch.Tensor:
    """Exact-k keep mask of 2-D x: the Triton select kernel where it runs, else the reference."""
    if HAVE_TRITON and x2.dtype in KERNEL_DTYPES and (x2.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        sel = triton_gemv.select(x2, k)
        bits = x2.view(torch.int16).to(torch.int32) & 0x7FFF
        idx = torch.arange(x2.shape[1], device=x2.device)
        t, cut = sel[:, :1], sel[:, 1:]
        return (bits > t) | ((bits == t) & (idx < cut))
    return ref.topk_keep_mask(x2, k)


def _dense_fallback(x2, wt, k, bias):
    """Many rows (prefill): the same exact selection, then one dense cuBLAS matmul."""
    xs = torch.where(select_mask(x2, k), x2, torch.zeros_like(x2))
    return xs @ wt if bias is None else torch.addmm(bias, xs, wt)


def _check(x: torch.Tensor, wt: torch.Tensor, k: int, impl: Optional[str] = None) -> None:
    if wt.dim() != 2 or x.shape[-1] != wt.shape[0]:
        raise ValueError(f"x (..., {x.shape[-1]}) does not match wt {tuple(wt.shape)} (expected d_in x d_out)")
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    if impl is not None and HAVE_TRITON and impl not in KERNEL_IMPLS:  # on every path, the reference ones too
        raise ValueError(f"unknown kernel implementation {impl!r}; choose from {', '.join(KERNEL_IMPLS)}")


def counter_workspace(rows: int, d_out: int, device=None) -> torch.Tensor:
    """A zeroed int32 workspace for `counters=`: large enough for `rows` rows of outputs up to `d_out`
    wide under every default tile (the smallest block_n is 32), the atomic reduction's fp32 sums of a
    gated op included. Without Triton no kernel runs: an empty buffer."""
    need = triton_gemv.tile_workspace_needed(rows, d_out, gated=True, block_n=32) if HAVE_TRITON else 0
    return torch.zeros(need, dtype=torch.int32, device=device)


def _counters(counters: Optional[torch.Tensor], x2: torch.Tensor, wt: torch.Tensor,
              gated: bool = False, mode: int = 0, alloc: bool = False, impl: Optional[str] = None,
              k: Optional[int] = None) -> Optional[torch.Tensor]:
    """The caller's zeroed buffer if it is large enough for this call (kernel `impl`, k kept), else None
    (the kernel then allocates its own: one memset per call), or with `alloc` a fresh zeroed one right away."""
    need = triton_gemv.counters_needed(x2.shape[0], wt.shape[0], wt.shape[1], gated, mode=mode, impl=impl, k=k)
    if counters is None or counters.numel() < need:
        return torch.zeros(need, dtype=torch.int32, device=x2.device) if alloc else None
    return counters


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


@torch.library.custom_op("larosa::topk_linear", mutates_args=())
def topk_linear(x: torch.Tensor, wt: torch.Tensor, k: int, bias: Optional[torch.Tensor] = None,
                counters: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                hint: Optional[torch.Tensor] = None, impl: Optional[str] = None,
                hist: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`residual` (x's leading shape, d_out): y = residual + TopK_k(x) @ wt (+ bias), added in fp32 before the
    one rounding where the kernel runs (the residual add of a decoder layer folded into the GEMV).
    `impl`: the kernel implementation (`triton_gemv.IMPLS`; None = the package default), as in the other
    Top-K ops. `hist` (v30): x's histogram as the op that wrote x counted it (`hist_out` of `topk_gate_up`,
    `rmsnorm_topk`), for the select; like `hint` it changes the time only (see the module's notes)."""
    _check(x, wt, k, impl)
    out_shape = (*x.shape[:-1], wt.shape[1])
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match the output {out_shape}")
    x2 = _rows(x)
    r2 = None if residual is None else residual.reshape(-1, wt.shape[1]).contiguous()
    if k >= x.shape[-1] and x.is_cuda:  # nothing to skip: cuBLAS
        y = x2 @ wt if bias is None else torch.addmm(bias, x2, wt)
        return (y if r2 is None else y + r2).view(out_shape)
    if k < x.shape[-1] and x.is_cuda and x.dtype in KERNEL_DTYPES and x2.shape[0] > max_kernel_rows():
        y = _dense_fallback(x2, wt, k, bias)
        return (y if r2 is None else y + r2).view(out_shape)
    if k >= x.shape[-1] or not _use_kernel(x2, x2.shape[0]):
        return ref.topk_gemv_ref(x2, wt, k, bias, r2).view(out_shape)
    return _launch_topk(x2, wt, k, bias, counters, r2, hint, impl, hist=hist).view(out_shape)


def _hist_kw(impl: Optional[str], d_in: int, k: int, **bufs) -> dict:
    """The histogram buffers (`hist` / `hist_out`) for `triton_gemv.launch` where the kernel it resolves to takes
    them (tile, gathered); elsewhere they are left out (the select then searches without: the same result)."""
    if all(v is None for v in bufs.values()) or triton_gemv.resolve_impl(impl, 0, d_in, k) not in ("tile", "gtile"):
        return {}
    return {n: v for n, v in bufs.items() if v is not None}


def _launch_topk(x2, wt, k, bias, counters, r2, hint, impl, side=None, hist=None) -> torch.Tensor:
    """The Triton Top-K GEMV of rows x2 (the kernel path of `topk_linear`; `side`: a `triton_gemv.SideGemv`
    carried by its launches, `triton_gemv.launch`)."""
    y = torch.empty(x2.shape[0], wt.shape[1], dtype=x2.dtype, device=x2.device)
    triton_gemv.launch(x2, wt.contiguous(), y, k, bias=bias, counters=_counters(counters, x2, wt, impl=impl, k=k),
                       residual=r2, hint=hint, impl=impl, side=side, **_hist_kw(impl, x2.shape[1], k, hist=hist))
    return y


@topk_linear.register_fake
def _(x, wt, k, bias=None, counters=None, residual=None, hint=None, impl=None, hist=None):
    return x.new_empty(*x.shape[:-1], wt.shape[1])


@torch.library.custom_op("larosa::topk_gate_up", mutates_args=())
def topk_gate_up(x: torch.Tensor, wt_gate: torch.Tensor, wt_up: torch.Tensor, k: int,
                 counters: Optional[torch.Tensor] = None, hint: Optional[torch.Tensor] = None,
                 impl: Optional[str] = None, hist_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(TopK_k(x) @ wt_gate) * (TopK_k(x) @ wt_up). `hist_out` (v30): a zeroed int32 buffer of
    `triton_gemv.hist_bins()` per row, into which the kernel counts the output for the next op's select (its
    `hist`); where the tile / gathered kernels do not run it is left alone. Speed only, like `hint`."""
    _check(x, wt_gate, k, impl)
    if wt_up.shape != wt_gate.shape:
        raise ValueError(f"gate {tuple(wt_gate.shape)} and up {tuple(wt_up.shape)} weights differ in shape")
    x2 = _rows(x)
    if not _use_kernel(x2, x2.shape[0]):
        return ref.topk_gate_up_ref(x2, wt_gate, wt_up, k).view(*x.shape[:-1], wt_gate.shape[1])
    y = torch.empty(x2.shape[0], wt_gate.shape[1], dtype=x.dtype, device=x.device)
    kk = min(k, x.shape[-1])
    mode, impl = (0, impl) if kk < x.shape[-1] else (2, None)
    triton_gemv.launch(x2, wt_gate.contiguous(), y, kk, wt2=wt_up.contiguous(), mode=mode, impl=impl,
                       counters=_counters(counters, x2, wt_gate, gated=True, mode=mode, impl=impl, k=kk), hint=hint,
                       **(_hist_kw(impl, x2.shape[1], kk, hist_out=hist_out) if mode == 0 else {}))
    return y.view(*x.shape[:-1], wt_gate.shape[1])


@topk_gate_up.register_fake
def _(x, wt_gate, wt_up, k, counters=None, hint=None, impl=None, hist_out=None):
    return x.new_empty(*x.shape[:-1], wt_gate.shape[1])


@torch.library.custom_op("larosa::rmsnorm_topk", mutates_args=())
def rmsnorm_topk(x: torch.Tensor, res: Optional[torch.Tensor], norm_w: torch.Tensor, eps: float,
                 wt: torch.Tensor, wt_up: Optional[torch.Tensor], k: int, bias: Optional[torch.Tensor] = None,
                 counters: Optional[torch.Tensor] = None, hint: Optional[torch.Tensor] = None,
                 impl: Optional[str] = None, hist_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The block input's RMSNorm with the Top-K select folded in: xs = x + res, h = RMSNorm(xs) * norm_w,
    y = TopK_k(h) @ wt (+ bias), or silu(TopK_k(h) @ wt) * (TopK_k(h) @ wt_up). Returns (xs, y); xs is
    empty when res is None (the caller keeps x). Where the kernels run, one kernel computes xs, h and h's
    selection (`triton_gemv.rmsnorm_select`), and the GEMV follows without a select launch; elsewhere the
    reference (`reference.rmsnorm_topk_ref`), or, for many rows on CUDA, the same norm and `topk_linear`.
    `hist_out`: y counted for the next select, as in `topk_gate_up`."""
    xs, y, _ = _rmsnorm_topk(x, res, norm_w, eps, wt, wt_up, k, bias, counters, hint, impl, hist_out=hist_out)
    return xs, y


@rmsnorm_topk.register_fake
def _(x, res, norm_w, eps, wt, wt_up, k, bias=None, counters=None, hint=None, impl=None, hist_out=None):
    return (x.new_empty(0) if res is None else x.new_empty(x.shape)), x.new_empty(*x.shape[:-1], wt.shape[1])


@torch.library.custom_op("larosa::rmsnorm_topk_side", mutates_args=())
def rmsnorm_topk_side(x: torch.Tensor, norm_w: torch.Tensor, eps: float, wt: torch.Tensor,
                      wt_up: Optional[torch.Tensor], k: int, side_w: torch.Tensor, side_cols: int,
                      counters: Optional[torch.Tensor] = None, hint: Optional[torch.Tensor] = None,
                      impl: Optional[str] = None,
                      hist_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rmsnorm_topk` without res (`hist_out` as there), plus a dense side GEMV of its input: (y, r) with r = x @ side_w[:side_cols].T
    (x's leading shape, side_cols; side_w (d_out, d_in) as F.linear's weight). Where the kernels run, r comes
    from extra programs (`triton_gemv.SideGemv`) of the gate/up GEMV launch, which stream while it waits for
    the norm + select (tile / gathered kernels, `triton_gemv.side_in()` "gemv"), or else of the norm + select
    launch itself, on the SMs the select leaves idle. `topk_linear_side` finishes it."""
    _check_side(x, side_w, side_cols, None)
    _, y, r = _rmsnorm_topk(x, None, norm_w, eps, wt, wt_up, k, None, counters, hint, impl, side_w, side_cols,
                            hist_out)
    return y, r


@rmsnorm_topk_side.register_fake
def _(x, norm_w, eps, wt, wt_up, k, side_w, side_cols, counters=None, hint=None, impl=None, hist_out=None):
    return x.new_empty(*x.shape[:-1], wt.shape[1]), x.new_empty(*x.shape[:-1], side_cols)


def _check_side(ax: torch.Tensor, side_w: torch.Tensor, c: int, prev: Optional[torch.Tensor]) -> None:
    if side_w.dim() != 2 or side_w.shape[1] != ax.shape[-1]:
        raise ValueError(f"side weight {tuple(side_w.shape)} (d_out x d_in) does not match inputs of width "
                         f"{ax.shape[-1]}")
    if not 0 <= c <= side_w.shape[0]:
        raise ValueError(f"side columns {c} out of range for a side weight {tuple(side_w.shape)}")
    if prev is not None and tuple(prev.shape) != (*ax.shape[:-1], c):
        raise ValueError(f"prev {tuple(prev.shape)} must be the side input's leading shape x its {c} columns")


def _rmsnorm_topk(x, res, norm_w, eps, wt, wt_up, k, bias, counters, hint, impl, side_w=None, side_cols=0,
                  hist_out=None):
    """(xs, y, r) of `rmsnorm_topk` and, with side_w, of `rmsnorm_topk_side` (r = x @ side_w[:side_cols].T;
    else None)."""
    _check(x, wt, k, impl)
    if wt_up is not None and wt_up.shape != wt.shape:
        raise ValueError(f"gate {tuple(wt.shape)} and up {tuple(wt_up.shape)} weights differ in shape")
    if wt_up is not None and bias is not None:
        raise ValueError("the gated form takes no bias")
    if res is not None and res.shape != x.shape:
        raise ValueError(f"res {tuple(res.shape)} does not match x {tuple(x.shape)}")
    x2 = _rows(x)
    d_out = wt.shape[1]
    kk = min(k, x.shape[-1])
    if not _use_kernel(x2, x2.shape[0]) or kk >= x.shape[-1]:
        xs = x if res is None else x + res
        h = ref.rmsnorm_ref(xs, norm_w, eps)
        y = (topk_gate_up(h, wt, wt_up, k, counters, None, impl, hist_out) if wt_up is not None
             else topk_linear(h, wt, k, bias, counters, None, None, impl))
        r = None if side_w is None else (x2 @ side_w[:side_cols].t()).view(*x.shape[:-1], side_cols)
        return (x.new_empty(0) if res is None else xs), y, r
    gated = wt_up is not None
    # zeroed here if needed, so no memset lands between the norm kernel and its dependent GEMV
    cnt = _counters(counters, x2, wt, gated=gated, alloc=True, impl=impl, k=kk)
    pdl = triton_gemv.pdl_default(x2)
    r2 = side = None
    if side_w is not None:
        r2 = torch.empty(x2.shape[0], side_cols, dtype=x.dtype, device=x.device)
        side = triton_gemv.SideGemv(x2, side_w.contiguous(), r2, 0, side_cols) if side_cols else None
    ri = triton_gemv.resolve_impl(impl, 0, x2.shape[1], kk)
    # the side programs ride in the GEMV launch (tile / gathered kernels, `side_in()` "gemv") or else in the
    # norm + select launch, which runs whatever the GEMV implementation
    in_gemv = side is not None and triton_gemv.side_in_gemv(ri)
    if in_gemv:  # checked before the norm + select launch, not after it
        triton_gemv.check_side(side, x2.shape[0], x2)
    site = triton_gemv.decode_site(x2.shape[1], wt.shape[1], gated)  # for a per-site prefetch budget
    xs, h, sel = triton_gemv.rmsnorm_select(x2, None if res is None else _rows(res), norm_w.contiguous(), eps, kk,
                                            pdl=pdl, hint=hint, side=None if in_gemv else side,
                                            compact=ri == "gtile",
                                            pack_x=ri == "gtile" and triton_gemv.gather_x(x2.shape[1]),
                                            prefetch=triton_prefetch.plan(x2, wt, wt_up, kk, hint, site))
    y = torch.empty(x2.shape[0], d_out, dtype=x.dtype, device=x.device)
    triton_gemv.launch(h, wt.contiguous(), y, kk, wt2=wt_up.contiguous() if gated else None, bias=bias,
                       counters=cnt, sel=sel, pdl=pdl, impl=impl, side=side if in_gemv else None,
                       **_hist_kw(impl, x2.shape[1], kk, hist_out=hist_out))
    r = None if r2 is None else r2.view(*x.shape[:-1], side_cols)
    return (x.new_empty(0) if xs is None else xs.view(x.shape)), y.view(*x.shape[:-1], d_out), r


@torch.library.custom_op("larosa::topk_linear_side", mutates_args=())
def topk_linear_side(x: torch.Tensor, wt: torch.Tensor, k: int, side_x: torch.Tensor, side_w: torch.Tensor,
                     prev: Optional[torch.Tensor] = None, counters: Optional[torch.Tensor] = None,
                     hint: Optional[torch.Tensor] = None,
                     impl: Optional[str] = None, hist: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r): y = TopK_k(x) @ wt, and a dense side GEMV r = side_x @ side_w.T (side_x's leading shape x
    side_w's d_out; side_w as F.linear's weight), whose first c columns are `prev` (side_x @ side_w[:c].T,
    from `rmsnorm_topk_side`) where given. Where the kernels run, the rest of r comes from extra programs
    (`triton_gemv.SideGemv`) of the GEMV launch that waits for the select (tile / gathered kernels,
    `triton_gemv.side_in()` "gemv") or else of the select launch, on the SMs the select leaves idle. `hist`: as
    in `topk_linear`."""
    _check(x, wt, k, impl)
    c0 = 0 if prev is None else prev.shape[-1]
    _check_side(side_x, side_w, c0, prev)
    if side_x.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"side_x {tuple(side_x.shape)} must have x's leading shape {tuple(x.shape[:-1])}")
    if prev is not None and prev.dtype != side_x.dtype:
        raise ValueError(f"prev is {prev.dtype}, the side GEMV's inputs {side_x.dtype}")
    x2, a2 = _rows(x), _rows(side_x)
    p2 = None if not c0 else prev.reshape(x2.shape[0], c0).contiguous()  # a 0-wide prev is no prev
    n = side_w.shape[0]
    r_shape = (*x.shape[:-1], n)
    if k >= x.shape[-1] or not _use_kernel(x2, x2.shape[0]) or c0 == n or not _side_rides(impl, x.shape[-1], k):
        rest = a2 @ side_w[c0:].t()
        r = rest if p2 is None else torch.cat([p2, rest], 1)
        return topk_linear(x, wt, k, None, counters, None, hint, impl, hist), r.view(r_shape)
    r2 = torch.empty(x2.shape[0], n, dtype=side_x.dtype, device=x.device)
    side = triton_gemv.SideGemv(a2, side_w.contiguous(), r2, c0, n, p2)
    y = _launch_topk(x2, wt, k, None, counters, None, hint, impl, side, hist)
    return y.view(*x.shape[:-1], wt.shape[1]), r2.view(r_shape)


def _side_rides(impl: Optional[str], d_in: int, k: int) -> bool:
    """Whether the GEMV `impl` resolves to launches a packed select that can carry side programs: not the
    "inline" / "fused" kernels (no select launch) nor the split-K gather mode (its own compacting select);
    those compute the side GEMV with a plain matmul."""
    ri = triton_gemv.resolve_impl(impl, 0, d_in, k)
    return ri in ("tile", "gtile", "spec") or (ri == "split" and not triton_gemv.GATHER)


@topk_linear_side.register_fake
def _(x, wt, k, side_x, side_w, prev=None, counters=None, hint=None, impl=None, hist=None):
    return x.new_empty(*x.shape[:-1], wt.shape[1]), side_x.new_empty(*side_x.shape[:-1], side_w.shape[0])


def _unblock(wblk: torch.Tensor, d_out: int) -> torch.Tensor:
    return wblk.permute(1, 0, 2).reshape(wblk.shape[1], -1)[:, :d_out]


@torch.library.custom_op("larosa::spec_linear", mutates_args=())
def spec_linear(x: torch.Tensor, wblk: torch.Tensor, k: int, residual: torch.Tensor,
                bias: Optional[torch.Tensor] = None, hint: Optional[torch.Tensor] = None) -> torch.Tensor:
    """residual + TopK_k(x) @ W^T (+ bias) with W^T in the speculative GEMV's blocked layout
    (`triton_spec.spec_layout`), d_out = residual's last dimension. One row at a time with Triton (`triton_spec`):
    its GEMV streams the rows guessed from `hint` (the row's threshold at the previous call, updated here like the
    selects' hints) while the select runs. Other rows, dtypes and devices: the PyTorch reference on the unblocked
    weight."""
    d_in, d_out = x.shape[-1], residual.shape[-1]
    if wblk.dim() != 3 or wblk.shape[1] != d_in or wblk.shape[0] * wblk.shape[2] < d_out:
        raise ValueError(f"wblk {tuple(wblk.shape)} is not a blocked (d_in = {d_in}) x (d_out = {d_out}) weight")
    if residual.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    x2, r2 = _rows(x), residual.reshape(-1, d_out).contiguous()
    if k >= d_in or not _use_kernel(x2, x2.shape[0]) or d_in >= 1 << 15 or hint is None \
            or wblk.shape[2] != triton_spec.spec_tiles()[0]:
        return ref.topk_gemv_ref(x2, _unblock(wblk, d_out), min(k, d_in), bias, r2).view(residual.shape)
    y = torch.empty(x2.shape[0], d_out, dtype=x.dtype, device=x.device)
    triton_spec.launch_spec(x2, wblk, y, k, hint=hint, bias=bias, residual=r2)
    return y.view(residual.shape)


@spec_linear.register_fake
def _(x, wblk, k, residual, bias=None, hint=None):
    return residual.new_empty(residual.shape)


@torch.library.custom_op("larosa::threshold_linear", mutates_args=())
def threshold_linear(x: torch.Tensor, wt: torch.Tensor, threshold: float,
                     counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    _check(x, wt, 1)
    x2 = _rows(x)
    if not _use_kernel(x2, x2.shape[0]):
        return ref.threshold_gemv_ref(x2, wt, threshold).view(*x.shape[:-1], wt.shape[1])
    y = torch.empty(x2.shape[0], wt.shape[1], dtype=x.dtype, device=x.device)
    triton_gemv.launch(x2, wt.contiguous(), y, 1, threshold=threshold, mode=1,
                       counters=_counters(counters, x2, wt, mode=1))
    return y.view(*x.shape[:-1], wt.shape[1])


@threshold_linear.register_fake
def _(x, wt, threshold, counters=None):
    return x.new_empty(*x.shape[:-1], wt.shape[1])


def dense_kernel_default(device: torch.device) -> bool:
    """Whether a decode engine on `device` runs its dense sites through `dense_linear`'s kernel by default:
    where its early weight loads can overlap the kernel before (PDL: CUDA, compute capability >= 9)."""
    device = torch.device(device)
    return HAVE_TRITON and device.type == "cuda" and triton_gemv.pdl_default(torch.empty(0, device=device))


@torch.library.custom_op("larosa::dense_linear", mutates_args=())
def dense_linear(x: torch.Tensor, w: torch.Tensor, w_up: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                 norm_w: Optional[torch.Tensor] = None, eps: float = 0.0, rms: bool = False,
                 pdl: bool = True) -> torch.Tensor:
    """A dense projection of the decode step with its block's other work: y = RMSNorm(x) (with norm_w, or
    with `rms` a norm whose weight is all ones) @ w.T (+ bias), or silu(. @ w.T) * (. @ w_up.T) with w_up,
    + residual; w, w_up (d_out, d_in) output-major (F.linear's layout). Up to `max_kernel_rows()` rows run
    `triton_dense.dense_gemv` (one launch at its site's tiles, fp32 until the one rounding, loading its first
    weight tiles before it waits for x where PDL is possible); more rows, fp32 and devices where Triton cannot
    run take `reference.dense_linear_ref` (HF's roundings). `pdl=False`: launched in order, never as a programmatic
    dependent (the decode engine's head where the step has gathered Top-K GEMVs, v28)."""
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x (..., {x.shape[-1]}) does not match w {tuple(w.shape)} (expected d_out x d_in)")
    x2 = _rows(x)
    if not _use_kernel(x, x2.shape[0]):
        return ref.dense_linear_ref(x, w, w_up, bias, residual, norm_w, eps, rms)
    r2 = None if residual is None else _rows(residual)
    y = triton_dense.dense_gemv(x2, w.contiguous(), w_up=None if w_up is None else w_up.contiguous(), bias=bias,
                                residual=r2, norm_w=norm_w, eps=eps, rms=rms or norm_w is not None,
                                pdl=None if pdl else False)
    return y.view(*x.shape[:-1], w.shape[0])


@dense_linear.register_fake
def _(x, w, w_up=None, bias=None, residual=None, norm_w=None, eps=0.0, rms=False, pdl=True):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def dense_linear_kernel(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """The same kernel with selection off (MODE 2): used to compare against cuBLAS at sparsity 0."""
    x2 = _rows(x)
    y = torch.empty(x2.shape[0], wt.shape[1], dtype=x.dtype, device=x.device)
    triton_gemv.launch(x2, wt, y, x.shape[-1], mode=2)
    return y.view(*x.shape[:-1], wt.shape[1])


def attention_impl() -> str:
    """`LAROSA_ATTENTION`: "split" (default, the Triton split-cache kernel) or "sdpa" (PyTorch's)."""
    impl = os.environ.get("LAROSA_ATTENTION", "split")
    if impl not in ("split", "sdpa"):
        raise ValueError(f"LAROSA_ATTENTION must be 'split' or 'sdpa', got {impl!r}")
    return impl


def attention_programs() -> Optional[int]:
    """Programs the split-cache attention launch aims at (`triton_attention.target_programs`); None without
    Triton. Benchmark rows record it."""
    return triton_attention.target_programs() if HAVE_TRITON else None


def attention_balanced() -> Optional[bool]:
    """Whether the split-cache attention divides the filled positions among its splits at run time
    (`triton_attention.balanced`); None without Triton. Benchmark rows record it."""
    return triton_attention.balanced() if HAVE_TRITON else None


def attention_v_early() -> Optional[bool]:
    """Whether the split-cache attention loads values with keys (`triton_attention.v_early`, v31); None without
    Triton. Benchmark rows record it."""
    return triton_attention.v_early() if HAVE_TRITON else None


@torch.library.custom_op("larosa::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q (B, KVH, G, HD), one query position `pos` ((1,) int64 on the device), against the first pos + 1
    positions of static caches (B, KVH, L, HD); returns (B, KVH, G, HD). Reads only those positions."""
    if q.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[:2] != q.shape[:2] \
            or k_cache.shape[3] != q.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} / caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}: expected "
                         f"(B, KVH, G, HD) and (B, KVH, L, HD)")
    if _attention_kernel_ok(q, q.shape[3]):
        return triton_attention.decode_attention(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(),
                                                 pos, scale)
    # SDPA may return a permuted layout; the op's output is contiguous, as its fake says
    return ref.decode_attention_ref(q, k_cache, v_cache, pos, scale).contiguous()


@decode_attention.register_fake
def _(q, k_cache, v_cache, pos, scale):
    return q.new_empty(q.shape)


def _attention_kernel_ok(x: torch.Tensor, hd: int) -> bool:
    """The split-cache kernel runs: Triton, a kernel dtype, a power-of-two head size >= 16, CUDA (or the
    interpreter) and `LAROSA_ATTENTION=split` (checked on every path, so a bad value never passes)."""
    impl = attention_impl()
    return (HAVE_TRITON and x.dtype in KERNEL_DTYPES and hd == 1 << (hd.bit_length() - 1) and hd >= 16
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and impl == "split")


@torch.library.custom_op("larosa::rope_decode_attention", mutates_args=("k_cache", "v_cache"))
def rope_decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, scale: float,
                          counters: Optional[torch.Tensor] = None, pdl: bool = False) -> torch.Tensor:
    """One decode position from the q/k/v projection's output qkv (B, (KVH * G + 2 * KVH) * HD): RoPE
    (rotate-half, cos/sin rows (HD,) of the position) on q and the new key, the new key and value written
    to the static caches (B, KVH, L, HD) at pos (in place), attention over positions 0..pos. Returns
    (B, KVH, G, HD). The kernel does it all in the split-cache launch (the engine's RoPE and cache-write
    kernels folded in); elsewhere the PyTorch reference. `counters` (a zeroed int32 buffer of at least
    B * KVH entries, left zeroed, like the GEMV ops'; the engine passes it by default since v18): the
    kernel's last program per KV head combines the splits, so no combine launch follows. It changes only
    the launches, not the result. `pdl` (v20): the kernel launches as a programmatic dependent where
    possible, letting the kernel after it launch at once (the dense step's o projection, which loads its
    weights meanwhile); timing only."""
    if qkv.dim() != 2 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != qkv.shape[0]:
        raise ValueError(f"qkv {tuple(qkv.shape)} / caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}: "
                         f"expected (B, F) and (B, KVH, L, HD)")
    b, kvh, _, hd = k_cache.shape
    if qkv.shape[1] % (kvh * hd) or qkv.shape[1] // (kvh * hd) < 3:
        raise ValueError(f"qkv has {qkv.shape[1]} features: not (KVH * G + 2 * KVH) * HD with KVH = {kvh}, HD = {hd}")
    if cos.shape != (hd,) or sin.shape != (hd,):
        raise ValueError(f"cos/sin must be rows of {hd}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if _attention_kernel_ok(qkv, hd) and qkv.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous():
        return triton_attention.rope_decode_attention(qkv, k_cache, v_cache, pos, cos.contiguous(),
                                                      sin.contiguous(), scale, counters, pdl)
    return ref.rope_decode_attention_ref(qkv, k_cache, v_cache, pos, cos, sin, scale).contiguous()


@rope_decode_attention.register_fake
def _(qkv, k_cache, v_cache, pos, cos, sin, scale, counters=None, pdl=False):
    b, kvh, _, hd = k_cache.shape
    return qkv.new_empty(b, kvh, qkv.shape[1] // hd // kvh - 2, hd)
