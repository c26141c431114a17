"""The CAP arguments of the Hugging Face Trainer integration, parsed by ``HfArgumentParser`` beside the user's
``TrainingArguments``, and the two helpers a ZeRO-3 / DeepSpeed script needs.

The defaults are those of ``cap_ds/train.py`` (read from ``cap_ds.run.args``), so ``--target_sparsity 0.9 --cap
prc,snc,fic`` means the same run in both entry points. Training-loop settings (LR, batch size, epochs, warm-up,
seed, logging, saving) are the ``TrainingArguments``'; only what CAP adds is here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cap_ds.cap.loss import REDUCTIONS
from cap_ds.compression.layers import MASK_INITS
from cap_ds.compression.methods import get_method, method_names
from cap_ds.data.models import SENTENCE_VECTORS
from cap_ds.run.args import CapArguments as _RunCap
from cap_ds.run.args import PruningArguments, RunArguments

_PRUNE, _CAP, _RUN = PruningArguments(), _RunCap(), RunArguments()
# CAP-f (first_order) needs its stage schedule and importance passes between epochs: cap_ds/train.py only.
SUPPORTED_METHODS = tuple(m for m in method_names() if not get_method(m).structured)


@dataclass
class CapArguments:
    """What CAP adds to a ``transformers.Trainer`` run (``HfArgumentParser((..., TrainingArguments, CapArguments))``)."""

    teacher_name_or_path: str | None = field(default=None, metadata={
        "help": "Fine-tuned teacher (a from_pretrained folder) for KD and FiC. Without one: no KD, no FiC."})
    pruning_method: str = field(default=_PRUNE.pruning_method, metadata={
        "help": f"Unstructured pruning criterion: one of {', '.join(SUPPORTED_METHODS)} (first_order: use "
                "cap_ds/train.py)."})
    target_sparsity: float = field(default=_PRUNE.target_sparsity, metadata={
        "help": "Fraction of encoder linear weights removed at the end of the cubic schedule, in [0, 1)."})
    cap: str = field(default=_CAP.cap, metadata={
        "help": "CAP contrastive modules: any of prc,snc,fic, comma-separated, or '' / none."})
    ce_weight: float | None = field(default=_CAP.ce_weight, metadata={
        "help": "Weight of the task loss. Default 0.1 with a teacher (KD carries the rest), else 1.0."})
    kd_weight: float = field(default=_CAP.kd_weight, metadata={
        "help": "Weight of T^2 KL(teacher || student) (needs a teacher)."})
    kd_temperature: float = field(default=_CAP.kd_temperature, metadata={"help": "KD softmax temperature T."})
    contrastive_temperature: float = field(default=_CAP.contrastive_temperature, metadata={
        "help": "tau of the contrastive cosine logits q.k/tau."})
    extra_negatives: int = field(default=_CAP.extra_negatives, metadata={
        "help": "Extra memory-bank keys per module and step (on top of the batch)."})
    cap_unsup_weight: float = field(default=_CAP.cap_unsup_weight, metadata={
        "help": "Weight of the unsupervised (same example) contrastive term."})
    cap_sup_weight: float = field(default=_CAP.cap_sup_weight, metadata={
        "help": "Weight of the supervised (same label) contrastive term."})
    cap_reduction: str = field(default=_CAP.cap_reduction, metadata={
        "help": "reference (the CAP code's reduction) or supcon.", "choices": list(REDUCTIONS)})
    sentence_vector: str = field(default="pooler", metadata={
        "help": "Sentence vector CAP contrasts: pooler, cls or mean.", "choices": list(SENTENCE_VECTORS)})
    initial_warmup: float = field(default=_PRUNE.initial_warmup, metadata={
        "help": "Dense steps before pruning starts = initial_warmup x LR warm-up steps (shrunk to fit short runs)."})
    final_warmup: float = field(default=_PRUNE.final_warmup, metadata={
        "help": "Steps held at the target sparsity at the end = final_warmup x LR warm-up steps."})
    mask_scores_learning_rate: float = field(default=_RUN.mask_scores_learning_rate, metadata={
        "help": "Learning rate of the pruning scores (movement, soft movement): their own optimizer group."})
    mask_init: str | None = field(default=_PRUNE.mask_init, metadata={
        "help": "Score init: magnitude, constant or uniform (default: the method's).", "choices": list(MASK_INITS)})
    mask_scale: float | None = field(default=_PRUNE.mask_scale, metadata={"help": "Score init scale."})
    final_threshold: float = field(default=_PRUNE.final_threshold, metadata={
        "help": "Soft movement: final sigmoid threshold (reference mode, --no_threshold_control)."})
    final_lambda: float = field(default=_PRUNE.final_lambda, metadata={
        "help": "Soft movement: final L1 weight on sigmoid(scores)."})
    threshold_control: bool = field(default=_PRUNE.threshold_control, metadata={
        "help": "Soft movement: steer the global threshold to the cubic schedule's sparsity."})
    prune_modules: str = field(default=_PRUNE.prune_modules, metadata={
        "help": "Regex of the linear layers to prune (default: every encoder-layer linear)."})
    snapshot_steps: int = field(default=_CAP.snapshot_steps, metadata={
        "help": "SnC snapshot every N optimizer steps (0: at the start of every epoch from the second on)."})
    snapshot_mode: str = field(default=_CAP.snapshot_mode, metadata={
        "help": "Encode SnC snapshots with dropout on (train, the reference) or off (eval).",
        "choices": ["train", "eval"]})
    max_snapshots: int | None = field(default=_CAP.max_snapshots, metadata={
        "help": "Keep at most N SnC columns (default: all)."})
    bank_dtype: str = field(default=_CAP.bank_dtype, metadata={
        "help": "Storage dtype of the memory banks.", "choices": ["float32", "bfloat16"]})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name} must be a finite number, got {value}")
        choices = {"pruning_method": SUPPORTED_METHODS, "cap_reduction": REDUCTIONS,
                   "sentence_vector": SENTENCE_VECTORS, "snapshot_mode": ("train", "eval"),
                   "bank_dtype": ("float32", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                extra = " (first_order, CAP-f, runs through cap_ds/train.py)" if name == "pruning_method" else ""
                raise ValueError(f"--{name} {getattr(self, name)!r}; allowed: {', '.join(allowed)}{extra}")
        if self.mask_init is not None and self.mask_init not in MASK_INITS:
            raise ValueError(f"--mask_init {self.mask_init!r}; allowed: {', '.join(MASK_INITS)}")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"--target_sparsity must be in [0, 1), got {self.target_sparsity}")
        for name in ("kd_weight", "cap_unsup_weight", "cap_sup_weight", "ce_weight", "extra_negatives",
                     "snapshot_steps", "initial_warmup", "final_warmup", "final_lambda", "mask_scores_learning_rate"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name} must be >= 0, got {value}")
        for name in ("kd_temperature", "contrastive_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.final_threshold <= 1.0:
            raise ValueError(f"--final_threshold must be in [0, 1], got {self.final_threshold}")
        if self.max_snapshots is not None and self.max_snapshots < 1:
            raise ValueError(f"--max_snapshots must be >= 1 (or unset: keep all), got {self.max_snapshots}")
        modules = self.modules
        if "fic" in modules and not self.teacher_name_or_path:
            raise ValueError("--cap fic needs --teacher_name_or_path (the fine-tuned model); or drop fic from --cap")

    @property
    def modules(self) -> list[str]:
        """The CAP modules asked for, in order, without repeats (``cap_ds/train.py``'s reading of ``--cap``)."""
        return _RunCap(cap=self.cap or "").modules

    def loss_weights(self, has_teacher: bool) -> tuple[float, float]:
        """(CE, KD) weights, as cap_ds/train.py decides them."""
        return _RunCap(ce_weight=self.ce_weight, kd_weight=self.kd_weight).loss_weights(has_teacher)

    def pruning_arguments(self) -> PruningArguments:
        """The pruning flags ``training.pruning.install_pruning`` reads."""
        return PruningArguments(
            pruning_method=self.pruning_method, target_sparsity=self.target_sparsity,
            initial_warmup=self.initial_warmup, final_warmup=self.final_warmup, final_threshold=self.final_threshold,
            final_lambda=self.final_lambda, threshold_control=self.threshold_control, mask_init=self.mask_init,
            mask_scale=self.mask_scale, prune_modules=self.prune_modules)


@contextlib.contextmanager
def outside_zero_init() -> Iterator[None]:
    """Load models inside this block when ``TrainingArguments(deepspeed=<ZeRO-3 config>)`` already exists:
    transformers would otherwise partition them at load (``zero.Init``), and CAP must install its masks into whole
    weights before DeepSpeed partitions them (as cap_ds/train.py does)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def deepspeed_config(path: str | Path, output_dir: str | Path) -> dict[str, Any]:
    """A shipped ``ds_configs/*.json`` made ready for ``TrainingArguments(deepspeed=...)``: DeepSpeed's own monitors
    write under ``<output_dir>/runs`` instead of a folder named ``auto``. A ``compression_training`` section is
    refused: the pruning is set by :class:`CapArguments` here."""
    import json

    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--deepspeed {path}: not a readable JSON file ({err})") from err
    resolve_monitor_paths(cfg, output_dir)
    if cfg.get("compression_training"):
        raise ValueError(f"--deepspeed {path}: a compression_training section is not read by CapHfTrainer; set the "
                         "pruning with CapArguments (--pruning_method, --target_sparsity, ...) or use cap_ds/train.py")
    return cfg


def resolve_monitor_paths(cfg: dict[str, Any], output_dir: str | Path) -> None:
    """DeepSpeed monitor sections with ``output_path: auto`` write under ``<output_dir>/runs`` (in place)."""
    for monitor in ("tensorboard", "csv_monitor"):
        section = cfg.get(monitor)
        if isinstance(section, dict) and section.get("output_path", "auto") == "auto":
            section["output_path"] = str(Path(output_dir) / "runs")
