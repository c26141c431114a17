"""cap_masked_gemm CPU kernels vs torch: sparse linear (inference) and masked linear (training), in one run.

Sparse linear: y = x @ W^T for x [M, K] dense and W [N, K] with unstructured zeros, fp32, timed as
  dense      F.linear(x, W)
  torch CSR  torch.sparse.mm(W_csr, x.t())   (output left as the transposed view, a favour to CSR)
  ours       cap_masked_gemm.csr_linear(x, CSR of W)
Timings are interleaved round-robin (one call of each per round) and the median is reported, so that load from
other processes hits all three alike. No bias anywhere (ours would add it for free in the write-back).

Masked linear (training): forward + backward of x @ (W*M)^T + b through the kernel vs the PyTorch expression,
with the bytes autograd keeps between forward and backward.

    python benchmarks/bench_kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
import torch.nn.functional as F
from timing import interleaved  # noqa: E402  (benchmarks/ is on sys.path)

SHAPES = ((512, 768, 3072), (512, 3072, 768))
SPARSITIES = (0.5, 0.9, 0.97)


def unstructured(n: int, k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Random weight with exactly round(sparsity * n * k) zeros at random places."""
    w = torch.randn(n, k, generator=gen)
    zeros = torch.randperm(n * k, generator=gen)[: int(round(sparsity * n * k))]
    w.view(-1)[zeros] = 0
    return w


def spmm_case(op, x: torch.Tensor, w: torch.Tensor, reps: int) -> dict:
    n = w.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        w_csr = w.to_sparse_csr()
    row_ptr, col_idx = w_csr.crow_indices().to(torch.int32), w_csr.col_indices().to(torch.int32)
    values = w_csr.values()
    with torch.inference_mode():
        ref = F.linear(x, w)
        err = (op.csr_linear(x, row_ptr, col_idx, values, None, n) - ref).abs().max().item()
        err_csr = (torch.sparse.mm(w_csr, x.t()).t() - ref).abs().max().item()
        t = interleaved({
            "dense": lambda: F.linear(x, w),
            "csr": lambda: torch.sparse.mm(w_csr, x.t()),
            "ours": lambda: op.csr_linear(x, row_ptr, col_idx, values, None, n),
        }, reps)
    return dict(err=err, err_csr=err_csr, **t)


def bench_spmm(op, reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m, k, n in SHAPES:
        x = torch.randn(m, k, generator=gen)
        for sparsity in SPARSITIES:
            case = spmm_case(op, x, unstructured(n, k, sparsity, gen), reps)
            rows.append(dict(shape=f"{m}x{k}->{n}", sparsity=sparsity, **case))
    return rows


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """Run fn under a saved-tensors hook: its output and the bytes of distinct storages autograd kept."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def training_case(m: int, k: int, n: int, gen: torch.Generator, reps: int) -> dict:
    from cap_ds.ops.masked_linear import masked_linear, masked_linear_reference

    x = torch.randn(m, k, generator=gen, requires_grad=True)
    w = torch.randn(n, k, generator=gen, requires_grad=True)
    scores = torch.randn(n, k, generator=gen, requires_grad=True)
    b = torch.randn(n, generator=gen, requires_grad=True)
    keep = (torch.rand(n, k, generator=gen) < 0.1).float()
    g = torch.randn(m, n, generator=gen)

    def step(fn):
        mask = keep + scores - scores.detach()  # straight-through to the scores, as movement pruning
        y = fn(x, w, mask, b)
        return y, torch.autograd.grad(y, (x, w, scores, b), g)

    results, kept = {}, {}
    for name, fn in (("pytorch", masked_linear_reference), ("ours", masked_linear)):
        (results[name], kept[name]) = saved_bytes(lambda fn=fn: step(fn))
    ours, ref = results["ours"], results["pytorch"]
    same = all(torch.equal(a, r) for a, r in zip((ours[0], *ours[1]), (ref[0], *ref[1])))
    t = interleaved({"pytorch": lambda: step(masked_linear_reference), "ours": lambda: step(masked_linear)},
                    max(5, reps // 3))
    return dict(same=same, kept_pytorch=kept["pytorch"], kept_ours=kept["ours"], **t)


def bench_training(reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    return [dict(shape=f"{m}x{k}->{n}", **training_case(m, k, n, gen, reps)) for m, k, n in SHAPES]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--no_training", action="store_true", help="skip the masked-linear (training) part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cap_ds.ops import load_kernels

    op = load_kernels()
    if op is None:
        print("cap_masked_gemm could not be built; nothing to benchmark", file=sys.stderr)
        return 1

    print(f"CPU sparse linear y = x @ W^T, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} interleaved rounds")
    header = (f"{'M x K -> N':<15} {'sparsity':>8} {'dense ms':>9} {'CSR ms':>8} {'ours ms':>8} "
              f"{'dense/ours':>10} {'CSR/ours':>9} {'max|err|':>9}")
    print(header)
    print("-" * len(header))
    rows = bench_spmm(op, args.reps)
    for r in rows:
        print(f"{r['shape']:<15} {r['sparsity']:>8.0%} {r['dense'] * 1e3:>9.2f} {r['csr'] * 1e3:>8.2f} "
              f"{r['ours'] * 1e3:>8.2f} {r['dense'] / r['ours']:>9.1f}x {r['csr'] / r['ours']:>8.1f}x "
              f"{r['err']:>9.1e}")

    def check(sparsity: float, target: float) -> str:
        ratios = [r["dense"] / r["ours"] for r in rows if r["sparsity"] == sparsity]
        ok = all(q >= target for q in ratios)
        return f"{'met' if ok else 'MISSED'} ({', '.join(f'{q:.1f}x' for q in ratios)})"

    print(f"target >= 4x dense at 90%: {check(0.9, 4.0)}; >= 10x dense at 97%: {check(0.97, 10.0)}")
    slower = [f"{r['shape']}@{r['sparsity']:.0%}" for r in rows if r["ours"] > r["csr"]]
    print(f"never slower than torch CSR: {'met' if not slower else 'MISSED at ' + ', '.join(slower)}")

    if not args.no_training:
        print()
        print("Training masked linear, forward + backward (dx, dW, dscores, db), 10% kept, fp32")
        header = (f"{'M x K -> N':<15} {'pytorch ms':>10} {'ours ms':>8} {'speed':>6} {'saved MB pytorch':>16} "
                  f"{'saved MB ours':>13} {'bit-identical':>13}")
        print(header)
        print("-" * len(header))
        for r in bench_training(args.reps):
            print(f"{r['shape']:<15} {r['pytorch'] * 1e3:>10.2f} {r['ours'] * 1e3:>8.2f} "
                  f"{r['pytorch'] / r['ours']:>5.2f}x {r['kept_pytorch'] / 2**20:>16.1f} "
                  f"{r['kept_ours'] / 2**20:>13.1f} {str(r['same']):>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
