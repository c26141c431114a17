"""What the pruning masks do along the sparsity ramp, per criterion, in one plain (no DeepSpeed) run each.

For every variant (criterion + score init) the same model, data order, LR schedule and cubic ramp as
``cap_ds/train.py`` (dense for 2 x warm-up steps, cubic to the target, final for 3 x warm-up) are trained with CE
only, and every ``--log_steps`` steps it records:

- ``overlap_magnitude``: share of the kept weights that are also in the top-k of |W| at the same k (chance = the
  kept fraction); ``energy_kept``: share of the weights' squared norm the mask keeps; ``dead_rows`` /
  ``dead_cols``: share of output rows / input columns of the masked matrices with no weight kept (whole neurons or
  input features cut off, where an unstructured mask turns structured);
- ``churn_per_step``: share of mask entries that flipped per optimizer step since the last record (every step is
  compared with the step before), and ``regrown_per_step``: the part of it that went from pruned to kept (the ramp
  alone only prunes, so this is the criterion changing its mind);
- for score-based criteria, ``score_snr``: mean over weights of |S_t - S_0| / sqrt(sum_t dS_t^2), the drift of
  each score over a random walk with the same steps (1 = no consistent direction, sqrt(t) = the same direction
  every step), and ``score_magnitude_spearman``: rank correlation of the scores with |W| (on a fixed sample);
- dev accuracy every ``--eval_steps`` steps and at the end.

Writes ``diagnostic.jsonl`` (one line per record), ``summary.md`` (records nearest to a few sparsity levels) and
``diagnostic.png`` under ``--output_dir``.

    python benchmarks/movement_diagnostic.py --data_dir ../shared/data/glue --max_train_samples 2000 \\
        --variants magnitude,movement_reference,movement --output_dir runs/diag
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.launch import DEFAULT_GLUE  # noqa: E402
from cap_ds.runtime.atomic import atomic_file  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    mask_init: str = "constant"
    mask_scale: float | None = None


PRESETS = {
    "magnitude": Variant("magnitude", "magnitude"),
    "movement_reference": Variant("movement_reference", "movement", "constant", 0.0),
    "movement": Variant("movement", "movement", "magnitude", None),
    "soft_movement_reference": Variant("soft_movement_reference", "soft_movement", "constant", 0.0),
    "soft_movement": Variant("soft_movement", "soft_movement", "magnitude", None),
}
LEVELS = (0.2, 0.4, 0.6, 0.8, 0.9, 0.97)


def parse_variant(spec: str) -> Variant:
    """A preset name, or ``name=method:init[:scale]`` (e.g. ``mag2=movement:magnitude:2``)."""
    if spec in PRESETS:
        return PRESETS[spec]
    name, sep, rest = spec.partition("=")
    parts = rest.split(":") if sep else []
    if not sep or len(parts) not in (2, 3):
        raise SystemExit(f"--variants: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor "
                         "name=method:init[:scale]")
    return Variant(name, parts[0], parts[1], float(parts[2]) if len(parts) == 3 else None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task_name", default="sst2")
    p.add_argument("--data_dir", default=DEFAULT_GLUE)
    p.add_argument("--model_name_or_path", default=None, help="Default: the offline all-MiniLM-L6-v2 package.")
    p.add_argument("--config_overrides", default=None, help="e.g. num_hidden_layers=2")
    p.add_argument("--max_train_samples", type=int, default=2000)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--per_device_train_batch_size", type=int, default=16)
    p.add_argument("--num_train_epochs", type=float, default=3.0)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--mask_scores_learning_rate", type=float, default=1e-2)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--initial_warmup", type=float, default=2.0)
    p.add_argument("--final_warmup", type=float, default=3.0)
    p.add_argument("--target_sparsity", type=float, default=0.9)
    p.add_argument("--final_lambda", type=float, default=400.0, help="soft movement only")
    p.add_argument("--variants", default="magnitude,movement_reference,movement",
                   help=f"Comma-separated presets ({', '.join(PRESETS)}) or name=method:init[:scale].")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log_steps", type=int, default=10)
    p.add_argument("--eval_steps", type=int, default=0, help="0: about 8 evaluations over the run.")
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    args.variants = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    if not args.variants:
        raise SystemExit("--variants: give at least one")
    if not 0.0 < args.target_sparsity < 1.0:
        raise SystemExit(f"--target_sparsity must be in (0, 1), got {args.target_sparsity}")
    return args


class MaskTracker:
    """Per-module masks, scores and score-step statistics between records."""

    def __init__(self, modules: dict, sample: int = 200_000, seed: int = 0) -> None:
        self.modules = modules
        self.prev = {n: m.get_mask().detach().bool() for n, m in modules.items()}
        self.flips = self.regrown = self.steps = 0
        self.has_scores = all(m.mask_scores is not None for m in modules.values())
        if self.has_scores:
            self.s0 = {n: m.mask_scores.detach().clone() for n, m in modules.items()}
            self.last = {n: m.mask_scores.detach().clone() for n, m in modules.items()}
            self.sq = {n: torch.zeros_like(m.mask_scores) for n, m in modules.items()}
        gen = torch.Generator().manual_seed(seed)
        total = sum(m.weight.numel() for m in modules.values())
        self.sample = torch.randperm(total, generator=gen)[: min(sample, total)]

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps += 1
        for n, m in self.modules.items():
            mask = m.get_mask().bool()
            self.flips += int((mask ^ self.prev[n]).sum())
            self.regrown += int((mask & ~self.prev[n]).sum())
            self.prev[n] = mask
            if self.has_scores:
                s = m.mask_scores.detach()
                self.sq[n] += (s - self.last[n]) ** 2
                self.last[n].copy_(s)

    @torch.no_grad()
    def record(self) -> dict:
        from scipy.stats import spearmanr

        kept = total = hit = rows = dead_rows = cols = dead_cols = 0
        energy = energy_total = 0.0
        for n, m in self.modules.items():
            mask = self.prev[n]
            w = m.weight.detach().float()
            k = int(mask.sum())
            mag = torch.zeros_like(mask)
            if k:
                mag.view(-1)[w.abs().flatten().topk(k).indices] = True
            kept += k
            total += mask.numel()
            hit += int((mask & mag).sum())
            energy += float((w[mask] ** 2).sum())
            energy_total += float((w ** 2).sum())
            rows, dead_rows = rows + mask.shape[0], dead_rows + int((~mask.any(1)).sum())
            cols, dead_cols = cols + mask.shape[1], dead_cols + int((~mask.any(0)).sum())
        out = {"sparsity": 1.0 - kept / total, "overlap_magnitude": hit / max(kept, 1),
               "energy_kept": energy / max(energy_total, 1e-30),
               "dead_rows": dead_rows / rows, "dead_cols": dead_cols / cols,
               "churn_per_step": self.flips / total / max(self.steps, 1),
               "regrown_per_step": self.regrown / total / max(self.steps, 1)}
        self.flips = self.regrown = self.steps = 0
        if self.has_scores:
            drift = torch.cat([(m.mask_scores.detach() - self.s0[n]).abs().flatten() for n, m in self.modules.items()])
            walk = torch.cat([self.sq[n].sqrt().flatten() for n in self.modules])
            moved = walk > 0
            out["score_snr"] = float((drift[moved] / walk[moved]).mean()) if moved.any() else 0.0
            scores = torch.cat([m.mask_scores.detach().flatten() for m in self.modules.values()])[self.sample]
            mags = torch.cat([m.weight.detach().abs().flatten() for m in self.modules.values()])[self.sample]
            rho = spearmanr(scores.float().numpy(), mags.float().numpy()).statistic
            out["score_magnitude_spearman"] = float(rho) if np.isfinite(rho) else 0.0
        return out


def evaluate(model, loader, task) -> float:
    from cap_ds.data.batches import model_inputs
    from cap_ds.data.metrics import compute_metrics

    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            logits.append(model(**model_inputs(batch)).logits.float())
            labels.append(batch["labels"])
    model.train()
    return compute_metrics(task, torch.cat(logits).numpy(), torch.cat(labels).numpy())[task.primary_metric]


def run_variant(args: argparse.Namespace, variant: Variant, data: dict, write) -> None:
    from transformers import get_linear_schedule_with_warmup

    from cap_ds.compression import CompressionScheduler, init_compression, masked_modules, warmup_offsets
    from cap_ds.compression.stats import ENCODER_LINEAR_PATTERN
    from cap_ds.data.batches import model_inputs
    from cap_ds.data.models import default_model_path, load_student
    from cap_ds.runtime.rng import set_seed
    from cap_ds.training.optim import optimizer_groups

    task, train_ds, collate = data["task"], data["train"], data["collate"]
    set_seed(args.seed)
    model = load_student(args.model_name_or_path or default_model_path(), task.num_labels, task.label_names,
                         args.config_overrides)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.per_device_train_batch_size, shuffle=True,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(args.seed))
    total = math.ceil(args.num_train_epochs * len(loader))
    warmup = math.ceil(args.warmup_ratio * total)
    offset, offset_end = warmup_offsets(total, warmup, args.initial_warmup, args.final_warmup)
    section = {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": variant.method, "schedule_offset": offset,
                              "schedule_offset_end": offset_end, "mask_init": variant.mask_init,
                              "mask_scale": variant.mask_scale, "final_lambda": args.final_lambda},
        "different_groups": {"sp1": {"params": {"dense_ratio": round(1.0 - args.target_sparsity, 10)},
                                     "modules": [ENCODER_LINEAR_PATTERN]}}}}
    cfg = {"compression_training": section}
    init_compression(model, cfg)
    scheduler = CompressionScheduler(model, cfg)
    for p in model.base_model.embeddings.parameters():
        p.requires_grad_(False)  # as train.py and the reference
    opt = torch.optim.AdamW(optimizer_groups(model, 0.0, args.mask_scores_learning_rate), lr=args.learning_rate)
    lr_sched = get_linear_schedule_with_warmup(opt, warmup, total)
    tracker = MaskTracker(masked_modules(model), seed=args.seed)
    eval_every = args.eval_steps or max(1, total // 8)
    model.train()
    step, t0 = 0, time.perf_counter()
    meta = {"variant": variant.name, "method": variant.method, "mask_init": variant.mask_init,
            "mask_scale": variant.mask_scale, "total_steps": total, "ramp": [offset, offset_end]}
    print(f"[{variant.name}] {total} steps, dense to {offset}, cubic to {offset_end}", flush=True)
    while step < total:
        for batch in loader:
            logits = model(**model_inputs(batch)).logits
            if task.is_regression:
                loss = F.mse_loss(logits.squeeze(-1), batch["labels"])
            else:
                loss = F.cross_entropy(logits, batch["labels"])
            reg = scheduler.regularization()
            if reg is not None:
                loss = loss + reg
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # scores included, as the reference
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            tracker.after_step()
            if step % args.log_steps == 0 or step % eval_every == 0 or step == total:
                rec = {**meta, "step": step, "kept_target": scheduler.threshold, "loss": float(loss.detach()),
                       **tracker.record(), "elapsed_s": time.perf_counter() - t0}
                if step % eval_every == 0 or step == total:
                    rec["eval"] = evaluate(model, data["eval_loader"], task)
                write(rec)
            if step >= total:
                break


def summarize(records: list[dict]) -> str:
    """Per variant, the record nearest each sparsity level (with an eval), and the final one."""
    cols = ["sparsity", "eval", "overlap_magnitude", "energy_kept", "dead_rows", "dead_cols", "regrown_per_step",
            "score_snr", "score_magnitude_spearman"]
    lines = ["| variant | step | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for name in dict.fromkeys(r["variant"] for r in records):
        evals = [r for r in records if r["variant"] == name and "eval" in r]
        picked = []
        for level in LEVELS:
            near = min(evals, key=lambda r: abs(r["sparsity"] - level), default=None)
            if near is not None and abs(near["sparsity"] - level) < 0.1 and near not in picked:
                picked.append(near)
        if evals and evals[-1] not in picked:
            picked.append(evals[-1])
        for r in sorted(picked, key=lambda r: r["step"]):
            cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else "-" for c in cols]
            lines.append(f"| {name} | {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in dict.fromkeys(r["variant"] for r in records):
        rs = [r for r in records if r["variant"] == name]
        ev = [r for r in rs if "eval" in r]
        axes[0].plot([r["sparsity"] for r in ev], [r["eval"] for r in ev], "o-", label=name)
        axes[1].plot([r["step"] for r in rs], [r["overlap_magnitude"] for r in rs], label=name)
        axes[2].plot([r["step"] for r in rs], [max(r["regrown_per_step"], 1e-8) for r in rs], label=name)
    axes[0].set(xlabel="sparsity", ylabel="dev metric", title="metric along the ramp")
    axes[1].set(xlabel="step", ylabel="kept weights also in |W| top-k", title="overlap with magnitude")
    axes[2].set(xlabel="step", ylabel="entries pruned -> kept per step", title="mask regrowth", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from cap_ds.data.batches import GlueCollator, tokenize_dataset
    from cap_ds.data.glue import load_glue_split
    from cap_ds.data.models import default_model_path, load_tokenizer
    from cap_ds.data.tasks import get_task

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(args.task_name)
    tokenizer = load_tokenizer(args.model_name_or_path or default_model_path())
    train = tokenize_dataset(load_glue_split(task, "train", args.data_dir, args.max_train_samples), task,
                             tokenizer, args.max_seq_length)
    dev = tokenize_dataset(load_glue_split(task, "validation", args.data_dir, args.max_eval_samples), task,
                           tokenizer, args.max_seq_length)
    collate = GlueCollator(tokenizer, is_regression=task.is_regression)
    data = {"task": task, "train": train, "collate": collate,
            "eval_loader": torch.utils.data.DataLoader(dev, batch_size=128, collate_fn=collate)}
    records: list[dict] = []
    jsonl = out / "diagnostic.jsonl"
    with open(jsonl, "w") as fh:  # records stream out as they come (a long run can be watched)
        def write(rec: dict) -> None:
            records.append(rec)
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            if "eval" in rec:
                print(f"[{rec['variant']}] step {rec['step']} sparsity {rec['sparsity']:.3f} eval {rec['eval']:.4f} "
                      f"overlap {rec['overlap_magnitude']:.3f} energy {rec['energy_kept']:.3f} "
                      f"churn {rec['churn_per_step']:.2e}" +
                      (f" snr {rec['score_snr']:.2f} rho {rec['score_magnitude_spearman']:.2f}"
                       if "score_snr" in rec else ""), flush=True)

        for variant in args.variants:
            run_variant(args, variant, data, write)
    table = summarize(records)
    atomic_file(out / "summary.md", lambda tmp: Path(tmp).write_text(table))
    plot(records, out / "diagnostic.png")
    print(table)
    return records


if __name__ == "__main__":
    main()
