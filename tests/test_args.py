"""Bad input fails before training with a message naming the flag/file/value (no process group, no weights)."""

import json

import pytest

from cap_ds.args import ArgumentError, parse_args
from cap_ds.train import preflight


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


def test_argparse_choices_name_allowed_values(capsys):
    with pytest.raises(SystemExit):
        args("--pruning_method", "random")
    assert "soft_movement" in capsys.readouterr().err


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
        preflight(*parsed)


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
        preflight(*parsed)
    teacher = _fake_teacher(tmp_path, model_path, 2, {0: "positive", 1: "negative"})
    with pytest.raises(ValueError, match="differ from the task"):
        preflight(*parsed)


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
        preflight(*parsed)
