"""ZeRO-2/3 with 2 real CPU ranks (gloo) against a world-size-1 run of the same global batch.

Each stage runs this file as a worker script: 2 ranks and 1 rank at once, each writing its numbers to a file.
Engine A trains movement + row (topk) + head (l1) pruning for a few steps, then sparsity_report, masks,
redundancy_clean logits and bake_masks (through the fp32 master: an lr-0 step must not undo it). Engine B
(movement + first-order heads/neurons) accumulates importance and prunes. Everything must agree across ranks
and with world size 1.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SPARSE = {"shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": 0, "schedule_offset_end": 2,
                                "mask_init": "kaiming"},
          "different_groups": {"sp1": {"params": {"dense_ratio": 0.5},
                                       "modules": ["attention.self", "intermediate", "output.dense"]}}}
STRUCTURED = {
    "row_pruning": {"shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": 0,
                                          "schedule_offset_end": 2},
                    "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["intermediate.dense"],
                                                 "related_modules": [[r"layer.\w+.output.dense"]]}}},
    "head_pruning": {"shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0, "num_heads": 4},
                     "different_groups": {"hp1": {"params": {"dense_ratio": 0.5}, "modules": ["attention.output.dense"],
                                                  "related_modules": [["self.query", "self.key", "self.value"]]}}},
}


def _tiny_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _engine(model, stage: int, micro: int, lr: float = 1e-2):
    import deepspeed

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine


def worker(stage: int, out: Path) -> None:
    import deepspeed

    from cap_ds.compression import (
        CompressionScheduler,
        FirstOrderPruner,
        bake_masks,
        first_order_section,
        init_compression,
        masked_modules,
        parameter_counts,
        redundancy_clean,
        sparsity_report,
    )
    from cap_ds.compression.zero import gathered, module_params

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 8), generator=g)
    labels = torch.tensor([0, 1, 1, 0])
    micro = 4 // world
    mine = slice(rank * micro, (rank + 1) * micro)
    res: dict = {}

    # ---- engine A: movement + row topk + head l1, trained
    cfg_a = {"compression_training": {"sparse_pruning": SPARSE, **STRUCTURED}}
    model = init_compression(_tiny_model(), cfg_a)
    sched = CompressionScheduler(model, cfg_a)
    engine = _engine(model, stage, micro)
    if stage == 3:  # really partitioned: outside forward a rank holds no full weight
        weight = engine.module.bert.encoder.layer[0].intermediate.dense.weight
        assert weight.numel() == 0 and weight.ds_numel == 48 * 32, (weight.shape, weight.ds_numel)
    for _ in range(3):
        loss = engine(input_ids=ids[mine], labels=labels[mine]).loss
        engine.backward(loss)
        engine.step()
        if engine.was_step_applied():
            sched.step()
    report = sparsity_report(engine.module)
    res["report"] = {k: report[k] for k in ("sparsity", "zeros", "total", "structured")}
    masks = {}
    for name, module in masked_modules(engine).items():
        with gathered(module_params(module)):
            masks[name] = module.get_mask().bool().clone()
    res["masks"] = masks
    engine.eval()
    with torch.no_grad():
        res["masked_logits"] = engine(input_ids=ids).logits.detach().clone()
    clean = redundancy_clean(engine, cfg_a).eval()
    with torch.no_grad():
        res["clean_logits"] = clean(input_ids=ids).logits.clone()
    res["params"] = parameter_counts(engine, clean)
    res["layer_heads"] = list(clean.config.layer_heads)
    res["layer_intermediate_sizes"] = list(clean.config.layer_intermediate_sizes)
    # bake through the master copy: an lr-0 step must keep the baked weights
    bake_masks(engine)
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    engine.train()
    engine.backward(engine(input_ids=ids[mine], labels=labels[mine]).loss)
    engine.step()
    engine.eval()
    with torch.no_grad():
        res["baked_logits"] = engine(input_ids=ids).logits.detach().clone()

    # ---- engine B: movement + first-order heads/neurons
    cfg_b = {"compression_training": {"sparse_pruning": SPARSE, **first_order_section(4)}}
    model_b = init_compression(_tiny_model(), cfg_b)
    engine_b = _engine(model_b, stage, micro)
    pruner = FirstOrderPruner(engine_b, cfg_b)
    engine_b.eval()
    pruner.start_accumulation()
    # Importance sums |dL/dgate| per micro-batch of 2: each rank takes its own, world size 1 takes both.
    for _ in range(2):
        for part in ([rank] if world == 2 else [0, 1]):
            batch = slice(2 * part, 2 * part + 2)
            engine_b.backward(engine_b(input_ids=ids[batch], labels=labels[batch]).loss)
            engine_b.zero_grad()
    pruner.stop_accumulation()
    res["importance"] = {k: v.clone() for k, v in pruner.importance.items()}
    res["prune_50"] = pruner.prune_step(0.5)
    res["fo_masks"] = {k: v for k, v in pruner.state_dict()["masks"].items()}
    with torch.no_grad():
        res["fo_masked_logits"] = engine_b(input_ids=ids).logits.detach().clone()
    clean_b = redundancy_clean(engine_b, cfg_b).eval()
    with torch.no_grad():
        res["fo_clean_logits"] = clean_b(input_ids=ids).logits.clone()
    res["fo_layer_heads"] = list(clean_b.config.layer_heads)
    torch.save(res, out / f"w{world}_r{rank}.pt")
    torch.distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(stage: int, out: Path) -> None:
    procs = []
    for world in (2, 1):
        port = _free_port()
        for rank in range(world):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "PYTHONPATH": str(ROOT),
                   "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
            log = open(out / f"log_w{world}_r{rank}.txt", "w")
            procs.append((subprocess.Popen([sys.executable, __file__, "--stage", str(stage), "--out", str(out)],
                                           env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=150)
        finally:
            log.close()
            if proc.poll() is None:
                proc.kill()
    for path in sorted(out.glob("log_*.txt")):
        if not (out / path.name.replace("log_", "").replace(".txt", ".pt")).exists():
            raise AssertionError(f"{path.name} did not finish:\n{path.read_text()[-3000:]}")


def _assert_same(a, b, path: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        if a.dtype == torch.bool or not a.is_floating_point():
            assert torch.equal(a, b), path
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=path)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9), path
    else:
        assert a == b, path


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_ranks_match_one(stage: int, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    _launch(stage, tmp_path)
    r0, r1, w1 = (torch.load(tmp_path / f, weights_only=False) for f in ("w2_r0.pt", "w2_r1.pt", "w1_r0.pt"))
    for key in ("report", "masks", "params", "layer_heads", "layer_intermediate_sizes", "fo_masks", "prune_50",
                "fo_layer_heads"):
        _assert_same(r0[key], r1[key], key)  # identical on both ranks (masks exactly)
        _assert_same(r0[key], w1[key], key)  # and as at world size 1
    for key in ("importance", "masked_logits", "clean_logits", "fo_masked_logits", "fo_clean_logits"):
        _assert_same(r0[key], r1[key], key)
        _assert_same(r0[key], w1[key], key)
    for res in (r0, w1):
        # exact structure: 2 of 4 heads and 24 of 48 neurons per layer, half of every sparse weight matrix
        assert res["layer_heads"] == [2, 2] and res["layer_intermediate_sizes"] == [24, 24]
        assert res["report"]["structured"]["bert.encoder.layer.0.intermediate.dense"]["rows"] == [24, 48]
        assert res["prune_50"]["heads"] == {"total": 8, "target_pruned": 4, "pruned": 4, "kept": 4}
        assert res["prune_50"]["neurons"]["pruned"] == 48
        dense, small = res["params"]
        assert small < dense
        torch.testing.assert_close(res["clean_logits"], res["masked_logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(res["fo_clean_logits"], res["fo_masked_logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(res["baked_logits"], res["masked_logits"], rtol=0, atol=1e-5)
        assert all(v.sum() > 0 for v in res["importance"].values())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    cli = parser.parse_args()
    worker(cli.stage, cli.out)
