"""Bad user data gets one line naming the file, column or value and exit code 2, before any work, and leaves
no output folder behind. All cases run through ``cap_ds.train.cli`` in one subprocess (one interpreter start)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_env

SAMPLE = REPO.parent / "shared" / "data" / "squad" / "sample.json"
DRIVER = """
import contextlib, io, json, sys
from cap_ds.train import cli
out = []
for argv in json.load(open(sys.argv[1])):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli(argv)
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """(name, argv, words the one line must contain)."""
    d = tmp_path_factory.mktemp("bad_data")
    train = write(d / "train.csv", "review,sentiment\ngreat film,pos\ndull plot,neg\nfine,pos\n")
    dev = write(d / "dev.csv", "review,sentiment\nnice,pos\nbad,neg\n")
    unseen = write(d / "unseen.csv", "review,sentiment\nnice,pos\nso so,neutral\n")
    mixed = write(d / "mixed.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": 1}\n')
    empty = write(d / "empty.csv", "")
    header_only = write(d / "header.csv", "review,sentiment\n")
    xml = write(d / "train.xml", "<rows/>")
    record = {"id": "q1", "title": "t", "context": "The cat sat on the mat.", "question": "Where did the cat sit?",
              "answers": {"text": ["the mat"], "answer_start": [3]}}
    bad_start = write(d / "bad_start.jsonl", json.dumps(record) + "\n")
    good = write(d / "good.jsonl", json.dumps({**record, "answers": {"text": ["the mat"], "answer_start": [15]}})
                 + "\n")
    long_context = " ".join(["word"] * 200) + " the mat."
    overflow = write(d / "overflow.jsonl", json.dumps({**record, "context": long_context, "answers": {
        "text": ["the mat"], "answer_start": [long_context.index("the mat")]}}) + "\n")
    files = ["--train_file", train, "--validation_file", dev, "--text_column_names", "review",
             "--label_column_name", "sentiment"]
    qa = ["--task_type", "question_answering"]
    table = [
        ("missing file", ["--train_file", str(d / "nope.csv"), "--validation_file", dev],
         ["--train_file", "nope.csv", "not found"]),
        ("unknown format", ["--train_file", xml, "--validation_file", dev], ["train.xml", ".csv", ".parquet"]),
        ("missing text column", [*files[:4], "--text_column_names", "body"], ["body", "review", "sentiment"]),
        ("missing label column", [*files[:6], "--label_column_name", "stars"], ["stars", "review", "sentiment"]),
        ("unseen label", [*files[:2], "--validation_file", unseen, *files[4:]], ["neutral", "neg", "pos"]),
        ("empty file", ["--train_file", empty, "--validation_file", dev], ["empty.csv", "empty"]),
        ("empty split", ["--train_file", header_only, "--validation_file", dev], ["header.csv"]),
        ("mixed label types", ["--train_file", mixed, "--validation_file", mixed], ["mixed.jsonl", "pos", "1"]),
        ("task type contradicts", [*files, "--task_type", "regression"], ["--task_type", "regression"]),
        ("task_name and files", ["--task_name", "sst2", *files], ["--task_name", "--train_file"]),
        ("unanswerable without v2", [*qa, "--train_file", str(SAMPLE), "--validation_file", str(SAMPLE)],
         ["6 of 14", "--version_2_with_negative"]),
        ("answer_start off", [*qa, "--train_file", bad_start, "--validation_file", good],
         ["q1", "the mat", "answer_start"]),
        ("all contexts overflow", [*qa, "--train_file", overflow, "--validation_file", overflow, "--doc_stride", "0",
                                   "--max_seq_length", "32"], ["--doc_stride", "--max_seq_length"]),
    ]
    common = ["--config_overrides", "num_hidden_layers=2", "--cap", "none", "--pruning_method", "magnitude",
              "--disable_tqdm", "--max_steps", "2"]
    return [(name, [*argv, *common, "--output_dir", str(d / "out" / str(i))], words)
            for i, (name, argv, words) in enumerate(table)], d


def test_each_bad_input_is_one_line_and_exit_2(cases, tmp_path):
    table, root = cases
    if not SAMPLE.is_file():
        pytest.skip(f"SQuAD fixture not found at {SAMPLE}")
    argv_file = tmp_path / "argv.json"
    argv_file.write_text(json.dumps([argv for _, argv, _ in table]))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(argv_file)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (name, _argv, words), (code, stderr) in zip(table, results):
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1, (name, code, stderr[-3000:])
        assert "Traceback" not in stderr, (name, stderr[-3000:])
        for word in words:
            assert word in lines[0], (name, word, lines[0])
    assert not (root / "out").exists() or not any((root / "out").iterdir())  # nothing half-written
