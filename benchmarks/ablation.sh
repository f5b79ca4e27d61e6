#!/usr/bin/env bash
# Issue 7 ablation table: variants vs TEAL at parameter-weighted 0.25 / 0.375 / 0.47 (CPU, fp32).
# Usage: bash benchmarks/ablation.sh smollm2-135m 40 [zeroshot-limit]
#        bash benchmarks/ablation.sh qwen2.5-0.5b 4 [zeroshot-limit]
# Resumable: re-running skips finished cells. Zero-shot (when a limit is given) runs for every cell.
# METHODS=a,b,... runs a subset (two workers can share the folder; a subset run writes its outputs for
# that subset only, so finish with RENDER=1, which rebuilds the outputs from the finished cells).
set -euo pipefail
MODEL=${1:-smollm2-135m}; WIN=${2:-40}; ZS=${3:-0}
ALL=dense,larosa-fused,teal,larosa-searched-weighted,larosa-searched,topk,topk-weighted,larosa-searched-weighted-block,larosa-fused-gammaq,teal-greedy,larosa-greedy,larosa-auto
larosa compare --model "$MODEL" --windows "$WIN" --targets "${TARGETS:-0.25,0.375,0.47}" --zeroshot-limit "$ZS" \
  --methods "${METHODS:-$ALL}" --held-out 4x1024 --out "benchmarks/results/ablation-$MODEL-w$WIN" \
  ${RENDER:+--render-only}
