"""CAP pruning from a Hugging Face ``Trainer`` script (the run_glue.py shape): fine-tune a teacher with the plain
``Trainer`` when its folder is empty, then CAP-prune the student with ``CapHfTrainer``.

    python examples/hf_trainer_cap.py --data_dir ../shared/data/glue --task_name sst2 --output_dir out/hf_cap \
        --teacher_name_or_path out/hf_teacher --cap prc,snc,fic --pruning_method movement --target_sparsity 0.9 \
        --num_train_epochs 3 --learning_rate 3e-5 --report_to tensorboard
    torchrun --nproc_per_node 2 examples/hf_trainer_cap.py ...           # DDP
    python examples/hf_trainer_cap.py ... --deepspeed ds_configs/zero3.json   # DeepSpeed (deepspeed launcher too)

Everything but ``CapArguments``, ``CapHfTrainer`` and ``outside_zero_init`` is ordinary transformers code.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from transformers import DataCollatorWithPadding, HfArgumentParser, Trainer, TrainingArguments, set_seed

from cap_ds.data.batches import tokenize_dataset
from cap_ds.data.glue import load_glue_split
from cap_ds.data.models import default_model_path, load_student, load_tokenizer
from cap_ds.data.tasks import get_task
from cap_ds.integrations import CapArguments, CapHfTrainer, outside_zero_init


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pre-trained student (default: the offline all-MiniLM-L6-v2)."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Student config overrides, e.g. num_hidden_layers=2."})
    teacher_epochs: float = field(default=3.0, metadata={
        "help": "Epochs of the teacher fine-tune (run only when --teacher_name_or_path has no model yet)."})
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "LR of the teacher fine-tune."})


@dataclass
class DataArguments:
    task_name: str = field(default="sst2", metadata={"help": "GLUE task (sst2, cola, mrpc, ...)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the GLUE TSV files (else the hub)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longest input in tokens (longer is truncated)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N dev rows."})


def compute_metrics(pred) -> dict[str, float]:
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    if logits.shape[-1] == 1:
        return {"mse": float(np.mean((logits.reshape(-1) - pred.label_ids) ** 2))}
    return {"accuracy": float((logits.argmax(-1) == pred.label_ids).mean())}


def main(argv: list[str] | None = None) -> tuple[CapHfTrainer, dict[str, float]]:
    """Both stages; returns the CAP trainer (its model still masked) and its final eval metrics."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, CapArguments))
    try:
        margs, dargs, targs, cargs = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # a bad value: one line, no traceback
        sys.exit(f"error: {err}")
    set_seed(targs.seed)  # before any model is built: the new classifier head's init follows --seed (run_glue.py)
    task = get_task(dargs.task_name)
    path = margs.model_name_or_path or default_model_path()
    tokenizer = load_tokenizer(path)
    train = tokenize_dataset(load_glue_split(task, "train", dargs.data_dir, dargs.max_train_samples), task, tokenizer,
                             dargs.max_seq_length)
    dev = tokenize_dataset(load_glue_split(task, "validation", dargs.data_dir, dargs.max_eval_samples), task,
                           tokenizer, dargs.max_seq_length)
    collator = DataCollatorWithPadding(tokenizer)

    def student():  # whole weights even under a ZeRO-3 config: CAP installs its masks before DeepSpeed partitions
        with outside_zero_init():
            return load_student(path, task.num_labels, task.label_names, margs.config_overrides)

    teacher_dir = cargs.teacher_name_or_path
    if teacher_dir and not (Path(teacher_dir) / "config.json").is_file():  # 1. the dense teacher
        tdir = os.path.join(targs.output_dir, "teacher_run")
        t_args = replace(targs, output_dir=tdir, num_train_epochs=margs.teacher_epochs, max_steps=-1,
                         learning_rate=margs.teacher_learning_rate, save_strategy="no", eval_strategy="no")
        teacher = Trainer(model=student(), args=t_args, train_dataset=train, data_collator=collator,
                          processing_class=tokenizer, compute_metrics=compute_metrics)
        teacher.train()
        teacher.save_model(teacher_dir)
        if teacher.is_world_process_zero():
            print("teacher", json.dumps(teacher.evaluate(dev)), file=sys.stderr)
        else:
            teacher.evaluate(dev)

    trainer = CapHfTrainer(model=student(), args=targs, cap_args=cargs, train_dataset=train,  # 2. CAP
                           eval_dataset=dev, data_collator=collator, processing_class=tokenizer,
                           compute_metrics=compute_metrics)
    trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model()  # <output_dir>/final: plain from_pretrained, masks baked in
    if trainer.is_world_process_zero():
        metrics["sparsity"] = json.loads((Path(targs.output_dir) / "final" / "sparsity.json").read_text())["sparsity"]
        trainer.save_metrics("eval", metrics)
        print("cap", json.dumps(metrics), file=sys.stderr)
    return trainer, metrics


if __name__ == "__main__":
    main()
