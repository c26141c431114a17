#!/usr/bin/env bash
# CAP on your own classification data: a CSV with your column names and string labels. To have one to try, this
# script writes SST-2 rows as reviews.csv (columns review, sentiment; labels neg/pos) unless CSV_DIR already holds
# train.csv / dev.csv / test.csv; point CSV_DIR at your own files (and set TEXT/LABEL) to run on yours.
#   bash examples/own_data.sh [extra trainer flags]
# Stages: dense teacher -> CAP-m (movement + PrC/SnC/FiC + KD) at 90 % -> predictions for test.csv
# (predict_results.jsonl, your label names) -> the exported model through a plain transformers pipeline.
# Environment: CSV_DIR (default $OUT/data), TEXT (review), LABEL (sentiment), OUT (outputs/own_data),
# TRAIN_SAMPLES (1000; empty = all rows), EPOCHS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/own_data}
CSV_DIR=${CSV_DIR:-$OUT/data}
TEXT=${TEXT:-review}
LABEL=${LABEL:-sentiment}
TRAIN_SAMPLES=${TRAIN_SAMPLES-1000}
EPOCHS=${EPOCHS:-3}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

if [ ! -f "$CSV_DIR/train.csv" ]; then  # a stand-in for your data: SST-2 rows under other names
    python - "${GLUE_DIR:-../shared/data/glue}/SST-2" "$CSV_DIR" <<'PY'
import csv, os, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
rows = lambda f: [l.split("\t") for l in open(os.path.join(src, f), encoding="utf-8").read().splitlines()[1:]]
train, dev = rows("train.tsv"), rows("dev.tsv")
for name, part, labelled in (("train", train[:5000], True), ("dev", dev[:400], True), ("test", dev[400:], False)):
    with open(os.path.join(dst, f"{name}.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "sentiment"] if labelled else ["review"])
        for text, label in part:
            w.writerow([text, {"0": "neg", "1": "pos"}[label]] if labelled else [text])
print(f"wrote {dst}/train.csv, dev.csv, test.csv (SST-2 rows as review/sentiment, labels neg/pos)")
PY
fi
data=(--train_file "$CSV_DIR/train.csv" --validation_file "$CSV_DIR/dev.csv" --text_column_names "$TEXT"
      --label_column_name "$LABEL" --max_seq_length 64 --per_device_train_batch_size 16 --learning_rate 1e-4
      --num_train_epochs "$EPOCHS" --seed 42 --disable_tqdm)
[ -n "$TRAIN_SAMPLES" ] && data+=(--max_train_samples "$TRAIN_SAMPLES")
test_file=()
[ -f "$CSV_DIR/test.csv" ] && test_file=(--test_file "$CSV_DIR/test.csv")

[ -f "$OUT/teacher/final/model.safetensors" ] || \
    python cap_ds/train.py --mode finetune "${data[@]}" --output_dir "$OUT/teacher" --resume auto "$@"
python cap_ds/train.py "${data[@]}" "${test_file[@]}" --teacher_name_or_path "$OUT/teacher/final" \
    --cap prc,snc,fic --pruning_method movement --target_sparsity 0.9 --output_dir "$OUT/cap_m90" --resume auto "$@"
python - "$OUT" <<'PY'
import json, sys
from transformers import pipeline
out = sys.argv[1]
t, c = (json.load(open(f"{out}/{d}/metrics.json")) for d in ("teacher", "cap_m90"))
print(f"dev: teacher {t['eval']} | CAP-m {c['sparsity']:.1%} sparse {c['eval']}")
clf = pipeline("text-classification", model=f"{out}/cap_m90/final", device="cpu")
print(clf(["a gripping, beautifully acted film", "a dull and lifeless mess"]))
PY
