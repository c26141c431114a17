"""The model card's content for each kind of run, without training: hub metadata that parses and agrees with the
run's metrics, the pipeline tag and usage of the task, the speed from speed.json, and what sparsity means for
speed. (The card of a real export is checked in tests/test_train_e2e.py.)"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

from cap_ds.data.sources import inspect_source
from cap_ds.data.squad import qa_task
from cap_ds.run.args import parse_args
from cap_ds.run.model_card import layer_type_sparsity, model_card
from cap_ds.run.spec import resolve

REPORT = {"sparsity": 0.5, "per_module": {f"bert.encoder.layer.{i}.{kind}": 0.5 for i in range(2) for kind in
                                          ("attention.self.query", "intermediate.dense")}}


def card(tmp_path, argv, *, task=None, result=None):
    flags = parse_args([*argv, "--output_dir", str(tmp_path / "out")])
    if task is None and flags.data.uses_files:
        task = inspect_source(flags.data.source())[0]
    spec = replace(resolve(flags, model_path="bert-base-uncased", num_train=64, world_size=1, task=task),
                   command=tuple(argv))
    base = {"eval": {"accuracy": 0.8}, "teacher_eval": {"accuracy": 0.85}, "ce_weight": 0.1, "kd_weight": 0.9,
            "steps": 12, "epochs": 3.0, "world_size": 1, "optimizer": "AdamW", "eval_examples": 64, "sparsity": 0.5}
    text = model_card(spec, {**base, **(result or {})}, tmp_path, command=list(argv),
                      sparsity=REPORT if spec.prune else None)
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_pruned_classifier_card(tmp_path):
    meta, body = card(tmp_path, ["--task_name", "cola", "--pruning_method", "magnitude", "--target_sparsity", "0.5",
                                 "--cap", "prc,snc", "--teacher_name_or_path", str(tmp_path)], result={
        "eval": {"accuracy": 0.7, "matthews_correlation": 0.3}})
    assert meta["base_model"] == "bert-base-uncased" and meta["pipeline_tag"] == "text-classification"
    assert meta["model-index"][0]["results"][0]["metrics"][1] == {"type": "matthews_correlation", "value": 0.3,
                                                                  "name": "matthews correlation"}
    assert meta["cap_ds"] == {"mode": "prune", "task": "cola", "task_type": "classification", "cap_modules":
                              ["prc", "snc"], "pruning_method": "magnitude", "target_sparsity": 0.5, "sparsity": 0.5}
    assert "unstructured-pruning" in meta["tags"] and "magnitude-pruning" in meta["tags"]
    assert "--cap prc,snc" in body and "zeros sit inside dense weight matrices" in body
    assert "| intermediate.dense | 50.00% |" in body and "Not measured for this model" in body


def test_teacher_card_from_your_files_has_no_pruning_facts(tmp_path):
    train = tmp_path / "tickets.csv"
    train.write_text("text,label\na,x\nb,y\n")
    meta, body = card(tmp_path, ["--mode", "finetune", "--train_file", str(train), "--validation_file", str(train)])
    assert "datasets" not in meta and meta["model-index"][0]["results"][0]["dataset"]["type"] == "local-file"
    assert meta["cap_ds"] == {"mode": "finetune", "task": "tickets", "task_type": "classification"}
    assert "pruning" not in meta["tags"] and "A dense model" in body and "sparsity_heatmap" not in body


def test_question_answering_card_and_speed(tmp_path):
    (tmp_path / "speed.json").write_text(json.dumps({"device": "cpu", "rows": [
        {"dtype": "fp32", "batch": 1, "seq_length": 128, "dense_ms": 5.0, "model_ms": 2.0, "speedup": 2.5}]}))
    questions = tmp_path / "q.jsonl"
    questions.write_text("{}\n")  # (not read: the task is given)
    meta, body = card(tmp_path, ["--task_type", "question_answering", "--train_file", str(questions),
                                 "--validation_file", str(questions), "--pruning_method", "first_order",
                                 "--target_sparsity", "0.5", "--structured_step", "0.5", "--cap", "none"],
                      task=qa_task("squad_q"), result={"eval": {"exact_match": 61.0, "f1": 70.5}})
    assert meta["pipeline_tag"] == "question-answering" and "structured-pruning" in meta["tags"]
    assert {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]} == \
        {"exact_match": 61.0, "f1": 70.5}
    assert "QuestionAnswerer" in body and "| fp32 | 1 x 128 | 5.00 | 2.00 | **2.50x** | - |" in body
    assert "physically removed" in body


def test_layer_type_sparsity_is_the_mean_per_type():
    per = {"bert.encoder.layer.0.output.dense": 0.9, "bert.encoder.layer.1.output.dense": 0.7}
    assert layer_type_sparsity(per) == {"output.dense": pytest.approx(0.8)}
