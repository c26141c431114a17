"""CAP pruning (or dense teacher fine-tuning) of a pre-trained encoder on a GLUE task, with DeepSpeed.

    deepspeed cap_ds/train.py --deepspeed ds_configs/zero2.json --mode finetune --output_dir out/teacher
    deepspeed cap_ds/train.py --deepspeed ds_configs/zero2.json --teacher_name_or_path out/teacher/final \
        --pruning_method movement --target_sparsity 0.9 --cap prc,snc,fic --output_dir out/cap

The recipe, top to bottom: args -> loaders -> models -> pruning -> engine -> CAP banks -> trainer -> train ->
results. Each line calls the module that owns the policy.
"""

from __future__ import annotations

import os
import signal
import sys

_EARLY_SIGNALS: list[int] = []  # stop signals that arrive during the imports below (replayed by main)
if __name__ == "__main__":  # a launcher may forward SIGTERM/SIGUSR1 within seconds of starting us
    for _sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(_sig, lambda signum, _frame: _EARLY_SIGNALS.append(signum))

if __package__ in (None, ""):
    # Run as a script (the DeepSpeed launcher does): import the package, not sibling files as top-level modules.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import logging
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from cap_ds.cap import CapObjective, Shard, make_banks
from cap_ds.compression import sparsity_report
from cap_ds.data.answer import remember_qa_settings
from cap_ds.data.batches import GlueCollator, LoaderSettings, make_loaders
from cap_ds.data.models import SentenceVectorHook, check_fic_width, load_student, load_teacher, load_tokenizer
from cap_ds.data.sources import load_task_data
from cap_ds.run.args import parse_args
from cap_ds.run.export import export_pretrained
from cap_ds.run.faults import settle
from cap_ds.run.model_card import model_card
from cap_ds.run.predictions import predict_rows, write_predictions
from cap_ds.run.preflight import Preflight, launcher_rank, preflight
from cap_ds.run.results import record_failure, run_results, write_results, write_state
from cap_ds.run.spec import RunSpec
from cap_ds.runtime.collectives import barrier, destroy_world, init_world
from cap_ds.runtime.errors import TrainingFailed, UserError
from cap_ds.runtime.monitor import RunLog, ScalarLogger, configure_logging
from cap_ds.runtime.rng import set_seed
from cap_ds.runtime.signals import StopRequested, StopSignals
from cap_ds.training.checkpoint import Checkpointer
from cap_ds.training.diagnostics import GradientDiagnostic
from cap_ds.training.ds_config import computes_in_bf16, warn_unknown_keys
from cap_ds.training.encode import (
    Encoder,
    Snapshots,
    TeacherSettings,
    fill_prc,
    restrict_encoded_rows,
    teacher_outputs,
)
from cap_ds.training.losses import TrainingLoss
from cap_ds.training.optim import build_optimizer, optimizer_groups, optimizer_name
from cap_ds.training.pruning import PassContext, install_pruning, lr_schedule, pruning_schedule
from cap_ds.training.trainer import CapTrainer, LoopParts, LoopSettings

logger = logging.getLogger("cap_ds.train")


class RunProgress:
    """How far the run got, told by the trainer's events: ``main`` records it when the run fails or stops."""

    def __init__(self) -> None:
        self.training, self.step = False, 0

    def resumed_at(self, step: int) -> None:
        self.step = step

    def on_train_begin(self, step: int) -> None:
        self.training, self.step = True, step

    def on_step_end(self, step: int) -> None:
        self.step = step


def main(argv: list[str] | None = None) -> dict:
    """Check the input, join the process group, run the recipe; leave train_state.json saying how it ended."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Expected noise: ZeRO-3 calls torch.distributed functions torch has deprecated (one warning per call site).
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would warn "Setting accelerator to CPU" on every import
    flags = parse_args(argv)
    output_dir = flags.run.output_dir
    # Stop signals from here on: remembered during setup, acted on at the next optimizer step or batch of an
    # encode pass (runtime/signals.py).
    stop = StopSignals().install()
    for signum in _EARLY_SIGNALS:
        stop.request(signum)
    try:
        pre = preflight(flags, lock=launcher_rank() == 0)  # rank 0 decides on the folder under its run lock
    except (ValueError, FileNotFoundError, OSError) as err:  # every check in preflight is about the input
        raise UserError(str(err)) from err
    world, rank = init_world()
    show_progress = configure_logging(rank == 0, flags.run.disable_tqdm)
    if rank == 0:
        pre.rundir.prepare()
    barrier()
    progress = RunProgress()
    try:
        spec = replace(pre.spec.for_world(world), command=tuple(sys.argv[1:] if argv is None else argv))
        return run(spec, pre, stop, rank, show_progress, progress)
    except BaseException as err:
        # The one-line cause, settled among the ranks while the process group lives: the first rank to fail
        # reports it; a rank that dies of its broken connection stays quiet (rank 0 records the claimed cause).
        failure = None if isinstance(err, StopRequested | KeyboardInterrupt | SystemExit) \
            else settle(err, output_dir)
        started = progress.training or pre.rundir.resume_tag is not None
        if rank == 0 and isinstance(err, StopRequested):  # a signal before training: the passes are redone
            write_state(output_dir, "preempted", progress.step)
            logger.info("stopped on signal before training (no new checkpoint)")
        elif started and (rank == 0 or (failure is not None and failure.report)):
            record_failure(output_dir, progress.step, failure.line if failure is not None else err)
        elif rank == 0:
            try:
                pre.rundir.remove_new_files()  # nothing trained: leave no run behind
            except OSError as cleanup:
                logger.warning("could not remove this run's files from %s: %s", output_dir, cleanup)
        if isinstance(err, StopRequested):
            err.exit_code = stop.exit_code
        raise
    finally:
        if rank == 0:
            pre.rundir.restore()  # a run that ended before training puts the run it replaced back (no-op after)
        if pre.lock is not None:
            pre.lock.release()


def run(spec: RunSpec, pre: Preflight, stop: StopSignals, rank: int, show_progress: bool,
        progress: RunProgress) -> dict:
    """The recipe for ``spec`` on this rank (``progress`` hears from the trainer how far it got)."""
    import deepspeed  # after main() chose the accelerator

    flags, is_rank0, prune, world = spec.training, rank == 0, spec.prune, spec.world_size
    set_seed(flags.seed)

    # ---- data, step plan (hub data: sized once loaded), DeepSpeed config
    task, tokenizer = spec.task, load_tokenizer(spec.model_path)
    data = load_task_data(spec.data.source(), tokenizer)
    train_ds, eval_ds = data.train, data.evaluate
    collate = GlueCollator(tokenizer, is_regression=task.is_regression)
    loaders = make_loaders(train_ds, eval_ds, collate, rank=rank,
                           world=world, settings=LoaderSettings(
                               seed=flags.seed, train_batch=flags.per_device_train_batch_size,
                               eval_batch=flags.per_device_eval_batch_size, num_workers=flags.dataloader_num_workers,
                               importance=spec.structured, pin_memory=torch.cuda.is_available()))
    spec = spec.with_train_rows(len(train_ds))
    plan, ds_config = spec.plan, spec.deepspeed.config
    if is_rank0 and spec.deepspeed.source is not None:
        warn_unknown_keys(spec.deepspeed.source, flags.deepspeed)
    if is_rank0:
        plan.log(prune)

    # ---- models, then pruning (before deepspeed.initialize, so score parameters reach the optimizer)
    student = load_student(spec.model_path, task.num_labels, task.label_names, spec.model.config_overrides,
                           question_answering=task.is_qa)
    teacher = load_teacher(spec.teacher_path, question_answering=task.is_qa) if spec.teacher_path else None
    if task.is_qa:  # the export answers with the run's windows and spans (data/answer.py)
        source = spec.data.source()
        remember_qa_settings(student.config, source.max_seq_length, source.doc_stride, source.qa)
    modules = spec.modules
    check_fic_width(teacher, student, modules)
    ce_weight, kd_weight = spec.loss_weights()
    pruning = install_pruning(student, spec.pruning, plan, spec.deepspeed.compression, source=flags.deepspeed,
                              is_rank0=is_rank0) if prune else None

    # ---- engine: AdamW over (weights, no-decay, scores); DeepSpeed's CPU Adam when the config offloads it
    optimizer, model_parameters = build_optimizer(
        optimizer_groups(student, flags.weight_decay, flags.mask_scores_learning_rate), ds_config,
        lr=flags.learning_rate, eps=flags.adam_epsilon)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, model_parameters=model_parameters,
                                      config=ds_config, lr_scheduler=lr_schedule(pruning, plan, spec.pruning,
                                                                                 flags.warmup_ratio))
    checkpointer = Checkpointer(flags.output_dir, engine, rank, keep=flags.save_total_limit, run_config=spec.identity)
    resume = checkpointer.load(pre.rundir.resume_tag) if pre.rundir.resume_tag is not None else None
    progress.resumed_at(resume["global_step"] if resume is not None else 0)

    # ---- CAP banks and teacher outputs (encode passes; a resumed run has them in its checkpoint)
    t_enc = time.perf_counter()
    shard = Shard(len(train_ds), rank, world)
    cap = spec.cap
    banks = make_banks(modules, len(train_ds), student.config.hidden_size, cap.bank_dtype, shard, cap.max_snapshots)
    hook = SentenceVectorHook(engine.module, spec.model.sentence_vector) if modules else None
    objective = CapObjective.from_settings(
        banks, torch.tensor(train_ds["labels"], dtype=torch.long) if task.kind == "classification" else None, cap,
        seed=flags.seed + rank) if modules else None
    encoder = Encoder(loaders.encode, len(train_ds), shard, engine.device, stop, show_progress and is_rank0, is_rank0)
    live = teacher is not None and cap.teacher_mode == "live" and kd_weight > 0
    restrict_encoded_rows(
        shard, loaders, reach=plan.total_steps * flags.gradient_accumulation_steps * flags.per_device_train_batch_size,
        resume=resume, encodes=not spec.structured and (bool(modules) or teacher is not None),
        extra_negatives=cap.extra_negatives if modules else 0, seed=flags.seed, max_steps=flags.max_steps)
    if stop.agreed(engine.device):  # a signal during setup: stop before the encode passes
        raise StopRequested
    taught = teacher_outputs(
        teacher, TeacherSettings(sentence_vector=spec.model.sentence_vector, live=live,
                                 cache_logits=kd_weight > 0 and not live, offload=cap.teacher_offload,
                                 micro_batch=flags.per_device_eval_batch_size, bf16=computes_in_bf16(ds_config)),
        resume=resume, encoder=encoder, banks=banks, eval_loader=loaders.evaluate, scorer=data.scorer)
    teacher = None  # a cached teacher is released here
    if resume is None:
        fill_prc(encoder, banks, engine.module, hook)
    encode_seconds = time.perf_counter() - t_enc

    # ---- trainer, built complete
    loss = TrainingLoss(task, ce_weight, kd_weight, cap.kd_temperature, shard, taught.logits, taught.live,
                        objective, hook, pruning.regularizer() if pruning is not None else None)
    log, scalars = RunLog(), ScalarLogger(engine, is_rank0)
    snapshots = Snapshots(encoder, banks["snc"], engine.module, hook, log) if "snc" in banks else None
    schedule = pruning_schedule(pruning, engine, plan, spec.pruning, loss=loss, importance_loader=loaders.importance,
                                snapshots=snapshots, context=PassContext(stop, show_progress and is_rank0, is_rank0))
    settings = LoopSettings(
        total_steps=plan.total_steps, num_epochs=plan.num_epochs, snapshot_steps=cap.snapshot_steps,
        snapshot_epochs=not spec.structured, snapshot_mode=cap.snapshot_mode, logging_steps=flags.logging_steps,
        eval_steps=flags.eval_steps, save_steps=flags.save_steps, log_sparsity=prune, show_progress=show_progress,
        max_nonfinite_steps=flags.max_nonfinite_steps, check_steps=flags.check_steps, is_rank0=is_rank0)
    diagnostics = [GradientDiagnostic(loss, engine.module, flags.grad_norm_steps, scalars, log)] \
        if flags.grad_norm_steps else []
    trainer = CapTrainer(
        engine=engine, scorer=data.scorer, loaders=loaders, settings=settings, loss=loss, log=log, scalars=scalars,
        parts=LoopParts(shard=shard, schedule=schedule, snapshots=snapshots, checkpointer=checkpointer, stop=stop,
                        callbacks=diagnostics, events=[progress], teacher_metrics=taught.metrics))
    if resume is not None:
        trainer.load_state_dict(resume)

    # ---- train
    pre.rundir.started()  # the run started cleanly: the earlier run it replaces in its folder is deleted now
    t0 = time.perf_counter()
    eval_metrics = trainer.train()
    runtime = time.perf_counter() - t0
    if trainer.preempted:
        if is_rank0:
            write_state(flags.output_dir, "preempted", trainer.global_step)
            logger.info("stopped on signal at step %d after writing a checkpoint", trainer.global_step)
        barrier()
        return {"status": "preempted", "steps": trainer.global_step, "exit_code": stop.exit_code}

    # ---- checks, results, export
    report = sparsity_report(engine.module) if prune else None
    if prune:
        schedule.check_reached(trainer.global_step, report["sparsity"])
    if not eval_metrics:
        raise TrainingFailed("the run ended without an evaluation (no optimizer step was taken)")
    result = run_results(spec, trainer, eval_metrics=eval_metrics,
                         timings={"train_runtime_s": runtime, "bank_encode_s": encode_seconds}, banks=banks,
                         eval_examples=data.eval_examples, optimizer=optimizer_name(engine), sparsity=report)
    predictions = predict_rows(engine.module, data, collate, flags.per_device_eval_batch_size, rank, world)
    if hook is not None:
        hook.remove()
    final = os.path.join(flags.output_dir, "final")
    card = model_card(spec, result, Path(final), command=[a for a in spec.command if not a.startswith("--local_rank")],
                      sparsity=report)
    export_pretrained(engine.module, tokenizer, final, sparsity_report=report, title=spec.title(),  # collective
                      card=card)
    if is_rank0:
        write_predictions(flags.output_dir, data, trainer.last_eval_logits, predictions)
        write_results(flags.output_dir, result, trainer.last_eval_logits, trainer.global_step)
        logger.info("final eval %s%s", eval_metrics, f", sparsity {result['sparsity']:.4f}" if prune else "")
    barrier()
    return result


def cli(argv: list[str] | None = None) -> int:
    """The command line: exit 0 when the run completed or stopped on SIGTERM/SIGUSR1 with a checkpoint, 130 on
    SIGINT, 2 for bad input (one line on stderr naming the flag, file or value), 1 for a fault (one line naming
    the cause: the path and OS error of an I/O failure, a diverged run, ...; train_state.json says failed once
    training started). With several ranks only the first to fail prints (cap_ds/run/faults.py). No traceback unless
    CAP_DS_TRACEBACK=1."""
    debug = os.environ.get("CAP_DS_TRACEBACK") == "1"
    try:
        result = main(argv)
        return int(result.get("exit_code", 0)) if result.get("status") == "preempted" else 0
    except StopRequested as stop:
        return int(getattr(stop, "exit_code", 0))
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("error: interrupted (a second Ctrl-C); no checkpoint written", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        failure = settle(err)  # computed in main() with the output folder when the error came from the run
        if failure.report:
            print(f"error: {failure.line}", file=sys.stderr)
        return failure.exit_code
    finally:
        destroy_world()


if __name__ == "__main__":
    sys.exit(cli())
