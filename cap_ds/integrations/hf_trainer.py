"""``CapHfTrainer``: CAP (CE + KD + PrC/SnC/FiC + the pruning regulariser, pruned on the cubic schedule) inside a
user's ``transformers.Trainer`` script: swap the class, pass ``cap_args``.

It mirrors cap_ds/train.py's recipe with the Trainer as the loop: masks are installed when ``train()`` starts
(the step count is known then, and the score parameters must reach the optimizer, which gets them as their own
group with their own LR); the bank passes run when training begins (``CapCallback``); ``compute_loss`` is
``training.losses.TrainingLoss``. Banks are kept whole on every process (the Trainer's sampler does not shard
examples the way ``cap.ShardSampler`` does), so each process encodes the whole training set in the bank passes.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer

from cap_ds.cap import CapObjective, Shard, ShardSampler, make_banks
from cap_ds.compression import sparsity_report
from cap_ds.compression.zero import model_is_zero3
from cap_ds.data.models import SentenceVectorHook, check_fic_width, check_teacher, load_teacher
from cap_ds.data.tasks import TaskSpec
from cap_ds.integrations.hf_args import CapArguments, outside_zero_init, resolve_monitor_paths
from cap_ds.integrations.hf_callback import CapCallback, CapRun, checked_state_path, save_state
from cap_ds.run.export import export_pretrained
from cap_ds.run.model_card import CardFacts, card_text, contrastive_rows
from cap_ds.runtime.collectives import rank
from cap_ds.runtime.monitor import RunLog
from cap_ds.runtime.signals import StopSignals
from cap_ds.training.encode import Encoder, Snapshots
from cap_ds.training.losses import TrainingLoss
from cap_ds.training.optim import optimizer_groups
from cap_ds.training.plan import StepPlan, fit_warmup_offsets
from cap_ds.training.pruning import install_pruning, pruning_schedule

logger = logging.getLogger(__name__)


def model_task(model: nn.Module) -> TaskSpec:
    """The task kind ``TrainingLoss`` needs, read from the model's config (regression: one output)."""
    config = model.config
    if config.num_labels == 1 or config.problem_type == "regression":
        labels = None
    else:
        labels = tuple(str(config.id2label.get(i, i)) for i in range(config.num_labels))
    return TaskSpec(name="hf_trainer", glue_dir="", hub_config="", text_fields=(), label_names=labels,
                    primary_metric="accuracy")


def dataset_with_index(dataset: Any) -> Any:
    """The training set with its ``idx`` column (each example's bank row): added when missing, else checked to be
    0..n-1 (a ``max_train_samples`` cut must renumber it)."""
    if not hasattr(dataset, "column_names"):
        raise TypeError(f"CapHfTrainer needs a datasets.Dataset as train_dataset (got {type(dataset).__name__}): "
                        "CAP's memory banks address examples by an idx column")
    n = len(dataset)
    if "idx" not in dataset.column_names:
        return dataset.add_column("idx", list(range(n)))
    idx = sorted(int(i) for i in dataset["idx"])
    if idx != list(range(n)):
        raise ValueError(f"train_dataset column idx must hold 0..{n - 1} once each (the bank row of every example); "
                         "after a select/shuffle, drop it (CapHfTrainer adds it) or renumber it")
    return dataset


def bank_labels(dataset: Any) -> torch.Tensor:
    """Each bank row's class (row ``idx`` holds the example whose ``idx`` it is, wherever that example sits in the
    dataset): the supervised contrastive terms pick their positives by it."""
    column = "labels" if "labels" in dataset.column_names else "label"
    labels = torch.empty(len(dataset), dtype=torch.long)
    labels[torch.tensor(dataset["idx"], dtype=torch.long)] = torch.tensor(dataset[column], dtype=torch.long)
    return labels


class _NoTokenizer:
    """Stands in for a missing ``processing_class`` in the export: nothing to save."""

    def save_pretrained(self, path: Any) -> None:
        return None


class CapHfTrainer(Trainer):
    """``transformers.Trainer`` that CAP-prunes its model. ``cap_args``: :class:`CapArguments`; ``teacher``: an
    already loaded fine-tuned model (else ``cap_args.teacher_name_or_path`` is loaded). The model must not be
    partitioned at load (ZeRO-3: load it inside :func:`outside_zero_init`)."""

    def __init__(self, *args: Any, cap_args: CapArguments, teacher: nn.Module | None = None, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        ds = getattr(training_args, "hf_deepspeed_config", None)
        if ds is not None:  # DeepSpeed's own TensorBoard writes under <output_dir>/runs, not ./auto
            resolve_monitor_paths(ds.config, training_args.output_dir)
            if ds.config.get("compression_training"):
                raise ValueError("CapHfTrainer: the DeepSpeed config's compression_training section is not read; set "
                                 "the pruning with CapArguments (--pruning_method, --target_sparsity, ...)")
        super().__init__(*args, **kwargs)
        if model_is_zero3(self.model):
            raise ValueError("CapHfTrainer: the model was partitioned at load (ZeRO-3 TrainingArguments existed); load "
                             "it inside `with cap_ds.integrations.outside_zero_init():` so the masks see whole weights")
        if self.train_dataset is None:
            raise ValueError("CapHfTrainer needs a train_dataset (its examples fill the memory banks)")
        self.train_dataset = dataset_with_index(self.train_dataset)
        self.cap_args = cap_args
        self.model_accepts_loss_kwargs = False  # our loss is a mean per micro-batch: the Trainer divides by GA
        if teacher is None and cap_args.teacher_name_or_path:
            with outside_zero_init():
                teacher = load_teacher(cap_args.teacher_name_or_path)
        self.teacher = teacher
        if teacher is not None:  # KD and FiC must read the same labels in the same order, at the same width
            check_teacher(teacher.config, self.model.config.num_labels, model_task(self.model).label_names,
                          cap_args.teacher_name_or_path or type(teacher).__name__)
        check_fic_width(teacher, self.model, cap_args.modules)
        self.cap_run: CapRun | None = None
        self.cap_callback: CapCallback | None = None

    # ---- setup, when train() starts
    def step_plan(self) -> StepPlan:
        """Optimizer steps as the Trainer will count them, and the pruning ramp's offsets within them."""
        args = self.args
        batches = len(self.get_train_dataloader())
        per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
        total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
        warmup = args.get_warmup_steps(total)
        offset, offset_end, note = fit_warmup_offsets(total, warmup, self.cap_args.initial_warmup,
                                                      self.cap_args.final_warmup)
        if note and self.is_world_process_zero():
            logger.warning(note)
        return StepPlan(per_epoch, total, math.ceil(total / per_epoch), warmup, offset=offset, offset_end=offset_end)

    def encode_loader(self) -> DataLoader:
        """The training set in order, batched for the bank passes with the run's own collator."""
        data = self.train_dataset
        if self.args.remove_unused_columns:
            data = self._remove_unused_columns(data, description="encode")
        return DataLoader(data, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator,
                          sampler=ShardSampler(len(data), shuffle=False, pad=False))

    def build_cap_run(self) -> CapRun:
        """Masks into the model, then the banks, objective, loss and schedule (cap_ds/train.py's recipe)."""
        cap, model, n = self.cap_args, self.model, len(self.train_dataset)
        task, plan = model_task(model), self.step_plan()
        pargs = cap.pruning_arguments()
        pruning = install_pruning(model, pargs, plan, None, source="CapArguments", is_rank0=self.is_world_process_zero())
        modules, shard = cap.modules, Shard(n)  # whole banks on every process (see the module docstring)
        banks = make_banks(modules, n, model.config.hidden_size, cap.bank_dtype, shard, cap.max_snapshots)
        hook = SentenceVectorHook(model, cap.sentence_vector) if modules else None
        objective = CapObjective.from_settings(
            banks, bank_labels(self.train_dataset) if task.kind == "classification" else None, cap,
            seed=self.args.seed + rank()) if modules else None
        ce_weight, kd_weight = cap.loss_weights(self.teacher is not None)
        loss = TrainingLoss(task, ce_weight, kd_weight, cap.kd_temperature, shard, None, None, objective, hook,
                            pruning.regularizer())
        encoder = Encoder(self.encode_loader(), n, shard, self.args.device, StopSignals(),
                          show_progress=False, report=self.is_world_process_zero())
        snapshots = Snapshots(encoder, banks["snc"], model, hook, RunLog()) if "snc" in banks else None
        schedule = pruning_schedule(pruning, None, plan, pargs, loss=loss, importance_loader=None,
                                    snapshots=snapshots, context=None)
        if self.teacher is not None:
            self.teacher.to(self.args.device)
        return CapRun(loss=loss, banks=banks, objective=objective, hook=hook, schedule=schedule, encoder=encoder,
                      plan=plan, teacher=self.teacher, sentence_vector=cap.sentence_vector, snapshots=snapshots,
                      snapshot_steps=cap.snapshot_steps, snapshot_train_mode=cap.snapshot_mode == "train")

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any):
        """Install CAP (once), then the Trainer's ``train``; a resumed run restores CAP's state from the
        checkpoint instead of running the bank passes."""
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True: no checkpoint-* folder in {self.args.output_dir}")
        if self.cap_run is None:
            self.cap_run = self.build_cap_run()
            self.teacher = None
            self.cap_callback = CapCallback(self.cap_run)
            self.add_callback(self.cap_callback)
        if resume_from_checkpoint:
            checked_state_path(resume_from_checkpoint)  # before the Trainer loads anything
        self.cap_run.resume_dir = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    # ---- the Trainer's hooks
    def _set_signature_columns_if_needed(self) -> None:
        """Keep ``idx`` through ``remove_unused_columns`` (the banks' row of each example)."""
        super()._set_signature_columns_if_needed()
        if "idx" not in self._signature_columns:
            self._signature_columns.append("idx")

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``idx`` stays on the host: the banks and cached logits live there (no device-to-host copy per step)."""
        idx = inputs.get("idx") if isinstance(inputs, Mapping) else None
        if idx is None:
            return super()._prepare_inputs(inputs)
        out = super()._prepare_inputs({k: v for k, v in inputs.items() if k != "idx"})
        out["idx"] = idx
        return out

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer class over cap_ds's groups: weights, undecayed biases/LayerNorm, and the pruning
        scores with ``mask_scores_learning_rate`` and no decay (``training.optim.optimizer_groups``)."""
        if self.optimizer is None and self.cap_run is not None:
            target = self.model if model is None else model
            groups = optimizer_groups(target, self.args.weight_decay, self.cap_args.mask_scores_learning_rate)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
            self.optimizer = cls(groups, **kwargs)
        return super().create_optimizer(model)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """Training: ``TrainingLoss`` (CE + KD + CAP terms + regulariser); its terms go to ``CapCallback``.
        Evaluation (``return_outputs``): the model's own loss."""
        if self.cap_run is None or return_outputs or not model.training:
            inputs = {k: v for k, v in inputs.items() if k != "idx"}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, terms = self.cap_run.loss(inputs, model)
        self.cap_callback.record(terms)
        return loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        inputs = {k: v for k, v in inputs.items() if k != "idx"}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training rows get the mean loss terms, sparsity and threshold (every process computes them: collective
        under ZeRO-3 / DDP; the Trainer's reporters write them from the main process)."""
        if self.cap_callback is not None and "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs.update(self.cap_callback.scalars(self.model))
        super().log(logs, start_time)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, plus CAP's state (banks, RNG, schedule) in the same folder, one file per rank."""
        super()._save_checkpoint(model, trial)
        if self.cap_run is not None:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_state(self.cap_run, folder)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (``_internal_call``): the Trainer's own, with scores. A call of yours: the pruned model with its
        masks baked in, loadable by plain ``from_pretrained`` (``run.export.export_pretrained``: sparsity.json, the
        heat-map, a model card, files.json), replacing ``output_dir`` (default ``<output_dir>/final``). A
        collective: call it on every process, as the Trainer's own ``save_model``."""
        if _internal_call or self.cap_run is None:
            return super().save_model(output_dir, _internal_call)
        target = Path(output_dir) if output_dir is not None else Path(self.args.output_dir) / "final"
        if target.is_dir() and any(target.glob("checkpoint-*")):
            raise ValueError(f"save_model({str(target)!r}): the export replaces the whole folder and this one holds "
                             "Trainer checkpoints; pass a new folder (the default is <output_dir>/final)")
        report = sparsity_report(self.model)
        with outside_zero_init():  # the export's fresh plain model must hold whole weights, not ZeRO-3 shards
            export_pretrained(self.model, self.processing_class or _NoTokenizer(), target, sparsity_report=report,
                              title=f"CAP {self.cap_args.pruning_method}", card=self.model_card_text(report, target))
        if self.is_world_process_zero():
            logger.info("pruned model (sparsity %.4f) written to %s", report["sparsity"], target)

    def model_card_text(self, report: dict[str, Any], folder: Path) -> str:
        """The export's README.md, the same card ``cap_ds/train.py`` writes (``run.model_card``), from the
        Trainer's state: its last evaluation, the CAP arguments and the script call that made the model."""
        cap, args = self.cap_args, self.args
        evals = [row for row in self.state.log_history if any(k.startswith("eval_") for k in row)]
        skip = ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
        metrics = {k.removeprefix("eval_"): float(v) for k, v in (evals[-1] if evals else {}).items()
                   if k.startswith("eval_") and k not in skip and isinstance(v, int | float)}
        loss = self.cap_run.loss
        name = Path(args.output_dir).name or "hf_trainer"
        task = replace(model_task(self.model), name=name)
        result = {"eval": metrics, "eval_examples": len(self.eval_dataset) if self.eval_dataset is not None else 0,
                  "sparsity": report["sparsity"], "kd_weight": loss.kd_weight}
        world = max(args.world_size, 1)
        recipe = [("entry point", "`cap_ds.integrations.CapHfTrainer` (transformers.Trainer)"),
                  ("student", f"`{getattr(self.model.config, '_name_or_path', '') or type(self.model).__name__}`"),
                  ("pruning method", cap.pruning_method), ("target sparsity", f"{cap.target_sparsity:.1%}"),
                  ("measured sparsity", f"{report['sparsity']:.2%} of encoder linear weights"),
                  ("CAP modules", ", ".join(cap.modules) or "none (plain pruning)")]
        recipe += contrastive_rows(cap, cap.modules, cap.sentence_vector)
        recipe += [("teacher", f"`{cap.teacher_name_or_path}`" if cap.teacher_name_or_path else "none"),
                   ("loss weights", f"CE {loss.ce_weight}, KD {loss.kd_weight} (T {cap.kd_temperature})"),
                   ("steps", f"{self.state.global_step} ({self.state.epoch or 0:g} epochs), {world} process(es), batch "
                             f"{args.per_device_train_batch_size} per process x {args.gradient_accumulation_steps} "
                             "accumulation"),
                   ("optimizer", f"{args.optim}, learning rate {args.learning_rate}"), ("seed", args.seed)]
        argv = [a for a in sys.argv if not a.startswith("--local_rank")]
        command = f"python {shlex.join(argv)}" if argv and argv[0].endswith(".py") else None
        facts = CardFacts(title=f"{name}: CAP {cap.pruning_method} {report['sparsity']:.0%}", task=task,
                          result=result, recipe=recipe, pruning_method=cap.pruning_method,
                          target_sparsity=cap.target_sparsity, modules=tuple(cap.modules), command=command)
        return card_text(facts, folder, sparsity=report)
