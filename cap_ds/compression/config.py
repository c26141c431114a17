"""The ``compression_training`` section of a DeepSpeed config (the schema of DeepSpeed's former library).

DeepSpeed >= 0.19.7 rejects this key in ``deepspeed.initialize``; we parse it here and the trainer strips it
from the dict it hands to DeepSpeed. Errors name the offending key path and what is allowed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import SPARSE_METHODS, canonical_method

COMPRESSION_KEY = "compression_training"
SPARSE_PRUNING = "sparse_pruning"
KNOWN_TECHNIQUES = (
    "weight_quantization", "activation_quantization", "sparse_pruning", "row_pruning", "head_pruning",
    "channel_pruning", "layer_reduction",
)
SUPPORTED_TECHNIQUES = (SPARSE_PRUNING,)

SPARSE_SHARED_KEYS = {
    # DeepSpeed's keys
    "enabled", "method", "schedule_offset", "schedule_offset_end", "schedule_offset_stride",
    "block_pattern", "dense_ratio", "excluded_modules",
    # ours
    "mask_init", "mask_scale", "initial_threshold", "final_threshold", "final_lambda",
}
GROUP_KEYS = {"params", "modules", "related_modules"}


class CompressionConfigError(ValueError):
    """A ``compression_training`` section that cannot be used; the message names the key."""


@dataclass
class SparseGroup:
    name: str
    dense_ratio: float
    modules: list[str]
    related_modules: list[list[str]] | None = None


@dataclass
class SparsePruningConfig:
    enabled: bool = False
    method: str = "l1"
    schedule_offset: int = 1000
    schedule_offset_end: int | None = None  # None: switch on at once (DeepSpeed's old behaviour)
    schedule_offset_stride: int = 1
    mask_init: str = "constant"
    mask_scale: float = 0.0
    initial_threshold: float = 0.0  # soft movement: sigmoid threshold at the start
    final_threshold: float = 0.1  # soft movement: sigmoid threshold at the end
    final_lambda: float = 0.0  # soft movement: L1 weight of sigmoid(scores) at the end
    excluded_modules: list[str] = field(default_factory=list)
    groups: list[SparseGroup] = field(default_factory=list)

    @property
    def canonical_method(self) -> str:
        return canonical_method(self.method)

    @property
    def offset_end(self) -> int:
        return self.schedule_offset if self.schedule_offset_end is None else self.schedule_offset_end


@dataclass
class CompressionConfig:
    sparse_pruning: SparsePruningConfig = field(default_factory=SparsePruningConfig)

    @property
    def enabled(self) -> bool:
        return self.sparse_pruning.enabled


def load_ds_config(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a dict, from a dict or a JSON file path (errors name the file)."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CompressionConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err


def _number(value: Any, key: str, kind: type, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CompressionConfigError(f"{key} must be a number, got {value!r}")
    if kind is int and int(value) != value:
        raise CompressionConfigError(f"{key} must be an integer, got {value!r}")
    value = kind(value)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise CompressionConfigError(f"{key} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise CompressionConfigError(f"{key} must be <= {hi}, got {value}")
    return value


def _regex_list(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CompressionConfigError(f"{key} must be a list of regular expressions, got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise CompressionConfigError(f"{key}: invalid regular expression {pattern!r}: {err}") from err
    return value


def _parse_sparse(section: dict[str, Any]) -> SparsePruningConfig:
    base = f"{COMPRESSION_KEY}.{SPARSE_PRUNING}"
    unknown = set(section) - {"shared_parameters", "different_groups"}
    if unknown:
        raise CompressionConfigError(
            f"{base}: unknown key(s) {sorted(unknown)}; allowed: shared_parameters, different_groups")
    shared = section.get("shared_parameters", {})
    bad = set(shared) - SPARSE_SHARED_KEYS
    if bad:
        raise CompressionConfigError(
            f"{base}.shared_parameters: unknown key(s) {sorted(bad)}; allowed: {', '.join(sorted(SPARSE_SHARED_KEYS))}")
    cfg = SparsePruningConfig()
    cfg.enabled = bool(shared.get("enabled", False))
    cfg.method = shared.get("method", cfg.method)
    if cfg.method not in SPARSE_METHODS:
        raise CompressionConfigError(
            f"{base}.shared_parameters.method: unknown method {cfg.method!r}; allowed: {', '.join(SPARSE_METHODS)}")
    sp = f"{base}.shared_parameters"
    cfg.schedule_offset = _number(shared.get("schedule_offset", cfg.schedule_offset), f"{sp}.schedule_offset", int, 0)
    if shared.get("schedule_offset_end") is not None:
        cfg.schedule_offset_end = _number(shared["schedule_offset_end"], f"{sp}.schedule_offset_end", int,
                                          cfg.schedule_offset)
    cfg.schedule_offset_stride = _number(shared.get("schedule_offset_stride", 1), f"{sp}.schedule_offset_stride",
                                         int, 1)
    cfg.mask_init = shared.get("mask_init", cfg.mask_init)
    if cfg.mask_init not in ("constant", "uniform", "kaiming"):
        raise CompressionConfigError(f"{sp}.mask_init: {cfg.mask_init!r}; allowed: constant, uniform, kaiming")
    cfg.mask_scale = _number(shared.get("mask_scale", 0.0), f"{sp}.mask_scale", float)
    cfg.initial_threshold = _number(shared.get("initial_threshold", 0.0), f"{sp}.initial_threshold", float, 0, 1)
    cfg.final_threshold = _number(shared.get("final_threshold", 0.1), f"{sp}.final_threshold", float, 0, 1)
    cfg.final_lambda = _number(shared.get("final_lambda", 0.0), f"{sp}.final_lambda", float, 0)
    cfg.excluded_modules = _regex_list(shared.get("excluded_modules", []), f"{sp}.excluded_modules")
    if "block_pattern" in shared and shared["block_pattern"] not in ("1x1", None):
        raise CompressionConfigError(
            f"{sp}.block_pattern: {shared['block_pattern']!r} is not supported; allowed: 1x1 (unstructured)")

    groups = section.get("different_groups", {})
    if cfg.enabled and not groups:
        raise CompressionConfigError(f"{base}.different_groups: enabled but no group defined")
    if not isinstance(groups, dict):
        raise CompressionConfigError(f"{base}.different_groups must be an object of named groups")
    for name, group in groups.items():
        gk = f"{base}.different_groups.{name}"
        if not isinstance(group, dict):
            raise CompressionConfigError(f"{gk} must be an object with params/modules")
        bad = set(group) - GROUP_KEYS
        if bad:
            raise CompressionConfigError(f"{gk}: unknown key(s) {sorted(bad)}; allowed: {', '.join(sorted(GROUP_KEYS))}")
        params = group.get("params", {})
        if "dense_ratio" not in params and "dense_ratio" not in shared:
            raise CompressionConfigError(f"{gk}.params.dense_ratio is required (the fraction of weights KEPT)")
        ratio = _number(params.get("dense_ratio", shared.get("dense_ratio")), f"{gk}.params.dense_ratio", float,
                        0.0, 1.0, lo_open=True)
        if "modules" not in group:
            raise CompressionConfigError(f"{gk}.modules is required (regexes matched against module names)")
        modules = _regex_list(group["modules"], f"{gk}.modules")
        related = group.get("related_modules")
        if related is not None:
            if not isinstance(related, list):
                raise CompressionConfigError(f"{gk}.related_modules must be a list of regex lists")
            related = [_regex_list(r, f"{gk}.related_modules") for r in related]
        cfg.groups.append(SparseGroup(name=name, dense_ratio=ratio, modules=modules, related_modules=related))
    return cfg


def parse_compression_config(ds_config: str | Path | dict[str, Any]) -> CompressionConfig:
    """Parse and validate the ``compression_training`` section (absent section = nothing enabled)."""
    section = load_ds_config(ds_config).get(COMPRESSION_KEY, {}) or {}
    if not isinstance(section, dict):
        raise CompressionConfigError(f"{COMPRESSION_KEY} must be an object")
    unknown = set(section) - set(KNOWN_TECHNIQUES)
    if unknown:
        raise CompressionConfigError(
            f"{COMPRESSION_KEY}: unknown technique(s) {sorted(unknown)}; allowed: {', '.join(KNOWN_TECHNIQUES)}")
    for tech in section:
        if tech not in SUPPORTED_TECHNIQUES and section[tech].get("shared_parameters", {}).get("enabled", False):
            raise CompressionConfigError(
                f"{COMPRESSION_KEY}.{tech} is enabled but not supported yet; supported: {', '.join(SUPPORTED_TECHNIQUES)}")
    out = CompressionConfig()
    if SPARSE_PRUNING in section:
        out.sparse_pruning = _parse_sparse(section[SPARSE_PRUNING])
    return out


def strip_compression_section(ds_config: dict[str, Any]) -> dict[str, Any]:
    """A copy of the DeepSpeed config without our section (DeepSpeed >= 0.19.7 refuses it)."""
    return {k: v for k, v in ds_config.items() if k != COMPRESSION_KEY}
