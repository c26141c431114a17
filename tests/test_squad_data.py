"""Extractive QA data on the real SQuAD v1.1 dev set and the HF SQuAD 2.0 sample (tokenizer only, no weights):
reading (nested, flat, JSON Lines, .gz, hub), one-line errors, windows and labels, post-processing, metrics."""

from __future__ import annotations

import gzip
import json
import time
import unicodedata
from pathlib import Path

import datasets
import numpy as np
import pytest

from cap_ds.data.qa import QaPredictionSettings, postprocess, prepare_features
from cap_ds.data.qa_metrics import normalize_answer, squad_metrics
from cap_ds.data.squad import QaDataError, load_qa_split, qa_task, split_by_article
from cap_ds.runtime.errors import UserError

SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad"
DEV, SAMPLE = SQUAD / "dev-v1.1.json.gz", SQUAD / "sample.json"


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def dev() -> str:
    if not DEV.is_file():
        pytest.skip(f"SQuAD dev set not found at {DEV}")
    return str(DEV)


@pytest.fixture(scope="module")
def dev200(dev) -> datasets.Dataset:
    return load_qa_split(dev, split="validation", max_samples=200, flag="--validation_file")


@pytest.fixture(scope="module")
def sample() -> datasets.Dataset:
    if not SAMPLE.is_file():
        pytest.skip(f"SQuAD sample not found at {SAMPLE}")
    return load_qa_split(str(SAMPLE), version_2_with_negative=True)


def one_line_error(call, *needles: str) -> str:
    """``call()`` raises a one-line QaDataError naming every needle; returns the message."""
    with pytest.raises(QaDataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------
def test_qa_task_spec() -> None:
    task = qa_task()
    assert (task.name, task.kind, task.text_fields, task.primary_metric, task.num_labels) == (
        "squad", "question_answering", ("question", "context"), "f1", 2)
    assert task.is_qa and task.metrics == ("exact_match", "f1") and qa_task("mine").name == "mine"


def test_sample_flat_v2_needs_the_flag(sample) -> None:
    one_line_error(lambda: load_qa_split(str(SAMPLE)), "--train_file", str(SAMPLE), "6 of 14",
                   "--version_2_with_negative")
    assert len(sample) == 14 and sample.column_names == ["id", "title", "context", "question", "answers", "idx"]
    assert sample["idx"] == list(range(14)) and set(sample["title"]) == {""}
    assert sum(1 for a in sample["answers"] if not a["text"]) == 6
    assert sum(len(a["text"]) for a in sample["answers"]) == 27
    assert sample.features["answers"]["answer_start"].feature.dtype == "int32"
    assert sample.features["idx"].dtype == "int64"
    first = sample[0]
    assert first["answers"] == {"text": ["France"] * 4, "answer_start": [159] * 4}
    assert first["context"][159:165] == "France"


def test_nested_gz_dev_set_counts(dev) -> None:
    full = load_qa_split(dev, split="validation")
    assert len(full) == 10570 and len(set(full["id"])) == 10570 and full["idx"] == list(range(10570))
    assert len(set(full["title"])) == 48 and full[0]["title"] == "Super_Bowl_50"
    assert sum(len(a["text"]) for a in full["answers"]) == 34726
    head = load_qa_split(dev, max_samples=7)
    assert head["id"] == full["id"][:7] and head["idx"] == list(range(7))


def test_split_by_article_never_shares_an_article(dev) -> None:
    train, evaluation = split_by_article(dev, 5)
    assert len(train) + len(evaluation) == 10570
    assert len({r["title"] for r in evaluation}) == 5 and len({r["title"] for r in train}) == 43
    assert not {r["title"] for r in train} & {r["title"] for r in evaluation}
    assert not {r["context"] for r in train} & {r["context"] for r in evaluation}
    assert evaluation[-1]["title"] == "Force" and train[0]["title"] == "Super_Bowl_50"
    assert set(evaluation[0]) == {"id", "title", "context", "question", "answers"}
    for bad in (0, 48, True, "3"):
        one_line_error(lambda bad=bad: split_by_article(dev, bad), "eval_articles", "from 1 to 47")
    one_line_error(lambda: split_by_article(str(SAMPLE), 1), "not the nested SQuAD layout")


def _nested(records: list[dict]) -> dict:
    """Records back to the nested SQuAD layout (articles by title, paragraphs by context)."""
    articles: dict[str, dict[str, list]] = {}
    for r in records:
        qa = {"id": r["id"], "question": r["question"],
              "answers": [{"text": t, "answer_start": s} for t, s in zip(*r["answers"].values())]}
        articles.setdefault(r["title"], {}).setdefault(r["context"], []).append(qa)
    return {"version": "1.1", "data": [{"title": t, "paragraphs": [{"context": c, "qas": q} for c, q in p.items()]}
                                       for t, p in articles.items()]}


def test_nested_json_and_flat_jsonl_round_trip(tmp_path, dev) -> None:
    _, evaluation = split_by_article(dev, 2)
    nested = tmp_path / "eval.json"
    nested.write_text(json.dumps(_nested(evaluation)))
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in evaluation))
    jsonl_gz = tmp_path / "eval.jsonl.gz"
    jsonl_gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    flat_list = tmp_path / "list.json"
    flat_list.write_text(json.dumps(evaluation))
    flat_data = tmp_path / "data.json"
    flat_data.write_text(json.dumps({"version": 2.0, "data": evaluation}))
    expected = [{**r, "idx": i} for i, r in enumerate(evaluation)]
    for path in (nested, jsonl, jsonl_gz, flat_list, flat_data):
        ds = load_qa_split(str(path), flag="--validation_file")
        assert ds.to_list() == expected, path.name


def test_nested_squad2_is_impossible(tmp_path) -> None:
    data = {"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "a", "question": "Where?", "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "b", "question": "Who?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "Paris", "answer_start": 0}]}]}]}]}
    path = _write(tmp_path, "v2.json", data)
    one_line_error(lambda: load_qa_split(str(path)), "1 of 2", "--version_2_with_negative")
    ds = load_qa_split(str(path), version_2_with_negative=True)
    assert ds["answers"] == [{"text": ["France"], "answer_start": [12]}, {"text": [], "answer_start": []}]


def test_hub_dataset_is_read_like_a_file(monkeypatch, sample) -> None:
    rows = sample.remove_columns(["idx", "title"])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: rows)
    ds = load_qa_split(None, dataset_name="rajpurkar/squad_v2", split="validation", version_2_with_negative=True)
    assert ds.to_list() == sample.to_list()
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: rows.remove_columns("answers"))
    one_line_error(lambda: load_qa_split(None, dataset_name="x/y"), "--dataset_name x/y", "answers",
                   "columns present")


def test_hub_offline_names_the_dataset_and_the_file_flags(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def offline(*args, **kwargs):
        raise ConnectionError("offline\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    one_line_error(lambda: load_qa_split(None, dataset_name="nobody/squad", split="validation"),
                   "--dataset_name nobody/squad", "offline", "--train_file/--validation_file")


QID, CTX = "q1", "The Denver Broncos won Super Bowl 50."
GOOD = {"id": QID, "question": "Who won?", "context": CTX, "answers": {"text": ["Denver Broncos"], "answer_start": [4]}}


def _write(tmp_path: Path, name: str, content) -> Path:
    text = content if isinstance(content, str | bytes) else json.dumps(content)
    (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return tmp_path / name


BAD_FILES = {
    "empty": ("e.json", "  \n", ["the file is empty"]),
    "not json": ("x.json", '{"data": [', ["not valid JSON", "expected nested SQuAD JSON"]),
    "bad jsonl line": ("x.jsonl", json.dumps(GOOD) + "\n{oops\n", ["JSON Lines line 2"]),
    "scalar": ("x.json", "3", ["a JSON int", "expected"]),
    "object": ("x.json", {"version": 1}, ["one JSON object with keys version"]),
    "no questions": ("x.json", {"data": []}, ["no questions"]),
    "missing fields": ("x.json", [{"id": QID, "question": "Who?"}], ["question id 'q1'", "answers, context",
                                                                     "fields present: id, question"]),
    "missing id": ("x.json", [{"question": "Who?", "context": CTX, "answers": GOOD["answers"]}],
                   ["record 0 (row 1)", "lacks field(s) id"]),
    "nested no context": ("x.json", {"data": [{"title": "T", "paragraphs": [{"qas": []}]}]},
                          ["article 0", "paragraph 0", "'context'"]),
    "nested no paragraphs": ("x.json", {"data": [{"title": "T", "paragraphs": []}, {"title": "U"}]},
                             ["article 1", "'paragraphs'"]),
    "nested missing answers": ("x.json", {"data": [{"title": "T", "paragraphs": [
        {"context": CTX, "qas": [{"id": "n1", "question": "?"}]}]}]}, ["question id 'n1'", "answers"]),
    "bad start": ("x.json", [{**GOOD, "answers": {"text": ["Denver Broncos"], "answer_start": [5]}}],
                  ["question id 'q1'", "answer_start 5", "'Denver Broncos'", "holds 'enver Broncos '"]),
    "start past the end": ("x.json", [{**GOOD, "answers": {"text": ["x"], "answer_start": [99]}}],
                           ["answer_start 99", "37 characters long"]),
    "answers shape": ("x.json", [{**GOOD, "answers": "Denver"}], ["question id 'q1'", "answers 'Denver'"]),
    "answer lengths": ("x.json", [{**GOOD, "answers": {"text": ["a", "b"], "answer_start": [0]}}],
                       ["2 answer texts but 1 answer_start"]),
    "answer_start type": ("x.json", [{**GOOD, "answers": {"text": ["a"], "answer_start": ["0"]}}],
                          ["integer answer_start"]),
    "duplicate ids": ("x.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n",
                      ["duplicate question id", "'q1' (2 times)"]),
    "bad gzip": ("x.json.gz", b"not gzip", ["not a readable gzip file"]),
    "not utf8": ("x.json", b'[{"id": "\xff"}]', ["not UTF-8", "0xff"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_one_line_naming_it(tmp_path, case) -> None:
    name, content, needles = BAD_FILES[case]
    path = _write(tmp_path, name, content)
    one_line_error(lambda: load_qa_split(str(path), flag="--validation_file"), f"--validation_file {path}", *needles)


def test_bad_arguments_are_one_line(tmp_path) -> None:
    missing = tmp_path / "nope.json"
    one_line_error(lambda: load_qa_split(str(missing)), f"--train_file {missing}", "file not found")
    one_line_error(lambda: load_qa_split(str(tmp_path)), "a directory")
    one_line_error(lambda: load_qa_split(None), "--train_file", "--dataset_name")
    good = _write(tmp_path, "good.json", [GOOD])
    one_line_error(lambda: load_qa_split(str(good), max_samples=0), "max_samples 0")
    assert load_qa_split(str(good))["id"] == [QID]


# --------------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------------
def _plain(text: str) -> str:
    """Normalised, accents stripped and spaces removed: the uncased tokenizer's decode drops both."""
    text = unicodedata.normalize("NFKD", normalize_answer(text))
    return "".join(c for c in text if not unicodedata.combining(c) and not c.isspace())


def _aligned(offsets: np.ndarray, start: int, end: int) -> bool:
    """The answer's characters start and end on token boundaries of this window's context."""
    inside = offsets[:, 0] >= 0
    return bool((offsets[inside, 0] == start).any() and (offsets[inside, 1] == end).any())


@pytest.fixture(scope="module")
def dev_windows(dev200, tokenizer) -> datasets.Dataset:
    return prepare_features(dev200, tokenizer, 128, 32, for_eval=True)


def test_training_labels_decode_to_the_answer(dev200, dev_windows, tokenizer) -> None:
    train = prepare_features(dev200, tokenizer, 128, 32)
    assert train.column_names == ["input_ids", "attention_mask", "token_type_ids", "labels", "idx"]
    assert len(train) == len(dev_windows) > len(dev200)  # long contexts need several windows
    assert train["idx"] == list(range(len(train))) and train["labels"] == dev_windows["labels"]
    assert {len(ids) for ids in train["input_ids"]} == {128}
    labelled = misaligned = 0
    for window in dev_windows:
        start, end = window["labels"]
        if (start, end) == (0, 0):
            continue
        labelled += 1
        example = dev200[window["example_idx"]]
        text, char = example["answers"]["text"][0], example["answers"]["answer_start"][0]
        offsets = np.asarray(window["offset_mapping"])
        assert 0 < start <= end and offsets[start, 0] >= 0 and offsets[end, 0] >= 0
        if not _aligned(offsets, char, char + len(text)):  # e.g. gold "gold" inside the token "golden"
            misaligned += 1
            continue
        assert _plain(tokenizer.decode(window["input_ids"][start:end + 1])) == _plain(text)
        assert example["context"][offsets[start, 0]:offsets[end, 1]] == text
    assert labelled >= 200 and misaligned <= labelled // 20, (labelled, misaligned)
    # Every question has its answer wholly inside at least one window.
    assert {e for e, (s, _) in zip(dev_windows["example_idx"], dev_windows["labels"]) if s} == set(range(200))


def test_eval_columns(dev_windows, dev200) -> None:
    assert dev_windows.column_names == ["input_ids", "attention_mask", "token_type_ids", "labels", "example_idx",
                                        "offset_mapping", "idx"]
    offsets = np.asarray(dev_windows[0]["offset_mapping"])
    context = np.asarray(dev_windows[0]["token_type_ids"]) == 1
    context[np.flatnonzero(context)[-1]] = False  # the final [SEP]
    assert offsets.shape == (128, 2) and (offsets[~context] == -1).all() and (offsets[context] >= 0).all()
    assert sorted(set(dev_windows["example_idx"])) == dev200["idx"]


def test_doc_stride_bounds(dev200, sample, tokenizer) -> None:
    one_line_error(lambda: prepare_features(dev200, tokenizer, 128, 97), "--doc_stride 97", "--max_seq_length",
                   "= 128 - (28 + 3) = 97", "from 0 to 96")
    assert len(prepare_features(dev200, tokenizer, 128, 96)) > 200
    one_line_error(lambda: prepare_features(dev200, tokenizer, 20, 0), "--max_seq_length 20", "28 tokens")
    one_line_error(lambda: prepare_features(sample, tokenizer, 64, 0), "--doc_stride 0", "all 14 questions",
                   "--doc_stride (e.g. 128)", "--max_seq_length")
    one_line_error(lambda: prepare_features(sample, tokenizer, 64, -1), "--doc_stride -1")
    truncated = prepare_features(dev200, tokenizer, 128, 0, for_eval=True)  # some overflow: truncated, fine
    assert truncated["example_idx"] == list(range(200)) and truncated["idx"] == list(range(200))


# --------------------------------------------------------------------------------------------------------
# Post-processing and metrics
# --------------------------------------------------------------------------------------------------------
def _oracle(windows: datasets.Dataset, length: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(windows["labels"])
    start, end = np.zeros((len(windows), length)), np.zeros((len(windows), length))
    rows = np.flatnonzero(labels[:, 0] > 0)
    start[rows, labels[rows, 0]] = end[rows, labels[rows, 1]] = 10.0
    return start, end


def test_oracle_logits_give_exact_match_100(dev200, dev_windows) -> None:
    predictions = postprocess(dev200, dev_windows, *_oracle(dev_windows, 128), QaPredictionSettings())
    assert set(predictions) == set(dev200["id"])
    aligned = set()
    for window in dev_windows:
        example = dev200[window["example_idx"]]
        text, char = example["answers"]["text"][0], example["answers"]["answer_start"][0]
        if window["labels"][0] and _aligned(np.asarray(window["offset_mapping"]), char, char + len(text)):
            aligned.add(example["idx"])
    assert len(aligned) >= 190
    assert squad_metrics(predictions, dev200.select(sorted(aligned))) == {"exact_match": 100.0, "f1": 100.0}
    assert squad_metrics(predictions, dev200)["exact_match"] >= 95.0


def test_postprocess_is_fast_and_checks_shapes(dev200, tokenizer) -> None:
    examples = datasets.concatenate_datasets([dev200] * 10)
    examples = examples.map(lambda r, i: {"id": f"{r['id']}-{i}", "idx": i}, with_indices=True)
    windows = prepare_features(examples, tokenizer, 128, 32, for_eval=True)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, len(windows), 128))
    began = time.perf_counter()
    predictions = postprocess(examples, windows, logits[0], logits[1], QaPredictionSettings())
    assert time.perf_counter() - began < 10.0 and len(predictions) == 2000
    with pytest.raises(ValueError, match="do not match"):
        postprocess(examples, windows, logits[0][:, :64], logits[1], QaPredictionSettings())
    with pytest.raises(QaDataError, match="for_eval=True"):
        postprocess(dev200, prepare_features(dev200.select(range(3)), tokenizer, 128, 32),
                    logits[0][:3], logits[1][:3], QaPredictionSettings())
    with pytest.raises(QaDataError, match="--max_answer_length 0"):
        QaPredictionSettings(max_answer_length=0)


def test_v2_null_prediction(sample, tokenizer) -> None:
    example = sample.select([0])  # "France" at character 159
    everything = prepare_features(sample, tokenizer, 64, 16, for_eval=True)
    empty = {i for i, a in enumerate(sample["answers"]) if not a["text"]}
    assert all(w["labels"] == [0, 0] for w in everything if w["example_idx"] in empty)  # unanswerable: [CLS]
    windows = prepare_features(example, tokenizer, 64, 16, for_eval=True)
    assert len(windows) >= 2
    labelled = [i for i, (s, _) in enumerate(windows["labels"]) if s]
    w = labelled[0]
    s, e = windows[w]["labels"]
    start, end = np.zeros((len(windows), 64)), np.zeros((len(windows), 64))
    start[w, s], end[w, e] = 1.0, 0.5  # best span: 1.5
    start[:, 0] = end[:, 0] = 1.0  # null 2.0 in every window
    v1 = postprocess(example, windows, start, end, QaPredictionSettings())
    v2 = postprocess(example, windows, start, end, QaPredictionSettings(version_2_with_negative=True))
    margin = QaPredictionSettings(version_2_with_negative=True, null_score_diff_threshold=1.0)
    assert v1 == {example[0]["id"]: "France"} and v2 == {example[0]["id"]: ""}  # 2.0 - 1.5 > 0
    assert postprocess(example, windows, start, end, margin)[example[0]["id"]] == "France"  # 0.5 <= 1.0
    start[w - 1 if w else w + 1, 0] = end[w - 1 if w else w + 1, 0] = 0.0  # the null is the smallest: 0.0
    assert postprocess(example, windows, start, end, QaPredictionSettings(version_2_with_negative=True)) == v1


def test_normalize_answer() -> None:
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a day") == "apple day"
    assert normalize_answer("theater") == "theater"  # "the" only as a word
    assert normalize_answer("  A.  ") == ""


def test_squad_metrics_hand_checked() -> None:
    examples = datasets.Dataset.from_dict({
        "id": ["a", "b", "c", "d", "e", "f"],
        "answers": [{"text": ["Denver Broncos"], "answer_start": [0]},
                    {"text": ["Denver Broncos"], "answer_start": [0]},
                    {"text": ["Santa Clara, California", "Levi's Stadium"], "answer_start": [0, 0]},
                    {"text": [], "answer_start": []},
                    {"text": [], "answer_start": []},
                    {"text": ["the cat sat"], "answer_start": [0]}],
    })
    predictions = {
        # "the denver broncos" -> "denver broncos": EM 1, F1 1.
        "a": "the Denver Broncos",
        # tokens {broncos, won} vs {denver, broncos}: 1 common, P = 1/2, R = 1/2, F1 = 2*(1/4)/(1) = 0.5; EM 0.
        "b": "Broncos won",
        # vs "santa clara california": 1 common of 1 -> P 1, R 1/3, F1 = 2*(1/3)/(4/3) = 0.5;
        # vs "levis stadium" ("levi's" -> "levis"): 1 common of 1 -> P 1, R 1/2, F1 = 2*(1/2)/(3/2) = 2/3: max 2/3.
        "c": "Stadium.",
        # unanswerable: "" is right (EM 1, F1 1) ...
        "d": "",
        # ... and any text is wrong (EM 0, F1 0).
        "e": "cat",
        # "cat cat" vs "cat sat" (article dropped): common Counter min(2,1) = 1 -> P 1/2, R 1/2, F1 1/2.
        "f": "a cat cat",
        "extra": "ignored",
    }
    scores = squad_metrics(predictions, examples)
    # EM: a, d = 2 of 6. F1: 1 + 0.5 + 2/3 + 1 + 0 + 0.5 = 11/3 over 6 = 11/18.
    assert scores["exact_match"] == pytest.approx(100 * 2 / 6)
    assert scores["f1"] == pytest.approx(100 * 11 / 18)
    with pytest.raises(ValueError, match="2 of 6 questions have no prediction"):
        squad_metrics({k: v for k, v in predictions.items() if k not in ("a", "e")}, examples)
