"""Bad input fails before training with a message naming the flag/file/value (no process group, no weights)."""

import json

import pytest

from cap_ds.run.args import ArgumentError, parse_args
from cap_ds.run.preflight import preflight


def args(*extra):
    return parse_args(["--output_dir", "/tmp/unused", *extra])


@pytest.mark.parametrize("flags, match", [
    (["--task_name", "squad"], "--task_name"),
    (["--target_sparsity", "1.0"], r"--target_sparsity must be in \[0, 1\)"),
    (["--target_sparsity", "-0.1"], "--target_sparsity"),
    (["--cap", "prc,xyz"], r"unknown module\(s\) \['xyz'\]"),
    (["--cap", "fic"], "--cap fic needs --teacher_name_or_path"),
    (["--deepspeed", "/no/such.json", "--cap", "none"], "--deepspeed '/no/such.json': file not found"),
    (["--data_dir", "/no/such/dir", "--cap", "none"], "--data_dir '/no/such/dir' is not a directory"),
    (["--per_device_train_batch_size", "0", "--cap", "none"], "--per_device_train_batch_size must be >= 1"),
])
def test_flag_errors(flags, match):
    with pytest.raises(ArgumentError, match=match):
        args(*flags)


def test_argparse_choices_name_allowed_values():
    with pytest.raises(ArgumentError, match="--pruning_method: invalid choice 'random'; allowed: .*soft_movement"):
        args("--pruning_method", "random")


def test_help_renders(capsys):
    with pytest.raises(SystemExit) as exc:
        args("--help")
    assert exc.value.code == 0
    assert "--target_sparsity" in capsys.readouterr().out


def test_launcher_local_rank_and_path_valued_deepspeed(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text("{}")
    _, _, run, _, cap = args("--local_rank=0", "--deepspeed", str(cfg), "--cap", "none")
    assert run.local_rank == 0 and run.deepspeed == str(cfg) and cap.modules == []


def test_missing_data_file_named(tmp_path, model_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\nok \t1\n")
    parsed = args("--data_dir", str(tmp_path), "--cap", "none", "--model_name_or_path", model_path)
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        preflight(parsed)


def _fake_teacher(tmp_path, model_path, num_labels, id2label=None):
    import shutil

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path, num_labels=num_labels)
    if id2label:
        cfg.id2label, cfg.label2id = id2label, {v: k for k, v in id2label.items()}
    out = tmp_path / "teacher"
    cfg.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{model_path}/{name}", out / name)
    return out


def test_teacher_with_other_labels_rejected(tmp_path, model_path, glue_dir):
    teacher = _fake_teacher(tmp_path, model_path, 3)
    parsed = args("--data_dir", str(glue_dir), "--teacher_name_or_path", str(teacher), "--model_name_or_path",
                  model_path)
    with pytest.raises(ValueError, match="has 3 labels but the task needs 2"):
        preflight(parsed)
    teacher = _fake_teacher(tmp_path, model_path, 2, {0: "positive", 1: "negative"})
    with pytest.raises(ValueError, match="differ from the task"):
        preflight(parsed)


def test_teacher_tokenizer_mismatch_rejected(tmp_path, model_path, glue_dir):
    teacher = _fake_teacher(tmp_path, model_path, 2)
    vocab = (teacher / "vocab.txt").read_text().splitlines()
    vocab[2000], vocab[2001] = vocab[2001], vocab[2000]
    (teacher / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = json.loads((teacher / "tokenizer.json").read_text())
    v = tok["model"]["vocab"]
    a, b = vocab[2000], vocab[2001]
    v[a], v[b] = v[b], v[a]
    (teacher / "tokenizer.json").write_text(json.dumps(tok))
    parsed = args("--data_dir", str(glue_dir), "--teacher_name_or_path", str(teacher), "--model_name_or_path",
                  model_path)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        preflight(parsed)


# ---------------------------------------------------------------- clear messages (issue 13)
@pytest.mark.parametrize("flags, match", [
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--learning_rate=-1e-4"], "--learning_rate must be >= 0, got -0.0001"),
    (["--contrastive_temperature", "nan"], "--contrastive_temperature must be a finite number"),
    (["--num_train_epochs", "inf"], "--num_train_epochs must be a finite number"),
    (["--max_nonfinite_steps=-1"], "--max_nonfinite_steps must be >= 0"),
    (["--overwrite_output_dir", "--resume", "auto"], "--overwrite_output_dir deletes the run that --resume auto"),
])
def test_numbers_and_combinations_named(flags, match):
    with pytest.raises(ArgumentError, match=match):
        args("--cap", "none", *flags)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(ArgumentError, match=f"--output_dir '{tmp_path / 'out'}' is a file"):
        parse_args(["--output_dir", str(tmp_path / "out"), "--cap", "none"])


def test_every_flag_has_a_description(capsys):
    from dataclasses import fields

    from cap_ds.run.args import ALL_ARGUMENTS

    missing = [f.name for cls in ALL_ARGUMENTS for f in fields(cls) if not f.metadata.get("help")]
    assert missing == []
    with pytest.raises(SystemExit):
        args("--help")
    text = capsys.readouterr().out.split("\noptions:", 1)[1]  # past the usage lines
    for flag, words in (("--per_device_train_batch_size", "per rank"), ("--learning_rate", "Peak learning rate"),
                        ("--num_train_epochs", "Passes over"), ("--seed", "Seed of"), ("--weight_decay", "decay")):
        assert words in text.split(flag, 1)[1].split("\n  --", 1)[0], flag


def _glue(tmp_path, train_bytes: bytes):
    (tmp_path / "SST-2").mkdir(exist_ok=True)
    (tmp_path / "SST-2" / "train.tsv").write_bytes(train_bytes)
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood \t1\n")
    return tmp_path


def test_non_utf8_tsv_names_file_and_line(tmp_path, model_path):
    data = _glue(tmp_path, "sentence\tlabel\nfine \t1\ncaf\u00e9 \t0\n".encode("latin-1"))
    parsed = args("--data_dir", str(data), "--cap", "none", "--model_name_or_path", model_path)
    with pytest.raises(ValueError, match=r"SST-2/train\.tsv:3: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        preflight(parsed)


def test_user_error_is_one_line_without_traceback_and_leaves_no_folder(tmp_path, model_path):
    """Through the command line: exit 2, one line on stderr, and the output folder is not created."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    data = _glue(tmp_path, b"sentence\tlabel\nfine \t1\ncaf\xe9 \t0\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "cap_ds/train.py", "--data_dir", str(data), "--cap", "none",
                           "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "train.tsv:3: not valid UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_teacher_folder_names_the_missing_file(tmp_path, model_path, glue_dir):
    teacher = _fake_teacher(tmp_path, model_path, 2)
    parsed = args("--data_dir", str(glue_dir), "--teacher_name_or_path", str(teacher), "--model_name_or_path",
                  model_path)
    with pytest.raises(FileNotFoundError, match="no model weights in the folder"):
        preflight(parsed)
    for name in ("tokenizer.json", "vocab.txt"):
        (teacher / name).unlink()
    with pytest.raises(FileNotFoundError, match="--teacher_name_or_path .*: no tokenizer files in the folder"):
        preflight(parsed)
    (teacher / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="--teacher_name_or_path .*: no config.json in the folder"):
        preflight(parsed)


def test_max_seq_length_beyond_the_models_positions(model_path, glue_dir):
    from cap_ds.runtime.errors import UserError

    parsed = args("--data_dir", str(glue_dir), "--cap", "none", "--model_name_or_path", model_path,
                  "--max_seq_length", "1024")
    with pytest.raises(UserError, match="--max_seq_length 1024 is longer than the 512 positions"):
        preflight(parsed)


def test_schedules_that_cannot_work_are_refused_before_loading(tmp_path, model_path, glue_dir):
    from cap_ds.training.plan import PlanError

    base = ["--data_dir", str(glue_dir), "--cap", "none", "--model_name_or_path", model_path,
            "--max_train_samples", "64", "--per_device_train_batch_size", "8"]
    with pytest.raises(PlanError, match="--max_steps 3 ends before the last CAP-f stage"):
        preflight(args(*base, "--pruning_method", "first_order", "--max_steps", "3", "--epochs_per_stage", "1"))
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": "magnitude", "schedule_offset": 200,
                              "schedule_offset_end": 700},
        "different_groups": {"sp1": {"params": {"dense_ratio": 0.1}, "modules": ["encoder"]}}}}}))
    with pytest.raises(PlanError, match="schedule_offset_end is 700 but the run has 5 optimizer steps"):
        preflight(args(*base, "--deepspeed", str(cfg), "--max_steps", "5"))
    # the flags' own schedule always fits: short runs shrink the warm-ups and say so
    plan = preflight(args(*base, "--max_steps", "5")).spec.plan
    assert (plan.offset, plan.offset_end) == (1, 3) and "shrunk" in plan.notes[0]


def test_soft_movement_score_init_default_follows_threshold_control():
    soft = ["--pruning_method", "soft_movement", "--cap", "none"]
    assert args(*soft)[3].threshold_control and args(*soft)[3].score_init == "magnitude"
    # the reference soft movement: zero-init scores (its lambda calibration assumes them), threshold schedule
    reference = args(*soft, "--no_threshold_control")[3]
    assert not reference.threshold_control and reference.score_init == "constant"
    assert args(*soft, "--mask_init", "constant")[3].score_init == "constant"
