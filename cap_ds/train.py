"""CAP pruning (or dense teacher fine-tuning) of a pre-trained encoder on a GLUE task, with DeepSpeed.

    deepspeed cap_ds/train.py --deepspeed ds_configs/zero2.json --mode finetune --output_dir out/teacher
    deepspeed cap_ds/train.py --deepspeed ds_configs/zero2.json --teacher_name_or_path out/teacher/final \
        --pruning_method movement --target_sparsity 0.9 --cap prc,snc,fic --output_dir out/cap

The recipe, top to bottom: args -> data -> models -> compression -> engine -> banks -> loop -> export.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script (the DeepSpeed launcher does): import the package, not sibling files as top-level modules.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import logging
import math
import random
import resource
import signal
import socket
import time

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
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def optimizer_groups(model: torch.nn.Module, weight_decay: float, score_lr: float) -> list[dict]:
    """Scores get their own LR and no decay; biases and LayerNorm get no decay (HF convention)."""
    from cap_ds.compression import is_score_parameter

    scores, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_score_parameter(name):
            scores.append(p)
        elif name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if scores:
        groups.append({"params": scores, "weight_decay": 0.0, "lr": score_lr})
    return [g for g in groups if g["params"]]


def sparse_section(pargs, offset: int, offset_end: int) -> dict:
    """The compression_training section the pruning flags stand for."""
    return {"sparse_pruning": {
        "shared_parameters": {
            "enabled": True, "method": pargs.pruning_method, "schedule_offset": offset,
            "schedule_offset_end": offset_end, "mask_init": pargs.score_init, "mask_scale": pargs.mask_scale,
            "final_threshold": pargs.final_threshold, "final_lambda": pargs.final_lambda,
        },
        "different_groups": {"sp1": {"params": {"dense_ratio": round(1.0 - pargs.target_sparsity, 10)},
                                     "modules": [pargs.prune_modules]}},
    }}


def preflight(margs, dargs, rargs, pargs, cargs) -> None:
    """Checks that need files (data, teacher config, tokenizers) but no model weights or processes, so a bad
    run fails in seconds with a message naming the problem, before any distributed setup or training."""
    from transformers import AutoConfig

    from cap_ds.data import get_task, resolve_local_file
    from cap_ds.models import check_teacher, check_tokenizers, default_model_path, load_tokenizer

    task = get_task(dargs.task_name)
    if dargs.data_dir is not None:
        for split in ("train", "validation"):
            resolve_local_file(task, split, dargs.data_dir)
    model_path = margs.model_name_or_path or default_model_path()
    if rargs.mode == "prune" and margs.teacher_name_or_path:
        t_cfg = AutoConfig.from_pretrained(margs.teacher_name_or_path)
        check_teacher(t_cfg, task.num_labels, task.label_names, margs.teacher_name_or_path)
        check_tokenizers(load_tokenizer(model_path), load_tokenizer(margs.teacher_name_or_path), model_path,
                         margs.teacher_name_or_path)


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cap_ds.args import parse_args

    margs, dargs, rargs, pargs, cargs = parse_args(argv)
    # Preemption signals that arrive during setup (model loads, encode passes) are remembered, not fatal.
    early_stop = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: early_stop.append(True))
    preflight(margs, dargs, rargs, pargs, cargs)
    _single_process_env()

    import deepspeed
    import transformers
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
        warmup_offsets,
    )
    from cap_ds.config import build_ds_config
    from cap_ds.data import GlueCollator, get_task, load_glue_split, tokenize_dataset
    from cap_ds.export import export_pretrained, write_json_atomic
    from cap_ds.models import (
        SentenceVectorHook,
        default_model_path,
        load_student,
        load_teacher,
        load_tokenizer,
    )
    from cap_ds.teachers import teacher_engine
    from cap_ds.trainer import CapTrainer, LoopSettings, steps_per_epoch

    # ---- distributed world (DeepSpeed picks gloo on CPU, nccl on GPUs). Under mpirun / srun --mpi=pmix it
    # discovers ranks with mpi4py and sets MASTER_PORT to `distributed_port`: pass ours, not its 29500.
    deepspeed.init_distributed(distributed_port=int(os.environ.get("MASTER_PORT", "29500")))
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    is_rank0 = rank == 0
    logging.basicConfig(level=logging.INFO if is_rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_rank0:
        transformers.logging.set_verbosity_error()
    set_seed(rargs.seed)
    os.makedirs(rargs.output_dir, exist_ok=True)

    # ---- data
    task = get_task(dargs.task_name)
    model_path = margs.model_name_or_path or default_model_path()
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
    encode_loader = DataLoader(train_ds, batch_size=rargs.per_device_eval_batch_size,
                               sampler=ShardSampler(len(train_ds), rank, world, shuffle=False, pad=False),
                               generator=torch.Generator().manual_seed(rargs.seed), **loader_kw)
    eval_loader = DataLoader(eval_ds, batch_size=rargs.per_device_eval_batch_size,
                             sampler=DistributedSampler(eval_ds, num_replicas=world, rank=rank, shuffle=False),
                             generator=torch.Generator().manual_seed(rargs.seed), **loader_kw)
    labels_tensor = None if task.is_regression else torch.tensor(train_ds["labels"], dtype=torch.long)

    spe = steps_per_epoch(len(train_loader), rargs.gradient_accumulation_steps)
    structured = rargs.mode == "prune" and pargs.pruning_method == "first_order"
    stages = structured_stages(pargs.target_sparsity, pargs.structured_step) if structured else []
    if structured:  # CAP-f: the schedule is the stages, each followed by --epochs_per_stage of retraining
        num_epochs = len(stages) * pargs.epochs_per_stage
        total_steps = num_epochs * spe if rargs.max_steps <= 0 else min(rargs.max_steps, num_epochs * spe)
    else:
        total_steps = rargs.max_steps if rargs.max_steps > 0 else math.ceil(rargs.num_train_epochs * spe)
        num_epochs = math.ceil(total_steps / spe)
    warmup = rargs.warmup_steps or math.ceil(rargs.warmup_ratio * total_steps)

    # ---- models
    prune = rargs.mode == "prune"
    student = load_student(model_path, task.num_labels, task.label_names, margs.config_overrides)
    teacher = None
    if prune and margs.teacher_name_or_path:
        teacher = load_teacher(margs.teacher_name_or_path)  # labels and tokenizer checked in preflight()
    modules = cargs.modules if prune else []
    if "fic" in modules and teacher.config.hidden_size != student.config.hidden_size:
        raise ValueError(f"--cap fic: teacher hidden size {teacher.config.hidden_size} differs from the student's "
                         f"{student.config.hidden_size}; FiC compares their sentence vectors")
    kd_weight = cargs.kd_weight if teacher is not None else 0.0
    ce_weight = cargs.ce_weight if cargs.ce_weight is not None else (0.1 if kd_weight > 0 else 1.0)

    # ---- compression (before deepspeed.initialize, so score parameters reach the optimizer)
    ds_config, compression = build_ds_config(
        rargs.deepspeed, micro_batch=rargs.per_device_train_batch_size, grad_accum=rargs.gradient_accumulation_steps,
        world_size=world, max_grad_norm=rargs.max_grad_norm, output_dir=rargs.output_dir)
    if rargs.grad_norm_steps and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ValueError(f"--grad_norm_steps needs whole parameters on rank 0; {rargs.deepspeed} uses ZeRO stage 3 "
                         "(use a stage 0-2 config for the diagnostic run)")
    scheduler = None
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
            offset, offset_end = warmup_offsets(total_steps, warmup, pargs.initial_warmup, pargs.final_warmup)
            compression = sparse_section(pargs, offset, offset_end)
            comp_cfg = parse_compression_config({"compression_training": compression})
        elif is_rank0:
            logger.info("using the compression_training section of %s (pruning flags ignored)", rargs.deepspeed)
        init_compression(student, comp_cfg)
        scheduler = CompressionScheduler(student, comp_cfg)
        for p in student.base_model.embeddings.parameters():
            p.requires_grad_(False)  # reference: embeddings stay frozen (and dense) while pruning

    # ---- engine
    optimizer = torch.optim.AdamW(optimizer_groups(student, rargs.weight_decay, rargs.mask_scores_learning_rate),
                                  lr=rargs.learning_rate, eps=rargs.adam_epsilon)
    if structured:  # reference CAP-f: each stage retrains with a fresh warm-up + linear decay
        stage_steps = pargs.epochs_per_stage * spe
        make_lr = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, staged_linear(stage_steps, rargs.warmup_ratio))  # noqa: E731
    else:
        make_lr = lambda opt: get_linear_schedule_with_warmup(opt, warmup, total_steps)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config, lr_scheduler=make_lr)
    pruner = FirstOrderPruner(engine.module, comp_cfg) if structured else None

    # ---- resume point (DeepSpeed checkpoint + CAP state)
    checkpointer = Checkpointer(rargs.output_dir, engine, rank, keep=rargs.save_total_limit)
    resume_tag = None
    if rargs.resume == "auto":
        resume_tag = checkpointer.latest_tag()
    elif rargs.resume != "none":
        resume_tag = rargs.resume
    settings = LoopSettings(total_steps=total_steps, num_epochs=num_epochs, ce_weight=ce_weight,
                            kd_weight=kd_weight, kd_temperature=cargs.kd_temperature,
                            snapshot_steps=cargs.snapshot_steps, snapshot_mode=cargs.snapshot_mode,
                            logging_steps=rargs.logging_steps, eval_steps=rargs.eval_steps,
                            save_steps=rargs.save_steps, structured_stages=stages,
                            epochs_per_stage=pargs.epochs_per_stage, importance_batches=pargs.importance_batches,
                            log_sparsity=prune, show_progress=not rargs.disable_tqdm,
                            grad_norm_steps=rargs.grad_norm_steps)
    trainer = CapTrainer(engine=engine, task=task, train_loader=train_loader, eval_loader=eval_loader,
                         encode_loader=encode_loader, num_train=len(train_ds), settings=settings,
                         scheduler=scheduler, is_rank0=is_rank0, checkpointer=checkpointer, pruner=pruner,
                         importance_loader=DataLoader(train_ds, batch_size=rargs.per_device_train_batch_size,
                                                      sampler=ShardSampler(len(train_ds), rank, world, shuffle=False),
                                                      generator=torch.Generator().manual_seed(rargs.seed),
                                                      **loader_kw) if structured else None)
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
    t_enc = time.perf_counter()
    if resume_tag is not None:
        trainer.load_state_dict(checkpointer.load(resume_tag))
        if is_rank0:
            logger.info("resumed from %s at step %d", resume_tag, trainer.global_step)
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

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, trainer.request_stop)
    trainer.stop_flag = bool(early_stop)
    trainer.restore_rng()  # last: everything above may have drawn random numbers

    # ---- loop
    t0 = time.perf_counter()
    eval_metrics = trainer.train()
    runtime = time.perf_counter() - t0
    if trainer.preempted:
        if is_rank0:
            write_json_atomic(os.path.join(rargs.output_dir, "train_state.json"),
                              {"status": "preempted", "step": trainer.global_step})
            logger.info("stopped on signal at step %d after writing a checkpoint", trainer.global_step)
        torch.distributed.barrier()
        return {"status": "preempted", "steps": trainer.global_step}

    # ---- export
    report = sparsity_report(engine.module) if prune else None
    result = {
        "task": task.name, "mode": rargs.mode, "eval": eval_metrics, "primary_metric": task.primary_metric,
        "steps": trainer.global_step, "epochs": num_epochs, "eval_examples": len(eval_ds), "train_runtime_s": runtime,
        "train_examples_per_second": trainer.examples_seen / max(trainer.train_time, 1e-9),
        "bank_encode_s": encode_seconds, "snapshot_s": trainer.snapshot_time, "world_size": world,
        "step_time_s": trainer.train_time / max(trainer.global_step, 1),
        "bank_bytes_per_rank": sum(b.memory_bytes() for b in banks.values()),
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


def structured_stages(target: float, step: float) -> list[float]:
    """Cumulative pruned fractions of CAP-f: step, 2*step, ... up to and including ``target``."""
    stages, k = [], 1
    while k * step < target - 1e-9:
        stages.append(round(k * step, 10))
        k += 1
    return [*stages, target]


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
                          show_progress=trainer.s.show_progress and trainer.is_rank0, shard=trainer.shard)


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
