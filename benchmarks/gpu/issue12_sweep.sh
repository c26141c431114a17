#!/usr/bin/env bash
# Issue 12 on one GPU in one device call (<= 10 min): fine-tune the SST-2 teacher, then magnitude + KD, movement + KD,
# CAP-mag and CAP-m at 90 % over three seeds side by side on the GPU, and the reference movement init (zero scores)
# at the same budget. Every stage runs under its own `timeout`; whatever finished is collected, so a stage cut short
# still reports the runs it completed. Run from the repo root after `source .devkit/env.sh`:
#
#   OUT=$OUT bash benchmarks/gpu/issue12_sweep.sh
#
# Sizes come from the environment (defaults: the issue's GPU budget, 16k rows x 2 epochs x batch 32 = 1,000 steps).
# A CPU smoke test of the script itself: NUM_GPUS=0 ROWS=64 EPOCHS=1 BATCH=16 TEACHER_EPOCHS=1 SEEDS=42 PAR=1
# EVAL_ROWS=32 MODEL=<2-layer model dir> OUT=/tmp/o bash benchmarks/gpu/issue12_sweep.sh
# Outputs in $OUT (<= 8 files): stages.jsonl (rc and seconds per stage), main.json / reference.json (every finished
# run with seed, steps, budget and machine: reproduce_glue --collect), main.md / reference.md (the sweep tables),
# log.txt (all stage output), gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the results folder}"
NUM_GPUS=${NUM_GPUS:-1} ROWS=${ROWS:-16000} EPOCHS=${EPOCHS:-2} BATCH=${BATCH:-32} SEEDS=${SEEDS:-42,43,44}
PAR=${PAR:-6} TEACHER_EPOCHS=${TEACHER_EPOCHS:-2} LR=${LR:-1e-4} EVAL_ROWS=${EVAL_ROWS:-}
T_MAIN=${T_MAIN:-330} T_REF=${T_REF:-120} T_TEACHER=${T_TEACHER:-150}
W=${WORK:-runs/gpu_issue12}
mkdir -p "$OUT" "$W"
common=(--task_name sst2 --max_train_samples "$ROWS" --per_device_train_batch_size "$BATCH"
        --num_train_epochs "$EPOCHS" --learning_rate "$LR" --teacher_epochs "$TEACHER_EPOCHS" --sparsities 0.9
        --seeds "$SEEDS" --parallel "$PAR" --num_gpus "$NUM_GPUS" --discard_weights)
[ -n "${MODEL:-}" ] && common+=(--model_name_or_path "$MODEL")
[ -n "$EVAL_ROWS" ] && common+=(--max_eval_samples "$EVAL_ROWS")

stage() {  # stage NAME SECONDS COMMAND...: time-boxed, output to log.txt, rc and seconds to stages.jsonl
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name: $*" >> "$OUT/log.txt"
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >> "$OUT/log.txt" 2>&1
    rc=$?
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"limit_s\": $limit}" \
        >> "$OUT/stages.jsonl"
    return $rc
}

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; python -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } \
    > "$OUT/gpu.txt" 2>&1
# The teacher and the first magnitude + KD run, alone, so that the teacher's cost is its own stage and the main
# stage starts with a teacher on disk.
stage teacher "$T_TEACHER" python benchmarks/reproduce_glue.py "${common[@]}" --output_dir "$W/main" \
    --methods magnitude_kd --seeds "${SEEDS%%,*}" --parallel 1
stage main "$T_MAIN" python benchmarks/reproduce_glue.py "${common[@]}" --output_dir "$W/main" \
    --methods movement_kd,cap_m,magnitude_kd,cap_mag
stage reference "$T_REF" python benchmarks/reproduce_glue.py "${common[@]}" --output_dir "$W/reference" \
    --teacher_name_or_path "$W/main/teacher/final" --methods movement_kd \
    --extra_args "--mask_init constant --mask_scale 0"

# Collect every finished run (also those of a stage that timed out): each row carries its seed, steps, budget and
# the machine it ran on; the folders themselves (weights discarded) can be carried off and resumed elsewhere.
for sweep in main reference; do
    [ -f "$W/$sweep/sweep_config.json" ] || continue
    python benchmarks/reproduce_glue.py --output_dir "$W/$sweep" --num_gpus "$NUM_GPUS" --collect \
        >> "$OUT/log.txt" 2>&1 || continue
    cp "$W/$sweep/results.json" "$OUT/$sweep.json"
    cp "$W/$sweep/results.md" "$OUT/$sweep.md"
done
