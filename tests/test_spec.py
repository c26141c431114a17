"""The run spec: resolved once, frozen, and re-resolved only for the two facts known late (world, hub rows)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cap_ds.run.args import parse_args
from cap_ds.run.spec import resolve

FLAGS = ["--task_name", "sst2", "--cap", "prc", "--per_device_train_batch_size", "4",
         "--gradient_accumulation_steps", "2", "--max_steps", "20", "--pruning_method", "magnitude"]


def spec_of(tmp_path, *extra, num_train=100, world_size=2):
    flags = parse_args([*FLAGS, "--output_dir", str(tmp_path / "out"), *extra])
    return resolve(flags, model_path="/models/student", num_train=num_train, world_size=world_size)


def test_the_spec_is_frozen_and_holds_everything_resolved(tmp_path):
    spec = spec_of(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.plan = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.training.learning_rate = 1.0  # the flag groups are frozen too
    assert spec.task.name == "sst2" and spec.model_path == "/models/student" and spec.prune
    assert spec.deepspeed.config["train_batch_size"] == 4 * 2 * 2  # micro x accumulation x world
    assert spec.plan.total_steps == 20 and spec.modules == ["prc"]
    assert spec.loss_weights() == (1.0, 0.0)  # no teacher: CE alone
    assert spec.identity["flags"]["model_name_or_path"] == "/models/student"
    json.dumps(spec.identity)  # the resume check stores it as JSON


def test_late_facts_re_resolve_the_config_and_the_plan(tmp_path):
    spec = spec_of(tmp_path, "--num_train_epochs", "1", "--max_steps", "-1", world_size=None, num_train=None)
    assert spec.plan is None and spec.deepspeed.config.get("train_batch_size") != 16  # world unknown yet
    assert spec.for_world(2) is not spec and spec.for_world(2).deepspeed.config["train_batch_size"] == 16
    sized = spec.for_world(2).with_train_rows(160)
    assert sized.plan.steps_per_epoch == 10  # 80 rows per rank, batches of 4, 2 per optimizer step
    assert sized.with_train_rows(160) is sized and sized.for_world(2) is sized  # nothing to re-resolve


def test_finetuning_has_no_pruning_facts(tmp_path):
    spec = spec_of(tmp_path, "--mode", "finetune", "--cap", "none")
    assert not spec.prune and not spec.structured and spec.modules == [] and spec.teacher_path is None
