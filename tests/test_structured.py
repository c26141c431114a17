"""Structured masks (rows = FFN neurons, heads = attention output columns) and the first-order pruner (CAP-f)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from cap_ds.compression import (
    CompressionConfigError,
    CompressionScheduler,
    FirstOrderPruner,
    MaskedLinear,
    first_order_section,
    init_compression,
    masked_modules,
    sparsity_report,
)


def tiny_bert(layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def structured_cfg(method: str = "l1", rows: float = 0.5, heads: float = 0.5, sparse: str | None = None) -> dict:
    section = {
        "row_pruning": {"shared_parameters": {"enabled": True, "method": method, "schedule_offset": 0},
                        "different_groups": {"rp": {"params": {"dense_ratio": rows}, "modules": [r"intermediate\.dense"],
                                                    "related_modules": [[r"layer\.\d+\.output\.dense"]]}}},
        "head_pruning": {"shared_parameters": {"enabled": True, "method": method, "schedule_offset": 0,
                                               "num_heads": 4},
                         "different_groups": {"hp": {"params": {"dense_ratio": heads},
                                                     "modules": [r"attention\.output\.dense"],
                                                     "related_modules": [["self.query", "self.key", "self.value"]]}}},
    }
    if sparse:
        section["sparse_pruning"] = {
            "shared_parameters": {"enabled": True, "method": sparse, "schedule_offset": 0},
            "different_groups": {"sp": {"params": {"dense_ratio": 0.5}, "modules": [r"encoder\.layer"]}}}
    return {"compression_training": section}


def batch(n: int = 4, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": torch.randint(0, 64, (n, seq), generator=g), "attention_mask": mask,
            "labels": torch.arange(n) % 2}


# ---------------------------------------------------------------- masks
def test_row_mask_zeros_rows_and_bias():
    model = init_compression(tiny_bert(), structured_cfg("l1", rows=0.25))
    CompressionScheduler(model, structured_cfg("l1", rows=0.25))
    inter = masked_modules(model)["bert.encoder.layer.0.intermediate.dense"]
    row = inter.row_mask()
    assert int(row.sum()) == 12  # floor(0.25 * 48)
    norms = inter.weight.detach().abs().sum(1)
    assert norms[row.bool()].min() >= norms[~row.bool()].max()
    out = inter(torch.randn(3, 32))
    assert torch.equal(out[:, ~row.bool()], torch.zeros(3, 36))  # weight rows and bias gone: GELU(0) = 0


def test_head_mask_equals_zeroing_the_heads_context():
    model = init_compression(tiny_bert(), structured_cfg("l1", heads=0.5))
    CompressionScheduler(model, structured_cfg("l1", heads=0.5))
    attn = model.bert.encoder.layer[0].attention
    o = attn.output.dense
    heads = o.head_mask()
    assert int(heads.sum()) == 2 and o.head_size == 8
    h = torch.randn(2, 5, 32)
    context, _ = attn.self(h)
    zeroed = context * heads.repeat_interleave(8)  # the head's context is zero
    expected = torch.nn.functional.linear(zeroed, o.weight, o.bias)
    torch.testing.assert_close(o(context), expected)
    # L1 of each head's column block decides
    l1 = o.weight.detach().abs().reshape(32, 4, 8).sum((0, 2))
    assert l1[heads.bool()].min() >= l1[~heads.bool()].max()


def test_mask_order_sparse_row_head():
    m = MaskedLinear(16, 8, method="magnitude")
    m.enable_row_pruning("l1")
    m.enable_head_pruning("l1", num_heads=4)
    m.threshold, m.row_threshold, m.head_threshold = 0.5, 0.5, 0.5
    sparse = m.sparse_mask()
    expected = sparse * m.row_mask()[:, None] * m.head_mask().repeat_interleave(4)[None, :]
    assert torch.equal(m.get_mask(), expected)
    assert torch.equal(m.masked_weight(), m.weight * expected)
    assert torch.equal(m.masked_bias(), m.bias * m.row_mask())


def test_topk_structured_scores_learn():
    cfg = structured_cfg("topk", sparse="topk")
    model = init_compression(tiny_bert(), cfg)
    CompressionScheduler(model, cfg)
    model.train()
    model(**batch()).loss.backward()
    mods = masked_modules(model)
    inter, o = mods["bert.encoder.layer.0.intermediate.dense"], mods["bert.encoder.layer.0.attention.output.dense"]
    assert inter.row_mask_scores.grad.abs().sum() > 0 and o.head_mask_scores.grad.abs().sum() > 0
    names = [n for n, _ in model.named_parameters() if "mask_scores" in n]
    assert any(n.endswith("row_mask_scores") for n in names) and any(n.endswith("head_mask_scores") for n in names)
    report = sparsity_report(model)
    assert report["structured"]["bert.encoder.layer.1.attention.output.dense"]["heads"] == [2, 4]


# ---------------------------------------------------------------- first order
def _manual_importance(model, batches) -> dict[str, torch.Tensor]:
    """Σ_batches |Σ_{tokens, columns of unit} x * dL/dx| on the gated inputs, computed without gates."""
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.bert.encoder.layer):
        for key, mod in ((f"h{i}", layer.attention.output.dense), (f"n{i}", layer.output.dense)):
            def pre(module, args, key=key):
                args[0].retain_grad()
                captured[key] = args[0]
            hooks.append(mod.register_forward_pre_hook(pre))
    total: dict[str, torch.Tensor] = {}
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
        for key, x in captured.items():
            contrib = (x * x.grad).sum((0, 1))
            if key.startswith("h"):
                contrib = contrib.reshape(4, 8).sum(1)
            total[key] = total.get(key, 0) + contrib.abs()
    for h in hooks:
        h.remove()
    return total


def test_first_order_importance_is_sum_of_abs_gate_grads():
    model = tiny_bert().double()  # gate grads are sums with heavy cancellation: compare in float64
    pruner = FirstOrderPruner(model, {"compression_training": first_order_section(4)})  # plain model: auto init
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, MaskedLinear)
    batches = [batch(), {k: v[1:] for k, v in batch().items()}]
    pruner.start_accumulation()
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
    pruner.stop_accumulation()
    # gates are not parameters and leave the forward once stopped
    assert not any("gate" in n for n, _ in model.named_parameters())
    manual = _manual_importance(model, batches)
    for i in range(2):
        torch.testing.assert_close(pruner.importance[f"bert.encoder.layer.{i}.attention.output.dense"],
                                   manual[f"h{i}"].float(), rtol=1e-5, atol=0)
        torch.testing.assert_close(pruner.importance[f"bert.encoder.layer.{i}.intermediate.dense"],
                                   manual[f"n{i}"].float(), rtol=1e-5, atol=0)
    # sum of per-batch |grad| (not |sum of grads|): two passes over the same batch double it
    single = FirstOrderPruner(model)
    single.start_accumulation()
    for _ in range(2):
        model(**batch()).loss.backward()
    single.stop_accumulation()
    once = _manual_importance(model, [batch()])
    torch.testing.assert_close(single.importance["bert.encoder.layer.1.attention.output.dense"],
                               2 * once["h1"].float(), rtol=1e-5, atol=0)


def _reference_selection(norm: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], need: int) -> set:
    candidates = []
    for name, imp in norm.items():
        alive = [i for i in range(len(imp)) if masks[name][i] > 0]
        if not alive:
            continue
        protected = max(alive, key=lambda i: (imp[i].item(), -i))
        candidates += [(imp[i].item(), name, i) for i in alive if i != protected]
    return {(n, i) for _, n, i in sorted(candidates, key=lambda c: c[0])[:need]}


def test_prune_step_global_cumulative_with_protection():
    model = tiny_bert(layers=3)
    pruner = FirstOrderPruner(model, {"compression_training": first_order_section(4)})
    pruner.start_accumulation()
    for _ in range(2):
        model(**batch()).loss.backward()
    pruner.stop_accumulation()
    norm = pruner.normalized_importance()
    for v in norm.values():
        assert v.norm().item() == pytest.approx(1.0, rel=1e-5)
    heads = {u.owner: u for u in pruner.units if u.kind == "heads"}
    before = {n: pruner.mask(u) for n, u in heads.items()}
    result = pruner.prune_step(0.3)
    assert result["heads"] == {"total": 12, "target_pruned": 3, "pruned": 3, "kept": 9}
    assert result["neurons"]["pruned"] == math.floor(144 * 0.3)
    chosen = {(n, i) for n, u in heads.items() for i in range(4) if pruner.mask(u)[i] == 0}
    assert chosen == _reference_selection({n: norm[n] for n in heads}, before, 3)
    # cumulative: 0.6 prunes 7 heads in total, keeps every earlier choice
    result = pruner.prune_step(0.6)
    assert result["heads"]["pruned"] == 7
    assert all(pruner.mask(heads[n])[i] == 0 for n, i in chosen)
    # the protected unit: at 0.99 every layer keeps exactly one head and one neuron
    result = pruner.prune_step(0.99)
    report = pruner.report()
    assert set(report["heads"].values()) == {1} and set(report["neurons"].values()) == {1}
    assert result["heads"]["target_pruned"] == 11 and result["heads"]["pruned"] == 9  # 3 protected heads
    # pruned heads contribute nothing: output projection columns are zero
    o = model.bert.encoder.layer[0].attention.output.dense
    kept = pruner.kept_units("heads")["bert.encoder.layer.0.attention.output.dense"]
    cols = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in range(4) if h not in kept])
    assert torch.equal(o.masked_weight()[:, cols], torch.zeros(32, 24))


def test_first_order_state_dict_roundtrip():
    model = tiny_bert()
    cfg = {"compression_training": first_order_section(4)}
    pruner = FirstOrderPruner(model, cfg)
    pruner.start_accumulation()
    model(**batch()).loss.backward()
    pruner.prune_step(0.5)
    state = pruner.state_dict()
    other_model = tiny_bert()
    other = FirstOrderPruner(other_model, cfg)
    other.load_state_dict(state)
    assert other.report() == pruner.report()
    for k in state["importance"]:
        assert torch.equal(other.importance[k], pruner.importance[k])
    with torch.no_grad():
        b = batch()
        torch.testing.assert_close(other_model(**b).logits, model(**b).logits)


def test_first_order_config_errors():
    with pytest.raises(CompressionConfigError, match="first_order"):
        FirstOrderPruner(tiny_bert(), structured_cfg("l1"))
    bad = {"compression_training": first_order_section(4)}
    del bad["compression_training"]["row_pruning"]["different_groups"]["fo_neurons"]["related_modules"]
    with pytest.raises(CompressionConfigError, match="related_modules is required for first_order"):
        FirstOrderPruner(tiny_bert(), bad)
    with pytest.raises(ValueError, match="target_fraction"):
        FirstOrderPruner(tiny_bert(), {"compression_training": first_order_section(4)}).prune_step(1.0)
