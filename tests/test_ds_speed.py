"""Issue 22 (DeepSpeed set up for speed): what DeepSpeed's own step bookkeeping does per optimizer step under the
shipped configs, counted on the CPU by ``benchmarks/ds_step_counts.py`` (it wraps DeepSpeed's methods) on a tiny
BERT with our three parameter groups:

- the global gradient norm is computed once per step (ZeRO-1/2 and ZeRO-3 build it from one partial norm per
  parameter group, each gradient tensor read once; stage 0 calls one clip over every parameter);
- no per-tensor overflow scan under bf16 (``bf16.check_grad_overflow: false`` on ZeRO-2; ZeRO-3 scans only fp16);
- no device synchronize of DeepSpeed's throughput timer (``timers.throughput.enabled: false``);
- the numbers stay right: the fast ZeRO configs train exactly like the ones shipped before, the stage-0
  ``torch_autocast`` config like a plain PyTorch loop (fp32 weights, autocast bf16, AdamW, clip 1.0).

The "before" configs are the shipped ones with the fast settings reverted (DeepSpeed's defaults for
``check_grad_overflow`` and the throughput timer, ``overlap_comm`` off as it was)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cap_ds.training.ds_config import build_ds_config, computes_in_bf16
from cap_ds.training.optim import adamw_implementation, build_optimizer, optimizer_groups
from tests.conftest import REPO, run_env

CONFIGS = {p.stem: p for p in sorted((REPO / "ds_configs").glob("*.json"))}
FAST = ("zero0_autocast_bf16", "zero2_bf16", "zero3_bf16")
STEPS = 5


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """benchmarks/ds_step_counts.py in its own process (it wraps DeepSpeed's methods and joins a world of one)."""
    names = ["plain", *FAST, "zero2_bf16_before", "zero3_bf16_before"]
    out = tmp_path_factory.mktemp("ds_speed") / "counts.json"
    proc = subprocess.run([sys.executable, "benchmarks/ds_step_counts.py", "--steps", str(STEPS), "--json", str(out),
                           *names], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=run_env(DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(proc.stdout)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", FAST)
def test_fast_configs_norm_once_and_never_scan_for_overflow(counted, name):
    run = counted[name]
    print(name, json.dumps(run["per_step"][-1]))
    assert run["groups"] == 3  # weights, no-decay, pruning scores
    for step in run["per_step"]:
        assert step["applied"], (name, step)
        assert step.get("global_norm", 0) == 1, (name, step)
        # ZeRO builds the global norm from one partial norm per parameter group: no gradient is read twice
        assert step.get("group_norm", 0) in (0, run["groups"]), (name, step)
        assert step.get("tensor_norm", 0) <= run["grad_tensors"] + 1, (name, step)
        assert step.get("overflow_scan", 0) == 0 and step.get("tensor_inf_nan_test", 0) == 0, (name, step)
        assert step.get("device_synchronize", 0) == 0, (name, step)


def test_the_counters_see_what_the_old_zero2_config_did(counted):
    """The ZeRO-2 bf16 config shipped before: one overflow scan per step testing every gradient tensor, and the
    throughput timer's device syncs once it starts timing (DeepSpeed's ThroughputTimer, from its step 2)."""
    run = counted["zero2_bf16_before"]
    for step in run["per_step"]:
        assert step["overflow_scan"] == 1 and step["tensor_inf_nan_test"] == run["grad_tensors"], step
        assert step["global_norm"] == 1 and step["group_norm"] == run["groups"], step
    assert sum(step.get("device_synchronize", 0) for step in run["per_step"]) > 0
    assert counted["zero3_bf16_before"]["per_step"][-1].get("overflow_scan", 0) == 0  # ZeRO-3 scans only fp16


@pytest.mark.parametrize("name", ["zero2_bf16", "zero3_bf16"])
def test_fast_zero_configs_train_like_the_old_ones(counted, name):
    fast, old = counted[name]["losses"], counted[f"{name}_before"]["losses"]
    assert fast == pytest.approx(old, rel=1e-3), (fast, old)
    assert fast[-1] < fast[0], fast


def test_stage0_autocast_config_trains_like_a_plain_pytorch_loop(counted):
    run, plain = counted["zero0_autocast_bf16"], counted["plain"]["losses"]
    assert run["wrapper"] == "AdamW"  # no DeepSpeed wrapper: the client optimizer steps the fp32 weights
    assert run["inner_kernel"] == {"fused": None, "foreach": True}  # CPU; fused on CUDA (adamw_implementation)
    assert run["losses"] == pytest.approx(plain, rel=1e-4), (run["losses"], plain)
    assert plain[-1] < plain[0], plain


def test_fast_settings_are_shipped():
    for name in ("zero2_bf16", "zero3_bf16", "zero3_offload_bf16", "zero0_autocast_bf16"):
        cfg = json.loads(CONFIGS[name].read_text())
        assert cfg["timers"] == {"throughput": {"enabled": False}}, name
        assert computes_in_bf16(cfg), name
        if cfg["zero_optimization"]["stage"] > 0:
            assert cfg["zero_optimization"]["overlap_comm"] is True, name
    assert json.loads(CONFIGS["zero2_bf16"].read_text())["bf16"]["check_grad_overflow"] is False
    for name in ("zero2", "zero3", "zero3_offload"):
        assert not computes_in_bf16(json.loads(CONFIGS[name].read_text())), name


def test_every_shipped_config_validates_with_deepspeed(tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    for name, path in CONFIGS.items():
        cfg, _ = build_ds_config(path, micro_batch=4, grad_accum=1, world_size=1, max_grad_norm=1.0,
                                 output_dir=str(tmp_path))
        parsed = DeepSpeedConfig(cfg)
        assert parsed.gradient_clipping == 1.0, name
        assert parsed.bfloat16_config.enabled or parsed.torch_autocast_enabled or not computes_in_bf16(cfg), name


def test_adamw_implementation_per_device():
    import torch

    assert adamw_implementation("cuda") == {"fused": True}
    assert adamw_implementation("cpu") == {"foreach": True}
    model = torch.nn.Linear(4, 4)
    opt, params = build_optimizer(optimizer_groups(model, 0.01, 0.5), {}, lr=1e-4, eps=1e-8, device_type="cpu")
    assert params is None and isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"] is True
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-4, 0.01), (1e-4, 0.0)]
