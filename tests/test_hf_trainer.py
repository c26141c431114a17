"""CAP inside the Hugging Face Trainer (cap_ds.integrations): the example script on the real 2-layer MiniLM and real
SST-2 rows. One process in this process (teacher + CAP-m, reused by the resume and export checks); torchrun and
DeepSpeed ZeRO-2/3 in subprocesses, compared with it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REPO, free_port, run_env

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1.0")

TARGET = 0.9
STEPS = 24  # 16 optimizer steps per epoch: the SnC snapshot at step 16 lies between the checkpoint (12) and the end


def example():
    """examples/hf_trainer_cap.py as a module (registered first: its dataclasses look their module up)."""
    if "hf_trainer_cap" not in sys.modules:
        spec = importlib.util.spec_from_file_location("hf_trainer_cap", REPO / "examples" / "hf_trainer_cap.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["hf_trainer_cap"] = module
        spec.loader.exec_module(module)
    return sys.modules["hf_trainer_cap"]


def args(model_path, glue_dir, out: Path, teacher: Path, *extra: str, batch: int = 16) -> list[str]:
    return ["--model_name_or_path", model_path, "--data_dir", str(glue_dir), "--task_name", "sst2",
            "--config_overrides", "num_hidden_layers=2", "--max_train_samples", "256", "--max_eval_samples", "128",
            "--max_seq_length", "64", "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size",
            "64", "--output_dir", str(out), "--teacher_name_or_path", str(teacher), "--teacher_epochs", "1.5",
            "--teacher_learning_rate", "2e-4", "--max_steps", str(STEPS), "--learning_rate", "1e-4",
            "--warmup_steps", "2", "--logging_steps", "4", "--cap", "prc,snc,fic", "--pruning_method", "movement",
            "--target_sparsity", str(TARGET), "--extra_negatives", "64", "--seed", "7", "--disable_tqdm", "true",
            "--dataloader_pin_memory", "false", *extra]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def final_sparsity(out: Path) -> float:
    return json.loads((out / "final" / "sparsity.json").read_text())["sparsity"]


def eval_metrics(out: Path) -> dict:
    return json.loads((out / "eval_results.json").read_text())


@pytest.mark.parametrize("argv, message", [
    (["--pruning_method", "first_order"], "--pruning_method 'first_order'; allowed: magnitude, movement, soft_movement"),
    (["--target_sparsity", "1.0"], "--target_sparsity must be in [0, 1), got 1.0"),
    (["--cap", "prc,xyz"], "--cap: unknown module(s) ['xyz']"),
    (["--cap", "fic"], "--cap fic needs --teacher_name_or_path"),
    (["--kd_temperature", "0"], "--kd_temperature must be > 0, got 0.0"),
])
def test_cap_arguments_refuse_bad_values_in_one_line(argv, message):
    from transformers import HfArgumentParser

    from cap_ds.integrations import CapArguments

    with pytest.raises(ValueError) as err:
        HfArgumentParser(CapArguments).parse_args_into_dataclasses(args=argv)
    assert message in str(err.value) and "\n" not in str(err.value)
    defaults = HfArgumentParser(CapArguments).parse_args_into_dataclasses(args=["--cap", ""])[0]
    assert (defaults.modules, defaults.pruning_method, defaults.target_sparsity) == ([], "movement", 0.9)


def test_train_dataset_gets_its_bank_index():
    import datasets

    from cap_ds.integrations.hf_trainer import dataset_with_index

    rows = datasets.Dataset.from_dict({"label": [0, 1, 0]})
    assert dataset_with_index(rows)["idx"] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"column idx must hold 0..2 once each"):
        dataset_with_index(rows.add_column("idx", [5, 6, 7]))


def test_bank_labels_follow_idx_not_row_order():
    import datasets

    from cap_ds.integrations.hf_trainer import bank_labels

    shuffled = datasets.Dataset.from_dict({"label": [1, 0, 2], "idx": [2, 0, 1]})  # a shuffle that kept idx
    assert bank_labels(shuffled).tolist() == [0, 2, 1]


def test_logged_terms_are_means_over_the_steps_that_had_them():
    from cap_ds.integrations.hf_callback import CapCallback

    callback = CapCallback(run=type("Run", (), {"schedule": None})())
    callback.record({"loss": torch.tensor(9.0), "ce": torch.tensor(1.0)})  # before the first snapshot: no SnC
    callback.record({"ce": torch.tensor(3.0), "snc": torch.tensor(0.5)})
    assert callback.scalars(torch.nn.Linear(1, 1)) == {"ce": 2.0, "snc": 0.5}
    assert callback.scalars(torch.nn.Linear(1, 1)) == {}


def test_deepspeed_config_writes_monitors_under_the_run(tmp_path):
    from cap_ds.integrations import deepspeed_config

    cfg = deepspeed_config(REPO / "ds_configs" / "zero3.json", tmp_path)
    assert cfg["tensorboard"]["output_path"] == str(tmp_path / "runs") and cfg["zero_optimization"]["stage"] == 3
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"compression_training": {"sparse_pruning": {}}}))
    with pytest.raises(ValueError, match="compression_training section is not read by CapHfTrainer"):
        deepspeed_config(bad, tmp_path)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, model_path, glue_dir):
    """Teacher fine-tune (plain Trainer) then CAP-m with a checkpoint at step 12, in this process."""
    root = tmp_path_factory.mktemp("hf_cap")
    out, teacher = root / "cap", root / "teacher"
    trainer, metrics = example().main(args(model_path, glue_dir, out, teacher, "--save_steps", "12",
                                           "--report_to", "tensorboard"))
    return {"root": root, "out": out, "teacher": teacher, "trainer": trainer, "metrics": metrics}


def test_one_process_reaches_target_and_logs_the_loss_parts(one_process):
    trainer, out = one_process["trainer"], one_process["out"]
    assert (one_process["teacher"] / "config.json").is_file()
    assert abs(final_sparsity(out) - TARGET) < 0.005
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
    for r in rows:
        assert {"ce", "kd", "prc", "fic", "sparsity", "threshold"} <= set(r)
        assert all(np.isfinite(r[k]) for k in ("ce", "kd", "prc", "fic"))
    assert "snc" not in rows[3] and "snc" in rows[4]  # the snapshot is taken at the start of epoch 1 (step 16)
    assert rows[0]["sparsity"] < 0.5 and rows[-1]["sparsity"] == pytest.approx(TARGET, abs=0.005)
    assert np.isfinite(one_process["metrics"]["eval_accuracy"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(out.joinpath("runs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    tags = set()
    for event in events:
        acc = EventAccumulator(str(event))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/ce", "train/kd", "train/prc", "train/snc", "train/fic", "train/sparsity",
            "train/threshold", "train/loss"} <= tags
    # the pruning scores are their own optimizer group, at --mask_scores_learning_rate (1e-2)
    assert sorted({g["initial_lr"] for g in trainer.optimizer.param_groups}) == [1e-4, 1e-2]
    ckpt = out / "checkpoint-12"
    assert (ckpt / "cap_state_rank0.pt").is_file() and (ckpt / "model.safetensors").is_file()


def test_export_loads_with_plain_transformers_and_predicts_the_same(one_process):
    from transformers import AutoModelForSequenceClassification

    from cap_ds.compression import sparsity_report

    trainer, final = one_process["trainer"], one_process["out"] / "final"
    plain = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert abs(sparsity_report(plain)["sparsity"] - TARGET) < 0.005  # exact zeros in the plain weights
    masked = trainer.model.eval()
    loader = trainer.get_eval_dataloader()
    with torch.no_grad():
        for batch in loader:
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "idx")}
            want, got = masked(**inputs).logits, plain(**inputs).logits
            assert torch.equal(want.argmax(-1), got.argmax(-1))
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    card = (final / "README.md").read_text()
    assert card.count("measured sparsity") == 1
    meta = yaml.safe_load(card.split("---\n")[1])  # the hub's YAML, checked against what the export measured
    assert meta["library_name"] == "transformers" and {"pruning", "sparse", "contrastive-pruning"} <= set(meta["tags"])
    assert meta["cap_ds"]["sparsity"] == pytest.approx(json.loads((final / "sparsity.json").read_text())["sparsity"])
    evals = [r for r in trainer.state.log_history if "eval_accuracy" in r]
    [index_metrics] = [m["metrics"] for m in meta["model-index"][0]["results"]]
    assert {m["type"]: m["value"] for m in index_metrics}["accuracy"] == pytest.approx(evals[-1]["eval_accuracy"])
    assert "](sparsity_heatmap.png)" in card and (final / "sparsity_heatmap.png").is_file()


def test_resume_from_checkpoint_matches_the_uninterrupted_run(one_process, model_path, glue_dir):
    out = one_process["root"] / "resumed"
    _, metrics = example().main(args(model_path, glue_dir, out, one_process["teacher"], "--resume_from_checkpoint",
                                     str(one_process["out"] / "checkpoint-12")))
    # The Trainer restores weights, optimizer, LR schedule, data position and RNG; CapHfTrainer its banks (SnC's
    # snapshot at step 16 comes after the checkpoint), extra-negative RNG, cached teacher logits and schedule.
    assert metrics["eval_accuracy"] == one_process["metrics"]["eval_accuracy"]
    assert metrics["eval_loss"] == pytest.approx(one_process["metrics"]["eval_loss"], abs=1e-6)
    want, got = final_weights(one_process["out"]), final_weights(out)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def launch(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=run_env(OMP_NUM_THREADS="1", CAP_DS_TRACEBACK="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.distributed
def test_torchrun_two_processes_reach_the_target(one_process, model_path, glue_dir):
    out = one_process["root"] / "ddp"
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "examples/hf_trainer_cap.py",
            *args(model_path, glue_dir, out, one_process["teacher"], "--ddp_backend", "gloo", "--save_steps", "12",
                  batch=8)], REPO)
    assert abs(final_sparsity(out) - TARGET) < 0.005
    assert 0.0 <= eval_metrics(out)["eval_accuracy"] <= 1.0
    for rank in (0, 1):  # every process keeps (and checkpoints) its own CAP state
        assert (out / "checkpoint-12" / f"cap_state_rank{rank}.pt").is_file()
    rows = [r for r in json.loads((out / "checkpoint-24" / "trainer_state.json").read_text())["log_history"]
            if "loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24] and all("prc" in r and "fic" in r for r in rows)
    assert rows[-1]["sparsity"] == pytest.approx(TARGET, abs=0.005)


def mask_agreement(a: Path, b: Path) -> float:
    """Share of encoder linear weight entries pruned (exact zero) in both exports or kept in both."""
    want, got = final_weights(a), final_weights(b)
    keys = [k for k in want if ".encoder.layer." in k and k.endswith(".weight") and want[k].dim() == 2]
    same = sum(int(((want[k] == 0) == (got[k] == 0)).sum()) for k in keys)
    return same / sum(want[k].numel() for k in keys)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_agrees_with_one_process(one_process, model_path, glue_dir, stage):
    out = one_process["root"] / stage
    # ZeRO-2 also runs with gradient accumulation (2 micro-batches of 8 per step, the same 16 rows per step),
    # ZeRO-3 with a checkpoint that a second run resumes from (partitioned weights, optimizer and scores).
    ds = ["--deepspeed", str(REPO / "ds_configs" / f"{stage}.json")]
    extra = ["--gradient_accumulation_steps", "2"] if stage == "zero2" else ["--save_steps", "12"]
    launch([sys.executable, "examples/hf_trainer_cap.py",
            *args(model_path, glue_dir, out, one_process["teacher"], *ds, *extra,
                  batch=8 if stage == "zero2" else 16)], REPO)
    if stage == "zero3":
        resumed = one_process["root"] / "zero3_resumed"
        launch([sys.executable, "examples/hf_trainer_cap.py",
                *args(model_path, glue_dir, resumed, one_process["teacher"], *ds, "--resume_from_checkpoint",
                      str(out / "checkpoint-12"))], REPO)
        assert eval_metrics(resumed)["eval_loss"] == eval_metrics(out)["eval_loss"]
        want, got = final_weights(out), final_weights(resumed)
        assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    report = json.loads((out / "final" / "sparsity.json").read_text())
    assert len(report["per_module"]) == 12 and all(abs(v - TARGET) < 0.005 for v in report["per_module"].values())
    assert report["sparsity"] == pytest.approx(final_sparsity(one_process["out"]), abs=0.002)
    # Not bit-identical to the one-process run (DeepSpeed's flattened fp32 partitions and its own clipping round
    # differently; ZeRO-2 here also accumulates): scores near the threshold may flip, nothing more.
    assert mask_agreement(one_process["out"], out) > 0.99
    got, want = eval_metrics(out), one_process["metrics"]
    assert abs(got["eval_accuracy"] - want["eval_accuracy"]) <= 0.04
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], abs=2e-3)
