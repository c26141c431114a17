"""CAP vs pruning baselines on one GLUE task, same data, budget and seed for every method.

Steps: fine-tune the dense teacher, then for each target sparsity prune the pre-trained student with
magnitude+KD, movement+KD, soft movement+KD, CAP-m (movement + PrC/SnC/FiC + KD), CAP-soft, the ablations
CAP-m without PrC / SnC / FiC, and the same CAP over magnitude pruning (CAP-mag and its ablations). Every run is a real ``cap_ds/train.py`` process (or ``deepspeed --num_gpus N``).

Writes to ``--output_dir``: one folder per run (model, metrics.json, sparsity heat-map in ``final/``),
``results.json``, ``results.md`` (the table) and ``accuracy_vs_sparsity.png``. Re-running the same command
resumes a partly finished sweep: finished runs are read back, an interrupted run resumes from its last checkpoint
(``--save_steps``) and the rest are started. Changing the budget flags of an existing sweep is refused.

    python benchmarks/reproduce_glue.py --task_name sst2 --data_dir ../shared/data/glue --output_dir runs/sst2 \\
        --max_train_samples 3000 --num_train_epochs 4 --sparsities 0.9
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.launch import DEFAULT_GLUE, REPO, offline_env, train_command  # noqa: E402

# name -> (label, pruning method, CAP modules)
METHODS: dict[str, tuple[str, str, str]] = {
    "magnitude_kd": ("magnitude + KD", "magnitude", "none"),
    "movement_kd": ("movement + KD", "movement", "none"),
    "soft_movement_kd": ("soft movement + KD", "soft_movement", "none"),
    "cap_m": ("CAP-m", "movement", "prc,snc,fic"),
    "cap_soft": ("CAP-soft", "soft_movement", "prc,snc,fic"),
    "cap_m_no_prc": ("CAP-m w/o PrC", "movement", "snc,fic"),
    "cap_m_no_snc": ("CAP-m w/o SnC", "movement", "prc,fic"),
    "cap_m_no_fic": ("CAP-m w/o FiC", "movement", "prc,snc"),
    # CAP over magnitude pruning: the criterion that still ranks weights at CPU-sized budgets, where movement
    # scores have not separated from noise (see README "Results").
    "cap_mag": ("CAP-mag", "magnitude", "prc,snc,fic"),
    "cap_mag_no_prc": ("CAP-mag w/o PrC", "magnitude", "snc,fic"),
    "cap_mag_no_snc": ("CAP-mag w/o SnC", "magnitude", "prc,fic"),
    "cap_mag_no_fic": ("CAP-mag w/o FiC", "magnitude", "prc,snc"),
}
# pruning criterion -> its KD-only baseline (the METHODS row with no CAP module)
BASELINES = {pruning: name for name, (_, pruning, cap) in METHODS.items() if cap == "none"}
# Flags that define the budget: a sweep folder is only resumed with the same values.
BUDGET_KEYS = ("task_name", "model_name_or_path", "max_train_samples", "max_eval_samples", "max_seq_length",
               "per_device_train_batch_size", "num_train_epochs", "learning_rate", "teacher_epochs",
               "teacher_learning_rate", "seed", "extra_args", "deepspeed", "num_gpus")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task_name", default="sst2")
    ap.add_argument("--data_dir", default=DEFAULT_GLUE,
                    help="GLUE folder (default ../shared/data/glue when present, else the hub)")
    ap.add_argument("--model_name_or_path", default=None, help="pre-trained student (default: offline all-MiniLM)")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--max_train_samples", type=int, default=3000, help="first N training rows; 0 = all")
    ap.add_argument("--max_eval_samples", type=int, default=None)
    ap.add_argument("--max_seq_length", type=int, default=64)
    ap.add_argument("--per_device_train_batch_size", type=int, default=16)
    ap.add_argument("--num_train_epochs", type=float, default=4.0, help="pruning epochs (every method)")
    ap.add_argument("--learning_rate", type=float, default=1e-4, help="pruning runs")
    ap.add_argument("--teacher_epochs", type=float, default=3.0)
    ap.add_argument("--teacher_learning_rate", type=float, default=1e-4)
    ap.add_argument("--teacher_name_or_path", default=None,
                    help="use this fine-tuned teacher instead of fine-tuning one (not part of the sweep budget)")
    ap.add_argument("--sparsities", default="0.9", help="comma list of target sparsities, e.g. 0.9,0.97")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero2.json"))
    ap.add_argument("--num_gpus", type=int, default=0, help="> 0: launch each run with deepspeed --num_gpus N")
    ap.add_argument("--save_steps", type=int, default=0, help="checkpoint interval of each run (for resume)")
    ap.add_argument("--extra_args", default="", help="extra train.py flags for every pruning run (quoted)")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    args.sparsity_list = [float(s) for s in args.sparsities.split(",") if s.strip()]
    bad = [s for s in args.sparsity_list if not 0.0 < s < 1.0]
    if bad or not args.sparsity_list:
        ap.error(f"--sparsities: values must lie in (0, 1), got {args.sparsities!r}")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        ap.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    return args


def write_atomic(path: Path, text: str) -> None:
    from cap_ds.atomic import atomic_file

    atomic_file(path, lambda tmp: Path(tmp).write_text(text))


class Sweep:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.output_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)

    # ---- bookkeeping
    def check_budget(self) -> None:
        """Refuse to mix runs of different budgets in one folder."""
        budget = {k: getattr(self.args, k) for k in BUDGET_KEYS}
        # the config's content, not its path: the same sweep may be resumed from another checkout
        budget["deepspeed"] = json.loads(Path(self.args.deepspeed).read_text())
        path = self.out / "sweep_config.json"
        if path.exists():
            old = json.loads(path.read_text())
            if isinstance(old.get("deepspeed"), str) and Path(old["deepspeed"]).is_file():
                old["deepspeed"] = json.loads(Path(old["deepspeed"]).read_text())  # sweeps that stored a path
            changed = {k: (old.get(k), v) for k, v in budget.items() if old.get(k) != v}
            if changed:
                raise SystemExit(f"{path}: this sweep was started with other settings {changed} (old, new); "
                                 "use a new --output_dir")
        else:
            write_atomic(path, json.dumps(budget, indent=2) + "\n")

    def common(self) -> list[str]:
        a = self.args
        flags = ["--deepspeed", a.deepspeed, "--task_name", a.task_name, "--max_seq_length", str(a.max_seq_length),
                 "--per_device_train_batch_size", str(a.per_device_train_batch_size), "--seed", str(a.seed),
                 "--disable_tqdm", "--resume", "auto", "--save_steps", str(a.save_steps)]
        if a.max_train_samples:
            flags += ["--max_train_samples", str(a.max_train_samples)]
        if a.data_dir:
            flags += ["--data_dir", a.data_dir]
        if a.model_name_or_path:
            flags += ["--model_name_or_path", a.model_name_or_path]
        if a.max_eval_samples:
            flags += ["--max_eval_samples", str(a.max_eval_samples)]
        return flags

    def launch(self, name: str, flags: list[str]) -> dict:
        """Run train.py into ``<out>/<name>`` unless it already finished; returns its metrics."""
        run_dir = self.out / name
        metrics = run_dir / "metrics.json"
        if metrics.exists():
            return json.loads(metrics.read_text())
        cmd = train_command([*flags, "--output_dir", str(run_dir)], self.args.num_gpus,
                            29500 + zlib.crc32(name.encode()) % 2000)
        line = shlex.join(cmd)
        print(f"[{name}] {line}", flush=True)
        if self.args.dry_run:
            return {}
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(run_dir / "train.log", "a") as log:
            log.write(f"$ {line}\n")
            log.flush()
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=offline_env())
        if proc.returncode != 0 or not metrics.exists():
            raise SystemExit(f"[{name}] failed (exit {proc.returncode}); see {run_dir / 'train.log'}; "
                             "re-run the same command to resume")
        result = json.loads(metrics.read_text())
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s: {result['eval']}", flush=True)
        return result

    # ---- steps
    def teacher(self) -> tuple[str, dict]:
        a = self.args
        if a.teacher_name_or_path:
            return a.teacher_name_or_path, {}
        metrics = self.launch("teacher", [*self.common(), "--mode", "finetune", "--num_train_epochs",
                                          str(a.teacher_epochs), "--learning_rate", str(a.teacher_learning_rate)])
        return str(self.out / "teacher" / "final"), metrics

    def prune(self, method: str, sparsity: float, teacher: str) -> dict:
        a = self.args
        _, pruning, cap = METHODS[method]
        flags = [*self.common(), "--teacher_name_or_path", teacher, "--pruning_method", pruning,
                 "--target_sparsity", str(sparsity), "--cap", cap, "--num_train_epochs", str(a.num_train_epochs),
                 "--learning_rate", str(a.learning_rate), *shlex.split(a.extra_args)]
        return self.launch(f"{method}_{round(sparsity * 100):g}", flags)

    def run(self) -> list[dict]:
        self.check_budget()
        teacher_dir, teacher_metrics = self.teacher()
        rows: list[dict] = []
        for sparsity in self.args.sparsity_list:
            for method in self.args.method_list:
                m = self.prune(method, sparsity, teacher_dir)
                if m:
                    rows.append(row(method, sparsity, m))
                    self.report(rows, teacher_metrics)
        return rows

    def report(self, rows: list[dict], teacher_metrics: dict) -> None:
        from cap_ds.plots import plot_accuracy_vs_sparsity

        metric = rows[0]["metric_name"]
        dense = (teacher_metrics.get("eval") or {}).get(metric) if teacher_metrics else rows[0]["teacher"]
        data = {"settings": {k: getattr(self.args, k) for k in BUDGET_KEYS}, "teacher": dense, "metric": metric,
                "runs": rows}
        write_atomic(self.out / "results.json", json.dumps(data, indent=2) + "\n")
        write_atomic(self.out / "results.md", markdown(rows, dense, metric))
        plot_accuracy_vs_sparsity([{"method": r["label"], "sparsity": r["sparsity"], metric: r["score"]}
                                   for r in rows], self.out / "accuracy_vs_sparsity.png", metric=metric,
                                  dense=dense, title=f"{self.args.task_name.upper()}: pruning at equal budget")


def row(method: str, target: float, m: dict) -> dict:
    label, pruning, cap = METHODS[method]
    metric = m["primary_metric"]
    return {"method": method, "label": label, "pruning": pruning, "cap": cap, "target_sparsity": target,
            "sparsity": m["sparsity"], "metric_name": metric, "score": m["eval"][metric], "eval": m["eval"],
            "teacher": (m.get("teacher_eval") or {}).get(metric), "steps": m["steps"],
            "step_time_s": m["step_time_s"], "train_runtime_s": m["train_runtime_s"],
            "eval_examples": m.get("eval_examples")}


def markdown(rows: list[dict], dense: float | None, metric: str) -> str:
    # baseline of the same criterion, target and sweep folder ("group": set when several sweeps are merged)
    base = {(r.get("group"), r["method"], r["target_sparsity"]): r["score"] for r in rows
            if r["method"] in BASELINES.values()}
    lines = [f"| method | target | sparsity | {metric} | % of dense | vs same criterion + KD | step time | run time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = f"{100 * r['score'] / dense:.1f} %" if dense else "-"
        ref = base.get((r.get("group"), BASELINES[r["pruning"]], r["target_sparsity"]))
        if ref is None and r.get("baseline_group"):  # a merged sweep without its own KD run (plot_sweeps --baseline)
            ref = base.get((r["baseline_group"], BASELINES[r["pruning"]], r["target_sparsity"]))
        delta = f"{100 * (r['score'] - ref):+.2f}" if ref is not None and r["cap"] != "none" else "-"
        lines.append(f"| {r['label']} | {100 * r['target_sparsity']:g} % | {100 * r['sparsity']:.1f} % | "
                     f"{100 * r['score']:.2f} | {pct} | {delta} | {1e3 * r['step_time_s']:.0f} ms | "
                     f"{r['train_runtime_s'] / 60:.1f} min |")
    head = f"Dense teacher {metric}: {100 * dense:.2f}\n\n" if dense else ""
    foot = ""
    n = rows[0].get("eval_examples")
    if metric == "accuracy" and n:
        p = sum(r["score"] for r in rows) / len(rows)  # the runs' accuracies, not the teacher's, set the error
        foot = (f"\nDev set: {n} examples; one standard error of an accuracy near {100 * p:.0f} is "
                f"{100 * (p * (1 - p) / n) ** 0.5:.1f} points (one run per row).\n")
    return head + "\n".join(lines) + "\n" + foot


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = Sweep(args).run()
    if rows and not args.dry_run:
        print((Path(args.output_dir) / "results.md").read_text())


if __name__ == "__main__":
    main()
