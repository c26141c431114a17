"""Command-line arguments (HF ``run_glue`` conventions) and their validation.

Every check runs before any model is loaded; errors name the flag, the bad value and what is allowed.
"""

from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

from cap_ds.cap.loss import REDUCTIONS
from cap_ds.cap.objective import MODULES
from cap_ds.compression.layers import MASK_INITS
from cap_ds.compression.methods import get_method, method_names
from cap_ds.compression.stats import ENCODER_LINEAR_PATTERN
from cap_ds.data.models import SENTENCE_VECTORS
from cap_ds.run.data_args import MIN_SEQ_LENGTH, ArgumentError, DataArguments, validate_data

__all__ = ["MIN_SEQ_LENGTH", "ArgumentError", "CapArguments", "DataArguments", "Flags", "ModelArguments",
           "PruningArguments", "RunArguments", "parse_args"]

MODES = ("prune", "finetune")
PRUNING_METHODS = method_names()  # the registered methods (compression.methods.registry), canonical names


@dataclass(frozen=True)
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pre-trained student (path or hub id). Default: the offline all-MiniLM-L6-v2 package."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Comma-separated config overrides for the student, e.g. 'num_hidden_layers=2'."})
    teacher_name_or_path: str | None = field(default=None, metadata={
        "help": "Fine-tuned teacher for KD and FiC (e.g. the final/ folder of a --mode finetune run)."})
    sentence_vector: str = field(default="auto", metadata={
        "help": "Sentence vector CAP contrasts. auto: pooler for sequence tasks, cls (the raw [CLS] state, as the "
                "CAP reference for SQuAD) for question answering.", "choices": ["auto", *SENTENCE_VECTORS]})


@dataclass(frozen=True)
class RunArguments:
    output_dir: str = field(default="outputs/cap", metadata={
        "help": "Where the run writes: metrics.json, final/ (the pruned model), checkpoints/, runs/ (TensorBoard), "
                "train_state.json. One run per folder."})
    mode: str = field(default="prune", metadata={"help": "prune (CAP) or finetune (dense teacher).",
                                                  "choices": list(MODES)})
    deepspeed: str | None = field(default=None, metadata={
        "help": "DeepSpeed config JSON (may hold a compression_training section). Default: built-in ZeRO-2."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start a new run in an --output_dir that holds an earlier run: its run files (checkpoints/, "
                "final/, metrics.json, runs/, ...) are deleted first. Without it (and without --resume) such a "
                "folder is refused."})
    local_rank: int = field(default=-1, metadata={
        "help": "This process's GPU on its node; the DeepSpeed launcher passes --local_rank=N (else LOCAL_RANK is "
                "read). Do not set it yourself."})
    per_device_train_batch_size: int = field(default=32, metadata={
        "help": "Training examples per rank and micro-batch (global batch = this x ranks x accumulation)."})
    per_device_eval_batch_size: int = field(default=64, metadata={
        "help": "Examples per rank and batch for evaluation and the bank encode passes."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=3e-5, metadata={
        "help": "Peak learning rate of the weights (AdamW; linear warm-up then linear decay to 0)."})
    mask_scores_learning_rate: float = field(default=1e-2, metadata={"help": "LR of pruning scores."})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay of the weights (biases, LayerNorm and pruning scores get none)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (DeepSpeed's gradient_clipping)."})
    num_train_epochs: float = field(default=3.0, metadata={
        "help": "Passes over the training set (ignored when --max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; overrides --num_train_epochs."})
    warmup_steps: int = field(default=0, metadata={"help": "LR warm-up steps (also the pruning warm-up unit)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Warm-up as a fraction of steps if --warmup_steps 0."})
    seed: int = field(default=42, metadata={
        "help": "Seed of everything random: head init, dropout, shuffling, extra negatives."})
    logging_steps: int = field(default=10, metadata={
        "help": "Every N optimizer steps (and at the last), rank 0 prints one progress line, 'step 40/900 | loss "
                "0.41 (ce .. kd .. prc ..) | sparsity 0.62 | lr 8.1e-05 | 31.2 ex/s | ETA 6m12s', whether or not "
                "output is a terminal (a redirected log shows progress), and writes the same values as Train/* "
                "scalars (TensorBoard). Only these steps read the loss from the device."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: at the end of each epoch)."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N optimizer steps (0: only on signal)."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (oldest deleted)."})
    resume: str = field(default="none", metadata={
        "help": "auto: continue from the newest complete checkpoint in <output_dir>/checkpoints/ (a new run if "
                "there is none); a tag (e.g. step200); none: a new run. A resumed run must use the same flags, "
                "except --max_steps/--num_train_epochs, logging, evaluation and checkpoint flags."})
    max_nonfinite_steps: int = field(default=10, metadata={
        "help": "Consecutive optimizer steps with a NaN/inf loss, or skipped by DeepSpeed, that are tolerated; one "
                "more stops the run as failed (train_state.json status failed, non-zero exit, no final/)."})
    check_steps: int = field(default=10, metadata={
        "help": "Read the ranks' agreed stop request and non-finite-step count every N optimizer steps (and at "
                "every logging, eval, snapshot and save step): a signal or a divergence is acted on within N "
                "steps; between checks a step makes no host sync of its own."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data-loader worker processes per rank."})
    disable_tqdm: bool = field(default=False, metadata={
        "help": "No progress bars (they are shown only when stderr is a terminal; the --logging_steps lines are "
                "printed either way)."})
    grad_norm_steps: int = field(default=0, metadata={
        "help": "Diagnostic: every N steps log each weighted loss term's gradient norm over the student's weights "
                "and its cosine with KD's (Grad/* scalars, metrics.json grad_diagnostics); rank 0's batch, one "
                "extra forward and a backward per term (holding 3 gradient copies), training unchanged; not under "
                "ZeRO-3. 0: off."})


@dataclass(frozen=True)
class PruningArguments:
    pruning_method: str = field(default="movement", metadata={
        "help": "Unstructured: magnitude, movement, soft_movement. Structured CAP-f: first_order (heads + FFN "
                "neurons, iterative).", "choices": list(PRUNING_METHODS)})
    target_sparsity: float = field(default=0.9, metadata={
        "help": "Fraction of encoder linear weights removed (soft movement with --no_threshold_control: reached "
                "through --final_lambda; "
                "first_order: fraction of heads and of FFN neurons removed)."})
    structured_step: float = field(default=0.1, metadata={
        "help": "first_order: pruned fraction added per stage (0.1 -> 10%%, 20%%, ... up to --target_sparsity)."})
    epochs_per_stage: int = field(default=2, metadata={"help": "first_order: retraining epochs after each stage."})
    importance_batches: int = field(default=0, metadata={
        "help": "first_order: batches per rank for importance (0: the whole training set, as the reference)."})
    initial_warmup: float = field(default=2.0, metadata={"help": "Dense steps = initial_warmup * warmup_steps."})
    final_warmup: float = field(default=3.0, metadata={"help": "Steps at final sparsity = final_warmup * warmup_steps."})
    final_threshold: float = field(default=0.1, metadata={"help": "Soft movement: final sigmoid threshold."})
    final_lambda: float = field(default=400.0, metadata={
        "help": "Soft movement: final L1 weight on sigmoid(scores)."})
    threshold_control: bool = field(default=True, metadata={
        "help": "Soft movement: each step, set the sigmoid threshold to the global quantile (over all pruned "
                "layers) that gives the cubic schedule's sparsity, ending at --target_sparsity; layers still get "
                "different sparsities, and the scores start from the magnitude prior. Our addition, on by "
                "default. --no_threshold_control is the REFERENCE soft movement: the threshold ramps to "
                "--final_threshold and the run reaches whatever sparsity --final_lambda gives, which moves with "
                "the task and the seed."})
    mask_init: str | None = field(default=None, metadata={
        "help": "Init of the learned scores. Default: magnitude for movement and soft_movement, constant for the "
                "reference soft_movement (--no_threshold_control). magnitude: "
                "S0 = --mask_scale * |W| / mean|W| per matrix, so the first masks are the magnitude masks and "
                "movement moves weights in or out only as its evidence accumulates; it does not collapse at short "
                "budgets. constant: every score = --mask_scale; '--mask_init constant' (scale 0) is the REFERENCE "
                "movement init of Sanh et al. and CAP's scripts, which needs a long dense phase (the reference "
                "warms up for ~22k steps) and collapses to the majority class at short ones.",
        "choices": list(MASK_INITS)})
    mask_scale: float | None = field(default=None, metadata={
        "help": "Score init scale: the magnitude prior's mean (default 1.0), the constant (default 0.0, the "
                "reference) or the uniform range."})
    prune_modules: str = field(default=ENCODER_LINEAR_PATTERN, metadata={
        "help": "Regex of linear layers to prune (default: every encoder-layer linear)."})

    @property
    def score_init(self) -> str:
        """--mask_init, or the method's default: magnitude for movement and for soft movement under
        --threshold_control (which prunes on the cubic schedule from the ramp's first step, where zero-init scores
        collapse as movement's do); the reference constant for the reference soft movement (--no_threshold_control,
        which prunes late enough not to collapse, and whose --final_lambda calibration assumes zero-init scores)."""
        if self.mask_init is not None:
            return self.mask_init
        return get_method(self.pruning_method).default_mask_init(self.threshold_control)


@dataclass(frozen=True)
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

    def loss_weights(self, has_teacher: bool) -> tuple[float, float]:
        """(CE, KD) weights: KD only with a teacher; CE defaults to 0.1 beside KD (the reference's), else 1.0."""
        kd = self.kd_weight if has_teacher else 0.0
        return (self.ce_weight if self.ce_weight is not None else (0.1 if kd > 0 else 1.0)), kd

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


class Flags(NamedTuple):
    """The five flag groups, validated and frozen (``parse_args``'s result; unpacks like a tuple)."""

    model: ModelArguments
    data: DataArguments
    run: RunArguments
    pruning: PruningArguments
    cap: CapArguments


# --help sections, in display order. A flag is listed under its dataclass's section unless FLAG_SECTIONS moves it
# there (display only: the field stays in its dataclass).
HELP_SECTIONS = {"model": "model", "data": "data (GLUE, your files, question answering)", "training": "training",
                 "pruning": "pruning", "cap": "CAP contrastive losses and distillation", "deepspeed": "DeepSpeed",
                 "output": "output, logging and checkpoints"}
DATACLASS_SECTIONS = {ModelArguments: "model", DataArguments: "data", RunArguments: "training",
                      PruningArguments: "pruning", CapArguments: "cap"}
FLAG_SECTIONS = {
    "deepspeed": "deepspeed", "local_rank": "deepspeed",
    "output_dir": "output", "overwrite_output_dir": "output", "resume": "output", "logging_steps": "output",
    "save_steps": "output", "save_total_limit": "output", "disable_tqdm": "output", "grad_norm_steps": "output",
    "mask_scores_learning_rate": "pruning", "sentence_vector": "cap",
}
USAGE = """CAP pruning (or dense teacher fine-tuning, --mode finetune) of a pre-trained encoder on a GLUE task, your
own classification/regression files (--train_file/--validation_file) or extractive QA (--task_type
question_answering).

  deepspeed cap_ds/train.py --mode finetune --data_dir ../shared/data/glue --output_dir out/teacher
  deepspeed cap_ds/train.py --teacher_name_or_path out/teacher/final --cap prc,snc,fic \\
      --pruning_method movement --target_sparsity 0.9 --data_dir ../shared/data/glue --output_dir out/cap

`python cap_ds/train.py ...` runs one process. Flags must be spelled in full (no prefixes); a mistake stops with
one line and exit code 2. Ctrl-C writes a checkpoint and exits 130 (a second Ctrl-C quits at once)."""


def build_parser() -> StrictArgumentParser:  # noqa: F821 (imported on use: transformers is slow to import)
    """The command line's parser: strict (no prefixes, one-line errors raising ArgumentError), help by section."""
    from cap_ds.run.flagparser import StrictArgumentParser

    def section_of(dtype: type, name: str) -> str:
        return HELP_SECTIONS[FLAG_SECTIONS.get(name, DATACLASS_SECTIONS[dtype])]

    return StrictArgumentParser(ALL_ARGUMENTS, error_type=ArgumentError, sections=HELP_SECTIONS.values(),
                                section_of=section_of, description=USAGE)


def parse_args(argv: list[str] | None = None) -> Flags:
    """Parse flags into the five dataclasses and validate them. Any mistake is an ArgumentError (one line)."""
    margs, dargs, rargs, pargs, cargs = build_parser().parse(argv)
    if rargs.local_rank < 0 and "LOCAL_RANK" in os.environ:
        rargs = replace(rargs, local_rank=int(os.environ["LOCAL_RANK"]))
    validate(margs, dargs, rargs, pargs, cargs)
    if dargs.task_name is None and not dargs.uses_files:
        dargs = replace(dargs, task_name="sst2")
    if margs.sentence_vector == "auto":  # QA models have no pooler; the CAP reference contrasts raw [CLS] there
        margs = replace(margs, sentence_vector="cls" if dargs.is_qa else "pooler")
    return Flags(margs, dargs, rargs, pargs, cargs)


def validate(margs: ModelArguments, dargs: DataArguments, rargs: RunArguments, pargs: PruningArguments,
             cargs: CapArguments) -> None:
    validate_data(dargs)
    if dargs.is_qa and margs.sentence_vector == "pooler":
        raise ArgumentError("--sentence_vector pooler: a question-answering model has no pooler; use cls (the CAP "
                            "reference's choice for SQuAD, what auto picks) or mean")
    for args in (margs, dargs, rargs, pargs, cargs):  # NaN passes every comparison below: refuse it here
        for f in fields(args):
            value = getattr(args, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ArgumentError(f"--{f.name} must be a finite number, got {value}")
    for name in ("learning_rate", "mask_scores_learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm"):
        if getattr(rargs, name) < 0:
            raise ArgumentError(f"--{name} must be >= 0, got {getattr(rargs, name)}")
    check_output_dir(rargs.output_dir)
    if rargs.overwrite_output_dir and rargs.resume != "none":
        raise ArgumentError(f"--overwrite_output_dir deletes the run that --resume {rargs.resume} would continue; "
                            "use one of them")
    for name in ("max_nonfinite_steps", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                 "dataloader_num_workers"):
        if getattr(rargs, name) < 0:
            raise ArgumentError(f"--{name} must be >= 0, got {getattr(rargs, name)}")
    for name in ("logging_steps", "check_steps"):
        if getattr(rargs, name) < 1:
            raise ArgumentError(f"--{name} must be >= 1, got {getattr(rargs, name)}")
    structured = get_method(pargs.pruning_method).structured
    if structured and not 0.0 < pargs.structured_step <= max(pargs.target_sparsity, 1e-9):
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
    if rargs.deepspeed is not None and not os.path.isfile(rargs.deepspeed):
        raise ArgumentError(f"--deepspeed {rargs.deepspeed!r}: file not found")
    if rargs.grad_norm_steps < 0:
        raise ArgumentError(f"--grad_norm_steps must be >= 0, got {rargs.grad_norm_steps}")
    if rargs.warmup_steps < 0:
        raise ArgumentError(f"--warmup_steps must be >= 0, got {rargs.warmup_steps} (0: use --warmup_ratio)")
    if not 0 <= rargs.seed < 2**32:
        raise ArgumentError(f"--seed must be in [0, 2**32 - 1] (NumPy's range), got {rargs.seed}")
    for name in ("importance_batches", "initial_warmup", "final_warmup", "final_lambda"):
        if getattr(pargs, name) < 0:
            raise ArgumentError(f"--{name} must be >= 0, got {getattr(pargs, name)}")
    if not 0.0 <= pargs.final_threshold <= 1.0:
        raise ArgumentError(f"--final_threshold must be in [0, 1] (a sigmoid threshold), got {pargs.final_threshold}")
    for name in ("kd_weight", "cap_unsup_weight", "cap_sup_weight", "ce_weight", "snapshot_steps"):
        value = getattr(cargs, name)
        if value is not None and value < 0:
            raise ArgumentError(f"--{name} must be >= 0, got {value}")
    if cargs.max_snapshots is not None and cargs.max_snapshots < 1:
        raise ArgumentError(f"--max_snapshots must be >= 1 (or left unset: keep all), got {cargs.max_snapshots}")
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


def check_output_dir(output_dir: str) -> None:
    """Refuse an --output_dir that cannot be created or written, naming the path and the OS error, before any work
    (a path under a file, a read-only mount, a folder without write permission). Reads only: nothing is created.
    statvfs, not permission bits, tells a read-only mount: root may write anywhere else."""
    target = os.path.abspath(output_dir)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ArgumentError(f"--output_dir {output_dir!r} is a file; give a folder (created if missing)")
    existing = target
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ArgumentError(f"--output_dir {output_dir!r}: {existing} is a file, not a folder "
                            f"([Errno {errno.ENOTDIR}] {os.strerror(errno.ENOTDIR)}); give a path under a folder")
    code = None
    try:
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            code = errno.EROFS
    except OSError as err:
        code = err.errno
    if code is None and not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EACCES
    if code is not None:
        what = "cannot write in" if existing == target else "cannot create it in"
        raise ArgumentError(f"--output_dir {output_dir!r}: {what} {existing} ([Errno {code}] {os.strerror(code)}); "
                            "choose a writable folder")
