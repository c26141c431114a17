"""cap_ds.compression: the DeepSpeed schema (valid and invalid configs), sparse masks (l1/topk/movement/N:M),
the cubic schedule and DeepSpeed's shipped bugs (schedule_offset_end KeyError, bf16 masks, full sort)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from cap_ds.compression import (
    CompressionConfigError,
    CompressionScheduler,
    MaskedLinear,
    compression_scheduler,
    first_order_section,
    init_compression,
    masked_modules,
    parse_compression_config,
    sparsity_report,
    strip_compression_section,
)
from cap_ds.compression.methods import nm_mask

# DeepSpeedExamples' model_compression/bert/config/ds_config_TEMPLATE.json with values filled in.
DS_TEMPLATE = {
    "train_batch_size": 32,
    "zero_optimization": {"stage": 0},
    "compression_training": {
        "layer_reduction": {"enabled": False, "keep_number_layer": 5, "module_name_prefix": "bert.encoder.layer",
                            "teacher_layer": [2, 4, 6, 8, 10], "other_module_name": ["bert.pooler"]},
        "weight_quantization": {"shared_parameters": {"enabled": False, "schedule_offset": 0},
                                "different_groups": {"wq1": {"params": {"start_bits": 8, "target_bits": 8},
                                                             "modules": ["attention.self"]}}},
        "sparse_pruning": {"shared_parameters": {"enabled": True, "schedule_offset": 2, "method": "l1"},
                           "different_groups": {"sp1": {"params": {"dense_ratio": 0.5},
                                                        "modules": ["attention.self", "output.dense", "intermediate"]}}},
        "row_pruning": {"shared_parameters": {"enabled": True, "schedule_offset": 2, "method": "topk"},
                        "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["intermediate.dense"],
                                                     "related_modules": [["layer.\\w+.output.dense"]]}}},
        "head_pruning": {"shared_parameters": {"enabled": True, "schedule_offset": 2, "method": "topk", "num_heads": 4},
                         "different_groups": {"rp1": {"params": {"dense_ratio": 0.5},
                                                      "modules": ["attention.output.dense"],
                                                      "related_modules": [["self.query", "self.key", "self.value"]]}}},
    },
}


def tiny_bert(intermediate: int = 48, layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=intermediate, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def sparse_cfg(method: str = "l1", ratio: float = 0.5, **shared) -> dict:
    return {"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": method, "schedule_offset": 0, **shared},
        "different_groups": {"sp1": {"params": {"dense_ratio": ratio}, "modules": [r"encoder\.layer\.\d+\."]}}}}}


# ---------------------------------------------------------------- schema
def test_deepspeed_template_runs_unchanged():
    model = init_compression(tiny_bert(), DS_TEMPLATE)
    mods = masked_modules(model)
    # sparse on every encoder linear (regexes overlap: fine within a group), row on intermediate, head on attn output
    assert len(mods) == 12
    inter = mods["bert.encoder.layer.0.intermediate.dense"]
    attn_out = mods["bert.encoder.layer.1.attention.output.dense"]
    assert (inter.method, inter.row_method, inter.head_method) == ("magnitude", "topk", None)
    assert (attn_out.method, attn_out.row_method, attn_out.head_method) == ("magnitude", None, "topk")
    assert tuple(inter.row_mask_scores.shape) == (48, 1) and tuple(attn_out.head_mask_scores.shape) == (1, 4)
    sched = compression_scheduler(model, DS_TEMPLATE)
    for _ in range(5):  # past schedule_offset with no schedule_offset_end: DeepSpeed raised KeyError here
        sched.step()
    assert inter.threshold == 0.5 and inter.row_threshold == 0.5 and attn_out.head_threshold == 0.5
    report = sparsity_report(model)
    assert report["structured"]["bert.encoder.layer.0.intermediate.dense"]["rows"] == [24, 48]
    assert report["structured"]["bert.encoder.layer.0.attention.output.dense"]["heads"] == [2, 4]
    model(input_ids=torch.randint(0, 64, (2, 5)))
    assert "compression_training" not in strip_compression_section(DS_TEMPLATE)


def test_switch_on_at_offset_without_end():
    model = init_compression(tiny_bert(), sparse_cfg(schedule_offset=3))
    sched = CompressionScheduler(model, sparse_cfg(schedule_offset=3))
    q = masked_modules(model)["bert.encoder.layer.0.attention.self.query"]
    seen = []
    for _ in range(5):
        seen.append(q.threshold)
        sched.step()
    assert seen == [1.0, 1.0, 1.0, 0.5, 0.5]


def test_cubic_ramp_and_stride():
    cfg = sparse_cfg(ratio=0.1, schedule_offset=2, schedule_offset_end=12, schedule_offset_stride=2)
    model = init_compression(tiny_bert(), cfg)
    sched = CompressionScheduler(model, cfg)
    sched.set_step(7)  # stride 2 -> evaluated at step 6: 0.1 + 0.9 * (1 - 4/10)^3
    assert sched.threshold == pytest.approx(0.1 + 0.9 * 0.6**3)
    sched.set_step(12)
    assert sched.threshold == pytest.approx(0.1)
    state = sched.state_dict()
    other = CompressionScheduler(model, cfg)
    other.load_state_dict(state)
    assert other.training_steps == 12 and other.threshold == pytest.approx(0.1)


def _err(cfg: dict, *fragments: str, model: nn.Module | None = None) -> None:
    with pytest.raises(CompressionConfigError) as info:
        init_compression(model or tiny_bert(), cfg)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def _with(path: list[str], value, base: dict | None = None) -> dict:
    cfg = copy.deepcopy(base or DS_TEMPLATE)
    node = cfg["compression_training"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


@pytest.mark.parametrize("ratio", [0, 1.5, -0.2, "half"])
def test_bad_dense_ratio(ratio):
    _err(_with(["row_pruning", "different_groups", "rp1", "params", "dense_ratio"], ratio),
         "compression_training.row_pruning.different_groups.rp1.params.dense_ratio")


def test_bad_method_and_unknown_keys():
    _err(_with(["head_pruning", "shared_parameters", "method"], "snip_momentum"),
         "compression_training.head_pruning.shared_parameters.method", "allowed: topk, l1, first_order")
    _err(_with(["sparse_pruning", "shared_parameters", "method"], "random"), "sparse_pruning.shared_parameters.method")
    _err(_with(["sparse_pruning", "shared_parameters", "dense_ration"], 0.5), "unknown key(s) ['dense_ration']")
    _err(_with(["row_pruning", "different_groups", "rp1", "modulez"], ["x"]), "different_groups.rp1: unknown key")
    _err(_with(["row_pruning", "different_groups", "rp1", "params", "ratio"], 0.5), "rp1.params: unknown key")
    _err(_with(["row_pruning", "extra"], {}), "compression_training.row_pruning: unknown key(s) ['extra']")
    _err(_with(["sparse_pruningg"], {}), "unknown technique(s) ['sparse_pruningg']")
    _err(_with(["weight_quantization", "shared_parameters", "enabled"], True), "weight_quantization is enabled")
    _err(_with(["layer_reduction", "enabled"], True), "layer_reduction is enabled")
    _err(_with(["head_pruning", "shared_parameters"], {"enabled": True}), "head_pruning.shared_parameters.num_heads")


def test_regex_matching_nothing_and_overlap():
    _err(_with(["sparse_pruning", "different_groups", "sp1", "modules"], ["attention.self", "decoder"]),
         "sparse_pruning.different_groups.sp1.modules[1] 'decoder' matches no linear")
    overlap = _with(["sparse_pruning", "different_groups", "sp2"],
                    {"params": {"dense_ratio": 0.3}, "modules": ["intermediate.dense"]})
    _err(overlap, "matched by sparse_pruning groups 'sp1' and 'sp2'")
    _err(_with(["head_pruning", "shared_parameters", "num_heads"], 5), "num_heads 5 does not divide")


def test_related_modules_pairing():
    # "output.dense" also matches attention.output.dense: pairing by shape + same layer picks layer.N.output.dense
    loose = _with(["row_pruning", "different_groups", "rp1", "related_modules"], [["output.dense"]])
    from cap_ds.compression.groups import resolve

    model = tiny_bert()
    plan = resolve(model, parse_compression_config(loose))
    assert [a.related for a in plan["row_pruning"]] == [["bert.encoder.layer.0.output.dense"],
                                                         ["bert.encoder.layer.1.output.dense"]]
    assert plan["head_pruning"][1].related == [f"bert.encoder.layer.1.attention.self.{n}"
                                               for n in ("query", "key", "value")]
    # when shapes cannot tell them apart (intermediate == hidden) the loose regex is an error, not a wrong pair
    _err(loose, "ambiguous", r"layer\.\d+\.output\.dense", model=tiny_bert(intermediate=32))
    _err(_with(["row_pruning", "different_groups", "rp1", "related_modules"], [["pooler.dense"]]),
         "related_modules[0][0] 'pooler.dense': no match has in_features == 48")
    _err(_with(["row_pruning", "different_groups", "rp1", "related_modules"], [["a"], ["b"]]),
         "related_modules has 2 list(s) but modules has 1")


# ---------------------------------------------------------------- sparse masks
@pytest.mark.parametrize("method", ["l1", "magnitude", "topk", "movement"])
def test_exact_kept_counts(method):
    model = init_compression(tiny_bert(), sparse_cfg(method, 0.3, mask_init="kaiming"))
    CompressionScheduler(model, sparse_cfg(method, 0.3))
    report = sparsity_report(model)
    # every matrix keeps exactly floor(0.3 * numel)
    expected = sum(m.weight.numel() - int(0.3 * m.weight.numel()) for m in masked_modules(model).values())
    assert report["zeros"] == expected and report["total"] == 2 * (3 * 32 * 32 + 32 * 32 + 2 * 32 * 48)


def test_l1_keeps_largest_magnitudes():
    model = init_compression(tiny_bert(), sparse_cfg("l1", 0.25))
    CompressionScheduler(model, sparse_cfg("l1", 0.25))
    m = masked_modules(model)["bert.encoder.layer.0.intermediate.dense"]
    mask = m.get_mask().bool()
    assert m.weight.abs()[mask].min() >= m.weight.abs()[~mask].max()


def test_movement_scores_get_straight_through_gradient():
    model = init_compression(tiny_bert(), sparse_cfg("topk", 0.5, mask_init="kaiming"))
    CompressionScheduler(model, sparse_cfg("topk", 0.5))
    model.train()
    model(input_ids=torch.randint(0, 64, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
    m = masked_modules(model)["bert.encoder.layer.0.attention.self.query"]
    assert m.mask_scores.grad is not None and m.mask_scores.grad.abs().sum() > 0
    # STE: dL/dS = dL/dW' * W, also for currently pruned weights
    assert (m.mask_scores.grad[m.get_mask() == 0] != 0).any()


def test_soft_movement_regularizer():
    cfg = sparse_cfg("soft_movement", 0.5, final_lambda=10.0, schedule_offset_end=4, final_threshold=0.1)
    model = init_compression(tiny_bert(), cfg)
    sched = CompressionScheduler(model, cfg)
    sched.set_step(4)
    model.train()
    model(input_ids=torch.randint(0, 64, (2, 5)))
    reg = sched.regularization()
    assert reg is not None and reg.item() == pytest.approx(10.0 * 0.5)  # sigmoid(0) = 0.5 everywhere


def test_nm_pattern_magnitude_and_movement():
    cfg = sparse_cfg("l1", 0.5, block_pattern="2:4")
    model = init_compression(tiny_bert(), cfg)
    CompressionScheduler(model, cfg)
    m = masked_modules(model)["bert.encoder.layer.0.output.dense"]
    mask = m.get_mask().reshape(32, 12, 4)
    assert torch.equal(mask.sum(-1), torch.full((32, 12), 2.0))
    w = m.weight.detach().abs().reshape(32, 12, 4)
    assert (torch.where(mask.bool(), w, torch.inf).amin(-1) >= torch.where(mask.bool(), -torch.inf, w).amax(-1)).all()
    # gradual: halfway through the ramp 3 of every 4 stay; dense_ratio may be omitted (it is N/M)
    ramp = sparse_cfg("topk", 0.5, block_pattern="2:4", schedule_offset_end=10, mask_init="kaiming")
    del ramp["compression_training"]["sparse_pruning"]["different_groups"]["sp1"]["params"]["dense_ratio"]
    model = init_compression(tiny_bert(), ramp)
    sched = CompressionScheduler(model, ramp)
    sched.set_step(2)  # kept fraction 0.5 + 0.5 * 0.8^3 = 0.756 -> round(3.02) = 3 of 4
    m = masked_modules(model)["bert.encoder.layer.1.attention.self.key"]
    assert torch.equal(m.get_mask().reshape(32, 8, 4).sum(-1), torch.full((32, 8), 3.0))
    scores = m.mask_scores.detach().reshape(32, 8, 4)
    assert torch.equal(m.get_mask().reshape(32, 8, 4), nm_mask(scores, 3, 4))
    with pytest.raises(CompressionConfigError, match="block_pattern is 0.3|keeps 0.5"):
        init_compression(tiny_bert(), sparse_cfg("l1", 0.3, block_pattern="2:4"))
    with pytest.raises(CompressionConfigError, match="not soft_movement"):
        init_compression(tiny_bert(), sparse_cfg("soft_movement", 0.5, block_pattern="2:4"))
    with pytest.raises(CompressionConfigError, match="block_pattern"):
        init_compression(tiny_bert(), sparse_cfg("l1", 0.5, block_pattern="4x1"))
    with pytest.raises(CompressionConfigError, match="not divisible by 5"):
        init_compression(tiny_bert(), sparse_cfg("l1", 0.4, block_pattern="2:5"))


# ---------------------------------------------------------------- DeepSpeed's bugs
def test_bf16_weights_with_every_mask_kind():
    cfg = copy.deepcopy(DS_TEMPLATE)
    cfg["compression_training"].update(first_order_section(4))
    cfg["compression_training"]["sparse_pruning"]["shared_parameters"]["method"] = "topk"
    model = init_compression(tiny_bert(), cfg)
    sched = CompressionScheduler(model, cfg)
    sched.set_step(10)
    model.to(torch.bfloat16)  # params cast; fixed-mask buffers are cast too by .to(), so force one back to fp32
    m = masked_modules(model)["bert.encoder.layer.0.intermediate.dense"]
    m.row_mask_fixed = m.row_mask_fixed.float()
    m.row_mask_fixed[:5] = 0
    out = model(input_ids=torch.randint(0, 64, (2, 5))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert m.get_mask().dtype == torch.bfloat16 and m.row_mask().dtype == torch.bfloat16


def test_no_full_sort_in_masks(monkeypatch):
    cfg = copy.deepcopy(DS_TEMPLATE)
    cfg["compression_training"]["sparse_pruning"]["shared_parameters"]["method"] = "topk"
    model = init_compression(tiny_bert(), cfg)
    CompressionScheduler(model, cfg).set_step(10)
    nm = init_compression(tiny_bert(), sparse_cfg("l1", 0.5, block_pattern="2:4"))
    CompressionScheduler(nm, sparse_cfg("l1", 0.5, block_pattern="2:4"))

    def forbidden(*args, **kwargs):
        raise AssertionError("full sort in a mask")

    for name in ("sort", "argsort", "msort"):
        monkeypatch.setattr(torch, name, forbidden)
        monkeypatch.setattr(torch.Tensor, name, forbidden, raising=False)
    model.train()
    model(input_ids=torch.randint(0, 64, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
    nm(input_ids=torch.randint(0, 64, (2, 5)))
    sparsity_report(model)


def test_masked_linear_keeps_public_surface():
    lin = nn.Linear(8, 6)
    m = MaskedLinear.from_linear(lin, "movement")
    assert m.weight is lin.weight and m.threshold == 1.0 and m.method == "movement" and m.group is None
    assert m.last_regularization is None and torch.equal(m.masked_weight(), lin.weight)
    baked = m.to_linear()
    assert type(baked) is nn.Linear and torch.equal(baked.weight, lin.weight)
    plain = MaskedLinear(8, 6, method=None)
    assert plain.mask_scores is None and torch.equal(plain.get_mask(), torch.ones(6, 8))
