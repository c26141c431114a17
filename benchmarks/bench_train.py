"""Training cost, measured in one run: plain student fine-tuning, movement + KD with a live teacher, and CAP
(movement + PrC/SnC/FiC + KD) with cached banks and teacher logits.

Each configuration is a real ``cap_ds/train.py`` run on the same real SST-2 rows, batch, epochs and seed
(``--ranks N`` launches each through ``deepspeed --num_gpus N``). Reported per configuration:

- step time: mean optimizer step (forward + losses + backward + step), the recurring cost;
- all-in per step: (steps + bank/teacher encode passes + SnC snapshots) / steps over the ``--epochs`` run; the
  one-off encodes weigh more in this short run than in a 10-epoch one (the table says how many epochs);
- bank memory per rank, and the peak host RSS (and peak GPU allocation on CUDA) of every rank.

Ratios are against movement+KD(live) and plain fine-tuning; targets: CAP <= 1.0x movement+KD(live) and
<= 1.25x plain. Pruning runs freeze the embeddings (the reference does); plain fine-tuning trains them.

    python benchmarks/bench_train.py [--layers 6] [--steps_per_epoch 20] [--epochs 2] [--batch 32] [--ranks 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.launch import DEFAULT_GLUE, REPO, run_checked, train_command  # noqa: E402


def run(args: list[str], out: Path, ranks: int, port: int) -> dict:
    flags = [*args, "--output_dir", str(out), "--disable_tqdm"]
    run_checked(train_command(flags, ranks if ranks > 1 else 0, port))
    return json.loads((out / "metrics.json").read_text())


def all_in(m: dict) -> float:
    return (m["step_time_s"] * m["steps"] + m["bank_encode_s"] + m.get("snapshot_s", 0.0)) / m["steps"]


def memory(m: dict) -> str:
    rss = "/".join(f"{mb:.0f}" for mb in m.get("peak_rss_mb_per_rank", [m["peak_rss_mb"]]))
    text = f"{rss} MB"
    if "peak_gpu_mb_per_rank" in m:
        text += " | GPU " + "/".join(f"{mb:.0f}" for mb in m["peak_gpu_mb_per_rank"]) + " MB"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps_per_epoch", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2, help=">= 2 so that CAP takes an SnC snapshot")
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--data_dir", default=DEFAULT_GLUE)
    ap.add_argument("--model_name_or_path", default=None)
    ap.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero2.json"))
    ap.add_argument("--teacher", default=None, help="fine-tuned teacher dir (default: the plain run's model)")
    ap.add_argument("--port", type=int, default=29741)
    args = ap.parse_args()
    rows_needed = args.batch * args.ranks * args.steps_per_epoch
    common = ["--config_overrides", f"num_hidden_layers={args.layers}", "--task_name", "sst2",
              "--deepspeed", args.deepspeed, "--max_train_samples", str(rows_needed), "--max_eval_samples", "64",
              "--max_seq_length", "64", "--per_device_train_batch_size", str(args.batch), "--logging_steps", "10",
              "--num_train_epochs", str(args.epochs), "--eval_steps", str(10**9)]
    if args.data_dir:
        common += ["--data_dir", args.data_dir]
    if args.model_name_or_path:
        common += ["--model_name_or_path", args.model_name_or_path]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = run([*common, "--mode", "finetune"], tmp / "plain", args.ranks, args.port)
        teacher = args.teacher or str(tmp / "plain" / "final")
        prune = [*common, "--teacher_name_or_path", teacher, "--pruning_method", "movement",
                 "--target_sparsity", "0.9"]
        live = run([*prune, "--cap", "none", "--teacher_mode", "live"], tmp / "live", args.ranks, args.port + 1)
        cached = run([*prune, "--cap", "none", "--teacher_mode", "cached"], tmp / "cached", args.ranks,
                     args.port + 2)
        cap = run([*prune, "--cap", "prc,snc,fic", "--teacher_mode", "cached"], tmp / "cap", args.ranks,
                  args.port + 3)
    rows = [("plain fine-tuning (CE; embeddings trained)", plain), ("movement + KD, live teacher", live),
            ("movement + KD, cached teacher logits", cached), ("CAP-m (PrC+SnC+FiC+KD), cached", cap)]
    print(f"{args.layers}-layer all-MiniLM-L6-v2, {args.ranks} rank(s) x batch {args.batch}, seq <= 64, "
          f"{args.epochs} epochs x {plain['steps'] // args.epochs} steps, host CPUs {os.cpu_count()}\n")
    print("| configuration | step time | vs movement+KD(live) | vs plain | all-in per step | all-in vs live | "
          "encode + snapshots | banks / rank | peak memory per rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['step_time_s'] * 1e3:.0f} ms | {m['step_time_s'] / live['step_time_s']:.2f}x | "
              f"{m['step_time_s'] / plain['step_time_s']:.2f}x | {all_in(m) * 1e3:.0f} ms | "
              f"{all_in(m) / all_in(live):.2f}x | {m['bank_encode_s']:.1f} + {m.get('snapshot_s', 0.0):.1f} s | "
              f"{m['bank_bytes_per_rank'] / 2**20:.1f} MiB | {memory(m)} |")
    ratio_live = cap["step_time_s"] / live["step_time_s"]
    ratio_plain = cap["step_time_s"] / plain["step_time_s"]
    print(f"\nCAP step time: {ratio_live:.2f}x movement+KD(live) (target <= 1.0: "
          f"{'met' if ratio_live <= 1.0 else 'missed'}), {ratio_plain:.2f}x plain (target <= 1.25: "
          f"{'met' if ratio_plain <= 1.25 else 'missed'})")


if __name__ == "__main__":
    main()
