"""Every shipped DeepSpeed config (ds_configs/*.json, bf16 ones included: DeepSpeed accepts bf16 on CPU) runs a
real tiny movement prune through cap_ds/train.py, in one process; offloading configs get DeepSpeed's CPU Adam with
our parameter groups (pruning scores keep their own LR and no weight decay), as does a config whose optimizer
section drives the optimizer. Unknown top-level keys are warned about, by name."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest

from cap_ds.training.ds_config import KNOWN_TOP_LEVEL_KEYS, warn_unknown_keys
from tests.conftest import REPO, run_env

CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from cap_ds.train import main

    out, data, configs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    results = {}
    for cfg in configs:
        r = main(["--config_overrides", "num_hidden_layers=2", "--task_name", "sst2", "--data_dir", data,
                  "--max_train_samples", "32", "--max_eval_samples", "16", "--max_seq_length", "32",
                  "--per_device_train_batch_size", "8", "--max_steps", "3", "--cap", "prc", "--extra_negatives", "8",
                  "--pruning_method", "movement", "--disable_tqdm", "--deepspeed", cfg,
                  "--output_dir", str(out / Path(cfg).stem)])
        results[Path(cfg).stem] = {k: r[k] for k in ("optimizer", "sparsity", "steps")}

    # The optimizer the offload configs get, on a model with pruning scores: the same three groups.
    import deepspeed
    from cap_ds.training.ds_config import build_ds_config
    from cap_ds.training.optim import build_optimizer, optimizer_groups

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Linear(4, 4)
            self.mask_scores = torch.nn.Parameter(torch.zeros(4, 4))

        def forward(self, x):
            return self.dense(x) * self.mask_scores.sigmoid().mean()

    groups_seen = {}
    for name, extra in (("offload", {}), ("optimizer_section", {"optimizer": {"type": "AdamW", "params": {
            "lr": "auto", "eps": "auto", "weight_decay": "auto", "betas": "auto"}}})):
        ds = json.loads(Path(configs[-1]).read_text())  # zero3_offload_bf16
        ds.update(extra)
        path = out / f"{name}.json"
        path.write_text(json.dumps(ds))
        cfg, _ = build_ds_config(path, micro_batch=2, grad_accum=1, world_size=1, max_grad_norm=1.0,
                                 output_dir=str(out / name), optimizer_flags={"lr": 1e-4, "eps": 1e-8, "weight_decay": 0.01})
        model = Tiny()
        opt, params = build_optimizer(optimizer_groups(model, 0.01, 0.5), cfg, lr=1e-4, eps=1e-8)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=params, config=cfg)
        inner = engine.optimizer.optimizer
        groups_seen[name] = {"type": type(inner).__name__,
                             "groups": [[g["lr"], g["weight_decay"]] for g in inner.param_groups]}
    print("RESULTS " + json.dumps({"runs": results, "optimizers": groups_seen}))
""")


def test_every_shipped_config_prunes(glue_dir, model_path, tmp_path):
    assert {c.stem for c in CONFIGS} >= {"zero0_autocast_bf16", "zero2", "zero2_bf16", "zero3", "zero3_bf16",
                                         "zero3_offload", "zero3_offload_bf16"}
    assert CONFIGS[-1].stem == "zero3_offload_bf16"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(glue_dir), *map(str, CONFIGS)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=run_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    data = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    for cfg in CONFIGS:
        run = data["runs"][cfg.stem]
        assert run["steps"] == 3 and run["sparsity"] == pytest.approx(0.9, abs=0.01), (cfg.stem, run)
        offload = "offload_optimizer" in json.loads(cfg.read_text()).get("zero_optimization", {})
        assert run["optimizer"] == ("DeepSpeedCPUAdam" if offload else "AdamW"), (cfg.stem, run)
        assert (tmp_path / cfg.stem / "final" / "config.json").is_file()
    # weights (decay 0.01), biases (no decay), pruning scores (own LR 0.5, no decay): in both ways of building it
    for how in ("offload", "optimizer_section"):
        seen = data["optimizers"][how]
        assert seen["type"] == "DeepSpeedCPUAdam", seen
        assert seen["groups"] == [[pytest.approx(1e-4), 0.01], [pytest.approx(1e-4), 0.0], [0.5, 0.0]], seen


def test_shipped_configs_use_only_known_keys(caplog):
    for cfg in CONFIGS:
        assert warn_unknown_keys(json.loads(cfg.read_text()), cfg) == []
    assert "zero_optimization" in KNOWN_TOP_LEVEL_KEYS and "compression_training" in KNOWN_TOP_LEVEL_KEYS


def test_unknown_top_level_keys_are_named_in_a_warning(caplog):
    cfg = {"zero_optimisation": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": True},
           "my_note": "x"}
    with caplog.at_level(logging.WARNING, logger="cap_ds.training.ds_config"):
        assert warn_unknown_keys(cfg, "my.json") == ["my_note", "zero_optimisation"]
    [record] = caplog.records
    assert "--deepspeed my.json" in record.message and "'zero_optimisation'" in record.message
    assert "'my_note'" in record.message and "bf16" not in record.message
