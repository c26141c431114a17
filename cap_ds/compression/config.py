"""The ``compression_training`` section of a DeepSpeed config (the schema of DeepSpeed's former library).

DeepSpeed >= 0.19.7 rejects this key in ``deepspeed.initialize``; we parse it here and the trainer strips it
from the dict it hands to DeepSpeed. Supported techniques: ``sparse_pruning``, ``row_pruning`` and
``head_pruning``; the others of the old schema are accepted while disabled. Errors name the offending key path
and what is allowed.

Keys beyond DeepSpeed's (all optional):

- every technique: ``schedule_offset_end`` (cubic ramp from dense at ``schedule_offset`` to ``dense_ratio`` here;
  missing = switch on at once at ``schedule_offset``, DeepSpeed's behaviour) and ``schedule_offset_stride``.
- ``sparse_pruning``: methods ``magnitude`` (= ``l1``), ``movement`` (= ``topk``), ``soft_movement``;
  ``block_pattern: "N:M"`` keeps the top N of every M consecutive weights along the input dim (ranked by |W| for
  l1/magnitude, by learned scores for topk/movement); ``mask_init``/``mask_scale`` for the score init (movement
  and soft movement with ``threshold_control``: ``magnitude`` unless given, ``constant`` with scale 0 is the
  reference; soft movement: ``constant``);
  ``initial_threshold``/``final_threshold``/``final_lambda`` for soft movement, and ``threshold_control`` (true:
  the sigmoid threshold is set every step to the global quantile that gives the cubic schedule's sparsity, ending
  at the groups' ``dense_ratio``, instead of whatever sparsity ``final_lambda`` happens to give).
- ``row_pruning`` / ``head_pruning``: method ``first_order`` (masks set by ``FirstOrderPruner``, no schedule;
  ``dense_ratio`` optional and unused), ``mask_init``/``mask_scale`` for topk scores (default kaiming, as DeepSpeed).

Which method allows what (blocks, threshold_control, an omitted dense_ratio, the default score init) is asked of
the method objects (``methods.get_method``); this module only enforces their answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cap_ds.compression.methods import (
    SPARSE,
    UNITS,
    PruningMethod,
    find_method,
    get_method,
    method_names,
    registered_methods,
)
from cap_ds.compression.methods.scores import MASK_INITS
from cap_ds.runtime.errors import UserError

COMPRESSION_KEY = "compression_training"
SPARSE_PRUNING = "sparse_pruning"
ROW_PRUNING = "row_pruning"
HEAD_PRUNING = "head_pruning"
KNOWN_TECHNIQUES = (
    "weight_quantization", "activation_quantization", "sparse_pruning", "row_pruning", "head_pruning",
    "channel_pruning", "layer_reduction",
)
SUPPORTED_TECHNIQUES = (SPARSE_PRUNING, ROW_PRUNING, HEAD_PRUNING)

_COMMON_SHARED_KEYS = {
    "enabled", "method", "schedule_offset", "schedule_offset_end", "schedule_offset_stride", "dense_ratio",
    "mask_init", "mask_scale",
}
SHARED_KEYS = {
    SPARSE_PRUNING: _COMMON_SHARED_KEYS | {
        "block_pattern", "excluded_modules", "initial_threshold", "final_threshold", "final_lambda",
        "threshold_control"},
    ROW_PRUNING: set(_COMMON_SHARED_KEYS),
    HEAD_PRUNING: _COMMON_SHARED_KEYS | {"num_heads"},
}
DEFAULT_METHOD = {SPARSE_PRUNING: "l1", ROW_PRUNING: "l1", HEAD_PRUNING: "topk"}
GROUP_KEYS = {"params", "modules", "related_modules"}


class CompressionConfigError(UserError, ValueError):
    """A ``compression_training`` section that cannot be used; the message names the key."""


@dataclass
class PruningGroup:
    name: str
    dense_ratio: float
    modules: list[str]
    related_modules: list[list[str]] | None = None


@dataclass
class TechniqueConfig:
    """Shared parameters + groups of one pruning technique."""

    technique: str = SPARSE_PRUNING
    enabled: bool = False
    method: str = "l1"
    schedule_offset: int = 1000
    schedule_offset_end: int | None = None  # None: switch on at once (DeepSpeed's old behaviour)
    schedule_offset_stride: int = 1
    mask_init: str = "constant"
    mask_scale: float | None = None  # None: the init's default (methods.scores.DEFAULT_MASK_SCALE)
    groups: list[PruningGroup] = field(default_factory=list)
    kind: ClassVar[str] = SPARSE  # what the technique masks (methods.SPARSE / methods.UNITS)

    @property
    def strategy(self) -> PruningMethod:
        """The registered method ``method`` names (for this technique's kind of mask)."""
        return get_method(self.method, self.kind)

    @property
    def offset_end(self) -> int:
        return self.schedule_offset if self.schedule_offset_end is None else self.schedule_offset_end

    @property
    def key(self) -> str:
        return f"{COMPRESSION_KEY}.{self.technique}"


@dataclass
class SparsePruningConfig(TechniqueConfig):
    initial_threshold: float = 0.0  # soft movement: sigmoid threshold at the start
    final_threshold: float = 0.1  # soft movement: sigmoid threshold at the end
    final_lambda: float = 0.0  # soft movement: L1 weight of sigmoid(scores) at the end
    threshold_control: bool = False  # soft movement: threshold = the quantile giving the scheduled sparsity
    excluded_modules: list[str] = field(default_factory=list)
    block: tuple[int, int] | None = None  # N:M pattern, None = unstructured


@dataclass
class RowPruningConfig(TechniqueConfig):
    technique: str = ROW_PRUNING
    mask_init: str = "kaiming"
    kind: ClassVar[str] = UNITS


@dataclass
class HeadPruningConfig(TechniqueConfig):
    technique: str = HEAD_PRUNING
    method: str = "topk"
    mask_init: str = "kaiming"
    num_heads: int = 0
    kind: ClassVar[str] = UNITS


@dataclass
class CompressionConfig:
    sparse_pruning: SparsePruningConfig = field(default_factory=SparsePruningConfig)
    row_pruning: RowPruningConfig = field(default_factory=RowPruningConfig)
    head_pruning: HeadPruningConfig = field(default_factory=HeadPruningConfig)

    @property
    def enabled(self) -> bool:
        return any(t.enabled for t in self.techniques())

    def techniques(self) -> list[TechniqueConfig]:
        return [self.sparse_pruning, self.row_pruning, self.head_pruning]


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
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise CompressionConfigError(f"{key} must be a non-empty list of regular expressions, got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise CompressionConfigError(f"{key}: invalid regular expression {pattern!r}: {err}") from err
    return value


def parse_block_pattern(value: Any, key: str) -> tuple[int, int] | None:
    """``"N:M"`` -> (N, M); ``"1x1"``/None -> None (unstructured)."""
    if value in (None, "1x1"):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value) if isinstance(value, str) else None
    if not match:
        raise CompressionConfigError(
            f"{key}: {value!r} is not supported; allowed: \"1x1\" (unstructured) or \"N:M\" (e.g. \"2:4\")")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n <= m:
        raise CompressionConfigError(f"{key}: {value!r} needs 0 < N <= M")
    return n, m


def _parse_common(cfg: TechniqueConfig, shared: dict[str, Any]) -> None:
    sp = f"{cfg.key}.shared_parameters"
    enabled = shared.get("enabled", False)
    if not isinstance(enabled, bool):
        raise CompressionConfigError(f"{sp}.enabled must be true or false, got {enabled!r}")
    cfg.enabled = enabled
    cfg.method = shared.get("method", DEFAULT_METHOD[cfg.technique])
    if find_method(cfg.method, cfg.kind) is None:
        default = DEFAULT_METHOD[cfg.technique]  # listed first
        allowed = [default, *(n for n in method_names(cfg.kind, aliases=True) if n != default)]
        raise CompressionConfigError(f"{sp}.method: unknown method {cfg.method!r}; allowed: {', '.join(allowed)}")
    cfg.schedule_offset = _number(shared.get("schedule_offset", cfg.schedule_offset), f"{sp}.schedule_offset", int, 0)
    if shared.get("schedule_offset_end") is not None:
        cfg.schedule_offset_end = _number(shared["schedule_offset_end"], f"{sp}.schedule_offset_end", int,
                                          cfg.schedule_offset)
    cfg.schedule_offset_stride = _number(shared.get("schedule_offset_stride", 1), f"{sp}.schedule_offset_stride",
                                         int, 1)
    if shared.get("mask_init") is not None:  # null = the method's default
        cfg.mask_init = shared["mask_init"]
    if cfg.mask_init not in MASK_INITS:
        raise CompressionConfigError(f"{sp}.mask_init: {cfg.mask_init!r}; allowed: {', '.join(MASK_INITS)}")
    if shared.get("mask_scale") is not None:
        cfg.mask_scale = _number(shared["mask_scale"], f"{sp}.mask_scale", float)


def _parse_groups(cfg: TechniqueConfig, section: dict[str, Any], shared: dict[str, Any],
                  ratio_optional: bool, fixed_ratio: float | None = None) -> None:
    base = cfg.key
    groups = section.get("different_groups", {})
    if not isinstance(groups, dict):
        raise CompressionConfigError(f"{base}.different_groups must be an object of named groups")
    if cfg.enabled and not groups:
        raise CompressionConfigError(f"{base}.different_groups: enabled but no group defined")
    for name, group in groups.items():
        gk = f"{base}.different_groups.{name}"
        if not isinstance(group, dict):
            raise CompressionConfigError(f"{gk} must be an object with params/modules")
        bad = set(group) - GROUP_KEYS
        if bad:
            raise CompressionConfigError(f"{gk}: unknown key(s) {sorted(bad)}; allowed: {', '.join(sorted(GROUP_KEYS))}")
        params = group.get("params", {}) or {}
        if not isinstance(params, dict):
            raise CompressionConfigError(f"{gk}.params must be an object (e.g. {{\"dense_ratio\": 0.5}})")
        bad = set(params) - {"dense_ratio"}
        if bad:
            raise CompressionConfigError(f"{gk}.params: unknown key(s) {sorted(bad)}; allowed: dense_ratio")
        raw = params.get("dense_ratio", shared.get("dense_ratio"))
        if raw is None:
            if fixed_ratio is None and not ratio_optional:
                raise CompressionConfigError(f"{gk}.params.dense_ratio is required (the fraction of weights KEPT)")
            ratio = fixed_ratio if fixed_ratio is not None else 1.0
        else:
            ratio = _number(raw, f"{gk}.params.dense_ratio", float, 0.0, 1.0, lo_open=True)
            if fixed_ratio is not None and abs(ratio - fixed_ratio) > 1e-9:
                raise CompressionConfigError(
                    f"{gk}.params.dense_ratio is {ratio} but block_pattern keeps {fixed_ratio:g} of the weights; "
                    "omit dense_ratio or set it to N/M")
        if "modules" not in group:
            raise CompressionConfigError(f"{gk}.modules is required (regexes matched against module names)")
        modules = _regex_list(group["modules"], f"{gk}.modules")
        related = group.get("related_modules")
        if related is not None:
            if not isinstance(related, list) or not all(isinstance(r, (list, str)) for r in related):
                raise CompressionConfigError(f"{gk}.related_modules must be a list of regex lists, got {related!r}")
            related = [_regex_list(r, f"{gk}.related_modules[{i}]") for i, r in enumerate(related)]
            if len(related) != len(modules):
                raise CompressionConfigError(
                    f"{gk}.related_modules has {len(related)} list(s) but modules has {len(modules)} regex(es); "
                    "give one list of related regexes per entry of modules")
            if cfg.technique == SPARSE_PRUNING:
                raise CompressionConfigError(f"{gk}.related_modules: only row_pruning and head_pruning use it")
        cfg.groups.append(PruningGroup(name=name, dense_ratio=ratio, modules=modules, related_modules=related))


def _section(section: Any, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(section, dict):
        raise CompressionConfigError(f"{key} must be an object with shared_parameters and different_groups")
    unknown = set(section) - {"shared_parameters", "different_groups"}
    if unknown:
        raise CompressionConfigError(
            f"{key}: unknown key(s) {sorted(unknown)}; allowed: shared_parameters, different_groups")
    shared = section.get("shared_parameters", {}) or {}
    if not isinstance(shared, dict):
        raise CompressionConfigError(f"{key}.shared_parameters must be an object")
    return section, shared


def _check_shared_keys(technique: str, shared: dict[str, Any]) -> None:
    bad = set(shared) - SHARED_KEYS[technique]
    if bad:
        raise CompressionConfigError(
            f"{COMPRESSION_KEY}.{technique}.shared_parameters: unknown key(s) {sorted(bad)}; "
            f"allowed: {', '.join(sorted(SHARED_KEYS[technique]))}")


def _parse_sparse(section: dict[str, Any]) -> SparsePruningConfig:
    section, shared = _section(section, f"{COMPRESSION_KEY}.{SPARSE_PRUNING}")
    _check_shared_keys(SPARSE_PRUNING, shared)
    cfg = SparsePruningConfig()
    _parse_common(cfg, shared)
    method = cfg.strategy
    if shared.get("mask_init") is None and method.learns_scores:
        cfg.mask_init = method.default_mask_init(bool(shared.get("threshold_control")))
    sp = f"{cfg.key}.shared_parameters"
    cfg.initial_threshold = _number(shared.get("initial_threshold", 0.0), f"{sp}.initial_threshold", float, 0, 1)
    cfg.final_threshold = _number(shared.get("final_threshold", 0.1), f"{sp}.final_threshold", float, 0, 1)
    cfg.final_lambda = _number(shared.get("final_lambda", 0.0), f"{sp}.final_lambda", float, 0)
    cfg.threshold_control = shared.get("threshold_control", False)
    if not isinstance(cfg.threshold_control, bool):
        raise CompressionConfigError(f"{sp}.threshold_control must be true or false, got {cfg.threshold_control!r}")
    if cfg.threshold_control and not method.supports_threshold_control:
        able = " or ".join(m.name for m in registered_methods(SPARSE) if m.supports_threshold_control)
        raise CompressionConfigError(f"{sp}.threshold_control needs method {able}, not {cfg.method!r}")
    cfg.excluded_modules = _regex_list(shared["excluded_modules"], f"{sp}.excluded_modules") \
        if shared.get("excluded_modules") else []
    cfg.block = parse_block_pattern(shared.get("block_pattern"), f"{sp}.block_pattern")
    if cfg.block is not None and not method.supports_blocks:
        able = ", ".join(n for m in registered_methods(SPARSE) if m.supports_blocks for n in reversed(m.spellings))
        raise CompressionConfigError(
            f"{sp}.block_pattern {shared['block_pattern']!r} needs a ranked method ({able}), not {cfg.method}")
    fixed = cfg.block[0] / cfg.block[1] if cfg.block is not None else None
    _parse_groups(cfg, section, shared, ratio_optional=method.ratio_optional(cfg), fixed_ratio=fixed)
    return cfg


def _parse_structured(technique: str, section: dict[str, Any]) -> TechniqueConfig:
    key = f"{COMPRESSION_KEY}.{technique}"
    section, shared = _section(section, key)
    _check_shared_keys(technique, shared)
    cfg: TechniqueConfig = RowPruningConfig() if technique == ROW_PRUNING else HeadPruningConfig()
    _parse_common(cfg, shared)
    if isinstance(cfg, HeadPruningConfig):
        if cfg.enabled and "num_heads" not in shared:
            raise CompressionConfigError(f"{key}.shared_parameters.num_heads is required (heads per attention layer)")
        if "num_heads" in shared:
            cfg.num_heads = _number(shared["num_heads"], f"{key}.shared_parameters.num_heads", int, 1)
    _parse_groups(cfg, section, shared, ratio_optional=cfg.strategy.ratio_optional(cfg))
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
    for tech, body in section.items():
        if tech in SUPPORTED_TECHNIQUES or not isinstance(body, dict):
            continue
        enabled = body.get("enabled", False) or (body.get("shared_parameters") or {}).get("enabled", False)
        if enabled:
            raise CompressionConfigError(
                f"{COMPRESSION_KEY}.{tech} is enabled but not supported; supported: {', '.join(SUPPORTED_TECHNIQUES)}")
    out = CompressionConfig()
    if SPARSE_PRUNING in section:
        out.sparse_pruning = _parse_sparse(section[SPARSE_PRUNING])
    if ROW_PRUNING in section:
        out.row_pruning = _parse_structured(ROW_PRUNING, section[ROW_PRUNING])
    if HEAD_PRUNING in section:
        out.head_pruning = _parse_structured(HEAD_PRUNING, section[HEAD_PRUNING])
    return out


def as_compression_config(config: str | Path | dict[str, Any] | CompressionConfig) -> CompressionConfig:
    return config if isinstance(config, CompressionConfig) else parse_compression_config(config)


def strip_compression_section(ds_config: dict[str, Any]) -> dict[str, Any]:
    """A copy of the DeepSpeed config without our section (DeepSpeed >= 0.19.7 refuses it)."""
    return {k: v for k, v in ds_config.items() if k != COMPRESSION_KEY}
