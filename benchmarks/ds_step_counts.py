"""What DeepSpeed's step bookkeeping does per optimizer step under a shipped config, counted on any device (issue 22).

A tiny BERT (2 layers, hidden 32, 53 trainable tensors) with our three parameter groups (decayed weights, undecayed
biases/LayerNorm, pruning scores) trains a few steps in one process through ``deepspeed.initialize``, built as
``cap_ds/train.py`` builds it (``build_ds_config`` + ``build_optimizer``). DeepSpeed's methods are wrapped and torch
ops counted, per optimizer step:

- ``global_norm``: global gradient-norm computations (ZeRO-1/2 ``scaled_global_norm``, ZeRO-3 ``_get_norm_groups``,
  ZeRO-1 BF16_Optimizer ``get_global_norm_of_tensors``, stage 0 ``clip_grad_norm_``); ``group_norm``: the
  per-parameter-group partial norms ZeRO builds it from; ``tensor_norm``: per-tensor norm ops;
- ``overflow_scan`` / ``tensor_inf_nan_test``: the whole-model overflow check and its per-tensor inf/NaN tests;
- ``device_synchronize``: DeepSpeed's ``get_accelerator().synchronize()`` (the throughput timer's);
- ``host_reads``: tensor reads to the host in ``engine.step()`` (``.item()``/``bool()``: a sync each on CUDA);
  ``host_scalars``: tensors made from host values in ``engine.step()`` (``torch.tensor(x, device=...)``: a blocking
  host-to-device copy each on CUDA);
- ``kernels_fwd`` / ``kernels_bwd`` / ``kernels_step``: torch ops that compute (view/metadata ops left out), a proxy
  for kernel launches. CPU counts, not GPU times.

``plain`` is the reference loop (fp32 weights, autocast bf16, torch AdamW, ``clip_grad_norm_`` 1.0); ``<config>``
is ``ds_configs/<config>.json``; ``<config>_before`` the same with the issue-22 fast settings reverted.
``--adamw fused`` steps with torch's fused AdamW as on CUDA (on the CPU the project uses foreach, whose bias
correction reads each step counter to the host).

    python benchmarks/ds_step_counts.py [--steps 5] [--adamw fused] [--json out.json] [plain zero2_bf16 ...]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_RUNS = ("plain", "zero0_autocast_bf16", "zero2_bf16", "zero2_bf16_before", "zero3_bf16", "zero3_bf16_before")
# ops that only make views or read metadata: no kernel on a GPU
VIEW_OPS = {"detach", "view", "slice", "t", "transpose", "_unsafe_view", "alias", "as_strided", "lift_fresh", "expand",
            "unsqueeze", "squeeze", "permute", "split", "split_with_sizes", "select", "narrow", "unbind", "reshape",
            "_reshape_alias", "empty", "empty_like", "new_empty", "empty_strided"}
SPARSE = {"shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": 0, "schedule_offset_end": 2,
                                "mask_init": "kaiming"},
          "different_groups": {"sp1": {"params": {"dense_ratio": 0.5},
                                       "modules": ["attention.self", "intermediate", "output.dense"]}}}
COUNTS: collections.Counter = collections.Counter()


def revert_fast_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as shipped before issue 22: DeepSpeed's default overflow check and throughput timer, no
    ``overlap_comm``."""
    cfg = copy.deepcopy(cfg)
    cfg.pop("timers", None)
    if isinstance(cfg.get("bf16"), dict):
        cfg["bf16"].pop("check_grad_overflow", None)
    cfg.setdefault("zero_optimization", {})["overlap_comm"] = False
    return cfg


def _count_calls(owner: Any, name: str, key: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        COUNTS[key] += 1
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def instrument() -> None:
    """Wrap the DeepSpeed methods counted (once per process)."""
    import deepspeed.runtime.bf16_optimizer as ds_bf16
    import deepspeed.runtime.engine as ds_engine
    import deepspeed.runtime.zero.stage3 as ds_z3
    import deepspeed.runtime.zero.stage_1_and_2 as ds_z12
    from deepspeed.accelerator import get_accelerator

    z12, z3 = ds_z12.DeepSpeedZeroOptimizer, ds_z3.DeepSpeedZeroOptimizer_Stage3
    for owner, name in ((z12, "scaled_global_norm"), (z3, "_get_norm_groups"), (ds_bf16, "get_global_norm_of_tensors"),
                        (ds_engine, "clip_grad_norm_")):
        _count_calls(owner, name, "global_norm")
    for owner, name, key in ((z12, "get_grad_norm_direct", "group_norm"), (z3, "get_grad_norm_direct", "group_norm"),
                             (z12, "has_overflow", "overflow_scan"), (z3, "has_overflow", "overflow_scan"),
                             (ds_z12, "has_inf_or_nan", "tensor_inf_nan_test"),
                             (ds_z3, "has_inf_or_nan", "tensor_inf_nan_test"),
                             (get_accelerator(), "synchronize", "device_synchronize")):
        _count_calls(owner, name, key)


def _op_counter(prefix: str, track_host: bool = False):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in VIEW_OPS and not str(func.overloadpacket).startswith("profiler"):
                COUNTS[f"kernels_{prefix}"] += 1
            if func.overloadpacket in (torch.ops.aten.linalg_vector_norm, torch.ops.aten.norm):
                COUNTS["tensor_norm"] += 1
            if track_host and name == "_local_scalar_dense":
                COUNTS["host_reads"] += 1
            if track_host and name == "lift_fresh":
                COUNTS["host_scalars"] += 1
            return func(*args, **(kwargs or {}))

    return Ops()


def tiny_model():
    """A seeded 2-layer BERT with pruning scores (so the optimizer has all three of our groups)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from cap_ds.compression import init_compression

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return init_compression(BertForSequenceClassification(cfg), {"compression_training": {"sparse_pruning": SPARSE}})


def _batch():
    import torch

    return torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 1, 0])


def run_engine(name: str, steps: int, out: Path, device_type: str | None) -> dict[str, Any]:
    """Train ``steps`` steps under ds_configs/<name>.json (``_before``: fast settings reverted); counts per step."""
    import deepspeed

    from cap_ds.training.ds_config import build_ds_config
    from cap_ds.training.optim import build_optimizer, optimizer_groups

    stem = name.removesuffix("_before")
    cfg = json.loads((REPO / "ds_configs" / f"{stem}.json").read_text())
    if name.endswith("_before"):
        cfg = revert_fast_settings(cfg)
    path = out / f"{name}.json"
    path.write_text(json.dumps(cfg))
    ds, _ = build_ds_config(path, micro_batch=4, grad_accum=1, world_size=1, max_grad_norm=1.0,
                            output_dir=str(out / name))
    model = tiny_model()
    groups = optimizer_groups(model, weight_decay=0.01, score_lr=1e-2)
    grad_tensors = sum(len(g["params"]) for g in groups)  # before ZeRO flattens the groups
    opt, params = build_optimizer(groups, ds, lr=1e-3, eps=1e-8, device_type=device_type)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=params, config=ds)
    ids, labels = _batch()
    losses, per_step = [], []
    for _ in range(steps):
        COUNTS.clear()
        with _op_counter("fwd"):
            loss = engine(input_ids=ids, labels=labels).loss
        losses.append(float(loss))
        with _op_counter("bwd"):
            engine.backward(loss)
        with _op_counter("step", track_host=True):
            engine.step()
        per_step.append(dict(COUNTS, applied=engine.was_step_applied()))
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return {"losses": losses, "per_step": per_step, "grad_tensors": grad_tensors, "groups": len(groups),
            "wrapper": type(engine.optimizer).__name__, "inner": type(inner).__name__,
            "inner_kernel": {k: inner.defaults.get(k) for k in ("fused", "foreach")}}


def run_plain(steps: int, device_type: str | None) -> dict[str, Any]:
    """The reference loop: fp32 weights, autocast bf16, torch AdamW, ``clip_grad_norm_`` 1.0."""
    import torch

    from cap_ds.training.optim import build_optimizer, optimizer_groups

    model = tiny_model()
    opt, _ = build_optimizer(optimizer_groups(model, weight_decay=0.01, score_lr=1e-2), {}, lr=1e-3, eps=1e-8,
                             device_type=device_type)
    ids, labels = _batch()
    losses, per_step = [], []
    for _ in range(steps):
        COUNTS.clear()
        with _op_counter("fwd"), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        losses.append(float(loss))
        with _op_counter("bwd"):
            loss.backward()
        with _op_counter("step", track_host=True):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        per_step.append(dict(COUNTS, applied=True))
    return {"losses": losses, "per_step": per_step}


def count_runs(names: list[str], steps: int, out: Path, device_type: str | None = None) -> dict[str, dict[str, Any]]:
    """Every run in this process (one rank, gloo on the CPU)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    instrument()
    return {name: run_plain(steps, device_type) if name == "plain" else run_engine(name, steps, out, device_type)
            for name in names}


COLUMNS = ("global_norm", "group_norm", "tensor_norm", "overflow_scan", "tensor_inf_nan_test", "device_synchronize",
           "host_reads", "host_scalars", "kernels_fwd", "kernels_bwd", "kernels_step")


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the last step's counts (the throughput timer starts syncing at step 3)."""
    lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, res in results.items():
        last = res["per_step"][-1]
        lines.append(f"| {name} | " + " | ".join(str(last.get(c, 0)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", default=list(DEFAULT_RUNS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--adamw", choices=("project", "fused"), default="project",
                        help="project: what build_optimizer picks here (foreach on the CPU); fused: as on CUDA")
    parser.add_argument("--json", help="write the per-step counts and losses here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = count_runs(args.runs, args.steps, Path(tmp), "cuda" if args.adamw == "fused" else None)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    print(table(results))
    for name, res in results.items():
        print(name, "losses", " ".join(f"{x:.5f}" for x in res["losses"]))


if __name__ == "__main__":
    main()
