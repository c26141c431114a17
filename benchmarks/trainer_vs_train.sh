#!/usr/bin/env bash
# The same CAP-m recipe through cap_ds/train.py and through the Hugging Face Trainer integration
# (examples/hf_trainer_cap.py): same teacher, data, seeds, budget and hyper-parameters; one JSON line per run in
# $OUT/results.jsonl (path, seed, accuracy, sparsity, wall seconds).
#
#   OUT=/tmp/tvt SEEDS="42 43" bash benchmarks/trainer_vs_train.sh
#
# Defaults: the real 6-layer all-MiniLM-L6-v2, SST-2's first 2,000 training rows, the whole dev set (872), seq 64,
# batch 32, 3 epochs (189 optimizer steps), movement pruning to 90 % with PrC/SnC/FiC + KD, LR 5e-5, warm-up 10 %.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/trainer_vs_train}
SEEDS=${SEEDS:-"42 43"}
GLUE=${GLUE_DIR:-../shared/data/glue}
TRAIN_ROWS=${TRAIN_ROWS:-2000}
EPOCHS=${EPOCHS:-3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
data=(--task_name sst2 --data_dir "$GLUE" --max_train_samples "$TRAIN_ROWS" --max_seq_length 64)
common=(--per_device_train_batch_size 32 --learning_rate 5e-5 --weight_decay 0.0)
# warm-up 10 %: train.py --warmup_ratio 0.1; transformers 5 takes a ratio as --warmup_steps 0.1
cap=(--pruning_method movement --target_sparsity 0.9 --cap prc,snc,fic)

if [ ! -f "$OUT/teacher/final/config.json" ]; then  # one dense teacher for every run
    python -m cap_ds.train --mode finetune "${data[@]}" "${common[@]}" --warmup_ratio 0.1 --num_train_epochs 2 --seed 42 \
        --output_dir "$OUT/teacher" --deepspeed ds_configs/zero2.json --disable_tqdm --logging_steps 50
fi
teacher="$OUT/teacher/final"

record() {  # path seed wall metrics.json-like file -> one JSON line
    python - "$@" >> "$OUT/results.jsonl" <<'PY'
import json, sys
path, seed, wall, file = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
m = json.load(open(file))
acc = m.get("eval", {}).get("accuracy", m.get("eval_accuracy"))
print(json.dumps({"path": path, "seed": seed, "accuracy": acc, "sparsity": m.get("sparsity"), "wall_s": wall}))
PY
}

for seed in $SEEDS; do
    start=$(date +%s)
    python -m cap_ds.train "${data[@]}" "${common[@]}" "${cap[@]}" --warmup_ratio 0.1 --num_train_epochs "$EPOCHS" \
        --seed "$seed" \
        --teacher_name_or_path "$teacher" --output_dir "$OUT/train_py_$seed" --deepspeed ds_configs/zero2.json \
        --disable_tqdm --logging_steps 50
    record train.py "$seed" $(( $(date +%s) - start )) "$OUT/train_py_$seed/metrics.json"

    start=$(date +%s)
    rm -rf "$OUT/trainer_$seed"
    python examples/hf_trainer_cap.py "${data[@]}" "${common[@]}" "${cap[@]}" --warmup_steps 0.1 \
        --num_train_epochs "$EPOCHS" --seed "$seed" --teacher_name_or_path "$teacher" --output_dir "$OUT/trainer_$seed" \
        --save_strategy no --eval_strategy no --report_to none --disable_tqdm true --logging_steps 50
    record Trainer "$seed" $(( $(date +%s) - start )) "$OUT/trainer_$seed/eval_results.json"
done
cat "$OUT/results.jsonl"
