"""Serving speed: dense eager, dense under CUDA graphs (the baseline) and pruned models under CUDA graphs, side by
side, through ``cap_ds.sparse.serve.BucketServer`` (issue 26): CAP-f cleaned at 50 % and 75 % of heads and FFN
neurons removed, and 90 % unstructured through ``sparsify(policy="measure")``.

    python benchmarks/bench_serve.py --device cuda --size base --batches 1,32 --jsonl serve.jsonl
    python benchmarks/bench_serve.py --device cpu --size tiny --batches 1,2 --seq 32 --reps 3   # smoke test

One JSON line per (model, mode, batch): median ms over interleaved rounds and the speed-up against the dense model
in the same serving mode (graphs on CUDA; eager on the CPU, where no graphs exist). ``--compile`` adds
``torch.compile(mode="reduce-overhead")`` rows (minutes of compilation on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_inference import base_model, capf_clean, magnitude_prune_, timed  # noqa: E402
from timing import add_host_memory_flag, apply_host_memory, int_list  # noqa: E402

from cap_ds.sparse import sparsify  # noqa: E402
from cap_ds.sparse.serve import BucketServer  # noqa: E402


def models(size: str, device: torch.device, dtype: torch.dtype, batch_tokens: int) -> dict[str, torch.nn.Module]:
    dense = base_model(size, None)
    out = {"dense": dense}
    for kept, name in ((0.5, "cap-f 50%"), (0.25, "cap-f 75%")):
        out[name] = capf_clean(dense, kept=kept)[1]
    unstructured = copy.deepcopy(dense)
    magnitude_prune_(unstructured, 0.9)
    out = {k: m.to(device, dtype).eval() for k, m in out.items()}
    out["90% sparsify"] = sparsify(unstructured.to(device, dtype).eval(), policy="measure", batch_tokens=batch_tokens)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--size", choices=("tiny", "minilm", "base"), default="base")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="also torch.compile(mode='reduce-overhead') rows")
    ap.add_argument("--jsonl", default=None)
    add_host_memory_flag(ap)
    args = ap.parse_args(argv)
    batches = int_list(ap, "--batches", args.batches)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    host_memory = apply_host_memory(args) if device.type == "cpu" else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    buckets = [(b, args.seq) for b in batches]
    served = models(args.size, device, dtype, max(batches) * args.seq)
    base_mode = "graphs" if device.type == "cuda" else "eager"
    modes = [base_mode] + (["compile"] if args.compile else [])
    servers = {("dense", "eager"): BucketServer(served["dense"], buckets, "eager")}
    for name, model in served.items():
        for mode in modes:
            servers[(name, mode)] = BucketServer(model, buckets, mode)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        x = {"input_ids": torch.randint(5, min(20000, served["dense"].config.vocab_size), (batch, args.seq),
                                        generator=g).to(device),
             "attention_mask": torch.ones(batch, args.seq, dtype=torch.long, device=device)}
        fns = {key: (lambda s=server, x=x: s(**x)) for key, server in servers.items()}
        times = timed(fns, args.reps, device)
        base = times[("dense", base_mode)][1]
        for (name, mode), (fastest, median) in times.items():
            row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "dtype": str(dtype).replace("torch.", ""), "model": name, "mode": mode, "batch": batch,
                   "seq": args.seq, "ms": round(1000 * median, 3), "ms_fastest": round(1000 * fastest, 3),
                   "speedup_vs_dense_" + base_mode: round(base / median, 3)}
            if host_memory:
                row["host_memory"] = host_memory
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
