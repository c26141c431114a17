"""Training step cost, measured in one run: plain student fine-tuning, movement + KD with a live teacher, and
CAP (movement + PrC/SnC/FiC + KD) with cached banks and teacher logits.

Each configuration is a real `cap_ds/train.py` run on real SST-2 rows (same data, batch and steps); reported:
mean optimizer-step time (forward + losses + backward + step; bank encode passes excluded and listed apart;
pruning runs freeze the embeddings as the reference does, plain fine-tuning trains them),
bank memory per rank and peak RSS per process. Ratios are against movement+KD(live) and plain fine-tuning.

    python benchmarks/bench_train.py [--layers 6] [--steps 40] [--batch 32] [--teacher DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"


def run(args: list[str], out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "cap_ds" / "train.py"), *args, "--output_dir", str(out), "--disable_tqdm"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--data_dir", default=str(GLUE))
    ap.add_argument("--teacher", default=None, help="fine-tuned teacher dir (default: fine-tune one here)")
    args = ap.parse_args()
    common = ["--config_overrides", f"num_hidden_layers={args.layers}", "--data_dir", args.data_dir,
              "--max_train_samples", str(args.batch * args.steps), "--max_eval_samples", "64",
              "--max_seq_length", "64", "--per_device_train_batch_size", str(args.batch), "--logging_steps", "10"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = args.teacher
        plain = run([*common, "--mode", "finetune", "--max_steps", str(args.steps)], tmp / "plain")
        if teacher is None:
            teacher = str(tmp / "plain" / "final")
        prune = [*common, "--teacher_name_or_path", teacher, "--max_steps", str(args.steps),
                 "--pruning_method", "movement", "--target_sparsity", "0.9"]
        live = run([*prune, "--cap", "none", "--teacher_mode", "live"], tmp / "live")
        cached = run([*prune, "--cap", "none", "--teacher_mode", "cached"], tmp / "cached")
        cap = run([*prune, "--cap", "prc,snc,fic", "--teacher_mode", "cached", "--num_train_epochs", "1"],
                  tmp / "cap")
    rows = [("plain fine-tuning (CE; embeddings trained)", plain), ("movement + KD, live teacher", live),
            ("movement + KD, cached teacher logits", cached),
            ("CAP-m (PrC+SnC+FiC+KD), cached", cap)]
    print(f"{args.layers}-layer all-MiniLM-L6-v2, batch {args.batch}, seq <= 64, {args.steps} steps, CPU threads "
          f"{os.cpu_count()}\n")
    print("| configuration | step time | vs movement+KD(live) | vs plain | bank encode | banks / rank | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['step_time_s'] * 1e3:.0f} ms | {m['step_time_s'] / live['step_time_s']:.2f}x | "
              f"{m['step_time_s'] / plain['step_time_s']:.2f}x | {m['bank_encode_s']:.1f} s | "
              f"{m['bank_bytes_per_rank'] / 2**20:.1f} MiB | {m['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
