"""The run spec: what a run is, resolved once from the flags and the files before any weights load or process
group exists.

``RunSpec`` holds the five validated flag groups (frozen), the task, the student's resolved path, the DeepSpeed
config resolved for the world, its ``compression_training`` section, the step plan and the run's identity (what a
resume must match). Everything below the entry layer takes the spec's parts (a flag group, the plan, the config),
never the command line. Two facts may only be known later, and each has one explicit re-resolution: the world
size when no launcher announced it (``for_world``) and the training-set size of hub data (``with_train_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from cap_ds.compression.config import load_ds_config
from cap_ds.compression.methods import get_method
from cap_ds.data.tasks import TaskSpec, get_task
from cap_ds.run.args import CapArguments, DataArguments, Flags, ModelArguments, PruningArguments, RunArguments
from cap_ds.run.rundir import run_config
from cap_ds.runtime.errors import UserError
from cap_ds.training.ds_config import build_ds_config, check_diagnostic, validate_ds_config
from cap_ds.training.plan import StepPlan, plan_steps


@dataclass(frozen=True)
class DeepSpeedSpec:
    """The ``--deepspeed`` file as the run uses it: ``source`` the file's JSON (None: the built-in ZeRO-2),
    ``config`` resolved for the world (``"auto"`` values from the flags), ``compression`` its section or None."""

    path: str | None
    source: dict[str, Any] | None
    config: dict[str, Any]
    compression: dict[str, Any] | None


@dataclass(frozen=True)
class RunSpec:
    """Everything a run is (see the module docstring). ``world_size`` None: no launcher announced it (the
    process group tells; ``for_world``). ``plan`` None: hub data whose size is known once loaded."""

    model: ModelArguments
    data: DataArguments
    training: RunArguments
    pruning: PruningArguments
    cap: CapArguments
    task: TaskSpec
    model_path: str
    world_size: int | None
    deepspeed: DeepSpeedSpec
    num_train: int | None
    plan: StepPlan | None
    identity: dict[str, Any]  # flags + DeepSpeed content: what a resumed run must match (rundir.run_config)
    command: tuple[str, ...] = ()  # the command line's arguments, for the model card

    # ---- derived facts the recipe asks for (one place each)
    @property
    def prune(self) -> bool:
        return self.training.mode == "prune"

    @property
    def structured(self) -> bool:
        """CAP-f: heads and FFN neurons pruned in stages (no encode passes, per-stage snapshots)."""
        return self.prune and get_method(self.pruning.pruning_method).structured

    @property
    def teacher_path(self) -> str | None:
        """The fine-tuned teacher (KD, FiC) of a pruning run; None when fine-tuning or without one."""
        return self.model.teacher_name_or_path if self.prune else None

    @property
    def modules(self) -> list[str]:
        """The CAP contrastive modules (none when fine-tuning)."""
        return self.cap.modules if self.prune else []

    @property
    def output_dir(self) -> str:
        return self.training.output_dir

    def loss_weights(self) -> tuple[float, float]:
        """(CE, KD) weights: KD only with a teacher."""
        return self.cap.loss_weights(self.teacher_path is not None)

    def title(self) -> str:
        """The model card's and heat-map's title: task, method and CAP modules."""
        modules = self.modules
        return f"{self.task.name} {self.pruning.pruning_method}" + (f" + {'/'.join(modules)}" if modules else "")

    # ---- the two late facts
    def for_world(self, world_size: int) -> RunSpec:
        """This spec for the process group's size (itself when the launcher announced that size)."""
        if world_size == self.world_size:
            return self
        return replace(self, world_size=world_size, deepspeed=_deepspeed(self.training, world_size),
                       plan=None if self.num_train is None else _plan(self, self.num_train, world_size))

    def with_train_rows(self, num_train: int) -> RunSpec:
        """This spec once the training set (hub data) is loaded: its size fixes the plan."""
        if self.plan is not None and num_train == self.num_train:
            return self
        return replace(self, num_train=num_train, plan=_plan(self, num_train, self.world_size or 1))


def _deepspeed(flags: RunArguments, world_size: int | None) -> DeepSpeedSpec:
    source = load_ds_config(flags.deepspeed) if flags.deepspeed is not None else None
    if isinstance(source, dict) and (source.get("checkpoint") or {}).get("load_universal"):
        raise UserError(f"--deepspeed {flags.deepspeed}: checkpoint.load_universal is not supported (DeepSpeed loads "
                        "universal checkpoints with weights_only=False); remove it")
    config, compression = build_ds_config(
        flags.deepspeed, micro_batch=flags.per_device_train_batch_size, grad_accum=flags.gradient_accumulation_steps,
        world_size=world_size, max_grad_norm=flags.max_grad_norm, output_dir=flags.output_dir,
        optimizer_flags={"lr": flags.learning_rate, "eps": flags.adam_epsilon, "weight_decay": flags.weight_decay})
    if flags.deepspeed is not None:  # (the built-in config is known to be valid)
        check_diagnostic(config, flags.grad_norm_steps, flags.deepspeed)
        validate_ds_config(config, flags.deepspeed)
    return DeepSpeedSpec(flags.deepspeed, source, config, compression)


def _plan(spec: RunSpec, num_train: int, world_size: int) -> StepPlan:
    return plan_steps(num_train, world_size, spec.training, spec.pruning, prune=spec.prune,
                      compression=spec.deepspeed.compression, source=str(spec.training.deepspeed))


def resolve(flags: Flags, *, model_path: str, num_train: int | None, world_size: int | None,
            task: TaskSpec | None = None) -> RunSpec:
    """The spec of validated ``flags`` (``preflight`` checks the files first and calls this). ``task``: what the
    data says the task is (a user's files: their labels); default the GLUE ``--task_name``."""
    deepspeed = _deepspeed(flags.run, world_size)
    spec = RunSpec(model=flags.model, data=flags.data, training=flags.run, pruning=flags.pruning, cap=flags.cap,
                   task=task or get_task(flags.data.task_name), model_path=model_path, world_size=world_size,
                   deepspeed=deepspeed, num_train=num_train, plan=None,
                   identity=run_config(tuple(flags), deepspeed.source, model_path))
    return spec if num_train is None else replace(spec, plan=_plan(spec, num_train, world_size or 1))
