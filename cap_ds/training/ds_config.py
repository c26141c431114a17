"""The ``--deepspeed`` config: load it, resolve ``"auto"`` values from the CLI (HF convention), and split off
the ``compression_training`` section (ours; DeepSpeed >= 0.19.7 refuses it) before ``deepspeed.initialize``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from cap_ds.compression.config import COMPRESSION_KEY, load_ds_config
from cap_ds.runtime.errors import UserError

logger = logging.getLogger(__name__)

# Top-level keys DeepSpeed 0.19 reads (runtime/config.py and the section parsers), plus ours. DeepSpeed ignores any
# other key without a word, so a typo ("zero_optimisation") would silently run without ZeRO: we warn.
KNOWN_TOP_LEVEL_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "gradient_allreduce_op", "communication_data_type", "seq_parallel_communication_data_type", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown",
    "memory_breakdown", "dump_state", "disable_allgather", "dataloader_drop_last", "disable_python_gc",
    "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger",
    "timers", "aio", "checkpoint", "data_types", "data_efficiency", "curriculum_learning", "autotuning", "compile",
    "pipeline", "tensor_parallel", "sequence_parallel_size", "expert_parallel", "hybrid_engine",
    "weight_quantization", "use_data_before_expert_parallelism", "use_node_local_storage", "legacy_fusion",
    "log_level", "lower_precision_safe_modules", "managed_gradient_accumulation", "datastates_ckpt", "zenflow",
    COMPRESSION_KEY,
})
# Keys whose values do not change what a run computes (logging, monitoring): ignored when a resumed run's
# DeepSpeed config is compared with the one it was started with.
MONITOR_KEYS = ("tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "flops_profiler", "timers",
                "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "log_level")

DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": False},
    "tensorboard": {"enabled": True, "output_path": "auto", "job_name": "cap"},
    "steps_per_print": 1000000,
}


class DeepSpeedConfigError(UserError, ValueError):
    """A ``--deepspeed`` value that conflicts with the command line."""


def _resolve(cfg: dict[str, Any], key: str, value: Any, flag: str) -> None:
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif current != value:
        raise DeepSpeedConfigError(f"--deepspeed sets {key}={current!r} but {flag} is {value!r}; "
                                   f"set one of them (use \"auto\" in the JSON to take the flag)")


def unknown_top_level_keys(cfg: dict[str, Any]) -> list[str]:
    return sorted(k for k in cfg if k not in KNOWN_TOP_LEVEL_KEYS)


def warn_unknown_keys(cfg: dict[str, Any], path: str | Path) -> list[str]:
    """Warn (one line) about top-level keys DeepSpeed does not know; returns them."""
    unknown = unknown_top_level_keys(cfg)
    if unknown:
        logger.warning("--deepspeed %s: unknown top-level key(s) %s are ignored by DeepSpeed (a typo?)", path,
                       ", ".join(repr(k) for k in unknown))
    return unknown


def computes_in_bf16(cfg: dict[str, Any]) -> bool:
    """True when the student computes in bf16: DeepSpeed's ``bf16`` mode (bf16 weights, fp32 master copy) or
    ``torch_autocast`` with bfloat16 (fp32 weights, bf16 matmuls). A frozen teacher then runs in bf16 too."""
    if isinstance(cfg.get("bf16"), dict) and cfg["bf16"].get("enabled") is True:
        return True
    autocast = cfg.get("torch_autocast")
    return isinstance(autocast, dict) and autocast.get("enabled") is True and \
        str(autocast.get("dtype", "")).removeprefix("torch.") in ("bfloat16", "bf16")


def check_diagnostic(cfg: dict[str, Any], grad_norm_steps: int, path: str | Path | None) -> None:
    """``--grad_norm_steps`` reads whole parameters on every rank: not under ZeRO stage 3."""
    if grad_norm_steps and cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        raise DeepSpeedConfigError(f"--grad_norm_steps needs whole parameters on rank 0; {path} uses ZeRO stage 3 "
                                   "(use a stage 0-2 config for the diagnostic run)")


def build_ds_config(path: str | Path | None, *, micro_batch: int, grad_accum: int, world_size: int | None,
                    max_grad_norm: float, output_dir: str,
                    optimizer_flags: dict[str, float] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config for ``deepspeed.initialize``, the ``compression_training`` section or None). ``world_size`` None
    (not known yet, before the process group): ``train_batch_size`` is left as the file has it.
    ``optimizer_flags``: the values an ``"auto"`` optimizer param takes (``lr``, ``eps``, ``weight_decay``)."""
    cfg = copy.deepcopy(DEFAULT_DS_CONFIG if path is None else load_ds_config(path))
    compression = cfg.pop(COMPRESSION_KEY, None)
    optimizer = cfg.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("params"), dict):
        params = optimizer["params"]  # HF convention: "auto" takes the flag
        for key, value in (optimizer_flags or {}).items():
            if params.get(key) == "auto" and value is not None:
                params[key] = value
        if params.get("betas") == "auto":
            params["betas"] = [0.9, 0.999]
    _resolve(cfg, "train_micro_batch_size_per_gpu", micro_batch, "--per_device_train_batch_size")
    _resolve(cfg, "gradient_accumulation_steps", grad_accum, "--gradient_accumulation_steps")
    if world_size is not None:
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


# pydantic model -> the config key it parses (for naming the key path of a validation error)
_SECTION_OF_MODEL = {
    "DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
    "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
    "ZenFlowConfig": "zero_optimization.zenflow", "DeepSpeedBF16Config": "bf16", "DeepSpeedFP16Config": "fp16",
    "HybridEngineConfig": "hybrid_engine", "CompileConfig": "compile", "TPTrainingConfig": "tensor_parallel",
    "TensorBoardConfig": "tensorboard", "WandbConfig": "wandb", "CSVConfig": "csv_monitor", "CometConfig": "comet",
    "CommsLoggerConfig": "comms_logger", "DeepSpeedTorchAutocastConfig": "torch_autocast",
    "DeepSpeedZeroLeafModuleConfig": "zero_optimization.leaf_module", "DeepSpeedMonitorConfig": "",
}


def _key_path(err, cfg: dict[str, Any]) -> str:
    """``section.key`` of the first error of a pydantic ValidationError raised while DeepSpeed parsed ``cfg``."""
    loc = [str(part) for part in (err.errors()[0].get("loc") or ())]
    section = _SECTION_OF_MODEL.get(getattr(err, "title", ""))
    if section is None and loc:  # an unmapped model: the first section of the config that has the key
        stack = [("", cfg)]
        while stack and section is None:
            prefix, node = stack.pop(0)
            for key, value in node.items():
                if isinstance(value, dict):
                    name = f"{prefix}{key}"
                    if loc[0] in value:
                        section = name
                        break
                    stack.append((f"{name}.", value))
    return ".".join(([section] if section else []) + loc) or "(top level)"


def validate_ds_config(cfg: dict[str, Any], path: str | Path | None) -> None:
    """Run DeepSpeed's own config parsing (its pydantic sections and sanity checks) on the resolved config without
    building an engine: a bad key fails before the output folder is touched, naming the key path."""
    import logging as _logging

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as ds_logger
    from pydantic import ValidationError

    probe = copy.deepcopy(cfg)
    # Without a process group DeepSpeed assumes one rank; the batch triad is checked against the real world size by
    # build_ds_config, so leave DeepSpeed the two per-rank values.
    probe.pop("train_batch_size", None)
    probe.pop(COMPRESSION_KEY, None)
    level = ds_logger.level
    ds_logger.setLevel(_logging.ERROR)  # its info/deprecation lines come again when the engine is built
    try:
        DeepSpeedConfig(probe)
    except ValidationError as err:
        first = err.errors()[0]
        what = first.get("msg", str(err))
        if first.get("type") != "extra_forbidden" and "input" in first:
            what += f" (got {first['input']!r})"
        raise DeepSpeedConfigError(f"{_key_path(err, cfg)} in --deepspeed {path}: {what}") from err
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise DeepSpeedConfigError(f"--deepspeed {path}: {' '.join(str(err).split()) or type(err).__name__}") from err
    finally:
        ds_logger.setLevel(level)
