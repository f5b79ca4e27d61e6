"""Compile the package's Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter, which is how CI runs the kernels, does not type-check: a kernel can pass every
interpreted test and still fail to compile (a variable that changes type in a conditional, say). Run as
a script in a process without TRITON_INTERPRET (`tests/test_kernels_compile.py` does); prints one line
per kernel variant and `compiled N`.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from larosa.kernels import triton_attention as ta
from larosa.kernels import triton_dense as td
from larosa.kernels import triton_gemv as tg
from larosa.kernels import triton_spec as tsp

FLOATS = {"threshold", "eps", "scale"}
POINTERS = {"sel_ptr": "*i32", "hint_ptr": "*i32", "cnt_ptr": "*i32", "acc_ptr": "*fp32", "part_ptr": "*fp32",
            "pos_ptr": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32", "o_ptr": "*fp32", "pf_rec_ptr": "*i32",
            "hist_ptr": "*i32", "stamp_ptr": "*i64", "arrive_ptr": "*i64", "release_ptr": "*i64", "set_ptr": "*i64",
            "seen_ptr": "*i64", "flag_ptr": "*i32", "err_ptr": "*i32", "lq_ptr": "*i32", "lo_ptr": "*i32",
            "lg_ptr": "*i32", "ld_ptr": "*i32", "la_ptr": "*i32", "aq_ptr": "*fp32", "ao_ptr": "*fp32",
            "ag_ptr": "*fp32", "ad_ptr": "*fp32", "ss_ptr": "*fp32"}  # the rest: bf16 tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import handoff as hof  # noqa: E402  (benchmarks/handoff.py: GPU-only kernels, %globaltimer stamps)
import persistent as pst  # noqa: E402  (benchmarks/persistent.py: the one-launch step, v33)

SIDE_GEMV = dict(zip(("A_BN", "A_BK", "A_STAGES"), tg.SIDE_TILES_GEMV))  # the side tiles of a GEMV launch

# (kernel, constexprs, num_warps): the variants the engine launches on the H200, and the hinted select's
CASES = [
    (tg.select_packed_kernel, {"BLOCK_D": 4096, "PDL": True}, 4),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "WINDOW": 7}, 8),
    (tg.select_packed_kernel, {"BLOCK_D": 4096, "WINDOW": 7, "FALLBACK": False}, 4),
    (tg.select_packed_kernel, {"BLOCK_D": 4096, "FIRST_BIT": 7}, 4),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "COMPACT": True}, 8),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "COMPACT": 2}, 8),  # timing only (select_bench.py --compact)
    # the kept list stored by inline PTX (COMPACT=3, the compiled default of v16-v18; True = 1 = tl.store)
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "COMPACT": 3, "WINDOW": 7}, 8),
    # v19 default: the list stored from 32-bit offsets (LAROSA_COMPACT_STORE=asm32)
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "COMPACT": 4, "WINDOW": 7}, 8),
    (tg.rmsnorm_select_kernel, {"HAS_RES": True, "BLOCK_D": 4096, "PDL": True, "COMPACT": 4}, 4),
    # v20: the selects launched as programmatic dependents of the GEMV before (WAIT)
    (tg.rmsnorm_select_kernel, {"HAS_RES": True, "BLOCK_D": 4096, "PDL": True, "COMPACT": 4, "WINDOW": 7,
                                "WAIT": True}, 4),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "COMPACT": 4, "WAIT": True}, 8),
    (tg.rmsnorm_select_kernel, {"HAS_RES": True, "BLOCK_D": 4096, "PDL": True, "COMPACT": 3}, 4),
    (tg.rmsnorm_select_kernel, {"HAS_RES": True, "BLOCK_D": 4096, "PDL": True}, 4),
    (tg.rmsnorm_select_kernel, {"HAS_RES": True, "BLOCK_D": 4096, "PDL": True, "COMPACT": True}, 4),
    # v23 (default since v24, LAROSA_GATHER_X): the kept list carries x, the gathered GEMV reads it from there
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "COMPACT": 4, "PACK_X": True}, 8),
    (tg.rmsnorm_select_kernel, {"HAS_RES": True, "BLOCK_D": 4096, "PDL": True, "COMPACT": 4, "WINDOW": 7,
                                "PACK_X": True, "PF": 1}, 4),
    (tg.gtile_gemv_kernel, {"GATED": True, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 64, "PDL": True,
                            "PACK_X": True}, 2),
    (tg.gtile_gemv_kernel, {"GATED": False, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 256, "PDL": True,
                            "HAS_RES": True, "PACK_X": True}, 2),
    # v23: the L2 prefetch of the GEMV's likely rows riding in the selects (bulk prefetch by inline PTX; 3 also
    # records the guess, as the GPU tests do)
    (tg.select_packed_kernel, {"BLOCK_D": 4096, "PDL": True, "COMPACT": 4, "WINDOW": 7, "PF": 1}, 4),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "COMPACT": 4, "WINDOW": 7, "PF": 3, "PF_ROWS": 32}, 8),
    (tg.rmsnorm_select_kernel, {"HAS_RES": True, "BLOCK_D": 4096, "PDL": True, "COMPACT": 4, "WINDOW": 7, "PF": 1,
                                "PF_TWO": True}, 4),
    (tg.rmsnorm_select_kernel, {"HAS_RES": False, "BLOCK_D": 4096, "PDL": True, "WINDOW": 7, "PF": 3}, 4),
    (tg.gtile_gemv_kernel, {"GATED": False, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 256, "PDL": True,
                            "HAS_RES": True}, 2),
    (tg.gtile_gemv_kernel, {"GATED": False, "HAS_BIAS": False, "BLOCK_M": 128, "BLOCK_N": 128, "PDL": True}, 2),
    (tg.gtile_gemv_kernel, {"GATED": True, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 64, "PDL": True}, 2),
    (tg.rmsnorm_select_kernel, {"HAS_RES": False, "BLOCK_D": 4096, "PDL": True, "WINDOW": 7}, 4),
    # v16: the adapter GEMV's programs in the MLP half's selects
    (tg.rmsnorm_select_kernel, {"HAS_RES": False, "BLOCK_D": 4096, "PDL": True, "WINDOW": 7, "SIDE": True}, 4),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "WINDOW": 7, "SIDE": True, "HAS_PREV": True}, 8),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "WINDOW": 7, "COMPACT": True, "SIDE": True,
                               "HAS_PREV": True}, 8),
    (tg.tile_gemv_kernel, {"MODE": 0, "GATED": False, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 256,
                           "PDL": True, "HAS_RES": True}, 2),
    # v18: the side GEMV's programs in the GEMV launch (LAROSA_SIDE_IN=gemv)
    (tg.gtile_gemv_kernel, {"GATED": False, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 256, "PDL": True,
                            "SIDE": True, "HAS_PREV": True, **SIDE_GEMV}, 2),
    (tg.gtile_gemv_kernel, {"GATED": True, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 64, "PDL": True,
                            "SIDE": True, **SIDE_GEMV}, 2),
    (tg.tile_gemv_kernel, {"MODE": 0, "GATED": True, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 64,
                           "PDL": True, "X_LATE": True, "SIDE": True, **SIDE_GEMV}, 2),
    (tg.tile_gemv_kernel, {"MODE": 0, "GATED": True, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 64,
                           "PDL": True, "X_LATE": True}, 2),
    (tg.sparse_gemv_kernel, {"MODE": 1, "GATED": False, "HAS_BIAS": False, "BLOCK_K": 64, "BLOCK_N": 128,
                             "ROWS_PER_SPLIT": 256, "SPLIT_CHUNK": 4}, 4),
    (tg.sparse_gemv_kernel, {"MODE": 0, "GATED": True, "HAS_BIAS": True, "BLOCK_K": 16, "BLOCK_N": 64,
                             "ROWS_PER_SPLIT": 512, "PDL": True, "HAS_RES": False}, 4),
    # the dense decode step's GEMVs at their sites' default tiles (`triton_dense.SITE_TILES`, v21), loading their
    # first weight tiles before waiting for x: q/k/v and the head with the norm (weight loaded, and bias; or
    # ones: rms alone), o and down with the residual, gate/up with the norm; the v19 experiment's 2-warp tiles
    # waiting first (benchmarks/dense_chain.py)
    (td.dense_gemv_kernel, {"BN": 8, "BK": 512, "STAGES": 2, "PDL": True, "PREFETCH": True, "NORM": True,
                            "HAS_G": True, "HAS_BIAS": True}, 4),
    (td.dense_gemv_kernel, {"BN": 8, "BK": 512, "STAGES": 2, "PDL": True, "PREFETCH": True, "NORM": True}, 4),
    (td.dense_gemv_kernel, {"BN": 16, "BK": 512, "STAGES": 2, "PDL": True, "PREFETCH": True, "HAS_RES": True}, 8),
    (td.dense_gemv_kernel, {"BN": 2, "BK": 1024, "STAGES": 2, "PDL": True, "PREFETCH": True, "NORM": True,
                            "HAS_G": True, "GATE_UP": True}, 2),
    (td.dense_gemv_kernel, {"BN": 2, "BK": 1024, "STAGES": 2, "PDL": True, "PREFETCH": True, "NORM": True,
                            "GATE_UP": True}, 2),
    (td.dense_gemv_kernel, {"BN": 2, "BK": 2048, "STAGES": 2, "PDL": True, "PREFETCH": False}, 2),
    (ta.decode_attn_split_kernel, {"G": 4, "GP": 16, "HD": 128, "BLOCK": 64, "DOT_F32": False}, 4),
    (ta.decode_attn_combine_kernel, {"G": 4, "GP": 16, "GR": 4, "NSP": 8, "HD": 128}, 4),
    # v17: RoPE and the cache write in the split launch (`rope_decode_attention`), and the last program combining
    (ta.decode_attn_split_kernel, {"G": 4, "GP": 16, "HD": 128, "BLOCK": 64, "DOT_F32": False, "ROPE": True,
                                   "KVH": 8}, 4),
    (ta.decode_attn_split_kernel, {"G": 1, "GP": 16, "HD": 128, "BLOCK": 64, "DOT_F32": False, "ROPE": True,
                                   "KVH": 32, "COMBINE": True, "GR": 1, "NSP": 8}, 4),
    # v20: launched as a programmatic dependent
    (ta.decode_attn_split_kernel, {"G": 1, "GP": 16, "HD": 128, "BLOCK": 64, "DOT_F32": False, "ROPE": True,
                                   "KVH": 32, "COMBINE": True, "GR": 1, "NSP": 8, "PDL": True}, 4),
    # a long cache in block-sized splits (LAROSA_ATTN_PROGRAMS=4096 at 2176 positions: 34 splits)
    (ta.decode_attn_split_kernel, {"G": 1, "GP": 16, "HD": 128, "BLOCK": 64, "DOT_F32": False, "ROPE": True,
                                   "KVH": 32, "COMBINE": True, "GR": 1, "NSP": 64, "PDL": True}, 4),
    # v24 (default, LAROSA_ATTN_BALANCED): the splits divide the filled positions at run time
    (ta.decode_attn_split_kernel, {"G": 1, "GP": 16, "HD": 128, "BLOCK": 64, "DOT_F32": False, "ROPE": True,
                                   "KVH": 32, "COMBINE": True, "GR": 1, "NSP": 8, "PDL": True, "BALANCED": True}, 4),
    # v30: the gate/up GEMV counting its output into the down select's histogram, and that select
    (tg.gtile_gemv_kernel, {"GATED": True, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 64, "PDL": True,
                            "SIDE": True, **SIDE_GEMV, "HIST": 4}, 2),
    (tg.tile_gemv_kernel, {"MODE": 0, "GATED": True, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 64,
                           "PDL": True, "X_LATE": True, "HIST": 4}, 2),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "COMPACT": 4, "HIST": 4}, 8),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "COMPACT": 4, "HIST": 4, "PACK_X": True}, 8),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "COMPACT": 4, "HIST": 4, "PACK_X": True,
                               "HIST_TRUST": True}, 8),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "COMPACT": 4, "PACK_X": True, "DYN": True}, 8),
    (tg.select_packed_kernel, {"BLOCK_D": 16384, "PDL": True, "COMPACT": 4, "PACK_X": True, "DYN": True,
                               "WINDOW": 7}, 8),
    # v31 (A/B, LAROSA_ATTN_V_EARLY): the attention's value loads issued with its key loads
    (ta.decode_attn_split_kernel, {"G": 1, "GP": 16, "HD": 128, "BLOCK": 64, "DOT_F32": False, "ROPE": True,
                                   "KVH": 32, "COMBINE": True, "GR": 1, "NSP": 8, "PDL": True, "BALANCED": True,
                                   "V_EARLY": True}, 4),
    # v31 (timing only, benchmarks/oracle_step.py): the gathered GEMV waiting only before its atomic adds
    (tg.gtile_gemv_kernel, {"GATED": True, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 64, "PDL": True,
                            "PACK_X": True, "LATE_WAIT": True}, 2),
    (tg.gtile_gemv_kernel, {"GATED": False, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 256, "PDL": True,
                            "HAS_RES": True, "PACK_X": True, "LATE_WAIT": True}, 2),
    (tg.gtile_gemv_kernel, {"GATED": False, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 256, "PDL": True,
                            "SIDE": True, **SIDE_GEMV, "PACK_X": True, "LATE_WAIT": True}, 2),
    # v31 (A/B, LAROSA_GUESS): the tile kernel loading its guessed rows before the wait (o with the residual; down
    # with the adapter's programs)
    (tg.tile_gemv_kernel, {"MODE": 0, "GATED": False, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 256, "PDL": True,
                           "HAS_RES": True, "GUESS": 16}, 2),
    (tg.tile_gemv_kernel, {"MODE": 0, "GATED": False, "HAS_BIAS": False, "BLOCK_M": 64, "BLOCK_N": 256, "PDL": True,
                           "SIDE": True, **SIDE_GEMV, "GUESS": 16}, 2),
    # v32 (benchmarks/handoff.py): the launch-boundary and grid-barrier probes, which only a GPU runs
    (hof.producer_kernel, {"PDL": True, "TILE": hof.TILE}, 4),
    (hof.consumer_kernel, {"PDL": True}, 1),
    (hof.consumer_kernel, {"PDL": False}, 1),
    (hof.barrier_kernel, {}, 1),
    (hof.flag_kernel, {}, 1),
    # v33 (benchmarks/persistent.py): the whole step's GEMVs in one launch of co-resident programs, grid barriers
    (pst.persistent_step_kernel, {"DEP": False, "ADAPTER": 1, "BM": 64, "BN": 256, "BMG": 64, "BNG": 128}, 4),
    (pst.persistent_step_kernel, {"DEP": True, "ADAPTER": 3, "BM": 64, "BN": 256, "BMG": 64, "BNG": 128,
                                  "SPIN_LOAD": True}, 4),
    # the configurations of the committed runs: one atomic add per chunk (SEG off), and one chunk at 4 warps
    (pst.persistent_step_kernel, {"DEP": True, "ADAPTER": 1, "BM": 64, "BN": 128, "BMG": 64, "BNG": 64,
                                  "SEG": False}, 2),
    (pst.persistent_step_kernel, {"DEP": False, "ADAPTER": 1, "BM": 32, "BN": 128, "BMG": 32, "BNG": 64,
                                  "UNROLL": 2}, 4),
    # v22 (opt-in): the speculative GEMV's select (hinted, the fix list by inline PTX) and GEMV (blocked weights at
    # the default tiles, with the residual; input-major with a side GEMV)
    (tsp.select_spec_kernel, {"BLOCK_D": 4096, "PDL": True, "WINDOW": 7, "ASM": True}, 4),
    (tsp.select_spec_kernel, {"BLOCK_D": 16384, "PDL": True, "ASM": True}, 8),
    (tsp.spec_gemv_kernel, {**dict(zip(("BN", "BK", "STAGES", "BM"), tsp.SPEC_TILES[:3] + tsp.SPEC_TILES[4:])),
                            "HAS_RES": True, "PDL": True, "BLOCKED": True}, tsp.SPEC_TILES[3]),
    (tsp.spec_gemv_kernel, {"BN": 32, "BK": 128, "STAGES": 2, "BM": 64, "PDL": True, "SIDE": True, "HAS_PREV": True,
                            **SIDE_GEMV}, 4),
]


def signature(kernel, constexprs: dict) -> tuple[dict, dict]:
    """Triton signature of `kernel` (pointer and scalar types by argument name) and its constexprs,
    the defaults of those not given filled in."""
    sig, consts = {}, dict(constexprs)
    for name, p in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(p.annotation):
            sig[name] = "constexpr"
            if name not in consts:
                consts[name] = p.default
        elif name.endswith("_ptr"):
            sig[name] = POINTERS.get(name, "*bf16")
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig, consts


def compile_sm90(kernel, constexprs: dict, warps: int):
    """One CASES variant compiled for sm_90 (the compiled kernel: its `asm["cubin"]`, `asm["ptx"]`, ...)."""
    sig, consts = signature(kernel, constexprs)
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})


def main() -> None:
    for kernel, constexprs, warps in CASES:
        compile_sm90(kernel, constexprs, warps)
        print(f"sm_90 {kernel.fn.__name__} {constexprs}: ok", flush=True)
    print(f"compiled {len(CASES)}")


if __name__ == "__main__":
    main()
