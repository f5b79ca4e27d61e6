#!/usr/bin/env bash
# The GPU work of a session in few device calls (each stage fits the 10-minute limit of one call).
# Run from the repository root on the GPU machine, results under $OUT (or /tmp/h200-out), packed as one
# tarball because only a few files come back from a device call:
#
#   bash benchmarks/h200_session.sh tests        # compiled kernel + engine GPU tests (~4.5 min)
#   bash benchmarks/h200_session.sh fusions      # norm + select and residual-epilogue A/B, per op and
#                                                # end to end (~5 min)
#   bash benchmarks/h200_session.sh tables       # decode tables, LLaMA2-7B and LLaMA3-8B (~4 min)
#   bash benchmarks/h200_session.sh genlens      # generation lengths 128/512/2048 at p = 0.5 (~3 min)
#   bash benchmarks/h200_session.sh gemv         # per-op GEMV table (~1 min)
#   bash benchmarks/h200_session.sh enginetests  # the engine's GPU tests alone (~1 min)
#   bash benchmarks/h200_session.sh profile      # per-kernel CUDA time of a step, LLaMA2-7B, p = 0.5 (~1 min)
#   bash benchmarks/h200_session.sh profile3     # the same profile for dense, LaRoSA and un-rotated Top-K at p = 0.5
#                                                # and 0.75 (Top-K has no adapters: the difference is theirs) (~1.5 min)
#   bash benchmarks/h200_session.sh profile4     # v27: the same at p = 0.5 with TEAL too (its thresholds at LaRoSA's
#                                                # parameter-weighted sparsity, as in the tables) (~1.5 min)
#   bash benchmarks/h200_session.sh selectsteps  # select time vs bisection steps (~1 min)
#   bash benchmarks/h200_session.sh window       # hinted select window on/off A/B, end to end (~1 min)
#   bash benchmarks/h200_session.sh hinttests    # compiled hinted-select kernel tests + engine GPU tests (~2 min)
#   bash benchmarks/h200_session.sh hintsoverlap # LaRoSA: select hints x adapter overlap, end to end (~1 min)
#   bash benchmarks/h200_session.sh hintsites    # LaRoSA, overlapped adapters: hints at no / norm + select / all sites (~3.5 min)
#   bash benchmarks/h200_session.sh hintprofile  # select kernel time per step by hint sites, LaRoSA and Top-K (~1.5 min)
#   bash benchmarks/h200_session.sh hintprofileinorder  # the same with LaRoSA's adapters in order (~1 min)
#   bash benchmarks/h200_session.sh hintdrift    # window hits of the hinted selects in the default (graph, overlap)
#                                                # engine's decode, per site (~1 min)
#   bash benchmarks/h200_session.sh densekernel  # v20: dense GEMV chain with the engine's block form, tests, and the
#                                                # engine's dense_linear vs cuBLAS end to end (~5 min)
#   bash benchmarks/h200_session.sh densesites   # v21: the dense step's tiles per site, greedy sweep on LLaMA2-7B,
#                                                # then best vs default on both shapes (~1.5 min)
#   bash benchmarks/h200_session.sh gtilesites   # v21: the gathered GEMV's tiles per site in LaRoSA's step (p = 0.5),
#                                                # then best vs default at 0.4 / 0.5 / 0.75 (~3 min)
#   bash benchmarks/h200_session.sh densesites3  # v21: o and down at (16, 512, 2, 4) vs (16, 512, 2, 8); the later
#                                                # stages run with the best (~1 min)
#   bash benchmarks/h200_session.sh densehead    # v21: LaRoSA's head in dense_linear vs cuBLAS; the later stages of
#                                                # the call run with the winner (LAROSA_DENSE_HEAD) (~1 min)
#   bash benchmarks/h200_session.sh headcause    # v21: LaRoSA's dense head with the adapters in order / hints at
#                                                # all four sites (~1 min)
#   bash benchmarks/h200_session.sh headhints    # v21: the same with the select hints off, distinct tokens counted
#                                                # (~1 min)
#   bash benchmarks/h200_session.sh headpdl      # v27: LaRoSA's head in dense_linear or cuBLAS, with PDL on / off
#                                                # everywhere (LAROSA_KERNEL_PDL=0), alternating twice (~1.5 min)
#   bash benchmarks/h200_session.sh graphdump    # v27: LaRoSA's captured step as dot, cuBLAS vs dense_linear head:
#                                                # nodes, edges and (v28, driver API) edge kinds (graph_dump.py) (~1 min)
#   bash benchmarks/h200_session.sh timeline     # v28: per-kernel start / end inside the graph replay (CUPTI via
#                                                # torch.profiler): the step's critical path for every variant in
#                                                # graph_timeline.py (17, ~10 s each; TIMELINE_VARIANTS picks some)
#   TIMELINE_VARIANTS=larosa,larosa-prefetch-off,larosa-hints-off,larosa-adapter-split-0.5,larosa-adapter-split-1 \
#     bash benchmarks/h200_session.sh timeline   # v28's next steps: the gate/up GEMV and the down select (~1 min)
#   bash benchmarks/h200_session.sh layoutcold   # v29: the gathered tile by weight layout with the weights cold, and the
#                                                # gate/up GEMV after its norm + select (layout_ab.py --cold) (~1 min)
#   bash benchmarks/h200_session.sh headdefault  # v28: each method (dense, LaRoSA, Top-K, TEAL at p = 0.5) with the head on
#                                                # cuBLAS / dense_linear with PDL / without, alternating twice (~6 min)
#   bash benchmarks/h200_session.sh headrule     # v28: the head rule (dense_linear, in order beside Top-K) vs the cuBLAS
#                                                # head, LaRoSA p = 0.4 / 0.5 / 0.75 and Top-K, both shapes (~2 min)
#   bash benchmarks/h200_session.sh headprofile  # v21: kernel profile of LaRoSA and Top-K with / without the dense head
#                                                # (~1 min)
#   bash benchmarks/h200_session.sh spec         # v22: the speculative GEMV (o and down): GPU tests, per-op A/B with a
#                                                # tile sweep, LaRoSA end to end off / on (~6 min)
#   bash benchmarks/h200_session.sh spece2e      # v22: the end-to-end part alone (~2 min)
#   bash benchmarks/h200_session.sh densetests   # the dense kernel's and the engine's dense GPU tests (~1 min)
#   bash benchmarks/h200_session.sh densesites2  # v21: a second round around the first's best; the later stages of
#                                                # the call run with its best (LAROSA_DENSE_TILES) (~1.5 min)
#   bash benchmarks/h200_session.sh gtile        # gathered-rows GEMV (v15): compiled tests, per-op A/B with a tile
#                                                # sweep, LLaMA2-7B decode under LAROSA_KERNEL_IMPL=gtile (~7 min)
#   bash benchmarks/h200_session.sh gputests     # the GPU-only kernel and engine tests (~3 min)
#   bash benchmarks/h200_session.sh gtilelow     # gathered rows everywhere at p = 0.25 / 0.4, LLaMA2-7B (~1 min)
#   bash benchmarks/h200_session.sh compactselect # the packed select plain / compacting / prefix sum only (~1 min)
#   bash benchmarks/h200_session.sh gtileab      # the same per-op A/B at the default tiles only (~1 min)
#   bash benchmarks/h200_session.sh sidetests    # v16 adapter-in-the-selects: compiled side-GEMV kernel tests and
#                                                # the engine GPU tests (~3 min)
#   bash benchmarks/h200_session.sh side         # v16: the MLP half with the adapter in its selects, per op, tile
#                                                # sweep (~2 min)
#   bash benchmarks/h200_session.sh adaptermodes # v16: LaRoSA adapters in the selects / side stream / in order,
#                                                # end to end, beside Top-K (~4 min)
#   bash benchmarks/h200_session.sh sidetiles    # v16: the side programs' best per-op tiles vs the default, end to
#                                                # end (~2 min)
#   bash benchmarks/h200_session.sh ropefusion   # v17: RoPE + cache write in the attention launch: GPU tests, A/B (~3 min)
#   bash benchmarks/h200_session.sh attncombine  # v17 experiment: the attention's last split program combines: GPU
#                                                # tests, A/B (~3 min)
#   bash benchmarks/h200_session.sh sidein       # v18: the adapter programs in the GEMV launches (LAROSA_SIDE_IN=gemv):
#                                                # compiled side tests, then end to end vs in the selects (~6 min)
#   bash benchmarks/h200_session.sh sidetilesgemv # v18: tilings of the adapter programs in the GEMV launches (~3 min)
#   bash benchmarks/h200_session.sh asm32        # v19: the kept list stored from 32-bit offsets (LAROSA_COMPACT_STORE=
#                                                # asm32, now the default): GPU tests, select alone, A/B x hints, profile (~4 min)
#   bash benchmarks/h200_session.sh densechain   # v19 experiment, not run yet: dense GEMV chains, cuBLAS vs
#                                                # `dense_gemv` loading weight tiles before its PDL wait (~2 min)
#   bash benchmarks/h200_session.sh compactstore # v16 experiment: compiled PTX-store tests, the select alone
#                                                # (compactselect) and end to end gtile+PTX / gtile / default (~5 min)
#   bash benchmarks/h200_session.sh adapterprefix # the MLP half with the adapter in order / overlapped / as
#                                                # always-kept rows of the down GEMV (~1 min)
#
#   bash benchmarks/h200_session.sh prefetch     # v23: the selects' L2 prefetch: GPU tests, per-op budgets, LaRoSA end
#                                                # to end by budget (~7 min)
#   bash benchmarks/h200_session.sh prefetche2e  # v23: the end-to-end part alone (~3 min)
#   bash benchmarks/h200_session.sh prefetchx    # v23: per op beside hot weights; LLaMA2-7B end to end by budget and
#                                                # pieces per row (~5 min)
#   bash benchmarks/h200_session.sh gatherx      # not run yet: the kept list carrying x (LAROSA_GATHER_X): GPU tests,
#                                                # then LaRoSA and Top-K end to end off / on (~4 min)
#   bash benchmarks/h200_session.sh attnprograms # not run yet: attention tests, then LaRoSA at 2048 tokens by the
#                                                # split attention's program target (LAROSA_ATTN_PROGRAMS) (~6 min)
#   bash benchmarks/h200_session.sh hintdown     # v24: LaRoSA with the down select hinted (and prefetching) or not,
#                                                # LAROSA_HINT_SITES 0,1,2 / 0,1,2,3 (~3 min)
#   bash benchmarks/h200_session.sh attnbalanced # v24: dense and LaRoSA at 2048 tokens, the attention's splits sized
#                                                # by the cache or by the filled length (LAROSA_ATTN_BALANCED) (~3 min)
#   bash benchmarks/h200_session.sh gatherxwidth # v25, not run yet: LaRoSA and Top-K with x in every kept list or only in
#                                                # the 4096-wide ones (LAROSA_GATHER_X=1 / 8192: the down select spills
#                                                # 304 B with x, 24 B without) (~4 min)
#   bash benchmarks/h200_session.sh gtilelowab   # v26: LaRoSA and Top-K at p = 0.25, masked rows (LAROSA_KERNEL_IMPL=tile)
#                                                # vs the engine's choice (gathered since v26), alternating, both shapes (~2 min)
#   bash benchmarks/h200_session.sh windowe2e    # v25: LaRoSA (the engine's own hint sites) with select windows WINDOWS
#                                                # (default "4 5"), alternating, LLaMA2-7B twice (~1.5 min)
#   bash benchmarks/h200_session.sh downhist     # v30: the down select from the gate/up output's histogram: GPU tests,
#                                                # timeline variants, LaRoSA and Top-K end to end off / on (~6 min)
#   bash benchmarks/h200_session.sh downhiste2e  # v30: the end-to-end part alone (~3.5 min)
#   bash benchmarks/h200_session.sh oracle       # v31: the step with every select free and at the byte model, beside
#                                                # the dense and LaRoSA engines, LLaMA2-7B p = 0.4 / 0.5 / 0.75 (~6 min)
#   bash benchmarks/h200_session.sh oraclelate   # v31: the same with each gathered GEMV loading its list and rows before
#                                                # its PDL wait (timing only), both shapes (~3 min)
#   bash benchmarks/h200_session.sh handoff      # v32: what one launch boundary costs (PDL, stream order) against a
#                                                # grid barrier and a flag inside one kernel, idle and beside a hog
#   bash benchmarks/h200_session.sh persistent   # v33: the step's GEMVs (no attention, no selects) in one launch of
#                                                # co-resident programs with grid barriers, against the chain of launches,
#                                                # and the bars' budget per select, both shapes (persistent.py;
#                                                # PERSIST_SHAPES / _CONFIGS / _SPARSITIES / _ARGS / _TAG) (~2 min)
#   bash benchmarks/h200_session.sh selectload   # v32: the selects and one dependent load (DRAM, L2) timed while a hog
#                                                # kernel streams beside them, by its grid (select_under_load.py)
#   bash benchmarks/h200_session.sh histtests    # v30: the histogram / loop-search select tests compiled (~1 min)
#   bash benchmarks/h200_session.sh histab       # v30: the down select's variants in the timeline (histogram checked
#                                                # by a loop / unchecked, x out of the down list, the plain search as a
#                                                # loop), then LaRoSA LLaMA2-7B end to end by HIST_CFGS, alternating (~5 min)
#
# Several stages in one call: `bash benchmarks/h200_session.sh tests fusions`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
[ $# -gt 0 ] || { echo "usage: $0 tests|enginetests|fusions|selectsteps|window|hinttests|hintsoverlap|hintsites|hintprofile|hintprofileinorder|hintdrift|gtile|gtileab|gputests|gtilelow|compactselect|sidetests|side|sidetiles|ropefusion|attncombine|sidein|sidetilesgemv|asm32|densechain|adaptermodes|compactstore|adapterprefix|tables|genlens|gemv|profile|profile3|profile4|densekernel|denseforms|densetiles|chains|densechain|densesites|densesites2|densesites3|gtilesites|layoutcold|densehead|headcause|headhints|headprofile|headpdl|headdefault|headrule|graphdump|timeline|densetests|spec|spece2e|prefetch|prefetche2e|prefetchx|gatherx|attnprograms|hintdown|attnbalanced|windowe2e|gatherxwidth|gtilelowab|downhist|downhiste2e|histab|histtests ..." >&2; exit 2; }
out=${OUT:-/tmp/h200-out}/r
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)" >> "$out/gpu.txt"
# the results so far, packed as one tarball beside $out (run at the end, and when the call is stopped early)
pack() {
  (cd "$(dirname "$out")" && tar czf results.tgz "$(basename "$out")" && rm -rf "$(basename "$out")")
  echo "packed $(dirname "$out")/results.tgz"
}
rc=0
# one benchmarks/decode_parts.py part, its JSON and log under $out/NAME.{json,log}
parts() { python3 benchmarks/decode_parts.py --parts "$1" --out "$out/$2.json" 2>&1 | tee "$out/$2.log" || rc=1; }
# a further round of the dense per-site sweep (round number, candidates); the later stages run with its best
dense_round() {
  python3 benchmarks/decode_parts.py --parts dense_sites --out "$out/dense-sites$1-h200.json" --site-candidates "$2" \
    2>&1 | tee "$out/dense-sites$1-h200.log" || rc=1
  local best
  best=$(sed -n 's/^best per site: //p' "$out/dense-sites$1-h200.log")
  if [ -n "$best" ] && [ "$best" != "the defaults" ]; then
    export LAROSA_DENSE_TILES="$best"; echo "LAROSA_DENSE_TILES=$best for the later stages"; fi
}
# LaRoSA decode with the speculative GEMV off and on (alternating: LLaMA2-7B twice, LLaMA3-8B once)
spec_e2e() {
  for run in llama2-7b:1 llama2-7b:2 llama3-8b:1; do for on in 0 1; do
    shape=${run%:*}; rep=${run#*:}
    LAROSA_SPEC=$on python3 -m larosa bench decode --shape $shape --methods larosa --sparsities 0.25,0.4,0.5,0.75 \
      --gen-lens 128 --out "$out/$1-$shape-spec$on-$rep" 2>&1 | grep -v "%|" | tee "$out/$1-$shape-spec$on-$rep.log" \
      || rc=1
  done; done
}
# LaRoSA decode by L2 prefetch budget (LAROSA_PREFETCH_MB, alternating: LLaMA2-7B twice, LLaMA3-8B once)
prefetch_e2e() {
  for run in llama2-7b:1 llama2-7b:2 llama3-8b:1; do for mb in ${PF_BUDGETS:-0 8 24}; do
    shape=${run%:*}; rep=${run#*:}
    LAROSA_PREFETCH_MB=$mb python3 -m larosa bench decode --shape $shape --methods larosa \
      --sparsities 0.25,0.4,0.5,0.75 --gen-lens 128 --out "$out/$1-$shape-mb$mb-$rep" 2>&1 | grep -v "%|" \
      | tee "$out/$1-$shape-mb$mb-$rep.log" || rc=1
  done; done
}
# LaRoSA and Top-K decode with the down histogram off and on (alternating: LLaMA2-7B twice, LLaMA3-8B once)
hist_e2e() {
  for run in llama2-7b:1 llama2-7b:2 llama3-8b:1; do for on in 0 1; do
    shape=${run%:*}; rep=${run#*:}
    LAROSA_DOWN_HIST=$on python3 -m larosa bench decode --shape $shape --methods larosa,topk \
      --sparsities 0.25,0.4,0.5,0.75 --gen-lens 128 --out "$out/$1-$shape-hist$on-$rep" 2>&1 | grep -v "%|" \
      | tee "$out/$1-$shape-hist$on-$rep.log" || rc=1
  done; done
}
# v31: benchmarks/oracle_step.py by shape (ORACLE_SHAPES), sparsities, forms, engines and profiled forms from the
# environment; ORACLE_TAG suffixes the output names
oracle_runs() {
  for shape in ${ORACLE_SHAPES:-llama2-7b}; do
    python3 benchmarks/oracle_step.py --shape "$shape" --sparsities "${ORACLE_SPARSITIES:-0.4,0.5,0.75}" \
      --timeline "${ORACLE_TIMELINE:-gather-adapter}" ${ORACLE_FORMS:+--forms "$ORACLE_FORMS"} \
      ${ORACLE_ENGINES+--engines "$ORACLE_ENGINES"} --out "$out/oracle-step-h200-$shape${ORACLE_TAG:-}.json" 2>&1 \
      | tee "$out/oracle-step-h200-$shape${ORACLE_TAG:-}.log" || rc=1
  done
}
run_stages() {
for stage in "$@"; do
  start=$(date +%s)
  case $stage in
    tests)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_kernels.py \
        tests/test_kernels_gpu.py tests/test_attention_kernel.py > "$out/kernel-tests.log" 2>&1 || rc=1
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_engine_gpu.py tests/test_engine.py \
        > "$out/engine-tests.log" 2>&1 || rc=1
      tail -n 3 "$out/kernel-tests.log" "$out/engine-tests.log" ;;
    enginetests)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_engine_gpu.py tests/test_engine.py \
        > "$out/engine-tests.log" 2>&1 || rc=1
      tail -n 3 "$out/engine-tests.log" ;;
    profile)
      python3 benchmarks/profile_decode.py --shape llama2-7b --sparsity 0.5 \
        --out "$out/profile-decode-llama2-7b.json" 2>&1 | tee "$out/profile-decode-llama2-7b.log" || rc=1 ;;
    profile3)
      for sp in 0.5 0.75; do
        python3 benchmarks/profile_decode.py --shape llama2-7b --sparsity $sp --methods dense,larosa,topk \
          --out "$out/profile3-llama2-7b-p$sp.json" 2>&1 | tee "$out/profile3-llama2-7b-p$sp.log" || rc=1
      done ;;
    profile4)
      python3 benchmarks/profile_decode.py --shape llama2-7b --sparsity 0.5 --methods dense,larosa,topk,teal \
        --out "$out/profile4-llama2-7b-p0.5.json" 2>&1 | tee "$out/profile4-llama2-7b-p0.5.log" || rc=1 ;;
    selectsteps)
      python3 benchmarks/select_bench.py --steps 15,12,8,4,0 --out "$out/select-steps-h200.json" \
        2>&1 | tee "$out/select-steps-h200.log" || rc=1 ;;
    hintsoverlap)
      parts hints_overlap hints-overlap-h200 ;;
    hintsites)
      parts hint_sites hint-sites-h200 ;;
    hintdrift)
      python3 benchmarks/threshold_drift.py --decode 24 --layers 32 --tokens 16 \
        --out "$out/threshold-drift-decode-engine-h200.json" 2>&1 | tee "$out/threshold-drift-decode-engine-h200.log" || rc=1 ;;
    hintprofileinorder)
      python3 benchmarks/profile_decode.py --shape llama2-7b --sparsity 0.5 --hints-ab --in-order \
        --out "$out/profile-hints-inorder-llama2-7b.json" 2>&1 | tee "$out/profile-hints-inorder-llama2-7b.log" || rc=1 ;;
    hintprofile)
      python3 benchmarks/profile_decode.py --shape llama2-7b --sparsity 0.5 --hints-ab \
        --out "$out/profile-hint-sites-llama2-7b.json" 2>&1 | tee "$out/profile-hint-sites-llama2-7b.log" || rc=1 ;;
    gtile)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_kernels_gpu.py \
        > "$out/gtile-tests.log" 2>&1 || rc=1
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_engine_gpu.py -k "gtile" \
        >> "$out/gtile-tests.log" 2>&1 || rc=1
      grep -E "passed|failed" "$out/gtile-tests.log"
      python3 benchmarks/gtile_ab.py --out "$out/gtile-ab-h200.json" 2>&1 | tee "$out/gtile-ab-h200.log" || rc=1
      LAROSA_KERNEL_IMPL=gtile python3 -m larosa bench decode --shape llama2-7b --methods dense,larosa,topk \
        --sparsities 0.25,0.4,0.5,0.75 --gen-lens 128 --out "$out/decode-gtile-h200-llama2-7b" \
        2>&1 | grep -v "%|" | tee "$out/decode-gtile-h200-llama2-7b.log" || rc=1 ;;
    handoff)  # v32: one launch boundary (PDL, stream order) against a grid barrier and a flag, idle and beside a hog
      python3 benchmarks/handoff.py --out "$out/handoff-h200.json" 2>&1 | tee "$out/handoff-h200.log" || rc=1 ;;
    persistent)  # v33: the step's GEMVs in one persistent launch (grid barriers) against the chain of launches, and
      # what the bars leave for the selects (--engine-dense), on each shape of PERSIST_SHAPES
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_persistent.py \
        > "$out/persistent-tests.log" 2>&1 || rc=1
      tail -n 2 "$out/persistent-tests.log"
      for shape in ${PERSIST_SHAPES:-llama2-7b llama3-8b}; do
        python3 benchmarks/persistent.py --check --shape "$shape" --sparsities ${PERSIST_SPARSITIES:-0.4,0.5,0.75} \
          --configs "${PERSIST_CONFIGS:-w2x4:64x128:64x64:chunk,w4x3:32x128:32x64}" \
          ${PERSIST_ARGS:---engine-dense --forms dense-chain,chain-adapter,persist-free-adapter,persist-dep-adapter} \
          --out "$out/persistent-h200-$shape${PERSIST_TAG:-}.json" 2>&1 | tee "$out/persistent-h200-$shape${PERSIST_TAG:-}.log" \
          || rc=1
      done ;;
    selectload)  # v32: the selects and a dependent load timed while a hog kernel streams beside them
      python3 -m pytest -q -p no:cacheprovider tests/test_select_under_load.py > "$out/selectload-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/selectload-tests.log"
      python3 benchmarks/select_under_load.py --out "$out/select-under-load-h200.json" 2>&1 \
        | tee "$out/select-under-load-h200.log" || rc=1 ;;
    oraclelate)  # v31: the gathered kernel's LATE_WAIT compiled and checked, then the late-wait forms beside the plain
      python3 -m pytest -q -p no:cacheprovider tests/test_oracle_step.py > "$out/oracle-tests.log" 2>&1 || rc=1
      tail -n 2 "$out/oracle-tests.log"
      ORACLE_FORMS=dense,gather,gather-late,gather-adapter,gather-adapter-late ORACLE_ENGINES= ORACLE_TAG=-late \
        ORACLE_SPARSITIES=0.4,0.5,0.75 ORACLE_TIMELINE=gather-late,gather-adapter-late \
        ORACLE_SHAPES="llama2-7b llama3-8b" oracle_runs ;;
    oracle)  # v31: the step with every select free (fixed kept lists) and at the byte model (compact rows)
      oracle_runs ;;
    gputests)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_kernels_gpu.py tests/test_engine_gpu.py \
        tests/test_persistent.py \
        > "$out/gpu-tests.log" 2>&1 || rc=1
      tail -n 3 "$out/gpu-tests.log" ;;
    gtilelow)
      LAROSA_KERNEL_IMPL=gtile python3 -m larosa bench decode --shape llama2-7b --methods dense,larosa,topk \
        --sparsities 0.25,0.4 --gen-lens 128 --out "$out/decode-gtile-low-h200-llama2-7b" \
        2>&1 | grep -v "%|" | tee "$out/decode-gtile-low-h200-llama2-7b.log" || rc=1 ;;
    compactselect)
      python3 benchmarks/select_bench.py --compact --out "$out/select-compact-h200.json" \
        2>&1 | tee "$out/select-compact-h200.log" || rc=1 ;;
    gtileab)
      python3 benchmarks/gtile_ab.py --no-grid --out "$out/gtile-ab-default-h200.json" \
        2>&1 | tee "$out/gtile-ab-default-h200.log" || rc=1 ;;
    sidetests)
      python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "side or rmsnorm or pdl" \
        > "$out/side-tests.log" 2>&1 || rc=1
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_engine_gpu.py \
        >> "$out/side-tests.log" 2>&1 || rc=1
      grep -E "passed|failed" "$out/side-tests.log" ;;
    side)
      python3 benchmarks/side_bench.py --out "$out/side-h200.json" 2>&1 | tee "$out/side-h200.log" || rc=1 ;;
    adaptermodes)
      parts adapter_modes adapter-modes-h200 ;;
    sidetiles)
      parts side_tiles side-tiles-h200 ;;
    ropefusion)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_attention_kernel.py tests/test_engine_gpu.py \
        tests/test_engine.py -k "rope or attention or graph or compile" > "$out/rope-tests.log" 2>&1 || rc=1
      grep -E "passed|failed" "$out/rope-tests.log"
      parts rope_fusion rope-fusion-h200 ;;
    attncombine)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_attention_kernel.py tests/test_engine_gpu.py \
        tests/test_engine.py -k "rope or attention or combine or graph or compile" > "$out/attn-combine-tests.log" 2>&1 || rc=1
      grep -E "passed|failed" "$out/attn-combine-tests.log"
      parts attn_combine attn-combine-h200 ;;
    sidein)
      LAROSA_SIDE_IN=gemv python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_kernels.py \
        tests/test_engine_gpu.py -k "side or adapter_modes" > "$out/side-in-tests.log" 2>&1 || rc=1
      grep -E "passed|failed" "$out/side-in-tests.log"
      parts side_in side-in-h200 ;;
    sidetilesgemv)
      parts side_tiles_gemv side-tiles-gemv-h200 ;;
    asm32)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_kernels_gpu.py tests/test_kernels.py \
        -k "compacting or compact_store" > "$out/asm32-tests.log" 2>&1 || rc=1
      grep -E "passed|failed" "$out/asm32-tests.log"
      python3 benchmarks/select_bench.py --compact --warps 8 --out "$out/select-compact32-h200.json" \
        2>&1 | tee "$out/select-compact32-h200.log" || rc=1
      parts compact_store32 compact-store32-h200
      LAROSA_COMPACT_STORE=asm32 python3 benchmarks/profile_decode.py --shape llama2-7b --sparsity 0.5 \
        --methods larosa,topk --out "$out/profile-asm32-llama2-7b-p0.5.json" 2>&1 \
        | tee "$out/profile-asm32-llama2-7b-p0.5.log" || rc=1 ;;
    densekernel)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_dense_kernel.py \
        tests/test_engine_gpu.py -k "dense" > "$out/dense-kernel-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/dense-kernel-tests.log"
      python3 benchmarks/dense_chain.py --block --out "$out/dense-chain-block-h200.json" 2>&1 \
        | tee "$out/dense-chain-block-h200.log" || rc=1
      parts dense_kernel dense-kernel-h200 ;;
    denseforms)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_dense_kernel.py \
        > "$out/dense-forms-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/dense-forms-tests.log"
      python3 benchmarks/dense_chain.py --block --tilings "2,2048,2,2;4,1024,2,4;2,1024,2,4" \
        --out "$out/dense-chain-forms-h200.json" 2>&1 | tee "$out/dense-chain-forms-h200.log" || rc=1
      python3 benchmarks/profile_decode.py --shape llama2-7b --sparsity 0.5 --dense-kernel-ab \
        --out "$out/profile-dense-kernel-llama2-7b.json" 2>&1 | tee "$out/profile-dense-kernel-llama2-7b.log" || rc=1 ;;
    densetiles)
      parts dense_kernel dense-tiles-h200 ;;
    gtilesites)
      parts gtile_sites gtile-sites-h200 ;;
    layoutcold)  # v29: layout_ab.py with the weights cold (copies cycled), and the gate/up GEMV after its norm + select
      python3 benchmarks/layout_ab.py --cold --out "$out/layout-ab-cold-h200.json" 2>&1 \
        | tee "$out/layout-ab-cold-h200.log" || rc=1 ;;
    densehead)  # v21: LaRoSA's head in dense_linear or cuBLAS; the later stages of the call run with the winner
      parts dense_head dense-head-h200
      if grep -q "^dense head for LaRoSA: on" "$out/dense-head-h200.log"; then
        export LAROSA_DENSE_HEAD=1; echo "LAROSA_DENSE_HEAD=1 for the later stages"; fi ;;
    headcause)
      parts head_cause head-cause-h200 ;;
    headhints)
      parts head_hints head-hints-h200 ;;
    headpdl)
      parts head_pdl head-pdl-h200 ;;
    headdefault)
      parts head_default head-default-h200 ;;
    headrule)
      for shape in llama2-7b llama3-8b; do
        python3 benchmarks/decode_parts.py --parts head_rule --shape $shape --out "$out/head-rule-h200-$shape.json" \
          2>&1 | tee "$out/head-rule-h200-$shape.log" || rc=1
      done ;;
    graphdump)
      python3 benchmarks/graph_dump.py --out "$out/graph-dump" 2>&1 | tee "$out/graph-dump.log" || rc=1
      gzip -q "$out"/graph-dump/*.dot ;;
    timeline)
      python3 benchmarks/graph_timeline.py --out "$out/timeline-llama2-7b.json" --traces "$out/timeline-traces" \
        ${TIMELINE_VARIANTS:+--variants "$TIMELINE_VARIANTS"} 2>&1 \
        | tee "$out/timeline-llama2-7b.log" || rc=1 ;;
    headprofile)
      python3 benchmarks/profile_decode.py --shape llama2-7b --sparsity 0.5 --methods larosa,topk --dense-head-ab \
        --out "$out/profile-dense-head-llama2-7b.json" 2>&1 | tee "$out/profile-dense-head-llama2-7b.log" || rc=1 ;;
    spec)  # v22: the speculative GEMV at the o and down sites: GPU tests, per-op A/B with a tile sweep, end to end
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_spec_kernel.py tests/test_kernels_gpu.py \
        tests/test_engine_gpu.py tests/test_engine.py -k "spec" > "$out/spec-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/spec-tests.log"
      python3 benchmarks/spec_ab.py --out "$out/spec-ab-h200.json" 2>&1 | tee "$out/spec-ab-h200.log" || rc=1
      best=$(sed -n 's/^best spec tiles for o: //p' "$out/spec-ab-h200.log")
      if [ -n "$best" ]; then export LAROSA_SPEC_TILES="$best"; echo "LAROSA_SPEC_TILES=$best for the later stages"; fi
      spec_e2e spec-e2e ;;
    prefetch)  # v23: the selects' L2 prefetch: GPU tests, per-op A/B by budget, LaRoSA end to end by budget
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_prefetch.py tests/test_engine_gpu.py \
        tests/test_engine.py -k "prefetch" > "$out/prefetch-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/prefetch-tests.log"
      python3 benchmarks/prefetch_ab.py --out "$out/prefetch-ab-h200.json" 2>&1 | tee "$out/prefetch-ab-h200.log" || rc=1
      prefetch_e2e prefetch-e2e ;;
    prefetche2e)
      prefetch_e2e prefetch-e2e ;;
    downhist)  # v30: the down select from the gate/up output's histogram
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_hist_select.py tests/test_engine.py \
        -k "hist" > "$out/hist-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/hist-tests.log"
      python3 benchmarks/graph_timeline.py --out "$out/timeline-hist-llama2-7b.json" --traces "$out/timeline-traces" \
        --variants "${TIMELINE_VARIANTS:-larosa,larosa-hist,larosa-hist-3,larosa-hist-5,topk,topk-hist}" 2>&1 \
        | tee "$out/timeline-hist-llama2-7b.log" || rc=1
      hist_e2e hist-e2e ;;
    downhiste2e)
      hist_e2e hist-e2e ;;
    histtests)  # v30: the histogram and loop-search selects compiled, and the engine's hint / histogram tests
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_hist_select.py tests/test_engine.py \
        -k "hist or hint" > "$out/hist-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/hist-tests.log" ;;
    histab)  # v30: the down select's variants, then LaRoSA end to end by configuration (name:VAR=v,VAR=v ...)
      python3 benchmarks/graph_timeline.py --out "$out/timeline-histab-llama2-7b.json" --traces "$out/timeline-traces" \
        --variants "${TIMELINE_VARIANTS:-larosa,larosa-hist,larosa-hist-trust,larosa-hist-xdown,larosa-no-hist-xdown,larosa-no-dyn}" \
        2>&1 | tee "$out/timeline-histab-llama2-7b.log" || rc=1
      for rep in 1 2; do
        for cfg in ${HIST_CFGS:-nohist:LAROSA_DOWN_HIST=0,LAROSA_SELECT_DYN=0 hist:LAROSA_DOWN_HIST=1 dyn:LAROSA_DOWN_HIST=0,LAROSA_SELECT_DYN=16384}; do
          name=${cfg%%:*}; envs=${cfg#*:}
          env ${envs//,/ } python3 -m larosa bench decode --shape llama2-7b --methods larosa --sparsities 0.4,0.5,0.75 \
            --gen-lens 128 --out "$out/histab-$name-$rep" 2>&1 | grep -v "%|" | tee "$out/histab-$name-$rep.log" || rc=1
        done
      done ;;
    prefetchx)  # v23: per op with hot weights beside; LaRoSA LLaMA2-7B by budget and pieces per row (alternating)
      python3 benchmarks/prefetch_ab.py --sites qkv,o,gate_up --budgets 0,8 --out "$out/prefetch-hot-h200.json" \
        2>&1 | tee "$out/prefetch-hot-h200.log" || rc=1
      for rep in 1 2; do for cfg in 0:8 4:8 8:8 12:8 8:1 8:32; do
        mb=${cfg%:*}; ch=${cfg#*:}
        LAROSA_PREFETCH_MB=$mb LAROSA_PREFETCH_CHUNKS=$ch python3 -m larosa bench decode --shape llama2-7b \
          --methods larosa --sparsities 0.4,0.5,0.75 --gen-lens 128 --out "$out/prefetchx-mb$mb-ch$ch-$rep" 2>&1 \
          | grep -v "%|" | tee "$out/prefetchx-mb$mb-ch$ch-$rep.log" || rc=1
      done; done ;;
    gatherx)  # not run yet: the kept list carrying x (LAROSA_GATHER_X): GPU tests, then LaRoSA end to end off / on
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_gather_x.py tests/test_kernels_gpu.py \
        -k "gather or compact" > "$out/gather-x-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/gather-x-tests.log"
      for run in llama2-7b:1 llama2-7b:2 llama3-8b:1; do for on in 0 1; do
        shape=${run%:*}; rep=${run#*:}
        LAROSA_GATHER_X=$on python3 -m larosa bench decode --shape $shape --methods larosa,topk \
          --sparsities 0.4,0.5,0.75 --gen-lens 128 --out "$out/gather-x-$shape-$on-$rep" 2>&1 | grep -v "%|" \
          | tee "$out/gather-x-$shape-$on-$rep.log" || rc=1
      done; done ;;
    attnprograms)  # not run yet: the split-cache attention's program target at 2048 generated tokens (p99/p50)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_attention_kernel.py \
        > "$out/attn-programs-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/attn-programs-tests.log"
      for rep in 1 2; do for n in ${ATTN_NS:-256 512 1024 4096}; do
        LAROSA_ATTN_PROGRAMS=$n python3 -m larosa bench decode --shape llama2-7b --methods larosa --sparsities 0.5 \
          --gen-lens 2048 --out "$out/attn-programs-$n-$rep" 2>&1 | grep -v "%|" | tee "$out/attn-programs-$n-$rep.log" \
          || rc=1
      done; done ;;
    hintdown)  # v24: the down select hinted too (its L2 prefetch then runs): LaRoSA with hint sites 0,1,2 / 0,1,2,3
      for run in llama2-7b:1 llama2-7b:2 llama3-8b:1; do for sites in 0,1,2 0,1,2,3; do
        shape=${run%:*}; rep=${run#*:}
        LAROSA_HINT_SITES=$sites python3 -m larosa bench decode --shape $shape --methods larosa \
          --sparsities 0.4,0.5,0.75 --gen-lens 128 --out "$out/hint-down-$shape-${sites//,/}-$rep" 2>&1 \
          | grep -v "%|" | tee "$out/hint-down-$shape-${sites//,/}-$rep.log" || rc=1
      done; done ;;
    gatherxwidth)  # v25: x in every kept list, or only in rows up to 8192 wide (not the down select), alternating
      for run in llama2-7b:1 llama2-7b:2 llama3-8b:1; do for gx in 1 8192; do
        shape=${run%:*}; rep=${run#*:}
        LAROSA_GATHER_X=$gx python3 -m larosa bench decode --shape $shape --methods larosa,topk \
          --sparsities 0.4,0.5,0.75 --gen-lens 128 --out "$out/gather-x-width-$shape-$gx-$rep" 2>&1 \
          | grep -v "%|" | tee "$out/gather-x-width-$shape-$gx-$rep.log" || rc=1
      done; done ;;
    gtilelowab)  # v26: p = 0.25 with masked rows or the engine's own choice (gathered since v26), alternating
      for rep in 1 2; do for impl in tile auto; do for shape in llama2-7b llama3-8b; do
        LAROSA_KERNEL_IMPL=$impl python3 -m larosa bench decode --shape $shape --methods larosa,topk --sparsities 0.25 \
          --gen-lens 128 --out "$out/low-$shape-$impl-$rep" 2>&1 | grep -v "%|" | tee "$out/low-$shape-$impl-$rep.log" || rc=1
      done; done; done ;;
    windowe2e)  # v25: the hinted selects' window (LAROSA_SELECT_WINDOW) at the engine's own hint sites
      for rep in 1 2; do for win in ${WINDOWS:-4 5}; do
        LAROSA_SELECT_WINDOW=$win python3 -m larosa bench decode --shape llama2-7b --methods larosa \
          --sparsities 0.4,0.5,0.75 --gen-lens 128 --out "$out/window-llama2-7b-w$win-$rep" 2>&1 \
          | grep -v "%|" | tee "$out/window-llama2-7b-w$win-$rep.log" || rc=1
      done; done ;;
    attnbalanced)  # v24: the split attention's splits sized by the filled length (LAROSA_ATTN_BALANCED) at 2048 tokens
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_attention_kernel.py \
        > "$out/attn-balanced-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/attn-balanced-tests.log"
      for rep in 1 2; do for on in 0 1; do
        LAROSA_ATTN_BALANCED=$on python3 -m larosa bench decode --shape llama2-7b --methods dense,larosa \
          --sparsities 0.5 --gen-lens 2048 --out "$out/attn-balanced-$on-$rep" 2>&1 | grep -v "%|" \
          | tee "$out/attn-balanced-$on-$rep.log" || rc=1
      done; done ;;
    spece2e)  # v22: LaRoSA end to end with the speculative GEMV off / on (LAROSA_SPEC), both shapes
      spec_e2e spec-e2e ;;
    densetests)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_dense_kernel.py \
        tests/test_engine_gpu.py -k "dense" > "$out/dense-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/dense-tests.log" ;;
    densesites)
      parts dense_sites dense-sites-h200 ;;
    densesites2)  # a second round around the first's best (now SITE_TILES)
      dense_round 2 "down=16,512,2,8/16,1024,2,8/32,256,2,8/8,1024,2,8/16,1024,1,8/32,512,1,8;o=16,512,2,8/16,1024,2,8/32,256,2,8/8,1024,2,8/16,256,2,8;qkv=8,512,2,4/8,1024,2,8/16,256,2,8/8,256,2,4/4,512,2,4;gate_up=2,1024,2,2/4,1024,2,8/2,2048,2,4/4,512,2,4/2,512,2,2" ;;
    densesites3)  # the 4-warp form of the o / down winner (two programs per SM at 250 registers)
      dense_round 3 "down=16,512,2,8/16,512,2,4;o=16,512,2,8/16,512,2,4" ;;
    chains)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_engine_gpu.py -k "dense_kernel" \
        > "$out/chains-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/chains-tests.log"
      parts dense_kernel,sparse_chain chains-h200
      python3 benchmarks/dense_chain.py --block --tilings "4,1024,2,4;2,2048,2,2;8,512,2,4" \
        --out "$out/dense-chain-forms-h200.json" 2>&1 | tee "$out/dense-chain-forms-h200.log" || rc=1
      python3 benchmarks/profile_decode.py --shape llama2-7b --sparsity 0.5 --dense-kernel-ab \
        --out "$out/profile-dense-kernel-llama2-7b.json" 2>&1 | tee "$out/profile-dense-kernel-llama2-7b.log" || rc=1 ;;
    densechain)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_dense_kernel.py \
        > "$out/dense-chain-tests.log" 2>&1 || rc=1
      tail -n 1 "$out/dense-chain-tests.log"
      python3 benchmarks/dense_chain.py --out "$out/dense-chain-h200.json" 2>&1 | tee "$out/dense-chain-h200.log" \
        || rc=1 ;;
    compactstore)
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_kernels_gpu.py -k compacting \
        > "$out/compact-store-tests.log" 2>&1 || rc=1
      grep -E "passed|failed" "$out/compact-store-tests.log"
      python3 benchmarks/select_bench.py --compact --out "$out/select-compact-h200.json" \
        2>&1 | tee "$out/select-compact-h200.log" || rc=1
      parts compact_store compact-store-h200 ;;
    adapterprefix)
      python3 benchmarks/adapter_prefix.py --out "$out/adapter-prefix-h200.json" \
        2>&1 | tee "$out/adapter-prefix-h200.log" || rc=1 ;;
    window)
      parts select_window select-window-h200 ;;
    hinttests)
      python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine.py -k "hint or pdl" \
        > "$out/hint-tests.log" 2>&1 || rc=1
      python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_engine_gpu.py \
        >> "$out/hint-tests.log" 2>&1 || rc=1
      grep -E "passed|failed" "$out/hint-tests.log" ;;
    fusions)
      parts fusions fusions-h200 ;;
    tables)
      for shape in llama2-7b llama3-8b; do
        python3 -m larosa bench decode --shape $shape --methods dense,larosa,topk,teal \
          --sparsities 0.25,0.4,0.5,0.75 --gen-lens 128 --out "$out/decode-h200-$shape" \
          2>&1 | grep -v "%|" | tee "$out/decode-h200-$shape.log" || rc=1
      done ;;
    genlens)
      python3 -m larosa bench decode --shape llama2-7b --methods dense,larosa,teal --sparsities 0.5 \
        --gen-lens 128,512,2048 --out "$out/decode-h200-llama2-7b-genlens" \
        2>&1 | grep -v "%|" | tee "$out/decode-h200-llama2-7b-genlens.log" || rc=1 ;;
    gemv)
      python3 benchmarks/gemv.py --no-select-sweep --out "$out/gemv-h200-bf16.json" \
        2>&1 | tee "$out/gemv-h200-bf16.log" || rc=1 ;;
    *)
      echo "unknown stage $stage" >&2; rc=2 ;;
  esac
  echo "stage $stage: $(( $(date +%s) - start )) s" | tee -a "$out/stages.txt"
done
exit $rc
}
# The stages run as a background job in a process group of their own, and this shell waits for it: a TERM (the
# `timeout` around a device call) then interrupts the wait at once, stops the stage that is running and still packs
# what the finished stages wrote (v25: a call cut by its timeout before the end used to return no tarball).
set -m
run_stages "$@" &
job=$!
trap 'echo "stopped: packing what the stages wrote so far" >&2; kill -TERM -- -"$job" 2>/dev/null; wait "$job"; \
  echo "stopped early" >> "$out/stages.txt"; pack; exit 124' TERM INT
wait "$job"
rc=$?
pack
exit $rc
