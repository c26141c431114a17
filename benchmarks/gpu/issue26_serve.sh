#!/usr/bin/env bash
# Issue 26 on one GPU in one device call (< 8 min): the GPU tests of the serving path, of 2:4 (sm 8.x and 9.x) and
# of the CSR ops (csr_linear's residual and LayerNorm on CUDA),
# then dense eager / dense under CUDA graphs / CAP-f cleaned at 50 % and 75 % / 90 % sparsify'd under CUDA graphs,
# BERT-base, bf16, seq 128, batch 1 and 32 (benchmarks/bench_serve.py), then the same with torch.compile rows.
# Every stage runs under its own timeout; results as JSON lines in $OUT.
#
#   source .devkit/env.sh && OUT=$OUT bash benchmarks/gpu/issue26_serve.sh
# CPU smoke test of the script: OUT=/tmp/o DEVICE=cpu SIZE=tiny SEQ=32 BATCHES=1,2 REPS=3 bash benchmarks/gpu/issue26_serve.sh
# Outputs (<= 8 files): stages.jsonl (rc and seconds per stage), serve.jsonl (the table's rows), log.txt, gpu.txt.
set -uo pipefail
OUT=${OUT:?set OUT to the folder that comes back}
DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-base} SEQ=${SEQ:-128} BATCHES=${BATCHES:-1,32} REPS=${REPS:-30}
T_TESTS=${T_TESTS:-150} T_SERVE=${T_SERVE:-150} T_COMPILE=${T_COMPILE:-150}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
[ "$DEVICE" = cpu ] && export DS_ACCELERATOR=cpu
(nvidia-smi 2>/dev/null || echo "no nvidia-smi") > "$OUT/gpu.txt"

stage() {  # stage NAME SECONDS COMMAND...: time-boxed, output to log.txt, rc and seconds to stages.jsonl
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name: $*" >> "$OUT/log.txt"
  timeout "$limit" "$@" >> "$OUT/log.txt" 2>&1
  rc=$?
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >> "$OUT/stages.jsonl"
}

if [ "$DEVICE" = cuda ]; then
  stage tests "$T_TESTS" python -m pytest -q -m gpu tests/test_serve.py tests/test_sparse_dispatch.py \
      tests/test_sparse.py tests/test_sparse_fusion.py
fi
bench=(python benchmarks/bench_serve.py --device "$DEVICE" --size "$SIZE" --batches "$BATCHES" --seq "$SEQ"
       --reps "$REPS" --jsonl "$OUT/serve.jsonl")
stage serve "$T_SERVE" "${bench[@]}"
[ "$DEVICE" = cuda ] && stage compile "$T_COMPILE" "${bench[@]}" --compile
cat "$OUT/stages.jsonl"
