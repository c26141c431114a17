"""Who should run the CPU sparse kernel's tasks: ATen's OpenMP team (default) or cap_ds's TaskPool.

One process, interleaved rounds: the dense model, the sparsified model with the kernel on OpenMP, and the same
model with the kernel on TaskPool (``set_cpu_threading``); median ms and the speed-up over dense of each.

    python benchmarks/cpu_threading.py --model out/cap/final --batch 32 --rounds 8 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an exported (unstructured) model folder")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cap_ds.ops import load_kernels
    from cap_ds.run.speed import load_export
    from cap_ds.sparse import sparsify
    from cap_ds.sparse.measure import interleaved_times

    kernels = load_kernels()
    if kernels is None:
        ap.error("cap_masked_gemm could not be built")
    dense = load_export(Path(args.model))
    sparse = sparsify(copy.deepcopy(dense), policy="csr")
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(1000, 20000, (args.batch, args.seq), generator=g),
         "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}

    def on(mode: int):
        kernels.set_cpu_threading(mode)
        return sparse(**x)

    times = interleaved_times({"dense": lambda: dense(**x), "openmp": lambda: on(0), "taskpool": lambda: on(1)},
                              args.rounds, torch.device("cpu"))
    kernels.set_cpu_threading(0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    row = {"batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
           **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
           "openmp_speedup": round(ms["dense"] / ms["openmp"], 2), "taskpool_speedup": round(ms["dense"] / ms["taskpool"], 2)}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
