"""A user's own data end to end on the real 2-layer MiniLM: classification from CSV (renamed columns, string
labels) and regression from JSON Lines, each teacher -> CAP-m -> export -> ``pipeline`` on ``final/``; extractive
QA on the SQuAD fixture through prune and export; and every bad input as one line with exit code 2."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run, run_env

SQUAD = REPO.parent / "shared" / "data" / "squad"
SMALL = ["--config_overrides", "num_hidden_layers=2", "--max_seq_length", "48", "--per_device_train_batch_size",
         "16", "--disable_tqdm", "--logging_steps", "4", "--deepspeed", str(REPO / "ds_configs" / "zero2.json")]
CAP_M = ["--cap", "prc,snc,fic", "--pruning_method", "movement", "--target_sparsity", "0.9", "--extra_negatives",
         "64", "--warmup_steps", "1", "--learning_rate", "1e-4"]


def glue_rows(glue_dir: Path, task: str, split: str) -> list[list[str]]:
    lines = (glue_dir / task / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines[1:]]


@pytest.fixture(scope="module")
def user_files(glue_dir, tmp_path_factory):
    """SST-2 rows as CSV (columns review/sentiment, labels neg/pos; a test file without labels) and STS-B rows as
    JSON Lines (columns first/second/similarity)."""
    root = tmp_path_factory.mktemp("user_data")
    names = {"0": "neg", "1": "pos"}

    def write_csv(path: Path, rows, labelled=True) -> None:
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "review", "sentiment"] if labelled else ["id", "review"])
            for i, (text, label) in enumerate(rows):
                writer.writerow([i, text, names[label]] if labelled else [i, text])

    train, dev = glue_rows(glue_dir, "SST-2", "train")[:160], glue_rows(glue_dir, "SST-2", "dev")
    write_csv(root / "train.csv", train)
    write_csv(root / "dev.csv", dev[:64])
    write_csv(root / "test.csv", dev[64:96], labelled=False)

    def write_jsonl(path: Path, rows) -> None:
        with path.open("w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps({"first": r[7], "second": r[8], "similarity": float(r[9])}) + "\n")

    write_jsonl(root / "sts_train.jsonl", glue_rows(glue_dir, "STS-B", "train")[:128])
    write_jsonl(root / "sts_dev.jsonl", glue_rows(glue_dir, "STS-B", "dev")[:64])
    return root


def pipeline_predictions(folder: Path, task: str, inputs, **kwargs) -> list:
    """The exported model through a plain transformers pipeline in a fresh process (no cap_ds import)."""
    code = ("import json, sys\nfrom transformers import pipeline\n"
            f"p = pipeline({task!r}, model=sys.argv[1], device='cpu')\n"
            "inputs = json.loads(sys.argv[2]); kwargs = json.loads(sys.argv[3])\n"
            "print(json.dumps(p(inputs, **kwargs) if isinstance(inputs, list) else p(**inputs, **kwargs)))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), json.dumps(inputs), json.dumps(kwargs)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_classification_from_csv_teacher_prune_export_pipeline(user_files, tmp_path):
    data = ["--train_file", str(user_files / "train.csv"), "--validation_file", str(user_files / "dev.csv"),
            "--text_column_names", "review", "--label_column_name", "sentiment"]
    teacher, student = tmp_path / "teacher", tmp_path / "cap"
    run([sys.executable, "cap_ds/train.py", "--mode", "finetune", *data, "--output_dir", str(teacher),
         "--num_train_epochs", "3", "--learning_rate", "3e-4", *SMALL])
    t_metrics = json.loads((teacher / "metrics.json").read_text())
    assert t_metrics["task"] == user_files.name and set(t_metrics["eval"]) == {"accuracy", "macro_f1"}
    run([sys.executable, "cap_ds/train.py", "--teacher_name_or_path", str(teacher / "final"), *data,
         "--test_file", str(user_files / "test.csv"), "--output_dir", str(student), "--num_train_epochs", "2",
         *CAP_M, *SMALL])
    metrics = json.loads((student / "metrics.json").read_text())
    assert abs(metrics["sparsity"] - 0.9) < 0.01 and set(metrics["eval"]) == {"accuracy", "macro_f1"}
    config = json.loads((student / "final" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    # the masked model's test predictions (label names) == what the exported model predicts through a pipeline
    predicted = [json.loads(line) for line in (student / "predict_results.jsonl").read_text().splitlines()]
    assert [p["idx"] for p in predicted] == list(range(32))
    with (user_files / "test.csv").open(encoding="utf-8") as fh:
        texts = [row["review"] for row in csv.DictReader(fh)]
    out = pipeline_predictions(student / "final", "text-classification", texts, truncation=True, max_length=48)
    assert [o["label"] for o in out] == [p["prediction"] for p in predicted]


def test_regression_from_jsonl_teacher_prune_export_pipeline(user_files, tmp_path):
    data = ["--train_file", str(user_files / "sts_train.jsonl"), "--validation_file",
            str(user_files / "sts_dev.jsonl"), "--text_column_names", "first,second", "--label_column_name",
            "similarity"]
    teacher, student = tmp_path / "teacher", tmp_path / "cap"
    run([sys.executable, "cap_ds/train.py", "--mode", "finetune", *data, "--output_dir", str(teacher),
         "--num_train_epochs", "2", "--learning_rate", "3e-4", *SMALL])
    run([sys.executable, "cap_ds/train.py", "--teacher_name_or_path", str(teacher / "final"), *data,
         "--test_file", str(user_files / "sts_dev.jsonl"), "--output_dir", str(student), "--num_train_epochs", "2",
         *CAP_M, *SMALL])
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["task"] == "sts_train" and set(metrics["eval"]) >= {"pearson", "spearmanr"}
    assert abs(metrics["sparsity"] - 0.9) < 0.01
    predicted = [json.loads(line)["prediction"] for line in (student / "predict_results.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (user_files / "sts_dev.jsonl").read_text().splitlines()[:8]]
    out = pipeline_predictions(student / "final", "text-classification",
                               [{"text": r["first"], "text_pair": r["second"]} for r in rows],
                               function_to_apply="none", truncation=True, max_length=48)
    assert [o["score"] for o in out] == pytest.approx(predicted[:8], abs=1e-4)


def test_question_answering_prune_export_pipeline(model_path, tmp_path):
    sample = SQUAD / "sample.json"
    if not sample.is_file():
        pytest.skip(f"SQuAD fixture not found at {sample}")
    data = ["--task_type", "question_answering", "--train_file", str(sample), "--validation_file", str(sample),
            "--version_2_with_negative", "--max_seq_length", "128", "--doc_stride", "48"]
    teacher, student = tmp_path / "teacher", tmp_path / "cap"
    small = [*SMALL[:2], *SMALL[4:]]  # (its own --max_seq_length)
    run([sys.executable, "cap_ds/train.py", "--mode", "finetune", *data, "--output_dir", str(teacher),
         "--num_train_epochs", "4", "--learning_rate", "5e-4", *small])
    run([sys.executable, "cap_ds/train.py", "--teacher_name_or_path", str(teacher / "final"), *data,
         "--output_dir", str(student), "--num_train_epochs", "3", *CAP_M, *small])
    metrics = json.loads((student / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"exact_match", "f1"} and 0 <= metrics["eval"]["f1"] <= 100
    assert metrics["primary_metric"] == "f1" and abs(metrics["sparsity"] - 0.9) < 0.01
    assert metrics["eval_examples"] == 14
    answers = json.loads((student / "eval_predictions.json").read_text())
    assert len(answers) == 14
    # transformers 5 has no "question-answering" pipeline; cap_ds's QuestionAnswerer (its replacement) on the
    # exported model, in a fresh process, answers every question as the masked model did in its last evaluation
    code = ("import json, sys\nfrom cap_ds.data.answer import QuestionAnswerer\n"
            "qa = QuestionAnswerer.from_pretrained(sys.argv[1])\n"
            "rows = json.load(open(sys.argv[2]))['data']\n"
            "out = qa([r['question'] for r in rows], [r['context'] for r in rows])\n"
            "print(json.dumps({r['id']: o['answer'] for r, o in zip(rows, out)}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(student / "final"), str(sample)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=run_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == answers


@pytest.mark.distributed
def test_question_answering_two_ranks_zero3_resumes_exactly(model_path, tmp_path):
    """QA under ZeRO-3 with 2 real ranks (banks sharded by window): a run resumed from its step-4 checkpoint ends
    with the same eval logits and answers as the uninterrupted run."""
    import shutil

    import numpy as np

    from tests.test_resume import start, wait

    if not (SQUAD / "sample.json").is_file():
        pytest.skip("SQuAD fixture not found")
    sample = str(SQUAD / "sample.json")

    def argv(out: Path) -> list[str]:
        return ["cap_ds/train.py", "--task_type", "question_answering", "--train_file", sample, "--validation_file",
                sample, "--version_2_with_negative", "--max_seq_length", "96", "--doc_stride", "32",
                "--config_overrides", "num_hidden_layers=2", "--per_device_train_batch_size", "4",
                "--num_train_epochs", "2", "--cap", "prc,snc", "--extra_negatives", "16", "--pruning_method",
                "magnitude", "--warmup_steps", "1", "--save_steps", "4", "--save_total_limit", "3",
                "--disable_tqdm", "--logging_steps", "2", "--deepspeed", str(REPO / "ds_configs" / "zero3.json"),
                "--output_dir", str(out)]

    ref = tmp_path / "ref"
    assert wait(start(argv(ref))) == [0, 0]
    metrics = json.loads((ref / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] > 4 and set(metrics["eval"]) == {"exact_match", "f1"}
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    for name in ("metrics.json", "final", "eval_logits.npy", "eval_predictions.json", "train_state.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()  # as if killed after step 4
    assert wait(start([*argv(out), "--resume", "step4"])) == [0, 0]
    np.testing.assert_allclose(np.load(out / "eval_logits.npy"), np.load(ref / "eval_logits.npy"), atol=1e-6, rtol=0)
    assert json.loads((out / "eval_predictions.json").read_text()) == \
        json.loads((ref / "eval_predictions.json").read_text())


def test_cleaned_qa_model_saves_loads_and_answers_as_the_masked_one(model_path, tmp_path):
    """CAP-f on a QA model: the cleaned model (heads and FFN neurons removed) has a QA head, keeps the run's window
    settings, loads with the auto class and answers every question as the masked model does."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from bench_inference import capf_clean
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    from cap_ds.compression import save_clean_pretrained
    from cap_ds.data.answer import QuestionAnswerer, remember_qa_settings
    from cap_ds.data.qa import QaPredictionSettings

    if not (SQUAD / "sample.json").is_file():
        pytest.skip("SQuAD fixture not found")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128)).eval()
    masked, clean = capf_clean(model, kept=0.5)
    assert type(clean).__name__ == "CapPrunedBertForQuestionAnswering"
    remember_qa_settings(clean.config, 96, 32, QaPredictionSettings(version_2_with_negative=True))
    folder = save_clean_pretrained(clean, tmp_path / "final", tokenizer)
    rows = json.loads((SQUAD / "sample.json").read_text())["data"]
    questions, contexts = [r["question"] for r in rows], [r["context"] for r in rows]
    loaded = QuestionAnswerer.from_pretrained(str(folder))
    assert (loaded.max_seq_length, loaded.doc_stride, loaded.settings.version_2_with_negative) == (96, 32, True)
    assert sum(loaded.model.config.layer_heads) == 4
    reference = QuestionAnswerer(masked, tokenizer, max_seq_length=96, doc_stride=32, settings=loaded.settings)
    assert loaded(questions, contexts) == reference(questions, contexts)
