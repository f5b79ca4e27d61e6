#!/usr/bin/env bash
# The README's perplexity tables (issue: the LaRoSA method). CPU, fp32, calibration on validation 16x2048.
# Usage: bash benchmarks/ppl_table.sh smollm2-135m 40
set -euo pipefail
MODEL=${1:-smollm2-135m}; WIN=${2:-40}
OUT=benchmarks/results
larosa eval ppl --model "$MODEL" --windows "$WIN" --form dense,fused --sparsity 0,0.25,0.4,0.5 \
  --out "$OUT/ppl-$MODEL-w$WIN-dense-fused.json"
larosa eval ppl --model "$MODEL" --windows "$WIN" --form official --sparsity 0.25,0.4,0.5 \
  --out "$OUT/ppl-$MODEL-w$WIN-official.json"
