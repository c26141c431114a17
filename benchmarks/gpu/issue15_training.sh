#!/usr/bin/env bash
# Issue 15, training half: one GPU run that re-measures the masked-linear routing, the top-k candidates and the
# training step costs, every stage under its own timeout, results as JSON lines (and logs) in $OUT (8 files).
#
# On the GPU machine, from the repo root (after bash ../shared/gpu/make_kit.sh on the CPU side):
#   source .devkit/env.sh && OUT=$OUT bash benchmarks/gpu/issue15_training.sh
# CPU smoke test at tiny sizes:
#   OUT=/tmp/o DEVICE=cpu SIZE=tiny bash benchmarks/gpu/issue15_training.sh
# Knobs: STAGES (default "tests kernels masks train"), TRAIN_STEPS (30), TRAIN_RUNS, TRAIN_STAGES (bench_train
# --runs/--stages), T_TESTS/T_KERNELS/T_MASKS/T_TRAIN (seconds per stage; defaults sum to 9.5 minutes: run it with a 600 s limit, or split it with STAGES).
set -uo pipefail
OUT=${OUT:?set OUT to the folder that comes back}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-large}
STAGES=${STAGES:-tests kernels masks train}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
if [ "$DEVICE" = cpu ]; then
  export DS_ACCELERATOR=cpu
  T_TESTS=${T_TESTS:-300} T_KERNELS=${T_KERNELS:-300} T_MASKS=${T_MASKS:-300} T_TRAIN=${T_TRAIN:-900}
  KERNEL_ARGS="--tokens 32 --train_reps 2 --threads 1"
  MASK_ARGS="--topk_shapes tiny --keeps 0.1 --dtypes fp32 --reps 2 --threads 1"
  TRAIN_ARGS="--size tiny --steps ${TRAIN_STEPS:-7} --batch 8"
else
  T_TESTS=${T_TESTS:-120} T_KERNELS=${T_KERNELS:-90} T_MASKS=${T_MASKS:-60} T_TRAIN=${T_TRAIN:-300}
  KERNEL_ARGS="--reps 30"
  MASK_ARGS="--topk_shapes base,large --keeps 0.1,0.5 --dtypes fp32,bf16 --reps 20"
  TRAIN_ARGS="--size $SIZE --steps ${TRAIN_STEPS:-30} --batch 32"
fi
[ -n "${TRAIN_RUNS:-}" ] && TRAIN_ARGS="$TRAIN_ARGS --runs $TRAIN_RUNS"
[ -n "${TRAIN_STAGES:-}" ] && TRAIN_ARGS="$TRAIN_ARGS --stages $TRAIN_STAGES"

source benchmarks/gpu/stage.sh
stage() {  # stage NAME SECONDS LOGFILE CMD...: a fresh log per stage
  : >"$3"
  run_stage "$@"
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"; git rev-parse HEAD 2>/dev/null; echo "DEVICE=$DEVICE SIZE=$SIZE STAGES=$STAGES"
  python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
  nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv 2>/dev/null || true
  uptime
} >"$OUT/env.txt" 2>&1

for s in $STAGES; do
  case $s in
    tests)   stage tests "$T_TESTS" "$OUT/pytest_gpu.txt" python3 -m pytest -q -m gpu tests/test_ops.py tests/test_topk.py ;;
    kernels) stage kernels "$T_KERNELS" "$OUT/kernels.log" python3 benchmarks/bench_kernels.py --only training \
               --device "$DEVICE" $KERNEL_ARGS --jsonl "$OUT/kernels.jsonl" ;;
    masks)   stage masks "$T_MASKS" "$OUT/masks.log" python3 benchmarks/bench_masks.py --part topk \
               --device "$DEVICE" $MASK_ARGS --jsonl "$OUT/masks.jsonl" ;;
    train)   stage train "$T_TRAIN" "$OUT/train.log" python3 benchmarks/bench_train.py --device "$DEVICE" \
               $TRAIN_ARGS --jsonl "$OUT/train.jsonl" ;;
    *) echo "STAGES: unknown stage '$s'; allowed: tests kernels masks train" >&2; exit 2 ;;
  esac
done
ls -l "$OUT"
