"""A persistent select-free step against the chain of launches (v33; H200, bf16, batch 1, random weights).

NOTES "Next steps" (v31, v32) left one design untried: fewer, larger launches. v31's select-free bound
(`oracle_step.py`) showed that a chain of gathered GEMV launches pays 3-6 us per site beyond its bytes (~18 us
per layer, ~0.58 ms per step on LLaMA2-7B at p = 0.5), and v32 timed a launch boundary itself at 0.67 us (PDL)
against 0.74 us for a grid barrier inside one kernel. What neither measured is what the *ramp and tail* of each
launch cost against programs that stay resident and move from site to site. This times exactly that, with the
attention and every select left out of all forms so that only the GEMV work and its handoffs differ:

  chain             the engine's gathered GEMVs (`launch_gtile`: fixed kept lists carrying x, fp32 atomics,
                    the finisher, PDL, the residual in the o epilogue), four launches per layer; with `-adapter`
                    the residual adapter's programs ride in the down launch, as in the engine;
  dense-chain       the dense step's GEMVs (`dense_linear`, the dense engine's kernel), four launches per layer;
  persist-free      one launch for the whole step: `tl.num_programs` co-resident programs split each site's
                    kept rows x column blocks evenly (to one row), add their partial sums with atomics, and
                    meet at a grid barrier (a counter) before the next site. The lists are fixed and carry x, so
                    nothing but the barrier orders the sites: the streaming bound of this shape (4 barriers per
                    layer);
  persist-dep       the same with the real dataflow: each site's x is the previous site's output (q/k/v reads
                    RMS-normed input, o and the adapter read q/k/v's and o's outputs, down reads silu(g) * u), so
                    every site is followed by a finish phase (round the sums to bf16, add the residual, zero the
                    sums, count the sum of squares for the next norm) and a second barrier (8 per layer). This is
                    what a persistent LaRoSA step pays before any select is put in. `--check` compares its
                    output with a PyTorch reference on the GPU; the CPU tests run it in the interpreter with one
                    program.

With `--engine-dense` the dense engine's step is timed too, and `budget` prints what each of issue 5's bars leaves
for the selects: the engine's step minus its GEMV chain is a rest that sparsity does not shrink (attention, head),
and a LaRoSA step is at least that rest plus its GEMV bytes at the dense chain's own rate.

`-adapter` forms add the adapter (d x d, input x_mid = o's output) to the down site (`--adapter-site down`) or
to the gate/up site (`gu`), or half to each (`split`). Every persistent form records, from program 0, a
%globaltimer stamp after each site's GEMV barrier (four per layer): the per-site times (median over layers) give
each site's time; in `persist-dep` they include the finish phase and barrier of the site before.

    PYTHONPATH=src python3 benchmarks/persistent.py --check --engine-dense --sparsities 0.4,0.5,0.75 \
        --forms dense-chain,chain-adapter,persist-free-adapter,persist-dep-adapter \
        --configs w2x4:64x128:64x64:chunk,w4x3:32x128:32x64 --shape llama2-7b \
        --out benchmarks/results/persistent-h200-llama2-7b.json

(`bash benchmarks/h200_session.sh persistent` runs that on both shapes.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from handoff import _now  # noqa: E402  (%globaltimer)
from oracle_step import _counters, _kept_list, _rnd, engine_step_us, kept_counts  # noqa: E402

from larosa.kernels import triton_gemv  # noqa: E402
from larosa.shapes import Shape, get_shape, random_base  # noqa: E402

FORMS = ("dense-chain", "chain", "chain-adapter", "persist-free", "persist-free-adapter", "persist-dep",
         "persist-dep-adapter")
ADAPTER_SITES = {"none": 0, "down": 1, "gu": 2, "split": 3}
SITES = ("qkv", "o", "gate_up", "down")


@triton.jit
def _grid_sync(cnt_ptr, bailed, SPIN_LOAD: tl.constexpr, SPIN_LIMIT: tl.constexpr):
    """A grid barrier over all tl.num_programs(0) programs (which must be co-resident): one arrival on a counter
    that is never reset, then a spin until the counter reaches the end of this barrier's group. `bailed`: this
    program already gave up once (it then passes every later barrier without waiting); returns it updated.
    SPIN_LOAD: spin on plain volatile loads (then one acquiring atomic) instead of acquiring atomics. After
    SPIN_LIMIT spins it gives up (the programs were not all resident): the kernel then sets its error flag."""
    P = tl.num_programs(0)
    tl.debug_barrier()
    old = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    target = (old // P + 1) * P
    seen = old + 1
    spins = 0
    while (seen < target) & (spins < SPIN_LIMIT) & (bailed == 0):
        if SPIN_LOAD:
            seen = tl.load(cnt_ptr, volatile=True)
        else:
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        spins += 1
    if SPIN_LOAD:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
    tl.debug_barrier()
    return tl.where(seen < target, 1, bailed)


@triton.jit
def _chunk(u, u1, k, BM: tl.constexpr):
    """The chunk of units starting at u: its column block, first row, and row count (0 past u1)."""
    nb = u // k
    r = u - nb * k
    n = tl.minimum(tl.minimum(k - r, u1 - u), BM)
    return nb, r, tl.where(u < u1, n, 0)


@triton.jit
def _chunk_x(e, jm, x_ptr, scale, DEP: tl.constexpr):
    """A chunk's positions and x values from its list entries."""
    idx = e & 0xFFFF
    if DEP:
        xf = tl.load(x_ptr + idx, mask=jm, other=0.0).to(tl.float32) * scale
    else:
        xf = (e >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32)
    return idx, xf


@triton.jit
def _units(pid, P, lst_ptr, k, x_ptr, scale, w_ptr, w2_ptr, acc_ptr, d_out, DEP: tl.constexpr,
           GATED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SEG: tl.constexpr = True,
           UNROLL: tl.constexpr = 1):
    """This program's share of one gathered GEMV: acc[c] += sum over kept j of x[pos_j] * W^T[pos_j, c] (and the
    up half into acc[d_out + c] when GATED). The work is k rows x ceil(d_out / BN) column blocks, numbered row
    fastest within a column block; program p takes units [p U / P, (p + 1) U / P), so every program streams the
    same bytes to within one row. List entries are (x's bf16 bits << 16) | position; DEP: x is read from x_ptr at
    the position (times `scale`) instead. SEG: the rows of one column block are walked UNROLL x BM at a time (the
    UNROLL chunks' loads issued together, as the dense kernel's STAGES), the products summed elementwise in
    registers and reduced once, one atomic add per column block the program touches; else one atomic add per
    BM-row chunk (v33's first form)."""
    n_nb = (d_out + BN - 1) // BN
    total = n_nb.to(tl.int64) * k
    u = pid.to(tl.int64) * total // P
    u1 = (pid.to(tl.int64) + 1) * total // P
    jj = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    if SEG:
        while u < u1:
            nb = u // k
            r0 = (u - nb * k).to(tl.int32)
            r1 = tl.minimum(k - r0, u1 - u).to(tl.int32) + r0
            rn = nb * BN + cols
            cm = rn < d_out
            a1 = tl.zeros([BM, BN], dtype=tl.float32)
            a2 = a1
            for r in range(r0, r1, BM * UNROLL):
                for t in tl.static_range(UNROLL):
                    jm = (r + t * BM + jj) < r1
                    idx, xf = _chunk_x(tl.load(lst_ptr + r + t * BM + jj, mask=jm, other=0), jm, x_ptr, scale, DEP)
                    off = idx.to(tl.int64)[:, None] * d_out + rn[None, :]
                    wm = jm[:, None] & cm[None, :]
                    w = tl.load(w_ptr + off, mask=wm, other=0.0, eviction_policy="evict_first")
                    a1 += w.to(tl.float32) * xf[:, None]
                    if GATED:
                        w2 = tl.load(w2_ptr + off, mask=wm, other=0.0, eviction_policy="evict_first")
                        a2 += w2.to(tl.float32) * xf[:, None]
            tl.atomic_add(acc_ptr + rn, tl.sum(a1, 0), mask=cm, sem="relaxed")
            if GATED:
                tl.atomic_add(acc_ptr + d_out + rn, tl.sum(a2, 0), mask=cm, sem="relaxed")
            u += r1 - r0
    else:
        while u < u1:
            nb, r, n = _chunk(u, u1, k, BM)
            jm = jj < n
            idx, xf = _chunk_x(tl.load(lst_ptr + r + jj, mask=jm, other=0), jm, x_ptr, scale, DEP)
            rn = nb * BN + cols
            cm = rn < d_out
            off = idx.to(tl.int64)[:, None] * d_out + rn[None, :]
            wm = jm[:, None] & cm[None, :]
            w = tl.load(w_ptr + off, mask=wm, other=0.0, eviction_policy="evict_first")
            if GATED:
                w2 = tl.load(w2_ptr + off, mask=wm, other=0.0, eviction_policy="evict_first")
                tl.atomic_add(acc_ptr + rn, tl.sum(w.to(tl.float32) * xf[:, None], 0), mask=cm, sem="relaxed")
                tl.atomic_add(acc_ptr + d_out + rn, tl.sum(w2.to(tl.float32) * xf[:, None], 0), mask=cm,
                              sem="relaxed")
            else:
                tl.atomic_add(acc_ptr + rn, tl.sum(w.to(tl.float32) * xf[:, None], 0), mask=cm, sem="relaxed")
            u += n


@triton.jit
def _finish(pid, P, acc_ptr, n, y_ptr, res_ptr, ss_ptr, GATED: tl.constexpr, HAS_RES: tl.constexpr,
            HAS_SS: tl.constexpr, FB: tl.constexpr):
    """This program's slice of a site's output: y = bf16(acc (+ residual)), or bf16(silu(g) * u) when GATED (acc
    holds g then u); the sums zeroed for the next step; HAS_SS: the sum of y's squares added into ss_ptr."""
    i0 = pid * n // P
    i1 = (pid + 1) * n // P
    ss = (pid * 0).to(tl.float32)
    for s in range(i0, i1, FB):
        i = s + tl.arange(0, FB)
        m = i < i1
        a = tl.load(acc_ptr + i, mask=m, other=0.0)
        if GATED:
            b = tl.load(acc_ptr + n + i, mask=m, other=0.0)
            v = a / (1.0 + tl.exp(-a)) * b
            tl.store(acc_ptr + n + i, tl.zeros_like(b), mask=m)
        else:
            v = a
            if HAS_RES:
                v += tl.load(res_ptr + i, mask=m, other=0.0).to(tl.float32)
        tl.store(acc_ptr + i, tl.zeros_like(a), mask=m)
        yb = v.to(tl.bfloat16)
        tl.store(y_ptr + i, yb, mask=m)
        if HAS_SS:
            yf = yb.to(tl.float32)
            ss += tl.sum(yf * yf, 0)
    if HAS_SS:
        tl.atomic_add(ss_ptr, ss, sem="relaxed")


@triton.jit
def _adapter_rows(pid, P, la_ptr, r0, r1, x_ptr, wa_ptr, acc_ptr, d, DEP: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, SEG: tl.constexpr, UNROLL: tl.constexpr):
    """Rows r0 .. r1 - 1 of the adapter's GEMV (its list holds every position; x = o's output, unscaled)."""
    _units(pid, P, la_ptr + r0, r1 - r0, x_ptr, 1.0, wa_ptr, wa_ptr, acc_ptr, d, DEP, False, BM, BN, SEG, UNROLL)


@triton.jit
def _site_end(cnt_ptr, bailed, stamp_ptr, slot, SPIN_LOAD: tl.constexpr, SPIN_LIMIT: tl.constexpr,
              STAMP: tl.constexpr):
    """The grid barrier after a site's GEMV; program 0 then stamps %globaltimer into stamp_ptr[slot]."""
    bailed = _grid_sync(cnt_ptr, bailed, SPIN_LOAD, SPIN_LIMIT)
    if STAMP:
        if tl.program_id(0) == 0:
            tl.store(stamp_ptr + slot, _now())
    return bailed


@triton.jit
def persistent_step_kernel(wq_ptr, wo_ptr, wg_ptr, wu_ptr, wd_ptr, wa_ptr, lq_ptr, lo_ptr, lg_ptr, ld_ptr, la_ptr,
                           aq_ptr, ao_ptr, ag_ptr, ad_ptr, yd_ptr, yq_ptr, yo_ptr, act_ptr, ss_ptr, cnt_ptr,
                           err_ptr, stamp_ptr, n_layers, d, f, nq, kq, ko, kg, kd, eps,
                           DEP: tl.constexpr, ADAPTER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BMG: tl.constexpr, BNG: tl.constexpr, FB: tl.constexpr = 64,
                           SPIN_LOAD: tl.constexpr = False, STAMP: tl.constexpr = True,
                           SPIN_LIMIT: tl.constexpr = 1 << 18, SEG: tl.constexpr = True,
                           UNROLL: tl.constexpr = 1):
    """Every layer's four gathered GEMVs (and the adapter) in one launch of co-resident programs, a grid barrier
    after each site (and, with DEP, a finish phase and a second barrier): see the module's docstring. Weights are
    stacked per layer, input-major (layers, d_in, d_out); lists are shared by the layers; the sums (aq, ao, ag, ad)
    and outputs (yq, yo, act; yd has n_layers + 1 rows, row 0 the input) are per layer; ss holds (layers + 1) x 2
    sums of squares (yd's, yo's). Program 0 stamps %globaltimer after each site's GEMV barrier (4 per layer) into
    stamp_ptr."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    bailed = pid * 0
    for layer in range(n_layers):
        lay = pid.to(tl.int64) * 0 + layer
        xin = yd_ptr + lay * d
        one = 1.0
        s_in = one
        s_mid = one
        if DEP:
            s_in = 1.0 / tl.sqrt(tl.load(ss_ptr + lay * 2) / d + eps)
        _units(pid, P, lq_ptr, kq, xin, s_in, wq_ptr + lay * d * nq, wq_ptr, aq_ptr + lay * nq, nq, DEP, False,
               BM, BN, SEG, UNROLL)
        bailed = _site_end(cnt_ptr, bailed, stamp_ptr, lay * 4 + 0, SPIN_LOAD, SPIN_LIMIT, STAMP)
        if DEP:
            if (pid == 0) & (layer > 0):  # the input's sum of squares was read by q/k/v (before the barrier)
                tl.store(ss_ptr + lay * 2, 0.0)
            _finish(pid, P, aq_ptr + lay * nq, nq, yq_ptr + lay * nq, yq_ptr, ss_ptr, False, False, False, FB)
            bailed = _grid_sync(cnt_ptr, bailed, SPIN_LOAD, SPIN_LIMIT)
        _units(pid, P, lo_ptr, ko, yq_ptr + lay * nq, one, wo_ptr + lay * d * d, wo_ptr, ao_ptr + lay * d, d, DEP,
               False, BM, BN, SEG, UNROLL)
        bailed = _site_end(cnt_ptr, bailed, stamp_ptr, lay * 4 + 1, SPIN_LOAD, SPIN_LIMIT, STAMP)
        if DEP:
            _finish(pid, P, ao_ptr + lay * d, d, yo_ptr + lay * d, xin, ss_ptr + lay * 2 + 1, False, True, True, FB)
            bailed = _grid_sync(cnt_ptr, bailed, SPIN_LOAD, SPIN_LIMIT)
            s_mid = 1.0 / tl.sqrt(tl.load(ss_ptr + lay * 2 + 1) / d + eps)
        _units(pid, P, lg_ptr, kg, yo_ptr + lay * d, s_mid, wg_ptr + lay * d * f, wu_ptr + lay * d * f,
               ag_ptr + lay * 2 * f, f, DEP, True, BMG, BNG, SEG, UNROLL)
        if ADAPTER == 2:
            _adapter_rows(pid, P, la_ptr, 0, d, yo_ptr + lay * d, wa_ptr + lay * d * d, ad_ptr + lay * d, d, DEP, BM,
                          BN, SEG, UNROLL)
        if ADAPTER == 3:
            _adapter_rows(pid, P, la_ptr, 0, d // 2, yo_ptr + lay * d, wa_ptr + lay * d * d, ad_ptr + lay * d, d, DEP,
                          BM, BN, SEG, UNROLL)
        bailed = _site_end(cnt_ptr, bailed, stamp_ptr, lay * 4 + 2, SPIN_LOAD, SPIN_LIMIT, STAMP)
        if DEP:
            if pid == 0:
                tl.store(ss_ptr + lay * 2 + 1, 0.0)
            _finish(pid, P, ag_ptr + lay * 2 * f, f, act_ptr + lay * f, act_ptr, ss_ptr, True, False, False, FB)
            bailed = _grid_sync(cnt_ptr, bailed, SPIN_LOAD, SPIN_LIMIT)
        _units(pid, P, ld_ptr, kd, act_ptr + lay * f, one, wd_ptr + lay * f * d, wd_ptr, ad_ptr + lay * d, d, DEP,
               False, BM, BN, SEG, UNROLL)
        if ADAPTER == 1:
            _adapter_rows(pid, P, la_ptr, 0, d, yo_ptr + lay * d, wa_ptr + lay * d * d, ad_ptr + lay * d, d, DEP, BM,
                          BN, SEG, UNROLL)
        if ADAPTER == 3:
            _adapter_rows(pid, P, la_ptr, d // 2, d, yo_ptr + lay * d, wa_ptr + lay * d * d, ad_ptr + lay * d, d, DEP,
                          BM, BN, SEG, UNROLL)
        bailed = _site_end(cnt_ptr, bailed, stamp_ptr, lay * 4 + 3, SPIN_LOAD, SPIN_LIMIT, STAMP)
        if DEP:
            _finish(pid, P, ad_ptr + lay * d, d, yd_ptr + (lay + 1) * d, yo_ptr + lay * d, ss_ptr + (lay + 1) * 2,
                    False, ADAPTER == 0, True, FB)
            bailed = _grid_sync(cnt_ptr, bailed, SPIN_LOAD, SPIN_LIMIT)
    if bailed != 0:
        tl.atomic_xchg(err_ptr, 1)


BARS = {0.4: 1.33, 0.5: 1.50, 0.75: 2.20}  # issue 5's LaRoSA bars over the dense engine (LLaMA2-7B shape)


def step_bytes(sh: Shape, ks: dict, adapter: bool) -> int:
    """Weight bytes of one step's sparse GEMVs (bf16): the kept rows at each site, the adapter whole."""
    d, f = sh.hidden, sh.intermediate
    nq = (sh.heads + 2 * sh.kv_heads) * sh.head_dim
    per = ks["qkv"] * nq + ks["o"] * d + 2 * ks["gate_up"] * f + ks["down"] * d + (d * d if adapter else 0)
    return per * 2 * sh.layers


def budget(sh: Shape, engine_us: float, chain_us: float, chain_bytes: int, sparsities, bars=None) -> list[dict]:
    """What each bar leaves for the selects. The dense engine's step is its GEMV chain (`dense-chain`, timed alone)
    plus a rest that sparsity does not shrink (attention, head, handoffs to them): fixed = engine - chain. A LaRoSA
    step can be no shorter than that rest plus its GEMV bytes (adapter included) streamed at the dense chain's own
    rate. The bar's step (engine / bar) minus that ideal is the time left for every select and every loss of
    streaming rate, per step and per select (four per layer)."""
    bars = BARS if bars is None else bars
    fixed = engine_us - chain_us
    rate = chain_bytes / chain_us  # bytes per us
    rows = []
    for p in sparsities:
        nb = step_bytes(sh, kept_counts(sh, p), adapter=True)
        ideal = fixed + nb / rate
        row = {"sparsity": p, "bytes": nb, "ideal_us": round(ideal, 1), "ideal_speedup": round(engine_us / ideal, 3)}
        if p in bars:
            bar_us = engine_us / bars[p]
            row.update(bar=bars[p], bar_us=round(bar_us, 1), left_us=round(bar_us - ideal, 1),
                       left_per_select_us=round((bar_us - ideal) / (4 * sh.layers), 3))
        rows.append(row)
    return rows


def packed_list(d_in: int, k: int, gen) -> torch.Tensor:
    """k sorted random positions of d_in, each entry (x's bf16 bits << 16) | position with a random x, int32."""
    pos = torch.randperm(d_in, device=gen.device, generator=gen)[:k].sort().values.to(torch.int32)
    xb = torch.randn(k, device=gen.device, generator=gen).to(torch.bfloat16).view(torch.int16).to(torch.int32)
    return (xb << 16) | pos


def list_x(lst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed list's positions (int64) and x values (fp32)."""
    pos = (lst & 0xFFFF).long()
    x = (lst >> 16).to(torch.int16).view(torch.bfloat16).float()
    return pos, x


class Persistent:
    """The stacked weights, lists and buffers of `persistent_step_kernel` for one shape and kept counts."""

    def __init__(self, sh: Shape, ks: dict, gen, adapter: str = "none", dep: bool = True):
        if adapter not in ADAPTER_SITES:
            raise ValueError(f"adapter site {adapter!r}: choose from {sorted(ADAPTER_SITES)}")
        if max(sh.hidden, sh.intermediate) > 0xFFFF:
            raise ValueError("list entries hold positions < 65536")
        d, f, hd, L = sh.hidden, sh.intermediate, sh.head_dim, sh.layers
        nq = (sh.heads + 2 * sh.kv_heads) * hd
        if ks["o"] > d or ks["qkv"] > d or ks["gate_up"] > d or ks["down"] > f:
            raise ValueError(f"kept counts {ks} exceed the widths (d {d}, f {f})")
        dev = gen.device
        self.sh, self.ks, self.adapter, self.dep = sh, ks, ADAPTER_SITES[adapter], dep
        self.d, self.f, self.nq, self.L = d, f, nq, L
        self.w = {"q": _rnd(L, d, nq, gen=gen), "o": _rnd(L, d, d, gen=gen), "g": _rnd(L, d, f, gen=gen),
                  "u": _rnd(L, d, f, gen=gen), "d": _rnd(L, f, d, gen=gen)}
        self.w["a"] = _rnd(L, d, d, gen=gen) if self.adapter else self.w["o"][:1]
        self.lists = {"qkv": packed_list(d, ks["qkv"], gen), "o": packed_list(d, ks["o"], gen),
                      "gate_up": packed_list(d, ks["gate_up"], gen), "down": packed_list(f, ks["down"], gen),
                      "adapter": packed_list(d, d, gen)}
        z = dict(device=dev, dtype=torch.float32)
        self.acc = {"q": torch.zeros(L, nq, **z), "o": torch.zeros(L, d, **z), "g": torch.zeros(L, 2 * f, **z),
                    "d": torch.zeros(L, d, **z)}
        b = dict(device=dev, dtype=torch.bfloat16)
        self.yd = torch.zeros(L + 1, d, **b)
        self.yd[0] = _rnd(d, gen=gen)
        self.yq, self.yo, self.act = torch.zeros(L, nq, **b), torch.zeros(L, d, **b), torch.zeros(L, f, **b)
        self.ss = torch.zeros(L + 1, 2, **z)
        self.ss[0, 0] = self.yd[0].float().square().sum()
        self.cnt = torch.zeros(1, dtype=torch.int32, device=dev)
        self.err = torch.zeros(1, dtype=torch.int32, device=dev)
        self.stamps = torch.zeros(L * 4, dtype=torch.int64, device=dev)
        self.programs, self.spin_load, self.spin_limit = 1, False, 1 << 18
        self.cfg = {"BM": 64, "BN": 256, "BMG": 64, "BNG": 128, "num_warps": 4}

    def barriers(self) -> int:
        """Grid barriers per step (each program adds one to the counter at each)."""
        return self.L * (8 if self.dep else 4)

    def read_bytes(self) -> int:
        """Weight bytes one step streams: the kept rows of each site, the adapter whole."""
        return step_bytes(self.sh, self.ks, bool(self.adapter))

    def __call__(self):
        """One step (one launch); returns Triton's compiled kernel."""
        w, a, c = self.w, self.acc, self.cfg
        return persistent_step_kernel[(self.programs,)](
            w["q"], w["o"], w["g"], w["u"], w["d"], w["a"], self.lists["qkv"], self.lists["o"],
            self.lists["gate_up"], self.lists["down"], self.lists["adapter"], a["q"], a["o"], a["g"], a["d"],
            self.yd, self.yq, self.yo, self.act, self.ss, self.cnt, self.err, self.stamps, self.L, self.d, self.f,
            self.nq, self.ks["qkv"], self.ks["o"], self.ks["gate_up"], self.ks["down"], self.sh.eps, DEP=self.dep,
            ADAPTER=self.adapter, BM=c["BM"], BN=c["BN"], BMG=c["BMG"], BNG=c["BNG"], num_warps=c["num_warps"],
            STAMP=self.yd.is_cuda, SPIN_LOAD=self.spin_load, SPIN_LIMIT=self.spin_limit,
            SEG=c.get("SEG", True), UNROLL=c.get("UNROLL", 1), num_stages=1)

    def reference(self) -> dict:
        """The DEP step in PyTorch (fp32 sums, the kernel's roundings): each layer's bf16 outputs."""
        d, eps = self.d, self.sh.eps
        lp = {s: list_x(t)[0] for s, t in self.lists.items()}
        x = self.yd[0].float()
        out = {"yq": [], "yo": [], "act": [], "yd": []}
        for i in range(self.L):
            xs = x * torch.rsqrt(x.square().sum() / d + eps)
            p = lp["qkv"]
            yq = (xs[p] @ self.w["q"][i][p].float()).bfloat16()
            p = lp["o"]
            yo = (yq.float()[p] @ self.w["o"][i][p].float() + x).bfloat16()
            m = yo.float()
            ms = m * torch.rsqrt(m.square().sum() / d + eps)
            p = lp["gate_up"]
            g = ms[p] @ self.w["g"][i][p].float()
            u = ms[p] @ self.w["u"][i][p].float()
            act = (torch.nn.functional.silu(g) * u).bfloat16()
            p = lp["down"]
            dn = act.float()[p] @ self.w["d"][i][p].float()
            x = (dn + (m @ self.w["a"][i].float() if self.adapter else m)).bfloat16().float()
            for n, v in (("yq", yq), ("yo", yo), ("act", act), ("yd", x.bfloat16())):
                out[n].append(v)
        return {n: torch.stack(v) for n, v in out.items()}

    def outputs(self) -> dict:
        return {"yq": self.yq, "yo": self.yo, "act": self.act, "yd": self.yd[1:]}


def fit_programs(step: Persistent, per_sm: int) -> int:
    """Programs for a launch that must be co-resident: SMs x min(per_sm, what fits by registers, warps and shared
    memory after compiling once). Without the compiler's figures, one per SM (always resident on an idle GPU)."""
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    step.programs = sms
    warps = step.cfg["num_warps"]
    try:
        from kernel_resources import programs_per_sm

        ck = step()  # compiles (one program per SM: always co-resident)
        torch.cuda.synchronize()
        ck._init_handles()
        fit = programs_per_sm(ck.n_regs, warps)
        smem = ck.metadata.shared
        if smem:
            fit = min(fit, props.shared_memory_per_multiprocessor // smem)
        step.cfg["n_regs"], step.cfg["n_spills"] = ck.n_regs, ck.n_spills
    except Exception as e:  # noqa: BLE001 - the figures are an optimisation; one per SM is safe
        print(f"  (no register count: {e!r}; one program per SM)", flush=True)
        fit = 1
    return sms * max(1, min(per_sm, fit))


def site_times(stamps: torch.Tensor, layers: int) -> dict:
    """Median per-site time (us) over layers 1.. from program 0's stamps, one after each site's GEMV barrier: a
    site's time runs from the stamp after the site before to its own, so with DEP it includes the finish phase
    (and barrier) of the site before."""
    s = stamps.view(layers, 4).double() / 1000
    flat = s.flatten()
    dt = (flat[1:] - flat[:-1]).view(-1)
    dt = torch.cat([dt.new_full((1,), float("nan")), dt]).view(layers, 4)[1:]
    return {site: round(statistics.median(dt[:, j].tolist()), 2) for j, site in enumerate(SITES)}


def parse_configs(text: str) -> list[dict]:
    """'w4x2:64x256:64x128:u2,...' -> warps 4, 2 programs per SM, ungated tiles 64 x 256, gated 64 x 128, two chunks'
    loads issued together (UNROLL, default 1); ':chunk' instead: one atomic add per chunk (SEG off)."""
    out = []
    for item in text.split(","):
        try:
            wp, t, tg, *opts = item.split(":")
            w, per = wp[1:].split("x")
            bm, bn = t.split("x")
            bmg, bng = tg.split("x")
            cfg = {"num_warps": int(w), "per_sm": int(per), "BM": int(bm), "BN": int(bn), "BMG": int(bmg),
                   "BNG": int(bng), "SEG": True, "UNROLL": 1, "name": item}
            for o in opts:
                if o == "chunk":
                    cfg["SEG"] = False
                elif o[:1] == "u" and o[1:].isdigit() and int(o[1:]) >= 1:
                    cfg["UNROLL"] = int(o[1:])
                else:
                    raise ValueError(o)
            out.append(cfg)
        except ValueError:
            raise SystemExit(f"bad config {item!r}: want w<warps>x<per SM>:<BM>x<BN>:<BMG>x<BNG>[:u<unroll>][:chunk]"
                             ) from None
    return out


def chain_step(sh: Shape, ks: dict, gen, adapter: bool):
    """The engine's gathered GEMV launches for one step over every layer, fixed lists (no attention, no select)."""
    d, f, hd, L = sh.hidden, sh.intermediate, sh.head_dim, sh.layers
    nq = (sh.heads + 2 * sh.kv_heads) * hd
    dev = gen.device
    W = [dict(q=_rnd(d, nq, gen=gen), o=_rnd(d, d, gen=gen), g=_rnd(d, f, gen=gen), u=_rnd(d, f, gen=gen),
              d=_rnd(f, d, gen=gen), cq=_counters(d, nq, False, ks["qkv"], dev), co=_counters(d, d, False, ks["o"], dev),
              cg=_counters(d, f, True, ks["gate_up"], dev), cd=_counters(f, d, False, ks["down"], dev),
              a=_rnd(d, d, gen=gen) if adapter else None) for _ in range(L)]
    sel = {"qkv": _kept_list(d, ks["qkv"], gen), "o": _kept_list(d, ks["o"], gen),
           "gate_up": _kept_list(d, ks["gate_up"], gen), "down": _kept_list(f, ks["down"], gen)}
    x0 = _rnd(1, d, gen=gen)
    bufs = dict(qkv=torch.empty(1, nq, device=dev, dtype=torch.bfloat16),
                act=torch.empty(1, f, device=dev, dtype=torch.bfloat16),
                side=torch.empty(1, d, device=dev, dtype=torch.bfloat16))

    def step():
        x = x0
        for w in W:
            triton_gemv.launch_gtile(x, w["q"], bufs["qkv"], ks["qkv"], sel=sel["qkv"], counters=w["cq"], pack_x=True)
            xm = torch.empty_like(x)
            triton_gemv.launch_gtile(bufs["qkv"][:, :d], w["o"], xm, ks["o"], sel=sel["o"], counters=w["co"],
                                     residual=x, pack_x=True)
            triton_gemv.launch_gtile(xm, w["g"], bufs["act"], ks["gate_up"], wt2=w["u"], sel=sel["gate_up"],
                                     counters=w["cg"], pack_x=True)
            x = torch.empty_like(xm)
            side = triton_gemv.SideGemv(xm, w["a"], bufs["side"], 0, d) if adapter else None
            triton_gemv.launch_gtile(bufs["act"], w["d"], x, ks["down"], sel=sel["down"], counters=w["cd"],
                                     residual=None if adapter else xm, side=side, pack_x=True)
        return x

    return step, step_bytes(sh, ks, adapter)


def dense_chain_step(sh: Shape, gen):
    """The dense step's GEMVs (`dense_linear`, norms folded: rms=True) over every layer, without the attention."""
    from larosa.kernels import ops

    d, f, hd, L = sh.hidden, sh.intermediate, sh.head_dim, sh.layers
    nq = (sh.heads + 2 * sh.kv_heads) * hd
    W = [dict(q=_rnd(nq, d, gen=gen), o=_rnd(d, d, gen=gen), g=_rnd(f, d, gen=gen), u=_rnd(f, d, gen=gen),
              d=_rnd(d, f, gen=gen)) for _ in range(L)]
    x0 = _rnd(1, d, gen=gen)

    def step():
        x = x0
        for w in W:
            qkv = ops.dense_linear(x, w["q"], rms=True)
            x = ops.dense_linear(qkv[:, :d], w["o"], residual=x)
            act = ops.dense_linear(x, w["g"], w["u"], rms=True)
            x = ops.dense_linear(act, w["d"], residual=x)
        return x

    return step, L * 2 * (nq * d + d * d + 3 * d * f)


def time_config(step: Persistent, cfg: dict, a, ks: dict) -> dict:
    """One launch config of a persistent form: programs fitted, outputs checked (DEP, with --check), the step
    timed in a CUDA graph, per-site times from the stamps; returns the row's fields, "us" among them."""
    from gemv import graph_time_us

    step.cnt.zero_()
    step.err.zero_()
    step.programs = fit_programs(step, cfg["per_sm"])
    if int(step.err.item()):
        raise RuntimeError("a barrier gave up with one program per SM")
    launches = 10 * (2 + 3 + a.reps) + 2  # graph_time_us: 2 warm-up rounds, 3 + reps replays of 10; the fit, the check
    if launches * step.barriers() * step.programs >= 2 ** 31:
        raise ValueError(f"--reps {a.reps}: the int32 barrier counter would wrap in one config")
    step.cnt.zero_()
    extra = {"config": cfg["name"], "programs": step.programs, "k": ks,
             "adapter_site": a.adapter_site if step.adapter else None, "spin_load": a.spin_load,
             **{n: step.cfg[n] for n in ("n_regs", "n_spills") if n in step.cfg}}
    if a.check and step.dep:
        for t in step.acc.values():
            t.zero_()
        step.ss[:, 1] = 0
        step.ss[1:, 0] = 0
        step()
        torch.cuda.synchronize()
        ref, got = step.reference(), step.outputs()
        errs = {n: float((got[n].float() - ref[n].float()).abs().max() / ref[n].float().abs().max().clamp_min(1e-6))
                for n in ref}
        extra["check_rel_err"] = {n: round(v, 5) for n, v in errs.items()}
    extra["us"] = graph_time_us([step] * 10, reps=a.reps)
    torch.cuda.synchronize()
    if int(step.err.item()):
        extra["error"] = "a barrier gave up: the programs were not all resident"
    extra["site_us"] = site_times(step.stamps, step.L)
    return extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--sparsities", default="0.5", help="comma list of nominal sparsities (the 0.8 / 1.2 split)")
    ap.add_argument("--forms", default=",".join(FORMS), help="comma list of: " + ", ".join(FORMS))
    ap.add_argument("--configs", default="w2x4:64x128:64x64:chunk",
                    help="persistent launch configs, comma list of w<warps>x<programs per SM>:<BM>x<BN>:<BMG>x<BNG>"
                         "[:u<unroll>][:chunk]")
    ap.add_argument("--adapter-site", default="down", choices=[s for s in ADAPTER_SITES if s != "none"])
    ap.add_argument("--spin-load", action="store_true", help="barriers spin on volatile loads, not atomics")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check", action="store_true", help="persist-dep outputs against the PyTorch reference")
    ap.add_argument("--engine-dense", action="store_true",
                    help="also time the dense engine's step (DecodeEngine, as the tables do) and, with dense-chain, "
                         "print what each bar leaves for the selects (`budget`)")
    ap.add_argument("--timed", type=int, default=100, help="engine steps timed (--engine-dense)")
    a = ap.parse_args()
    forms = [s for s in a.forms.split(",") if s]
    if set(forms) - set(FORMS):
        ap.error(f"unknown forms {sorted(set(forms) - set(FORMS))}; choose from {', '.join(FORMS)}")
    if not torch.cuda.is_available():
        sys.exit("persistent.py times kernels on a GPU (the CPU tests run the kernel in the interpreter)")
    from gemv import graph_time_us

    from larosa.bench import copy_bandwidth
    from larosa.record import run_record

    sh = get_shape(a.shape)
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth(torch.device("cuda"))
    res = {**run_record("benchmarks/persistent.py", {k: str(v) for k, v in vars(a).items()}),
           "device": torch.cuda.get_device_name(), "dtype": "bfloat16", "batch": 1, "shape": a.shape,
           "split": [0.8, 1.2], "copy_bandwidth_TBps": round(bw / 1e12, 3), "triton": triton.__version__,
           "timing": f"CUDA graph of 10 steps, median of {a.reps} replays, per step; no attention, no selects, "
                     "no head in any form", "rows": []}
    print(f"{res['device']} | bf16 | batch 1 | {a.shape} | copy bandwidth {bw / 1e12:.2f} TB/s | "
          "step without attention / selects / head, us (median)", flush=True)

    def record(form, p, us, nb, extra=None):
        row = {"form": form, "sparsity": p, "step_us": round(us, 1), "read_bytes": nb,
               "tb_s": round(nb / us / 1e6, 3), "of_copy_bw": round(nb / us / 1e6 / (bw / 1e12), 3), **(extra or {})}
        res["rows"].append(row)
        print(f"  {form:34s} p = {p:4.2f}: {us:8.1f} us  {nb / 1e9:6.2f} GB  {row['tb_s']:.2f} TB/s "
              f"({100 * row['of_copy_bw']:.0f}% of copy)" + (f"  {extra}" if extra else ""), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")

    with torch.no_grad():
        if "dense-chain" in forms:
            fn, nb = dense_chain_step(sh, gen)
            record("dense-chain", 0.0, graph_time_us([fn] * 10, reps=a.reps), nb)
            del fn
            torch.cuda.empty_cache()
        for p in [float(s) for s in a.sparsities.split(",") if s]:
            ks = kept_counts(sh, p)
            for form in forms:
                if form.startswith("chain"):
                    fn, nb = chain_step(sh, ks, gen, form.endswith("adapter"))
                    record(form, p, graph_time_us([fn] * 10, reps=a.reps), nb, {"k": ks})
                    del fn
                    torch.cuda.empty_cache()
                    continue
                if not form.startswith("persist"):
                    continue
                step = Persistent(sh, ks, gen, a.adapter_site if form.endswith("adapter") else "none",
                                  dep=form.startswith("persist-dep"))
                step.spin_load = a.spin_load
                for cfg in parse_configs(a.configs):
                    step.cfg = {k: v for k, v in cfg.items() if k in ("num_warps", "BM", "BN", "BMG", "BNG", "SEG",
                                                                       "UNROLL")}
                    try:
                        extra = time_config(step, cfg, a, ks)
                    except Exception as e:  # noqa: BLE001 - a config that does not compile is recorded, not fatal
                        print(f"  {form} [{cfg['name']}]: failed ({str(e).splitlines()[0][:200]})", flush=True)
                        res.setdefault("failed", []).append({"form": form, "config": cfg["name"], "sparsity": p,
                                                             "error": str(e).splitlines()[0][:500]})
                        continue
                    record(f"{form} [{cfg['name']}]", p, extra.pop("us"), step.read_bytes(), extra)
                del step
                torch.cuda.empty_cache()
    if a.engine_dense:
        us = engine_step_us(random_base(sh, torch.bfloat16, "cuda", 0), a.timed)
        res["rows"].append({"form": "engine dense", "sparsity": 0.0, "step_us": round(us, 1),
                            "tok_s": round(1e6 / us, 1)})
        print(f"  engine dense: {us:.1f} us ({1e6 / us:.1f} tok/s)", flush=True)
        dc = next((r for r in res["rows"] if r["form"] == "dense-chain"), None)
        if dc is not None:
            res["budget"] = budget(sh, us, dc["step_us"], dc["read_bytes"],
                                   sorted({*(float(s) for s in a.sparsities.split(",") if s), *BARS}))
            print("\nwhat the bars leave (fixed = engine - dense chain = "
                  f"{us - dc['step_us']:.0f} us; sparse bytes at the dense chain's {dc['tb_s']:.2f} TB/s)")
            print("| p | GB (adapter incl.) | ideal step (us) | ideal speed-up | bar | bar step (us) | left per step "
                  "(us) | per select (us) |")
            print("|---|---|---|---|---|---|---|---|")
            for b in res["budget"]:
                print(f"| {b['sparsity']} | {b['bytes'] / 1e9:.2f} | {b['ideal_us']} | {b['ideal_speedup']:.3f}x | "
                      f"{b.get('bar', '-')} | {b.get('bar_us', '-')} | {b.get('left_us', '-')} | "
                      f"{b.get('left_per_select_us', '-')} |")
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
