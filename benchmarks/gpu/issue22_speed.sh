#!/usr/bin/env bash
# Issue 22: one GPU call that measures what the issue asks, every stage under its own timeout, results in $OUT
# (6 files: env.txt with a JSON status line per stage, results.jsonl, pytest_gpu.txt, logs.txt, syncs.json,
# profile.txt). Stages (STAGES, in this order by default):
#   tests    pytest -m gpu on the training-side tests (ops, top-k selection)
#   masks    bench_masks --part topk: every top-k candidate on BERT-base / RoBERTa-large shapes, fp32 and bf16
#   train    bench_train --device cuda: plain loop, then dense and CAP-m with ZeRO-2, ZeRO-3 (teacher offloaded) and
#            stage 0 + autocast (step times, ratios, peak memory, MFU), the table of the issue
#            (TRAIN_RUNS / TRAIN_STAGES: bench_train --runs / --stages, e.g. add movement_kd)
#   syncs    count_syncs --mode cuda on a ZeRO-2 CAP-m run of the same model: host syncs per steady step by source
#   profile  profile_step: a torch.profiler table of one steady ZeRO-2 CAP-m step
# On the GPU machine, from the repo root (after bash ../shared/gpu/make_kit.sh on the CPU side):
#   source .devkit/env.sh && bash benchmarks/gpu/issue22_speed.sh
# CPU smoke test at tiny sizes:
#   OUT=/tmp/o DEVICE=cpu SIZE=tiny bash benchmarks/gpu/issue22_speed.sh
# Default limits sum to 440 s of stages (+ ~40 s setup): run it with timeout_s 600.
set -uo pipefail
OUT=${OUT:?set OUT to the folder that comes back}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-large}
STAGES=${STAGES:-tests masks train syncs profile}
STEPS=${TRAIN_STEPS:-30}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
WORK=${WORK:-$(mktemp -d)}
if [ "$DEVICE" = cpu ]; then
  export DS_ACCELERATOR=cpu CAP_DS_TOPK=${CAP_DS_TOPK:-radix}
  T_TESTS=${T_TESTS:-300} T_MASKS=${T_MASKS:-300} T_TRAIN=${T_TRAIN:-900} T_SYNCS=${T_SYNCS:-300} T_PROF=${T_PROF:-300}
  MASK_ARGS="--topk_shapes tiny --keeps 0.1 --dtypes fp32 --reps 2 --threads 1"
  BATCH=8 STEPS=${TRAIN_STEPS:-7} SYNC_MODE=reads
else
  T_TESTS=${T_TESTS:-45} T_MASKS=${T_MASKS:-45} T_TRAIN=${T_TRAIN:-270} T_SYNCS=${T_SYNCS:-40} T_PROF=${T_PROF:-40}
  MASK_ARGS="--topk_shapes base,large --keeps 0.1 --dtypes fp32,bf16 --reps 10"
  BATCH=32 SYNC_MODE=cuda
fi
TRAIN_ARGS="--device $DEVICE --size $SIZE --batch $BATCH --work_dir $WORK"

source benchmarks/gpu/stage.sh
stage() {  # stage NAME SECONDS CMD...: every stage's output goes to logs.txt, after a header line
  echo "===== $1: ${*:3}" >>"$OUT/logs.txt"
  run_stage "$1" "$2" "$OUT/logs.txt" "${@:3}"
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"; git rev-parse HEAD 2>/dev/null; echo "DEVICE=$DEVICE SIZE=$SIZE STAGES=$STAGES"
  python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
  nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv 2>/dev/null || true
  uptime
} >"$OUT/env.txt" 2>&1

capm_flags() {  # the ZeRO-2 CAP-m run of bench_train (sets up $WORK once), with a logging step at its end only
  python3 benchmarks/bench_train.py $TRAIN_ARGS --steps "$1" --print_flags capm:zero2 2>>"$OUT/logs.txt"
}

for s in $STAGES; do
  case $s in
    tests)   stage tests "$T_TESTS" python3 -m pytest -q -m gpu tests/test_ops.py tests/test_topk.py \
               -p no:cacheprovider --junit-xml=/dev/null ;
             grep -E "passed|failed|error" "$OUT/logs.txt" | tail -1 >"$OUT/pytest_gpu.txt" ;;
    masks)   stage masks "$T_MASKS" python3 benchmarks/bench_masks.py --part topk --device "$DEVICE" $MASK_ARGS \
               --jsonl "$OUT/results.jsonl" ;;
    train)   stage train "$T_TRAIN" python3 benchmarks/bench_train.py $TRAIN_ARGS --steps "$STEPS" \
               --runs "${TRAIN_RUNS:-plain,dense,capm}" --stages "${TRAIN_STAGES:-zero2,zero3,zero0}" \
               --jsonl "$OUT/results.jsonl" ;;
    syncs)   FLAGS=$(capm_flags 16) && stage syncs "$T_SYNCS" python3 benchmarks/count_syncs.py --mode "$SYNC_MODE" \
               --out "$OUT/syncs.json" -- $FLAGS --check_steps 8 ;;
    profile) FLAGS=$(capm_flags 10) && stage profile "$T_PROF" python3 benchmarks/profile_step.py --step 8 \
               --out "$OUT/profile.txt" -- $FLAGS ;;
    *) echo "STAGES: unknown stage '$s'; allowed: tests masks train syncs profile" >&2; exit 2 ;;
  esac
done
[ -f "$OUT/syncs.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({'bench': 'syncs', 'mode': d['mode'], 'steps': d['steps'], **{'per_step_'+k: v for k, v in d['syncs_per_steady_step'].items()}}))" "$OUT/syncs.json" >>"$OUT/results.jsonl"
ls -l "$OUT"
