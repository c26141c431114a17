"""Page faults and serving speed on the CPU: glibc's default malloc against ``retain_freed_memory``.

Each mode runs in its own fresh processes (the setting is process-wide and glibc's default adapts as a process
runs), alternating default / retain ``--processes`` times. Inside a process the dense model and its ``sparsify``'d
self (``policy="csr"``) are timed in interleaved rounds, so the speed-up within a process is a same-load ratio;
minor page faults per forward (``ru_minflt``) say where the difference comes from.

    python benchmarks/cpu_host_memory.py --model out/cap/final --threads 2
    python benchmarks/cpu_host_memory.py --tiny --batches 2 --rounds 2 --processes 1   # seconds (the test)
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cap_ds
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from cpu_breakdown import add_model_flags, model_under_test  # noqa: E402
from timing import int_list  # noqa: E402


def child(args: argparse.Namespace) -> None:
    """One process in one mode: a JSON line per batch size."""
    from transformers.utils import logging as hf_logging

    from cap_ds.runtime.host_memory import host_memory_mode, retain_freed_memory
    from cap_ds.sparse import sparsify

    if args.child == "retain":
        retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    dense = model_under_test(args).eval()
    sparse = sparsify(copy.deepcopy(dense), policy="csr")
    models = {"dense": dense, "sparse": sparse}
    for batch in args.batch_list:
        ids = torch.randint(1000, 20000, (batch, args.seq), generator=torch.Generator().manual_seed(batch))
        times: dict[str, list[float]] = {k: [] for k in models}
        faults = dict.fromkeys(models, 0)
        with torch.inference_mode():
            for _ in range(2):  # warm-up; the heap reaches its steady size
                for model in models.values():
                    model(input_ids=ids)
            for _ in range(args.rounds):
                for name, model in models.items():
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = time.perf_counter()
                    model(input_ids=ids)
                    times[name].append(time.perf_counter() - t0)
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(json.dumps({"mode": host_memory_mode(), "batch": batch, "dense_ms": ms["dense"],
                          "sparse_ms": ms["sparse"], "speedup": ms["dense"] / ms["sparse"],
                          "faults_per_forward": {k: v / args.rounds for k, v in faults.items()}}), flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(ap)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--processes", type=int, default=3, help="fresh processes per mode, alternating")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--jsonl", default=None, help="append the per-mode medians as JSON lines here")
    ap.add_argument("--child", choices=("default", "retain"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch_list = int_list(ap, "--batches", args.batches)
    if args.child:
        child(args)
        return []
    passthrough = ["--sparsity", str(args.sparsity), "--batches", args.batches, "--seq", str(args.seq),
                   "--rounds", str(args.rounds), *(["--model", args.model] if args.model else []),
                   *(["--tiny"] if args.tiny else []), *(["--threads", str(args.threads)] if args.threads else [])]
    runs: list[dict] = []
    for _ in range(args.processes):
        for mode in ("default", "retain"):
            done = subprocess.run([sys.executable, __file__, *passthrough, "--child", mode], capture_output=True,
                                  text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"child ({mode}) failed:\n{done.stderr[-3000:]}")
            runs += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    summary = []
    print(f"{torch.get_num_threads() if not args.threads else args.threads} threads, seq {args.seq}, median over "
          f"{args.processes} process(es) per mode, {args.rounds} interleaved rounds each")
    print("| host memory | batch | dense ms | sparse ms | speed-up | faults/forward dense | sparse |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch_list:
        for mode in ("default", "retained"):
            rows = [r for r in runs if r["mode"] == mode and r["batch"] == batch]
            med = {k: statistics.median(r[k] for r in rows) for k in ("dense_ms", "sparse_ms", "speedup")}
            flt = {k: statistics.median(r["faults_per_forward"][k] for r in rows) for k in ("dense", "sparse")}
            row = {"mode": mode, "batch": batch, "seq": args.seq, "processes": len(rows), **med,
                   "faults_per_forward": flt}
            summary.append(row)
            print(f"| {mode} | {batch} | {med['dense_ms']:.2f} | {med['sparse_ms']:.2f} | {med['speedup']:.2f}x | "
                  f"{flt['dense']:.0f} | {flt['sparse']:.0f} |")
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            for row in summary:
                f.write(json.dumps(row) + "\n")
    return summary


if __name__ == "__main__":
    main()
