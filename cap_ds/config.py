"""The ``--deepspeed`` config: load it, resolve ``"auto"`` values from the CLI (HF convention), and split off
the ``compression_training`` section (ours; DeepSpeed >= 0.19.7 refuses it) before ``deepspeed.initialize``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .compression.config import COMPRESSION_KEY, load_ds_config

DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": False},
    "tensorboard": {"enabled": True, "output_path": "auto", "job_name": "cap"},
    "steps_per_print": 1000000,
}


class DeepSpeedConfigError(ValueError):
    """A ``--deepspeed`` value that conflicts with the command line."""


def _resolve(cfg: dict[str, Any], key: str, value: Any, flag: str) -> None:
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif current != value:
        raise DeepSpeedConfigError(f"--deepspeed sets {key}={current!r} but {flag} is {value!r}; "
                                   f"set one of them (use \"auto\" in the JSON to take the flag)")


def build_ds_config(path: str | Path | None, *, micro_batch: int, grad_accum: int, world_size: int,
                    max_grad_norm: float, output_dir: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config for ``deepspeed.initialize``, the ``compression_training`` section or None)."""
    cfg = copy.deepcopy(DEFAULT_DS_CONFIG if path is None else load_ds_config(path))
    compression = cfg.pop(COMPRESSION_KEY, None)
    _resolve(cfg, "train_micro_batch_size_per_gpu", micro_batch, "--per_device_train_batch_size")
    _resolve(cfg, "gradient_accumulation_steps", grad_accum, "--gradient_accumulation_steps")
    _resolve(cfg, "train_batch_size", micro_batch * grad_accum * world_size,
             "--per_device_train_batch_size x --gradient_accumulation_steps x world size")
    _resolve(cfg, "gradient_clipping", max_grad_norm, "--max_grad_norm")
    for precision in ("bf16", "fp16"):
        if isinstance(cfg.get(precision), dict) and cfg[precision].get("enabled") == "auto":
            cfg[precision]["enabled"] = False
    for monitor in ("tensorboard", "csv_monitor"):
        section = cfg.get(monitor)
        if isinstance(section, dict) and section.get("output_path", "auto") == "auto":
            section["output_path"] = str(Path(output_dir) / "runs")
    if "optimizer" not in cfg:
        # We pass our own torch AdamW (two LR groups: weights and pruning scores).
        cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 1000000)
    return cfg, compression


def tensorboard_dir(cfg: dict[str, Any]) -> Path | None:
    tb = cfg.get("tensorboard")
    if not isinstance(tb, dict) or not tb.get("enabled"):
        return None
    return Path(tb.get("output_path", "runs")) / tb.get("job_name", "DeepSpeedJobName")
