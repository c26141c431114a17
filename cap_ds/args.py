"""Command-line arguments (HF ``run_glue`` conventions) and their validation.

Every check runs before any model is loaded; errors name the flag, the bad value and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .cap.loss import REDUCTIONS
from .cap.objective import MODULES
from .compression.layers import MASK_INITS
from .compression.stats import ENCODER_LINEAR_PATTERN
from .models import SENTENCE_VECTORS

MODES = ("prune", "finetune")
PRUNING_METHODS = ("magnitude", "movement", "soft_movement", "first_order")


class ArgumentError(ValueError):
    """A flag value that cannot work; raised before training starts."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pre-trained student (path or hub id). Default: the offline all-MiniLM-L6-v2 package."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Comma-separated config overrides for the student, e.g. 'num_hidden_layers=2'."})
    teacher_name_or_path: str | None = field(default=None, metadata={
        "help": "Fine-tuned teacher for KD and FiC (e.g. the final/ folder of a --mode finetune run)."})
    sentence_vector: str = field(default="pooler", metadata={
        "help": "Sentence vector CAP contrasts.", "choices": list(SENTENCE_VECTORS)})


@dataclass
class DataArguments:
    task_name: str = field(default="sst2", metadata={"help": "GLUE task: sst2, cola, stsb, mrpc, rte, qnli, mnli, qqp."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Local GLUE folder (with SST-2/, CoLA/, ... or the task folder itself). Default: the hub."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N evaluation rows."})


@dataclass
class RunArguments:
    output_dir: str = field(default="outputs/cap", metadata={"help": "Where metrics, runs/ and final/ go."})
    mode: str = field(default="prune", metadata={"help": "prune (CAP) or finetune (dense teacher).",
                                                  "choices": list(MODES)})
    deepspeed: str | None = field(default=None, metadata={
        "help": "DeepSpeed config JSON (may hold a compression_training section). Default: built-in ZeRO-2."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the DeepSpeed launcher."})
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-5
    mask_scores_learning_rate: float = field(default=1e-2, metadata={"help": "LR of pruning scores."})
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; overrides --num_train_epochs."})
    warmup_steps: int = field(default=0, metadata={"help": "LR warm-up steps (also the pruning warm-up unit)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Warm-up as a fraction of steps if --warmup_steps 0."})
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: at the end of each epoch)."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N optimizer steps (0: only on signal)."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (oldest deleted)."})
    resume: str = field(default="none", metadata={
        "help": "auto: resume from <output_dir>/checkpoints/latest if present; a tag (e.g. step200); none."})
    dataloader_num_workers: int = 0
    disable_tqdm: bool = False
    grad_norm_steps: int = field(default=0, metadata={
        "help": "Diagnostic: every N steps log each weighted loss term's gradient norm over the student's weights "
                "and its cosine with KD's (Grad/* scalars, metrics.json grad_diagnostics); rank 0's batch, one "
                "extra forward and a backward per term (holding 3 gradient copies), training unchanged; not under "
                "ZeRO-3. 0: off."})


@dataclass
class PruningArguments:
    pruning_method: str = field(default="movement", metadata={
        "help": "Unstructured: magnitude, movement, soft_movement. Structured CAP-f: first_order (heads + FFN "
                "neurons, iterative).", "choices": list(PRUNING_METHODS)})
    target_sparsity: float = field(default=0.9, metadata={
        "help": "Fraction of encoder linear weights removed (soft movement: reached through --final_lambda; "
                "first_order: fraction of heads and of FFN neurons removed)."})
    structured_step: float = field(default=0.1, metadata={
        "help": "first_order: pruned fraction added per stage (0.1 -> 10%%, 20%%, ... up to --target_sparsity)."})
    epochs_per_stage: int = field(default=2, metadata={"help": "first_order: retraining epochs after each stage."})
    importance_batches: int = field(default=0, metadata={
        "help": "first_order: batches per rank for importance (0: the whole training set, as the reference)."})
    initial_warmup: float = field(default=2.0, metadata={"help": "Dense steps = initial_warmup * warmup_steps."})
    final_warmup: float = field(default=3.0, metadata={"help": "Steps at final sparsity = final_warmup * warmup_steps."})
    final_threshold: float = field(default=0.1, metadata={"help": "Soft movement: final sigmoid threshold."})
    final_lambda: float = field(default=400.0, metadata={"help": "Soft movement: final L1 weight on sigmoid(scores)."})
    mask_init: str | None = field(default=None, metadata={
        "help": "Init of the learned scores. Default: magnitude for movement, constant for soft_movement.",
        "choices": list(MASK_INITS)})
    mask_scale: float | None = field(default=None, metadata={
        "help": "Score init scale: the magnitude prior's mean (default 1.0), the constant (default 0.0, the "
                "reference) or the uniform range."})
    prune_modules: str = field(default=ENCODER_LINEAR_PATTERN, metadata={
        "help": "Regex of linear layers to prune (default: every encoder-layer linear)."})


    @property
    def score_init(self) -> str:
        if self.mask_init is not None:
            return self.mask_init
        return "constant" if self.pruning_method == "soft_movement" else "magnitude"


@dataclass
class CapArguments:
    cap: str = field(default="prc,snc,fic", metadata={"help": "CAP modules: any of prc,snc,fic, or none."})
    contrastive_temperature: float = field(default=0.1, metadata={"help": "tau of the cosine logits q.k/tau."})
    extra_negatives: int = field(default=4096, metadata={"help": "Extra bank keys per module and step."})
    cap_unsup_weight: float = field(default=0.1, metadata={"help": "Weight of the unsupervised (same example) term."})
    cap_sup_weight: float = field(default=10.0, metadata={
        "help": "Weight of the supervised (same label) term; with the reference reduction it is divided by the "
                "mean positive count (about 2000), hence the large default."})
    cap_reduction: str = field(default="reference", metadata={
        "help": "reference: the CAP code's sum / total-positives reduction; supcon: SupCon mean over anchors.",
        "choices": list(REDUCTIONS)})
    ce_weight: float | None = field(default=None, metadata={"help": "Default 0.1 with a teacher, else 1.0."})
    kd_weight: float = field(default=0.9, metadata={"help": "Weight of T^2 KL(teacher || student) (needs a teacher)."})
    kd_temperature: float = field(default=2.0, metadata={"help": "KD softmax temperature T."})
    snapshot_steps: int = field(default=0, metadata={"help": "SnC snapshot every N steps (0: each epoch >= 1)."})
    snapshot_mode: str = field(default="train", metadata={
        "help": "Encode snapshots with dropout on (train, reference) or off (eval).", "choices": ["train", "eval"]})
    max_snapshots: int | None = field(default=None, metadata={"help": "Keep at most N SnC columns (default all)."})
    teacher_mode: str = field(default="cached", metadata={
        "help": "cached: teacher logits from the encode pass; live: teacher forward every step.",
        "choices": ["cached", "live"]})
    bank_dtype: str = field(default="float32", metadata={
        "help": "Storage dtype of the memory banks (bfloat16 halves their memory).", "choices": ["float32", "bfloat16"]})
    teacher_offload: str = field(default="auto", metadata={
        "help": "Teacher engine: cpu = ZeRO-3 with params offloaded to CPU, none = stage 0, auto = cpu for "
                ">= 300M parameters.", "choices": ["auto", "none", "cpu"]})

    @property
    def modules(self) -> list[str]:
        value = self.cap.strip().lower()
        if value in ("", "none"):
            return []
        mods = [m.strip() for m in value.split(",") if m.strip()]
        bad = [m for m in mods if m not in MODULES]
        if bad:
            raise ArgumentError(f"--cap: unknown module(s) {bad}; allowed: any of {', '.join(MODULES)} or none")
        return list(dict.fromkeys(mods))


ALL_ARGUMENTS = (ModelArguments, DataArguments, RunArguments, PruningArguments, CapArguments)


def parse_args(argv: list[str] | None = None):
    """Parse flags into the five dataclasses and validate them."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ALL_ARGUMENTS)
    margs, dargs, rargs, pargs, cargs = parser.parse_args_into_dataclasses(args=argv)
    if rargs.local_rank < 0 and "LOCAL_RANK" in os.environ:
        rargs.local_rank = int(os.environ["LOCAL_RANK"])
    validate(margs, dargs, rargs, pargs, cargs)
    return margs, dargs, rargs, pargs, cargs


def validate(margs: ModelArguments, dargs: DataArguments, rargs: RunArguments, pargs: PruningArguments,
             cargs: CapArguments) -> None:
    from .data import get_task

    try:
        get_task(dargs.task_name)
    except ValueError as err:
        raise ArgumentError(f"--task_name: {err}") from err
    if pargs.pruning_method == "first_order" and not 0.0 < pargs.structured_step <= max(pargs.target_sparsity, 1e-9):
        raise ArgumentError(f"--structured_step must be in (0, --target_sparsity], got {pargs.structured_step}")
    if pargs.epochs_per_stage < 1:
        raise ArgumentError(f"--epochs_per_stage must be >= 1, got {pargs.epochs_per_stage}")
    if not 0.0 <= pargs.target_sparsity < 1.0:
        raise ArgumentError(f"--target_sparsity must be in [0, 1), got {pargs.target_sparsity}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(rargs, name) < 1:
            raise ArgumentError(f"--{name} must be >= 1, got {getattr(rargs, name)}")
    if rargs.max_steps <= 0 and rargs.num_train_epochs <= 0:
        raise ArgumentError("one of --max_steps or --num_train_epochs must be > 0")
    if not 0.0 <= rargs.warmup_ratio < 1.0:
        raise ArgumentError(f"--warmup_ratio must be in [0, 1), got {rargs.warmup_ratio}")
    if dargs.data_dir is not None and not os.path.isdir(dargs.data_dir):
        raise ArgumentError(f"--data_dir {dargs.data_dir!r} is not a directory")
    if rargs.deepspeed is not None and not os.path.isfile(rargs.deepspeed):
        raise ArgumentError(f"--deepspeed {rargs.deepspeed!r}: file not found")
    if rargs.grad_norm_steps < 0:
        raise ArgumentError(f"--grad_norm_steps must be >= 0, got {rargs.grad_norm_steps}")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(dargs, name)
        if value is not None and value < 1:
            raise ArgumentError(f"--{name} must be >= 1, got {value}")
    modules = cargs.modules  # validates --cap
    if cargs.contrastive_temperature <= 0 or cargs.kd_temperature <= 0:
        raise ArgumentError("--contrastive_temperature and --kd_temperature must be > 0")
    if cargs.extra_negatives < 0:
        raise ArgumentError(f"--extra_negatives must be >= 0, got {cargs.extra_negatives}")
    if rargs.mode == "prune":
        if "fic" in modules and not margs.teacher_name_or_path:
            raise ArgumentError("--cap fic needs --teacher_name_or_path (the fine-tuned model); "
                                "or drop fic from --cap")
        if margs.teacher_name_or_path and not os.path.exists(margs.teacher_name_or_path) \
                and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ArgumentError(f"--teacher_name_or_path {margs.teacher_name_or_path!r} does not exist")
