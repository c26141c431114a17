#!/usr/bin/env bash
# CAP on extractive question answering (SQuAD v1.1 layout). There is no SQuAD train set beside the project, so the
# official dev set is split by article (benchmarks/squad_split.py: the last EVAL_ARTICLES articles are the dev
# part; no article is in both). Stages: dense QA teacher -> CAP-m (movement + PrC/SnC/FiC on the [CLS] vector +
# KD on start/end logits) at 90 % -> the exported model answers a question (cap_ds.data.answer.QuestionAnswerer,
# since transformers 5 has no question-answering pipeline).
#   bash examples/squad_qa.sh [extra trainer flags]
# Environment: SQUAD (../shared/data/squad/dev-v1.1.json.gz), OUT (outputs/squad), EVAL_ARTICLES (6),
# TRAIN_SAMPLES (1000 questions; empty = all), EVAL_SAMPLES (500), EPOCHS (2), TEACHER_EPOCHS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
SQUAD=${SQUAD:-../shared/data/squad/dev-v1.1.json.gz}
OUT=${OUT:-outputs/squad}
TRAIN_SAMPLES=${TRAIN_SAMPLES-1000}
EVAL_SAMPLES=${EVAL_SAMPLES-500}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

[ -f "$OUT/data/train.jsonl" ] || python benchmarks/squad_split.py "$SQUAD" --eval_articles "${EVAL_ARTICLES:-6}" \
    --output_dir "$OUT/data"
data=(--task_type question_answering --train_file "$OUT/data/train.jsonl" --validation_file "$OUT/data/dev.jsonl"
      --max_seq_length 192 --doc_stride 64 --per_device_train_batch_size 16 --seed 42 --disable_tqdm)
[ -n "$TRAIN_SAMPLES" ] && data+=(--max_train_samples "$TRAIN_SAMPLES")
[ -n "$EVAL_SAMPLES" ] && data+=(--max_eval_samples "$EVAL_SAMPLES")

[ -f "$OUT/teacher/final/model.safetensors" ] || python cap_ds/train.py --mode finetune "${data[@]}" \
    --num_train_epochs "${TEACHER_EPOCHS:-3}" --learning_rate 2e-4 --output_dir "$OUT/teacher" --resume auto "$@"
python cap_ds/train.py "${data[@]}" --teacher_name_or_path "$OUT/teacher/final" --cap prc,snc,fic \
    --pruning_method movement --target_sparsity 0.9 --num_train_epochs "${EPOCHS:-2}" --learning_rate 1e-4 \
    --output_dir "$OUT/cap_m90" --resume auto "$@"
python - "$OUT" <<'PY'
import json, sys
from cap_ds.data.answer import QuestionAnswerer
out = sys.argv[1]
t, c = (json.load(open(f"{out}/{d}/metrics.json")) for d in ("teacher", "cap_m90"))
print(f"dev EM/F1: teacher {t['eval']['exact_match']:.1f}/{t['eval']['f1']:.1f} | CAP-m {c['sparsity']:.1%} sparse "
      f"{c['eval']['exact_match']:.1f}/{c['eval']['f1']:.1f}")
qa = QuestionAnswerer.from_pretrained(f"{out}/cap_m90/final")
print(qa("Which team won Super Bowl 50?", "The Denver Broncos defeated the Carolina Panthers 24-10 to win "
         "Super Bowl 50, played on February 7, 2016."))
PY
