"""CAP vs pruning baselines on one task, same data, budget and seed for every method: a GLUE task
(``--task_name``) or your own data, classification, regression or extractive QA (``--data_args``: the train.py
data flags, e.g. ``--data_args "--task_type question_answering --train_file q_train.jsonl --validation_file
q_dev.jsonl --max_seq_length 256 --doc_stride 64"``).

Steps: fine-tune the dense teacher, then for each target sparsity prune the pre-trained student with
magnitude+KD, movement+KD, soft movement+KD, CAP-m (movement + PrC/SnC/FiC + KD), CAP-soft, the ablations
CAP-m without PrC / SnC / FiC, and the same CAP over magnitude pruning (CAP-mag and its ablations). Every run is a real ``cap_ds/train.py`` process (or ``deepspeed --num_gpus N``).

Every method runs at every seed of ``--seeds`` with the same teacher (fine-tuned once, at ``--teacher_seed``);
``--parallel N`` runs N pruning runs side by side (on a CPU each gets 1/N of the cores; on a GPU they share it).

Writes to ``--output_dir``: one folder per run ``<method>_<sparsity>_s<seed>`` (model, metrics.json, sparsity
heat-map in ``final/``), ``results.json`` (every run with its seed, steps, budget and the machine), ``results.md``
(per-run table, then mean ± standard error over seeds and the paired difference to the same criterion + KD) and
``accuracy_vs_sparsity.png``. Re-running the same command resumes a partly finished sweep: finished runs are read
back, an interrupted run resumes from its last checkpoint (``--save_steps``) and the rest are started; more seeds,
methods or sparsities can be added later. The results always cover every finished run in the folder, whichever
command started it (``--collect`` rewrites them without training, e.g. after runs were copied in from another
machine). Changing the budget flags of an existing sweep is refused.

    python benchmarks/reproduce_glue.py --task_name sst2 --data_dir ../shared/data/glue --output_dir runs/sst2 \\
        --max_train_samples 3000 --num_train_epochs 3 --sparsities 0.9 --seeds 42,43,44 --parallel 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.launch import DEFAULT_GLUE, REPO, offline_env, train_command  # noqa: E402
from cap_ds.runtime.atomic import atomic_file  # noqa: E402

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
BUDGET_KEYS = ("task_name", "data_args", "model_name_or_path", "max_train_samples", "max_eval_samples", "max_seq_length",
               "per_device_train_batch_size", "num_train_epochs", "learning_rate", "teacher_epochs",
               "teacher_learning_rate", "teacher_seed", "extra_args", "deepspeed", "num_gpus")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task_name", default="sst2")
    ap.add_argument("--data_args", default="",
                    help="train.py data flags for your own data instead of --task_name/--data_dir (quoted), e.g. "
                         "'--train_file t.csv --validation_file d.csv' or '--task_type question_answering ...'; "
                         "a --max_seq_length inside wins over --max_seq_length")
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
    ap.add_argument("--seeds", "--seed", dest="seeds", default="42",
                    help="comma list of seeds; every method runs at each (same teacher)")
    ap.add_argument("--teacher_seed", type=int, default=42, help="seed of the teacher fine-tuning run")
    ap.add_argument("--parallel", type=int, default=1, help="pruning runs at once (default 1)")
    ap.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero2.json"))
    ap.add_argument("--num_gpus", type=int, default=0, help="> 0: launch each run with deepspeed --num_gpus N")
    ap.add_argument("--save_steps", type=int, default=0, help="checkpoint interval of each run (for resume)")
    ap.add_argument("--extra_args", default="", help="extra train.py flags for every pruning run (quoted)")
    ap.add_argument("--discard_weights", action="store_true",
                    help="after each finished pruning run delete its model weights and checkpoints, keeping metrics, "
                         "logs, sparsity.json and the heat-map: a sweep folder small enough to carry off a GPU "
                         "machine and resume elsewhere (finished runs are read back from metrics.json)")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: rewrite results.json / results.md / the plot from every finished run in "
                         "--output_dir (its budget is read from the folder's sweep_config.json)")
    args = ap.parse_args(argv)
    args.sparsity_list = [float(s) for s in args.sparsities.split(",") if s.strip()]
    bad = [s for s in args.sparsity_list if not 0.0 < s < 1.0]
    if bad or not args.sparsity_list:
        ap.error(f"--sparsities: values must lie in (0, 1), got {args.sparsities!r}")
    try:
        args.seed_list = list(dict.fromkeys(int(x) for x in args.seeds.split(",") if x.strip()))
    except ValueError:
        ap.error(f"--seeds: comma list of integers, got {args.seeds!r}")
    if not args.seed_list:
        ap.error("--seeds: give at least one seed")
    if args.parallel < 1:
        ap.error(f"--parallel must be >= 1, got {args.parallel}")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        ap.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    return args


def write_atomic(path: Path, text: str) -> None:
    atomic_file(path, lambda tmp: Path(tmp).write_text(text))


RUN_NAME = re.compile(r"^(?P<method>.+)_(?P<target>\d+(?:\.\d+)?)_s(?P<seed>-?\d+)$")


def run_name(method: str, sparsity: float, seed: int) -> str:
    """A pruning run's folder, ``<method>_<sparsity %>_s<seed>``: what :data:`RUN_NAME` reads back."""
    return f"{method}_{round(sparsity * 100):g}_s{seed}"


class Sweep:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.output_dir).resolve()
        if not args.collect:
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

    def common(self, seed: int) -> list[str]:
        a = self.args
        data = shlex.split(a.data_args) if a.data_args else ["--task_name", a.task_name]
        flags = ["--deepspeed", a.deepspeed, *data, "--max_seq_length", str(a.max_seq_length),
                 "--per_device_train_batch_size", str(a.per_device_train_batch_size), "--seed", str(seed),
                 "--disable_tqdm", "--resume", "auto", "--save_steps", str(a.save_steps)]
        if a.max_train_samples:
            flags += ["--max_train_samples", str(a.max_train_samples)]
        if a.data_dir and not a.data_args:
            flags += ["--data_dir", a.data_dir]
        if "--max_seq_length" in data:  # the data's own window length (QA) wins
            i = flags.index("--max_seq_length", 2 + len(data))
            del flags[i:i + 2]
        if a.model_name_or_path:
            flags += ["--model_name_or_path", a.model_name_or_path]
        if a.max_eval_samples:
            flags += ["--max_eval_samples", str(a.max_eval_samples)]
        return flags

    def launch(self, name: str, flags: list[str], threads: int | None = None) -> dict:
        """Run train.py into ``<out>/<name>`` unless it already finished; returns its metrics. ``threads`` caps
        the run's CPU threads (runs side by side on a CPU) unless the caller's environment sets them."""
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
        env = offline_env()
        if threads is not None and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(run_dir / "train.log", "a") as log:
            log.write(f"$ {line}\n")
            log.flush()
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0 or not metrics.exists():
            raise SystemExit(f"[{name}] failed (exit {proc.returncode}); see {run_dir / 'train.log'}; "
                             "re-run the same command to resume")
        result = json.loads(metrics.read_text())
        # the machine travels with the run, so that a sweep resumed elsewhere still says where each row ran
        write_atomic(run_dir / "machine.json", json.dumps(machine(self.args.num_gpus)) + "\n")
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s: {result['eval']}", flush=True)
        if self.args.discard_weights and name != "teacher":
            discard_weights(run_dir)
        return result

    # ---- steps
    def teacher(self) -> str:
        a = self.args
        if a.teacher_name_or_path:
            return a.teacher_name_or_path
        self.launch("teacher", [*self.common(a.teacher_seed), "--mode", "finetune", "--num_train_epochs",
                                str(a.teacher_epochs), "--learning_rate", str(a.teacher_learning_rate)])
        return str(self.out / "teacher" / "final")

    def prune(self, method: str, sparsity: float, seed: int, teacher: str) -> dict:
        a = self.args
        _, pruning, cap = METHODS[method]
        flags = [*self.common(seed), "--teacher_name_or_path", teacher, "--pruning_method", pruning,
                 "--target_sparsity", str(sparsity), "--cap", cap, "--num_train_epochs", str(a.num_train_epochs),
                 "--learning_rate", str(a.learning_rate), *shlex.split(a.extra_args)]
        threads = max(1, (os.cpu_count() or 1) // a.parallel) if a.parallel > 1 and a.num_gpus == 0 else None
        return self.launch(run_name(method, sparsity, seed), flags, threads)

    def run(self) -> list[dict]:
        self.check_budget()
        teacher_dir = self.teacher()
        jobs = [(method, sparsity, seed) for sparsity in self.args.sparsity_list for seed in self.args.seed_list
                for method in self.args.method_list]
        lock = threading.Lock()

        def one(job: tuple[str, float, int]) -> None:
            method, sparsity, seed = job
            if self.prune(method, sparsity, seed, teacher_dir) and not self.args.dry_run:
                with lock:  # runs finish in any order; the results are rebuilt from the folder each time
                    self.report(self.finished())

        # A failed run stops the sweep once the runs in flight finish (their results stay on disk for the next
        # resume).
        pool = ThreadPoolExecutor(max_workers=self.args.parallel)
        try:
            list(pool.map(one, jobs))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return self.finished() if not self.args.dry_run else []

    def finished(self) -> list[dict]:
        """Every finished pruning run in the folder (``<method>_<target>_s<seed>/metrics.json``), in the order
        target sparsity, seed, method (as listed in METHODS)."""
        order = list(METHODS)
        found = []
        for metrics in self.out.glob("*/metrics.json"):
            m = RUN_NAME.match(metrics.parent.name)
            if not m or m["method"] not in METHODS:
                continue
            data = json.loads(metrics.read_text())
            run = row(m["method"], data.get("target_sparsity", float(m["target"]) / 100), int(m["seed"]), data)
            where = metrics.parent / "machine.json"
            run["machine"] = json.loads(where.read_text()) if where.exists() else None
            found.append(run)
        return sorted(found, key=lambda r: (r["target_sparsity"], r["seed"], order.index(r["method"])))

    def collect(self) -> list[dict]:
        """Rewrite the results from the folder alone, training nothing."""
        if not (self.out / "sweep_config.json").exists():
            raise SystemExit(f"--collect: {self.out / 'sweep_config.json'} not found: {self.out} is not a sweep folder")
        rows = self.finished()
        if not rows:
            raise SystemExit(f"--collect: no finished run (<method>_<sparsity>_s<seed>/metrics.json) in {self.out}")
        self.report(rows)
        return rows

    def report(self, rows: list[dict]) -> None:
        from cap_ds.run.plots import plot_accuracy_vs_sparsity

        metric = rows[0]["metric_name"]
        teacher = self.out / "teacher" / "metrics.json"  # a teacher fine-tuned in this folder, else the given one
        dense = json.loads(teacher.read_text())["eval"][metric] if teacher.exists() else rows[0]["teacher"]
        settings = json.loads((self.out / "sweep_config.json").read_text())
        data = {"settings": {**settings, "seeds": sorted({r["seed"] for r in rows})},
                "machine": machine(self.args.num_gpus), "teacher": dense, "metric": metric, "runs": rows}
        write_atomic(self.out / "results.json", json.dumps(data, indent=2) + "\n")
        summary = seed_table(rows, metric)
        text = markdown(rows, dense, metric) + (f"\nAcross seeds:\n\n{summary}" if summary else "")
        ran_on = sorted({r["machine"]["description"] for r in rows if r.get("machine")})
        where = "; ".join(ran_on) if ran_on else data["machine"]["description"]
        write_atomic(self.out / "results.md", text + f"\nMachine: {where}.\n")
        plot_accuracy_vs_sparsity([{"method": r["label"], "sparsity": r["sparsity"], metric: r["score"]}
                                   for r in rows], self.out / "accuracy_vs_sparsity.png", metric=metric,
                                  dense=dense, title=f"{(rows[0].get('task') or self.args.task_name).upper()}: pruning at equal budget")


def discard_weights(run_dir: Path) -> None:
    """Delete a finished run's weights (``*.safetensors``, ``*.bin``, ``*.pt``) and its checkpoints folder."""
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for pattern in ("*.safetensors", "*.bin", "*.pt"):
        for f in run_dir.rglob(pattern):
            f.unlink()


def machine(num_gpus: int) -> dict:
    """Where the runs ran: host, CPU count, torch, and the GPU name when they used GPUs."""
    import torch

    gpu = torch.cuda.get_device_name(0) if num_gpus > 0 and torch.cuda.is_available() else None
    desc = (f"{num_gpus} x {gpu}" if gpu else f"CPU only, {os.cpu_count()} cores") + f", torch {torch.__version__}"
    return {"host": platform.node(), "cpus": os.cpu_count(), "gpu": gpu, "num_gpus": num_gpus,
            "torch": torch.__version__, "description": desc}


def row(method: str, target: float, seed: int, m: dict) -> dict:
    label, pruning, cap = METHODS[method]
    metric = m["primary_metric"]
    return {"method": method, "label": label, "pruning": pruning, "cap": cap, "target_sparsity": target, "seed": seed,
            "sparsity": m["sparsity"], "metric_name": metric, "score": m["eval"][metric], "eval": m["eval"],
            "teacher": (m.get("teacher_eval") or {}).get(metric), "steps": m["steps"],
            "step_time_s": m["step_time_s"], "train_runtime_s": m["train_runtime_s"],
            "eval_examples": m.get("eval_examples"), "task": m.get("task")}


def points(rows: list[dict]) -> int:
    """100 for metrics on 0-1 (accuracy, Pearson, ...), 1 for metrics already in points (SQuAD EM/F1)."""
    return 1 if any(abs(r["score"]) > 1.0 or (r.get("teacher") or 0) > 1.0 for r in rows) else 100


def markdown(rows: list[dict], dense: float | None, metric: str) -> str:
    # baseline of the same criterion, target, seed and sweep folder ("group": set when several sweeps are merged)
    base = {(r.get("group"), r.get("seed"), r["method"], r["target_sparsity"]): r["score"] for r in rows
            if r["method"] in BASELINES.values()}
    lines = [f"| method | seed | target | sparsity | {metric} | % of dense | vs same criterion + KD | steps | step time "
             "| run time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = f"{100 * r['score'] / dense:.1f} %" if dense else "-"
        ref = base.get((r.get("group"), r.get("seed"), BASELINES[r["pruning"]], r["target_sparsity"]))
        if ref is None and r.get("baseline_group"):  # a merged sweep without its own KD run (plot_sweeps --baseline)
            ref = base.get((r["baseline_group"], r.get("seed"), BASELINES[r["pruning"]], r["target_sparsity"]))
        delta = f"{points(rows) * (r['score'] - ref):+.2f}" if ref is not None and r["cap"] != "none" else "-"
        lines.append(f"| {r['label']} | {r.get('seed', '-')} | {100 * r['target_sparsity']:g} % | "
                     f"{100 * r['sparsity']:.1f} % | {points(rows) * r['score']:.2f} | {pct} | {delta} | {r.get('steps', '-')} | "
                     f"{1e3 * r['step_time_s']:.0f} ms | {r['train_runtime_s'] / 60:.1f} min |")
    head = f"Dense teacher {metric}: {points(rows) * dense:.2f}\n\n" if dense else ""
    foot = ""
    n = rows[0].get("eval_examples")
    if metric == "accuracy" and n:
        p = sum(r["score"] for r in rows) / len(rows)  # the runs' accuracies, not the teacher's, set the error
        foot = (f"\nDev set: {n} examples; one standard error of an accuracy near {100 * p:.0f} is "
                f"{100 * (p * (1 - p) / n) ** 0.5:.1f} points (one run per row).\n")
    return head + "\n".join(lines) + "\n" + foot


def seed_table(rows: list[dict], metric: str) -> str:
    """Per (method, target, extra_args): mean ± standard error over seeds (and the sd), and the paired difference
    to the KD baseline of the same criterion over the seeds both ran (mean ± its standard error). Empty when no
    method ran at two or more seeds. Scores in points (x100)."""
    by, info = {}, {}
    for r in rows:
        key = (r["method"], r["target_sparsity"], r.get("extra_args", ""))
        by.setdefault(key, {})[r.get("seed")] = r["score"]
        info.setdefault(key, r)
    lines = []
    for (method, target, extra), scores in by.items():
        if len(scores) < 2:
            continue
        first = info[(method, target, extra)]
        vals = [points(rows) * v for v in scores.values()]
        sd = statistics.stdev(vals)
        cell = f"{statistics.mean(vals):.2f} ± {sd / len(vals) ** 0.5:.2f}"
        paired = "-"
        base = by.get((BASELINES[first["pruning"]], target, extra))
        if first["cap"] != "none" and base:
            common = sorted(set(scores) & set(base))
            diffs = [points(rows) * (scores[s] - base[s]) for s in common]
            if len(diffs) >= 2:
                paired = f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs) / len(diffs) ** 0.5:.2f} " \
                         f"(n={len(diffs)})"
            elif diffs:
                paired = f"{diffs[0]:+.2f} (n=1)"
        seeds = ",".join(str(s) for s in sorted(scores))
        lines.append(f"| {first.get('name', first['label'])} | {100 * target:g} % | {seeds} | {cell} | {sd:.2f} | "
                     f"{paired} |")
    if not lines:
        return ""
    return "\n".join([f"| method | target | seeds | {metric} mean ± SE | sd | paired vs same criterion + KD ± SE |",
                      "|---|---|---|---|---|---|", *lines]) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sweep = Sweep(args)
    rows = sweep.collect() if args.collect else sweep.run()
    if rows:
        print((Path(args.output_dir) / "results.md").read_text())


if __name__ == "__main__":
    main()
