"""The same CAP recipe through cap_ds/train.py and through the Trainer integration, step by step: with the data
order and dropout made equal, both paths must log the same loss terms at every optimizer step.

Across seeds the two paths differ only by what a seed draws (data order: ``ShardSampler`` vs the Trainer's
sampler; dropout masks: the Trainer's dataloader draws from the global RNG). This check removes both: the
Trainer gets train.py's ``ShardSampler`` (same seed, ``set_epoch`` per epoch) and both students run without dropout;
then the CE, KD, PrC, SnC and FiC terms, the sparsity and the final evaluation must agree to print precision.

    python benchmarks/trainer_vs_train_steps.py --teacher /tmp/tvt/teacher/final --out /tmp/tvt_steps

It prints one JSON object (steps compared, the worst relative difference per term, both final accuracies) and
exits 1 when a term differs by more than ``--tolerance`` (default 1 %: train.py prints 3-4 significant digits).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"step (\d+)/\d+ \| loss ([\d.e+-]+) \(([^)]*)\)(?: \| sparsity ([\d.]+))?")


def trainer_with_train_py_order() -> None:
    """Run examples/hf_trainer_cap.py with train.py's sampler (``sys.argv`` holds the example's flags)."""
    import importlib.util

    from transformers import TrainerCallback

    from cap_ds.cap import ShardSampler
    from cap_ds.integrations import CapHfTrainer

    spec = importlib.util.spec_from_file_location("hf_trainer_cap", REPO / "examples" / "hf_trainer_cap.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules["hf_trainer_cap"] = example
    spec.loader.exec_module(example)

    class Epochs(TrainerCallback):
        def __init__(self, sampler: ShardSampler) -> None:
            self.sampler = sampler

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.sampler.set_epoch(int(round(state.epoch or 0)))

    def sampler(self, train_dataset=None):
        data = train_dataset if train_dataset is not None else self.train_dataset
        s = ShardSampler(len(data), shuffle=True, seed=self.args.seed)
        self.add_callback(Epochs(s))
        return s

    CapHfTrainer._get_train_sampler = sampler
    example.main()


def train_py_steps(log: str) -> dict[int, dict[str, float]]:
    out = {}
    for m in STEP_LINE.finditer(log):
        names_values = m.group(3).split()
        terms = {k: float(v) for k, v in zip(names_values[0::2], names_values[1::2])}
        terms["loss"] = float(m.group(2))
        if m.group(4) is not None:
            terms["sparsity"] = float(m.group(4))
        out[int(m.group(1))] = terms
    return out


def trainer_steps(log: str) -> dict[int, dict[str, float]]:
    rows = [ast.literal_eval(line.strip()) for line in log.splitlines() if line.startswith("{'loss'")]
    return {i + 1: {k: float(v) for k, v in row.items()} for i, row in enumerate(rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="a fine-tuned teacher folder (e.g. trainer_vs_train.sh's)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--glue_dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rows", type=int, default=320, help="training rows (320 / batch 32: 10 steps per epoch)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tolerance", type=float, default=0.01)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--task_name", "sst2", "--data_dir", args.glue_dir, "--max_train_samples", str(args.rows),
              "--max_eval_samples", "200", "--max_seq_length", "64", "--per_device_train_batch_size", "32",
              "--learning_rate", "5e-5", "--weight_decay", "0.0", "--pruning_method", "movement",
              "--target_sparsity", "0.9", "--cap", "prc,snc,fic", "--max_steps", str(args.steps),
              "--seed", str(args.seed), "--teacher_name_or_path", args.teacher, "--logging_steps", "1",
              "--config_overrides", "hidden_dropout_prob=0,attention_probs_dropout_prob=0"]
    runs = {
        "train.py": [sys.executable, "-m", "cap_ds.train", *common, "--warmup_ratio", "0.1", "--output_dir",
                     str(out / "train_py"), "--deepspeed", "ds_configs/zero2.json", "--disable_tqdm"],
        "Trainer": [sys.executable, __file__, "--as-trainer", *common, "--warmup_steps", "0.1", "--output_dir",
                    str(out / "trainer"), "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
                    "--disable_tqdm", "true", "--optim", "adamw_torch"],
    }
    logs = {}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(f"{name} failed (rc {proc.returncode}); see {out / f'{name}.log'}", file=sys.stderr)
            return 1
        logs[name] = proc.stdout + proc.stderr
    ref, other = train_py_steps(logs["train.py"]), trainer_steps(logs["Trainer"])
    worst: dict[str, float] = {}
    for step, terms in ref.items():
        for k, v in terms.items():
            if k in other.get(step, {}) and v != 0:
                worst[k] = max(worst.get(k, 0.0), abs(other[step][k] - v) / abs(v))
    acc = {"train.py": json.loads((out / "train_py" / "metrics.json").read_text())["eval"]["accuracy"],
           "Trainer": json.loads((out / "trainer" / "eval_results.json").read_text())["eval_accuracy"]}
    result = {"steps": len(ref), "steps_trainer": len(other), "worst_relative_difference": worst, "accuracy": acc}
    print(json.dumps(result))
    ok = len(ref) == len(other) == args.steps and all(w <= args.tolerance for w in worst.values()) \
        and {"ce", "kd", "prc", "snc", "fic"} <= set(worst)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--as-trainer":
        sys.argv.pop(1)
        trainer_with_train_py_order()
    else:
        sys.exit(main())
