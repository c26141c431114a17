"""A user's own data files (``cap_ds.data.files``): every format loads into GLUE-shaped splits with the right
task spec, and every bad input is one line naming what is wrong. Fixtures are real SST-2 / STS-B rows renamed
and written into tmp_path (never into the data folder)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pandas as pd
import pytest

from cap_ds.data.files import DataFileError, DataFiles, UserData, load_user_data
from cap_ds.data.glue import load_glue_split
from cap_ds.data.tasks import TASKS

ROWS = 60
SENTIMENT = {0: "neg", 1: "pos"}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """datasets' cache goes to tmp_path: the tests leave nothing behind and never share stale cache entries."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def sst2(glue_dir) -> dict[str, pd.DataFrame]:
    """SST-2 rows as a user's sentiment data: ``review`` text and ``sentiment`` labels "neg"/"pos"."""
    out = {}
    for split in ("train", "validation"):
        frame = load_glue_split(TASKS["sst2"], split, glue_dir, max_samples=ROWS).to_pandas()
        out[split] = pd.DataFrame({"review": frame["sentence"], "sentiment": frame["label"].map(SENTIMENT)})
    return out


@pytest.fixture(scope="module")
def stsb(glue_dir) -> dict[str, pd.DataFrame]:
    """STS-B rows with renamed text columns and float scores."""
    out = {}
    for split in ("train", "validation"):
        frame = load_glue_split(TASKS["stsb"], split, glue_dir, max_samples=ROWS).to_pandas()
        out[split] = pd.DataFrame({"premise": frame["sentence1"], "hypothesis": frame["sentence2"],
                                   "score": frame["label"].astype("float64").round(3)})
    return out


def write(frame: pd.DataFrame, path: Path) -> str:
    """``frame`` in the format ``path``'s extension names."""
    name = path.name
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        frame.to_csv(path, index=False)
    elif name.endswith(".tsv"):
        frame.to_csv(path, sep="\t", index=False)
    elif name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        frame.to_json(path, orient="records", lines=True)
    elif name.endswith(".parquet"):
        frame.to_parquet(path)
    elif name.endswith(".data.json"):
        path.write_text(json.dumps({"data": frame.to_dict("records")}, indent=1))
    else:
        frame.to_json(path, orient="records")
    return str(path)


def pair(tmp_path: Path, frames: dict[str, pd.DataFrame], ext: str = "csv") -> tuple[str, str]:
    return write(frames["train"], tmp_path / f"train.{ext}"), write(frames["validation"], tmp_path / f"dev.{ext}")


def sentiment(tmp_path: Path, frames: dict[str, pd.DataFrame], ext: str = "csv", **kw) -> UserData:
    train, dev = pair(tmp_path, frames, ext)
    return load_user_data(DataFiles(train_file=train, validation_file=dev, label_column_name="sentiment", **kw))


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "json", "data.json", "parquet", "csv.gz", "jsonl.gz"])
def test_every_format_loads_like_a_glue_split(tmp_path, sst2, ext):
    folder = tmp_path / "data"
    folder.mkdir()
    train, dev = pair(folder, sst2, ext)
    before = sorted(os.listdir(folder))
    data = load_user_data(DataFiles(train_file=train, validation_file=dev, label_column_name="sentiment"))
    task = data.task
    assert task.kind == "classification" and task.label_names == ("neg", "pos") and task.num_labels == 2
    assert task.text_fields == ("review",) and task.name in ("train", "train.data") and task.glue_dir == ""
    assert task.primary_metric == "accuracy" and "macro_f1" in task.metrics
    assert task.id2label == {0: "neg", 1: "pos"}
    for ds, frame in ((data.train, sst2["train"]), (data.validation, sst2["validation"])):
        assert ds.column_names == ["review", "label", "idx"]
        assert ds.features["label"].dtype == "int64" and ds.features["idx"].dtype == "int64"
        assert ds["idx"] == list(range(ROWS))
        assert ds["label"] == [{"neg": 0, "pos": 1}[s] for s in frame["sentiment"]]
        assert ds["review"] == list(frame["review"])
    assert data.test is None
    assert sorted(os.listdir(folder)) == before  # nothing written beside the data


def test_regression_inferred_from_float_scores(tmp_path, stsb):
    train, dev = pair(tmp_path, stsb, "tsv")
    data = load_user_data(DataFiles(train_file=train, validation_file=dev, text_column_names=("premise", "hypothesis"),
                                    label_column_name="score", metric_name="spearmanr"))
    assert data.task.kind == "regression" and data.task.label_names is None and data.task.num_labels == 1
    assert data.task.primary_metric == "spearmanr" and data.task.text_fields == ("premise", "hypothesis")
    assert data.train.features["label"].dtype == "float32"
    assert data.train["label"] == pytest.approx(list(stsb["train"]["score"]), abs=1e-6)
    assert data.validation.column_names == ["premise", "hypothesis", "label", "idx"]


def test_pair_columns_inferred_and_max_samples(tmp_path, stsb):
    frames = {k: v.rename(columns={"premise": "sentence1", "hypothesis": "sentence2", "score": "label"})
              for k, v in stsb.items()}
    train, dev = pair(tmp_path, frames, "jsonl")
    data = load_user_data(DataFiles(train_file=train, validation_file=dev), max_train_samples=7, max_eval_samples=5)
    assert data.task.text_fields == ("sentence1", "sentence2") and data.task.primary_metric == "pearson"
    assert (len(data.train), len(data.validation)) == (7, 5)
    assert data.train["idx"] == list(range(7)) and data.validation["idx"] == list(range(5))
    assert data.train["sentence1"] == list(frames["train"]["sentence1"][:7])


@pytest.mark.parametrize("task_type, kind, names", [(None, "regression", None),
                                                    ("classification", "classification", ("0", "1"))])
def test_whole_float_labels_regress_unless_told(tmp_path, sst2, task_type, kind, names):
    frames = {k: v.assign(sentiment=(v["sentiment"] == "pos").astype("float64")) for k, v in sst2.items()}
    data = sentiment(tmp_path, frames, "parquet", task_type=task_type)
    assert data.task.kind == kind and data.task.label_names == names


@pytest.mark.parametrize("task_type, kind", [(None, "classification"), ("regression", "regression")])
def test_int_labels_classify_unless_told(tmp_path, sst2, task_type, kind):
    frames = {k: v.assign(sentiment=v["sentiment"].map({"neg": 10, "pos": 2})) for k, v in sst2.items()}
    data = sentiment(tmp_path, frames, "csv", task_type=task_type, metric_name="matthews_correlation"
                     if kind == "classification" else None)
    assert data.task.kind == kind
    if kind == "classification":  # sorted numerically: 2 before 10
        assert data.task.label_names == ("2", "10") and data.train["label"][0] == (0 if frames["train"]
                                                                                    ["sentiment"][0] == 2 else 1)
        assert data.task.primary_metric == "matthews_correlation"
        assert data.task.metrics == ("macro_f1", "matthews_correlation")
    else:
        assert data.train["label"] == [float(v) for v in frames["train"]["sentiment"]]


def test_test_file_with_and_without_labels(tmp_path, sst2):
    train, dev = pair(tmp_path, sst2)
    bare = write(sst2["validation"][["review"]].head(9), tmp_path / "test.tsv")
    labelled = write(sst2["validation"].head(9), tmp_path / "test_labelled.jsonl")
    kw = dict(train_file=train, validation_file=dev, label_column_name="sentiment")
    test = load_user_data(DataFiles(test_file=bare, **kw), max_eval_samples=4).test  # every test row is predicted
    assert test is not None and test.column_names == ["review", "idx"] and test["idx"] == list(range(9))
    test = load_user_data(DataFiles(test_file=labelled, **kw)).test
    assert test is not None and test.column_names == ["review", "label", "idx"] and len(test) == 9


def test_empty_text_stays_a_string_and_hub_style_class_labels(tmp_path, sst2):
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = {"text": ["", "NA", None, "fine"], "label": [1, 1, 1, 1]}  # "neg" never seen: still a class
    for name in ("train", "dev"):
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(tmp_path / f"{name}.parquet"))
    data = load_user_data(DataFiles(train_file=str(tmp_path / "train.parquet"),
                                    validation_file=str(tmp_path / "dev.parquet")))
    assert data.task.label_names == ("neg", "pos") and data.train["label"] == [1, 1, 1, 1]
    assert data.train["text"] == ["", "NA", "", "fine"]


def test_local_dataset_folder_as_dataset_name(tmp_path, sst2):
    folder = tmp_path / "my_reviews"
    folder.mkdir()
    write(sst2["train"], folder / "train.csv")
    write(sst2["validation"], folder / "validation.csv")
    data = load_user_data(DataFiles(dataset_name=str(folder), label_column_name="sentiment"))
    assert data.task.name == "my_reviews" and len(data.validation) == ROWS and data.test is None


def _bad(case: str, tmp: Path, sst2: dict[str, pd.DataFrame]) -> tuple[DataFiles, tuple[str, ...]]:
    """One bad input: the DataFiles and the words its one-line error must contain."""
    train, dev = pair(tmp, sst2)
    ok = dict(train_file=train, validation_file=dev, label_column_name="sentiment")
    frame = sst2["validation"]
    if case == "missing file":
        return DataFiles(**{**ok, "validation_file": str(tmp / "nope.csv")}), ("--validation_file", "nope.csv")
    if case == "missing train flag":
        return DataFiles(validation_file=dev), ("--train_file",)
    if case == "unknown extension":
        (tmp / "train.xlsx").write_text("x")
        return DataFiles(**{**ok, "train_file": str(tmp / "train.xlsx")}), ("train.xlsx", ".csv", ".parquet")
    if case == "missing text column":
        return DataFiles(**ok, text_column_names=("body",)), ("'body'", "train.csv", "'review'", "'sentiment'")
    if case == "no text column to infer":
        frames = {k: v.rename(columns={"review": "body"}) for k, v in sst2.items()}
        t, d = pair(tmp, frames)
        return DataFiles(train_file=t, validation_file=d, label_column_name="sentiment"), ("--text_column_names",
                                                                                            "'body'")
    if case == "missing label column":
        return DataFiles(train_file=train, validation_file=dev), ("'label'", "--label_column_name", "'sentiment'")
    if case == "empty file":
        (tmp / "dev.csv").write_text("")
        return DataFiles(**ok), ("--validation_file", "dev.csv", "empty")
    if case == "header only":
        (tmp / "dev.csv").write_text("review,sentiment\n")
        return DataFiles(**ok), ("dev.csv", "no rows")
    if case == "unseen validation label":
        write(frame.assign(sentiment=frame["sentiment"].where(frame.index != 3, "meh")), tmp / "dev.csv")
        return DataFiles(**ok), ("'meh'", "dev.csv", "'neg'", "'pos'")
    if case == "mixed label types":
        lines = [json.dumps({"review": r, "sentiment": s if i % 2 else int(s == "pos")})
                 for i, (r, s) in enumerate(zip(frame["review"], frame["sentiment"]))]
        (tmp / "dev.jsonl").write_text("\n".join(lines) + "\n")
        return DataFiles(**{**ok, "validation_file": str(tmp / "dev.jsonl")}), ("dev.jsonl", "string", "number")
    if case == "contradicting task_type":
        return DataFiles(**ok, task_type="regression"), ("--task_type regression", "string", "'neg'")
    if case == "missing label value":
        write(frame.assign(sentiment=frame["sentiment"].where(frame.index != 4, "")), tmp / "dev.csv")
        return DataFiles(**ok), ("dev.csv", "data row 5", "'sentiment'")
    if case == "bad metric_name":
        return DataFiles(**ok, metric_name="bleu"), ("--metric_name", "'bleu'", "macro_f1", "spearmanr")
    if case == "metric of the other kind":
        return DataFiles(**ok, metric_name="pearson"), ("--metric_name", "classification", "macro_f1")
    if case == "bad task_type":
        return DataFiles(**ok, task_type="ranking"), ("--task_type", "'ranking'", "regression")
    if case == "three text columns":
        return DataFiles(**ok, text_column_names=("a", "b", "c")), ("--text_column_names", "one or two")
    if case == "hub dataset without a validation split":
        folder = tmp / "hubby"
        folder.mkdir()
        write(sst2["train"], folder / "train.csv")
        write(frame, folder / "test.csv")
        return DataFiles(dataset_name=str(folder), label_column_name="sentiment"), ("'validation'", "'train'",
                                                                                    "'test'", "--validation_file")
    assert case == "hub dataset offline and not cached"
    return DataFiles(dataset_name="someone-unknown/no-such-reviews"), ("someone-unknown/no-such-reviews", "offline",
                                                                       "--train_file")


BAD = ["missing file", "missing train flag", "unknown extension", "missing text column", "no text column to infer",
       "missing label column", "empty file", "header only", "unseen validation label", "mixed label types",
       "contradicting task_type", "missing label value", "bad metric_name", "metric of the other kind",
       "bad task_type", "three text columns", "hub dataset without a validation split",
       "hub dataset offline and not cached"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_it(tmp_path, sst2, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files, words = _bad(case, tmp_path, sst2)
    with pytest.raises(DataFileError) as info:
        load_user_data(files)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


@pytest.mark.parametrize("value", [0, -3, 1.5, True])
def test_bad_max_samples(tmp_path, sst2, value):
    train, dev = pair(tmp_path, sst2)
    with pytest.raises(DataFileError, match="--max_eval_samples"):
        load_user_data(DataFiles(train_file=train, validation_file=dev, label_column_name="sentiment"),
                       max_eval_samples=value)


def test_preflight_and_run_read_the_files_once_unless_they_change(tmp_path, sst2, monkeypatch):
    """inspect_source (the preflight) and load_task_data (the run) share one read in a process; a file written in
    between is read again."""
    from transformers import AutoTokenizer

    from cap_ds.data import sources
    from cap_ds.data.models import default_model_path

    reads = []
    monkeypatch.setattr(sources, "load_user_data", lambda *a: reads.append(a) or load_user_data(*a))
    monkeypatch.setattr(sources, "_LAST_READ", {})
    train, dev = pair(tmp_path, sst2)
    source = sources.DataSource(files=DataFiles(train_file=train, validation_file=dev,
                                                label_column_name="sentiment"), max_seq_length=32)
    task, rows = sources.inspect_source(source)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    assert len(sources.load_task_data(source, tokenizer).train) == rows == ROWS and len(reads) == 1
    write(sst2["train"].head(ROWS - 1), Path(train))
    os.utime(train, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    assert len(sources.load_task_data(source, tokenizer).train) == ROWS - 1 and len(reads) == 2
