"""CAP pruning (or dense teacher fine-tuning) of a pre-trained encoder on a GLUE task, with DeepSpeed.

    deepspeed cap_ds/train.py --deepspeed ds_configs/zero2.json --mode finetune --output_dir out/teacher
    deepspeed cap_ds/train.py --deepspeed ds_configs/zero2.json --teacher_name_or_path out/teacher/final \
        --pruning_method movement --target_sparsity 0.9 --cap prc,snc,fic --output_dir out/cap

The recipe, top to bottom: args -> data -> models -> compression -> engine -> banks -> loop -> export.
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

import contextlib
import io
import logging
import math
import random
import resource
import socket
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger("cap_ds.train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """A plain ``python cap_ds/train.py`` is a world of one: skip DeepSpeed's MPI discovery."""
    if any(v in os.environ for v in ("RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return  # a launcher (deepspeed, torchrun, mpirun, srun --mpi=pmix) owns the world
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    # A port of its own, whatever MASTER_PORT says: single-process runs side by side (a sweep's --parallel, a
    # shell loop with one exported MASTER_PORT) must not collide on the rendezvous port.
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sparse_section(pargs, offset: int, offset_end: int) -> dict:
    """The compression_training section the pruning flags stand for."""
    return {"sparse_pruning": {
        "shared_parameters": {
            "enabled": True, "method": pargs.pruning_method, "schedule_offset": offset,
            "schedule_offset_end": offset_end, "mask_init": pargs.score_init,
            "mask_scale": pargs.mask_scale,
            "final_threshold": pargs.final_threshold, "final_lambda": pargs.final_lambda,
        },
        "different_groups": {"sp1": {"params": {"dense_ratio": round(1.0 - pargs.target_sparsity, 10)},
                                     "modules": [pargs.prune_modules]}},
    }}


class UserError(Exception):
    """Bad input found before training: printed as one line, exit code 2."""


@dataclass
class Preflight:
    """What the checks before any process group or weights found out."""

    model_path: str
    run_config: dict
    rundir: object  # rundir.RunDirPlan
    plan: object | None  # plan.StepPlan (None: training rows unknown until the hub data is loaded)
    num_train: int | None
    ds_source: object  # the loaded --deepspeed JSON (None: the built-in ZeRO-2)


def launcher_world_size() -> int:
    """The world size a launcher announced in the environment (1 when it will be discovered later)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def preflight(margs, dargs, rargs, pargs, cargs) -> Preflight:
    """Checks that need files (data, configs, tokenizers, the output folder, checkpoints) but no model weights or
    processes, so a bad run fails in seconds with one line naming the problem, before any distributed setup."""
    from transformers import AutoConfig

    from cap_ds.compression.config import load_ds_config
    from cap_ds.data import count_local_rows, get_task
    from cap_ds.models import (
        check_model_folder,
        check_teacher,
        check_tokenizers,
        default_model_path,
        load_tokenizer,
        max_positions,
        parse_config_overrides,
    )
    from cap_ds.plan import plan_steps
    from cap_ds.rundir import plan_output_dir, run_config

    task = get_task(dargs.task_name)
    num_train = None
    if dargs.data_dir is not None:
        num_train = count_local_rows(task, "train", dargs.data_dir, dargs.max_train_samples)
        count_local_rows(task, "validation", dargs.data_dir, dargs.max_eval_samples)
    model_path = margs.model_name_or_path or default_model_path()
    check_model_folder(model_path, "--model_name_or_path")
    s_cfg = AutoConfig.from_pretrained(model_path)
    overrides = parse_config_overrides(margs.config_overrides)
    limit = max_positions(s_cfg) if "max_position_embeddings" not in overrides else overrides["max_position_embeddings"]
    if limit is not None and dargs.max_seq_length > limit:
        raise UserError(f"--max_seq_length {dargs.max_seq_length} is longer than the {limit} positions of "
                        f"{model_path} (max_position_embeddings); use at most {limit}")
    if rargs.mode == "prune" and margs.teacher_name_or_path:
        teacher = margs.teacher_name_or_path
        check_model_folder(teacher, "--teacher_name_or_path", ("config",))
        check_teacher(AutoConfig.from_pretrained(teacher), task.num_labels, task.label_names, teacher)
        check_model_folder(teacher, "--teacher_name_or_path", ("tokenizer",))
        check_tokenizers(load_tokenizer(model_path), load_tokenizer(teacher), model_path, teacher)
        check_model_folder(teacher, "--teacher_name_or_path", ("weights",))
    ds_source = load_ds_config(rargs.deepspeed) if rargs.deepspeed is not None else None
    if isinstance(ds_source, dict) and (ds_source.get("checkpoint") or {}).get("load_universal"):
        raise UserError(f"--deepspeed {rargs.deepspeed}: checkpoint.load_universal is not supported (DeepSpeed loads "
                        "universal checkpoints with weights_only=False); remove it")
    plan = None
    if num_train is not None:
        compression = (ds_source or {}).get("compression_training")
        plan = plan_steps(num_train, launcher_world_size(), rargs, pargs, prune=rargs.mode == "prune",
                          compression=compression, source=str(rargs.deepspeed))
    config = run_config((margs, dargs, rargs, pargs, cargs), ds_source, model_path)
    rundir = plan_output_dir(rargs.output_dir, rargs.resume, rargs.overwrite_output_dir, config)
    return Preflight(model_path, config, rundir, plan, num_train, ds_source)


def bank_pool(train_sampler, shard, reach: int, extra_negatives: int, world: int, seed: int) -> torch.Tensor | None:
    """Rows a run shorter than an epoch needs in its banks: the ``reach`` examples its steps draw (the sampler's
    first epoch) plus ``extra_negatives // world`` more of this rank's rows to draw extra negatives from. None:
    the run reaches every row (encode them all)."""
    if reach >= len(train_sampler):
        return None
    order = train_sampler.order()[:reach]
    rest = shard.indices[~torch.isin(shard.indices, order)]
    g = torch.Generator().manual_seed(seed + 7919 * shard.rank)
    extra = rest[torch.randperm(len(rest), generator=g)[: extra_negatives // world]]
    pool = torch.unique(torch.cat([order, extra]))
    return None if len(pool) >= shard.size else pool


def check_reached_target(trainer, scheduler, comp_cfg, pargs, structured: bool, report) -> None:
    """A pruning run that ends short of its schedule (skipped steps, a non-finite model) is a failed run."""
    from cap_ds.trainer import TrainingFailed

    if structured:
        done, total = trainer.stage_done + 1, len(trainer.s.structured_stages)
        if done < total:
            raise TrainingFailed(f"CAP-f applied {done} of its {total} pruning stages; the run did not reach "
                                 f"--target_sparsity {pargs.target_sparsity}")
        return
    if scheduler is None or comp_cfg is None:
        return
    for tech in comp_cfg.techniques():
        if tech.enabled and tech.canonical_method != "first_order" and scheduler.training_steps < tech.offset_end:
            raise TrainingFailed(
                f"the pruning schedule did not reach its target: {tech.key} ends at step {tech.offset_end} but "
                f"only {scheduler.training_steps} of the run's {trainer.global_step} steps were applied (DeepSpeed "
                f"skipped the others); measured sparsity {report['sparsity']:.4f}")
    sparse = comp_cfg.sparse_pruning
    if sparse.enabled and sparse.canonical_method in ("magnitude", "movement") and sparse.groups:
        target = 1.0 - max(g.dense_ratio for g in sparse.groups)
        if report["sparsity"] < target - 0.01:
            raise TrainingFailed(f"measured sparsity {report['sparsity']:.4f} is below the schedule's target "
                                 f"{target:.4f} at its end: the masks are not what the method asks for (a "
                                 "non-finite model?)")


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Expected noise: ZeRO-3 calls torch.distributed functions torch has deprecated (one warning per call site).
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would warn "Setting accelerator to CPU" on every import
    from cap_ds.args import parse_args

    margs, dargs, rargs, pargs, cargs = parse_args(argv)
    # Stop signals (SIGTERM, SIGUSR1, SIGINT) from here on: remembered during setup, acted on at the next
    # optimizer step or batch of an encode pass (cap_ds/signals.py).
    from cap_ds.signals import StopSignals

    stop = StopSignals().install()
    for signum in _EARLY_SIGNALS:
        stop.request(signum)
    try:
        pre = preflight(margs, dargs, rargs, pargs, cargs)
    except (ValueError, FileNotFoundError, OSError) as err:  # every check above is about the input
        raise UserError(str(err)) from err
    _single_process_env()

    import deepspeed
    import transformers

    # ---- distributed world (DeepSpeed picks gloo on CPU, nccl on GPUs). Under mpirun / srun --mpi=pmix it
    # discovers ranks with mpi4py and sets MASTER_PORT to `distributed_port`: pass ours, not its 29500.
    with contextlib.redirect_stdout(io.StringIO()) as out:  # DeepSpeed prints "... shm_comm_op built successfully"
        deepspeed.init_distributed(distributed_port=int(os.environ.get("MASTER_PORT", "29500")))
    for line in out.getvalue().splitlines():
        if "built successfully" not in line:
            print(line)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    is_rank0 = rank == 0
    logging.basicConfig(level=logging.INFO if is_rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning() if is_rank0 else transformers.logging.set_verbosity_error()
    show_progress = not rargs.disable_tqdm and sys.stderr.isatty()
    if not show_progress:  # bars become escape-code noise in a redirected log; PassReport lines remain
        import datasets

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    rundir = pre.rundir
    if is_rank0:
        for note in rundir.notes:
            logger.warning(note)
        for tag, problem in rundir.skipped:
            logger.warning("checkpoint %s skipped: %s", tag, problem)
        rundir.apply()
        os.makedirs(rargs.output_dir, exist_ok=True)
    torch.distributed.barrier()
    state = {"training": False}
    try:
        return _run(margs, dargs, rargs, pargs, cargs, pre, stop, world, rank, state, show_progress)
    except BaseException as err:
        from cap_ds.export import write_json_atomic
        from cap_ds.signals import StopRequested

        if isinstance(err, StopRequested):  # a signal before training: no checkpoint, the passes are redone
            if is_rank0:
                write_json_atomic(os.path.join(rargs.output_dir, "train_state.json"),
                                  {"status": "preempted", "step": state.get("step", 0)})
                logger.info("stopped on signal before training (no new checkpoint)")
            err.exit_code = stop.exit_code
            raise
        if is_rank0:
            if state["training"] or rundir.resume_tag is not None:
                write_json_atomic(os.path.join(rargs.output_dir, "train_state.json"),
                                  {"status": "failed", "step": state.get("step", 0),
                                   "error": f"{type(err).__name__}: {str(err)[:500]}"})
            else:
                rundir.remove_new_files()  # nothing trained: leave no run behind
        raise


def _run(margs, dargs, rargs, pargs, cargs, pre, stop, world, rank, state, show_progress) -> dict:
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import get_linear_schedule_with_warmup

    from cap_ds.cap import CapObjective, MemoryBank, Shard, ShardSampler
    from cap_ds.checkpoint import Checkpointer
    from cap_ds.compression import (
        CompressionScheduler,
        FirstOrderPruner,
        first_order_section,
        init_compression,
        parse_compression_config,
        sparsity_report,
    )
    from cap_ds.config import build_ds_config, warn_unknown_keys
    from cap_ds.data import GlueCollator, get_task, load_glue_split, tokenize_dataset
    from cap_ds.export import export_pretrained, write_json_atomic
    from cap_ds.models import SentenceVectorHook, load_student, load_teacher, load_tokenizer
    from cap_ds.optim import build_optimizer, optimizer_groups, optimizer_name
    from cap_ds.plan import plan_steps
    from cap_ds.signals import StopRequested
    from cap_ds.teachers import teacher_engine
    from cap_ds.trainer import CapTrainer, LoopSettings, TrainingFailed

    is_rank0 = rank == 0
    set_seed(rargs.seed)

    # ---- data
    task = get_task(dargs.task_name)
    model_path = pre.model_path
    tokenizer = load_tokenizer(model_path)
    train_ds = tokenize_dataset(load_glue_split(task, "train", dargs.data_dir, dargs.max_train_samples), task,
                                tokenizer, dargs.max_seq_length)
    eval_ds = tokenize_dataset(load_glue_split(task, "validation", dargs.data_dir, dargs.max_eval_samples), task,
                               tokenizer, dargs.max_seq_length)
    collate = GlueCollator(tokenizer, is_regression=task.is_regression)
    # Rank r trains on and encodes the examples it owns (idx % world == r): bank rows stay local (cap/shards.py).
    train_sampler = ShardSampler(len(train_ds), rank, world, shuffle=True, seed=rargs.seed)
    # Own generators: creating a loader iterator must not draw from the global RNG (dropout), or a resumed
    # run would diverge from an uninterrupted one.
    loader_kw = {"collate_fn": collate, "num_workers": rargs.dataloader_num_workers}
    train_loader = DataLoader(train_ds, batch_size=rargs.per_device_train_batch_size, sampler=train_sampler,
                              generator=torch.Generator().manual_seed(rargs.seed), **loader_kw)
    encode_sampler = ShardSampler(len(train_ds), rank, world, shuffle=False, pad=False)
    encode_loader = DataLoader(train_ds, batch_size=rargs.per_device_eval_batch_size, sampler=encode_sampler,
                               generator=torch.Generator().manual_seed(rargs.seed), **loader_kw)
    eval_loader = DataLoader(eval_ds, batch_size=rargs.per_device_eval_batch_size,
                             sampler=DistributedSampler(eval_ds, num_replicas=world, rank=rank, shuffle=False),
                             generator=torch.Generator().manual_seed(rargs.seed), **loader_kw)
    labels_tensor = None if task.is_regression else torch.tensor(train_ds["labels"], dtype=torch.long)

    prune = rargs.mode == "prune"
    structured = prune and pargs.pruning_method == "first_order"
    ds_config, compression = build_ds_config(
        rargs.deepspeed, micro_batch=rargs.per_device_train_batch_size, grad_accum=rargs.gradient_accumulation_steps,
        world_size=world, max_grad_norm=rargs.max_grad_norm, output_dir=rargs.output_dir,
        learning_rate=rargs.learning_rate, adam_epsilon=rargs.adam_epsilon, weight_decay=rargs.weight_decay)
    if is_rank0 and pre.ds_source is not None:
        warn_unknown_keys(pre.ds_source, rargs.deepspeed)
    plan = plan_steps(len(train_ds), world, rargs, pargs, prune=prune, compression=compression,
                      source=str(rargs.deepspeed))
    total_steps, num_epochs, warmup, stages = plan.total_steps, plan.num_epochs, plan.warmup, plan.stages
    spe = plan.steps_per_epoch
    if is_rank0:
        logger.info("plan: %s", plan.describe(prune))
        for note in plan.notes:
            logger.warning(note)

    # ---- models
    student = load_student(model_path, task.num_labels, task.label_names, margs.config_overrides)
    teacher = None
    if prune and margs.teacher_name_or_path:
        teacher = load_teacher(margs.teacher_name_or_path)  # labels and tokenizer checked in preflight()
    modules = cargs.modules if prune else []
    if "fic" in modules and teacher.config.hidden_size != student.config.hidden_size:
        raise UserError(f"--cap fic: teacher hidden size {teacher.config.hidden_size} differs from the student's "
                        f"{student.config.hidden_size}; FiC compares their sentence vectors")
    kd_weight = cargs.kd_weight if teacher is not None else 0.0
    ce_weight = cargs.ce_weight if cargs.ce_weight is not None else (0.1 if kd_weight > 0 else 1.0)

    # ---- compression (before deepspeed.initialize, so score parameters reach the optimizer)
    if rargs.grad_norm_steps and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise UserError(f"--grad_norm_steps needs whole parameters on rank 0; {rargs.deepspeed} uses ZeRO stage 3 "
                        "(use a stage 0-2 config for the diagnostic run)")
    scheduler = None
    comp_cfg = None
    if structured:
        compression = compression if compression and any(
            compression.get(k, {}).get("shared_parameters", {}).get("method") == "first_order"
            for k in ("head_pruning", "row_pruning")) else first_order_section(student.config.num_attention_heads)
        comp_cfg = parse_compression_config({"compression_training": compression})
        init_compression(student, comp_cfg)
        for p in student.base_model.embeddings.parameters():
            p.requires_grad_(False)
    elif prune:
        comp_cfg = parse_compression_config({"compression_training": compression}) if compression else None
        if comp_cfg is None or not comp_cfg.enabled:
            compression = sparse_section(pargs, plan.offset, plan.offset_end)
            comp_cfg = parse_compression_config({"compression_training": compression})
        elif is_rank0:
            logger.info("using the compression_training section of %s (pruning flags ignored)", rargs.deepspeed)
        init_compression(student, comp_cfg)
        scheduler = CompressionScheduler(student, comp_cfg)
        for p in student.base_model.embeddings.parameters():
            p.requires_grad_(False)  # reference: embeddings stay frozen (and dense) while pruning

    # ---- engine: AdamW over (weights, no-decay, scores); DeepSpeed's CPU Adam when the config offloads it
    optimizer, model_parameters = build_optimizer(
        optimizer_groups(student, rargs.weight_decay, rargs.mask_scores_learning_rate), ds_config,
        lr=rargs.learning_rate, eps=rargs.adam_epsilon)
    if structured:  # reference CAP-f: each stage retrains with a fresh warm-up + linear decay
        stage_steps = pargs.epochs_per_stage * spe
        make_lr = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, staged_linear(stage_steps, rargs.warmup_ratio))  # noqa: E731
    else:
        make_lr = lambda opt: get_linear_schedule_with_warmup(opt, warmup, total_steps)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, model_parameters=model_parameters,
                                           config=ds_config, lr_scheduler=make_lr)
    pruner = FirstOrderPruner(engine.module, comp_cfg) if structured else None

    # ---- resume point (DeepSpeed checkpoint + CAP state)
    checkpointer = Checkpointer(rargs.output_dir, engine, rank, keep=rargs.save_total_limit,
                                run_config=pre.run_config)
    resume_tag = pre.rundir.resume_tag
    settings = LoopSettings(total_steps=total_steps, num_epochs=num_epochs, ce_weight=ce_weight,
                            kd_weight=kd_weight, kd_temperature=cargs.kd_temperature,
                            snapshot_steps=cargs.snapshot_steps, snapshot_mode=cargs.snapshot_mode,
                            logging_steps=rargs.logging_steps, eval_steps=rargs.eval_steps,
                            save_steps=rargs.save_steps, structured_stages=stages,
                            epochs_per_stage=pargs.epochs_per_stage, importance_batches=pargs.importance_batches,
                            log_sparsity=prune, show_progress=show_progress,
                            grad_norm_steps=rargs.grad_norm_steps, max_nonfinite_steps=rargs.max_nonfinite_steps)
    trainer = CapTrainer(engine=engine, task=task, train_loader=train_loader, eval_loader=eval_loader,
                         encode_loader=encode_loader, num_train=len(train_ds), settings=settings,
                         scheduler=scheduler, is_rank0=is_rank0, checkpointer=checkpointer, pruner=pruner,
                         importance_loader=DataLoader(train_ds, batch_size=rargs.per_device_train_batch_size,
                                                      sampler=ShardSampler(len(train_ds), rank, world, shuffle=False),
                                                      generator=torch.Generator().manual_seed(rargs.seed),
                                                      **loader_kw) if structured else None, stop=stop)
    hook = SentenceVectorHook(engine.module, margs.sentence_vector) if modules else None
    trainer.hook = hook

    # ---- banks (teacher encode pass: FiC vectors + cached logits; student before any update: PrC)
    bank_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cargs.bank_dtype]
    dim = student.config.hidden_size
    shard = Shard(len(train_ds), rank, world)
    banks = {name: MemoryBank(name, len(train_ds), dim, bank_dtype, shard=shard,
                              max_columns=cargs.max_snapshots if name == "snc" else None) for name in modules}
    if modules:
        trainer.objective = CapObjective(
            banks, labels_tensor, temperature=cargs.contrastive_temperature,
            extra_negatives=cargs.extra_negatives, unsup_weight=cargs.cap_unsup_weight,
            sup_weight=cargs.cap_sup_weight, reduction=cargs.cap_reduction, seed=rargs.seed + rank)
    need_live = teacher is not None and cargs.teacher_mode == "live" and kd_weight > 0
    # A run shorter than an epoch encodes only the rows its steps reach (+ a pool for extra negatives).
    reach = total_steps * rargs.gradient_accumulation_steps * rargs.per_device_train_batch_size
    t_enc = time.perf_counter()
    if resume_tag is not None:
        trainer.load_state_dict(checkpointer.load(resume_tag))
        state["step"] = trainer.global_step
        shard.restrict(trainer.encode_pool)
        if shard.pool is not None and not bool(torch.isin(train_sampler.order()[:reach], shard.pool).all()):
            raise UserError(f"--max_steps {rargs.max_steps}: the checkpoint's banks hold only the {len(shard.pool)} "
                            "rows per rank its shorter run reaches; resume with the --max_steps it was started with, "
                            "or start a new run (--overwrite_output_dir)")
        if is_rank0:
            logger.info("resumed from %s at step %d", resume_tag, trainer.global_step)
    elif not structured and (modules or teacher is not None):
        pool = bank_pool(train_sampler, shard, reach, cargs.extra_negatives if modules else 0, world,
                         rargs.seed)
        shard.restrict(pool)
        trainer.encode_pool = shard.pool
        if pool is not None and is_rank0:
            logger.info("this %d-step run reaches %d of the %d training rows per rank: the encode passes cover "
                        "those and %d more for extra negatives (%d rows; a run of an epoch or more encodes all)",
                        total_steps, min(reach, len(train_sampler)), shard.size, len(pool) - min(reach, len(pool)),
                        len(pool))
    encode_sampler.restrict(shard.pool)
    if stop.agreed(engine.device):  # a signal during setup: stop before the encode passes
        raise StopRequested
    if teacher is not None and (resume_tag is None or need_live):
        bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
        teacher = teacher_engine(teacher, cargs.teacher_offload, rargs.per_device_eval_batch_size, bf16)
    if teacher is not None and resume_tag is None:
        trainer.teacher_metrics = trainer.evaluate(teacher)
        if "fic" in modules:
            t_hook = SentenceVectorHook(teacher.module, margs.sentence_vector)
            out = trainer.encode_vectors(teacher, t_hook, train_mode=False, with_logits=True, desc="FiC bank")
            banks["fic"].add_column(out["vectors"])
            t_hook.remove()
            trainer.teacher_logits = out["logits"]
        elif kd_weight > 0 and not need_live:
            trainer.teacher_logits = encode_teacher_logits(trainer, teacher)["logits"]
    if need_live:
        trainer.live_teacher = teacher
    teacher = None  # a cached teacher is released here
    if "prc" in modules and resume_tag is None:
        banks["prc"].add_column(trainer.encode_vectors(engine.module, hook, train_mode=False, desc="PrC bank")["vectors"])
    encode_seconds = time.perf_counter() - t_enc
    trainer.restore_rng()  # last: everything above may have drawn random numbers

    # ---- loop
    state["training"] = True
    t0 = time.perf_counter()
    try:
        eval_metrics = trainer.train()
    finally:
        state["step"] = trainer.global_step
    runtime = time.perf_counter() - t0
    if trainer.preempted:
        if is_rank0:
            write_json_atomic(os.path.join(rargs.output_dir, "train_state.json"),
                              {"status": "preempted", "step": trainer.global_step})
            logger.info("stopped on signal at step %d after writing a checkpoint", trainer.global_step)
        torch.distributed.barrier()
        return {"status": "preempted", "steps": trainer.global_step, "exit_code": stop.exit_code}

    # ---- checks, then export
    report = sparsity_report(engine.module) if prune else None
    if prune:
        check_reached_target(trainer, scheduler, comp_cfg, pargs, structured, report)
    if not eval_metrics:
        raise TrainingFailed("the run ended without an evaluation (no optimizer step was taken)")
    result = {
        "task": task.name, "mode": rargs.mode, "eval": eval_metrics, "primary_metric": task.primary_metric,
        "steps": trainer.global_step, "epochs": num_epochs, "eval_examples": len(eval_ds), "train_runtime_s": runtime,
        "train_time_s": trainer.train_time, "train_examples": trainer.examples_seen,
        "bank_encode_s": encode_seconds, "snapshot_s": trainer.snapshot_time, "world_size": world,
        **trainer.step_timer.metrics(),  # issue 15: step_time_s = steady-state median, train_examples_per_second
        "bank_bytes_per_rank": sum(b.memory_bytes() for b in banks.values()),
        "bank_rows_per_rank": len(shard.encoded) if banks else 0, "optimizer": optimizer_name(engine),
        **peak_memory(trainer.device),
        "model_name_or_path": model_path, "teacher_name_or_path": margs.teacher_name_or_path,
        "teacher_eval": trainer.teacher_metrics, "cap_modules": modules, "ce_weight": ce_weight, "kd_weight": kd_weight,
    }
    if settings.grad_history:
        result["grad_diagnostics"] = settings.grad_history
    if prune:
        result.update({"pruning_method": pargs.pruning_method, "target_sparsity": pargs.target_sparsity,
                       "sparsity": report["sparsity"], "sparsity_per_module": report["per_module"],
                       "snapshots": banks["snc"].num_columns if "snc" in banks else 0})
    if structured:
        rep = pruner.report()
        result.update({"sparsity": trainer.structured_sparsity(), "masked_weight_sparsity": report["sparsity"],
                       "heads_kept": rep.get("heads_kept"), "heads_total": rep.get("heads_total"),
                       "neurons_kept": rep.get("neurons_kept"), "neurons_total": rep.get("neurons_total"),
                       "kept_per_layer": {k: rep[k] for k in ("heads", "neurons") if k in rep},
                       "stages": trainer.stage_reports})
    if hook is not None:
        hook.remove()
    title = f"{task.name} {pargs.pruning_method}" + (f" + {'/'.join(modules)}" if modules else "")
    export_pretrained(engine.module, tokenizer, os.path.join(rargs.output_dir, "final"),  # collective
                      sparsity_report=report, title=title)
    if is_rank0:
        if trainer.last_eval_logits is not None:
            np.save(os.path.join(rargs.output_dir, "eval_logits.npy"), trainer.last_eval_logits)
        write_json_atomic(os.path.join(rargs.output_dir, "metrics.json"), result)
        write_json_atomic(os.path.join(rargs.output_dir, "train_state.json"),
                          {"status": "completed", "step": trainer.global_step})
        logger.info("final eval %s%s", eval_metrics, f", sparsity {result['sparsity']:.4f}" if prune else "")
    torch.distributed.barrier()
    return result


def peak_memory(device: torch.device) -> dict:
    """Peak host RSS of every rank (and peak CUDA allocation on GPUs), gathered to every rank (collective)."""
    from cap_ds.cap.distributed import all_gather_cat

    local = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    if device.type == "cuda":
        local.append(torch.cuda.max_memory_allocated(device) / 2**20)
    per_rank = all_gather_cat(torch.tensor([local], dtype=torch.float64, device=device)).cpu().tolist()
    out = {"peak_rss_mb": per_rank[0][0], "peak_rss_mb_per_rank": [r[0] for r in per_rank]}
    if device.type == "cuda":
        out["peak_gpu_mb_per_rank"] = [r[1] for r in per_rank]
        out["gpu_name"] = torch.cuda.get_device_name(device)
    return out


def staged_linear(stage_steps: int, warmup_ratio: float):
    """LR multiplier: warm-up then linear decay to 0, restarted at every CAP-f stage."""
    warm = max(1, math.ceil(warmup_ratio * stage_steps))

    def factor(step: int) -> float:
        i = step % stage_steps
        return i / warm if i < warm else max(0.0, (stage_steps - i) / max(1, stage_steps - warm))

    return factor


def encode_teacher_logits(trainer, teacher) -> dict:
    """Teacher logits for this rank's training examples (KD without FiC): one forward pass, cached."""
    from cap_ds.cap import encode_dataset
    from cap_ds.trainer import model_inputs, to_device

    def run(batch):
        batch = to_device(batch, trainer.device)
        return {"logits": teacher(**model_inputs(batch)).logits.float()}

    return encode_dataset(run, trainer.encode_loader, trainer.num_train, desc="teacher logits",
                          show_progress=trainer.s.show_progress and trainer.is_rank0, shard=trainer.shard,
                          check=trainer.stop.pass_check(len(trainer.encode_loader), trainer.device),
                          report=trainer.is_rank0)


def cli(argv: list[str] | None = None) -> int:
    """The command line: exit 0 when the run completed or stopped on SIGTERM/SIGUSR1 with a checkpoint, 130 on
    SIGINT, 2 for bad input (one line on stderr naming the flag, file or value; no traceback), 1 when training
    failed (one line; train_state.json says failed). CAP_DS_TRACEBACK=1 shows tracebacks for all of them."""
    from cap_ds.args import ArgumentError
    from cap_ds.checkpoint import CheckpointError
    from cap_ds.compression.config import CompressionConfigError
    from cap_ds.config import DeepSpeedConfigError
    from cap_ds.plan import PlanError
    from cap_ds.rundir import RunDirError
    from cap_ds.signals import StopRequested
    from cap_ds.trainer import TrainingFailed

    user_errors = (UserError, ArgumentError, CheckpointError, RunDirError, PlanError, DeepSpeedConfigError,
                   CompressionConfigError)
    speak = os.environ.get("RANK", "0") == "0"  # every rank fails alike: one message
    debug = os.environ.get("CAP_DS_TRACEBACK") == "1"
    try:
        result = main(argv)
        return int(result.get("exit_code", 0)) if result.get("status") == "preempted" else 0
    except user_errors as err:
        if debug:
            raise
        if speak:
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except TrainingFailed as err:
        if debug:
            raise
        if speak:
            print(f"error: training failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except StopRequested as stop:
        return int(getattr(stop, "exit_code", 0))
    except KeyboardInterrupt:
        if speak:
            print("error: interrupted (a second Ctrl-C); no checkpoint written", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
