"""redundancy_clean + export: physically smaller BERT/RoBERTa with the masked model's logits, loadable with
``from_pretrained`` (registered classes, and remote code without cap_ds), per-layer sizes including 0."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from cap_ds.compression import (
    CapPrunedBertForSequenceClassification,
    CompressionConfigError,
    CompressionScheduler,
    FirstOrderPruner,
    MaskedLinear,
    bake_masks,
    first_order_section,
    init_compression,
    masked_modules,
    parameter_counts,
    redundancy_clean,
    save_clean_pretrained,
    sparsity_report,
)

SPARSE = {"shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0},
          "different_groups": {"sp": {"params": {"dense_ratio": 0.6}, "modules": [r"encoder\.layer"]}}}


def tiny(kind: str = "bert", attn: str = "eager", layers: int = 3):
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48, num_labels=3,
                  attn_implementation=attn)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(vocab_size=64, max_position_embeddings=32, **common)).eval()
    cfg = RobertaConfig(vocab_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, **common)
    return RobertaForSequenceClassification(cfg).eval()


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(2, 64, (3, 9), generator=g), "attention_mask": mask}


def fo_pruned(kind: str = "bert", attn: str = "eager", fraction: float = 0.5, sparse: bool = True):
    """A model with sparse l1 masks + first-order head/neuron masks from a real importance pass."""
    model = tiny(kind, attn)
    cfg = {"compression_training": {**first_order_section(4), **({"sparse_pruning": SPARSE} if sparse else {})}}
    init_compression(model, cfg)
    CompressionScheduler(model, cfg)
    pruner = FirstOrderPruner(model, cfg)
    pruner.start_accumulation()
    model(**inputs(), labels=torch.tensor([0, 1, 2])).loss.backward()
    pruner.prune_step(fraction)
    return model, cfg, pruner


def expected_params(heads: list[int], neurons: list[int], dense: int) -> int:
    removed = sum((3 * (32 * 8 + 8) + 8 * 32) * (4 - h) + (32 + 1 + 32) * (48 - n) for h, n in zip(heads, neurons))
    return dense - removed


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_clean_matches_masked_model(kind, attn, tmp_path):
    model, cfg, pruner = fo_pruned(kind, attn)
    with torch.no_grad():
        masked = model(**inputs()).logits
    clean = redundancy_clean(model, cfg)
    assert clean.config.model_type == f"cap_pruned_{kind}" and clean.config._attn_implementation == attn
    report = pruner.report()
    assert clean.config.layer_heads == list(report["heads"].values())
    assert clean.config.layer_intermediate_sizes == list(report["neurons"].values())
    assert sum(clean.config.layer_heads) == 6 and sum(clean.config.layer_intermediate_sizes) == 72
    with torch.no_grad():
        torch.testing.assert_close(clean(**inputs()).logits, masked, rtol=0, atol=1e-5)
    dense, small = parameter_counts(model, clean)
    assert dense == sum(p.numel() for p in tiny(kind).parameters())
    assert small == expected_params(clean.config.layer_heads, clean.config.layer_intermediate_sizes, dense)
    # sparse zeros survive the slicing
    assert sparsity_report(clean)["sparsity"] > 0.3

    out = save_clean_pretrained(clean, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["layer_heads"] == clean.config.layer_heads and "modeling_cap_pruned.py" in [
        p.name for p in out.iterdir()]
    assert config["auto_map"]["AutoModelForSequenceClassification"].startswith("modeling_cap_pruned.CapPruned")
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()  # registered classes, no remote code
    assert type(loaded) is type(clean)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, masked, rtol=0, atol=1e-5)


def test_layers_with_zero_heads_and_zero_neurons(tmp_path):
    model, cfg, _ = fo_pruned(sparse=False, fraction=0.0)
    layers = model.bert.encoder.layer
    layers[0].attention.output.dense.head_mask_fixed.zero_()  # no head left in layer 0
    layers[1].intermediate.dense.row_mask_fixed.zero_()  # no neuron left in layer 1
    layers[2].attention.output.dense.head_mask_fixed[1:] = 0
    with torch.no_grad():
        masked = model(**inputs()).logits
        # what the math gives for layer 0: attention output = dense(empty context) + bias = bias
        h = torch.randn(2, 4, 32)
        attn_out = layers[0].attention(h)[0]
        expected = layers[0].attention.output.LayerNorm(layers[0].attention.output.dense.bias + h)
        torch.testing.assert_close(attn_out, expected)
    clean = redundancy_clean(model, cfg)
    assert clean.config.layer_heads == [0, 4, 1] and clean.config.layer_intermediate_sizes == [48, 0, 48]
    assert clean.bert.encoder.layer[0].attention.self.query.weight.shape == (0, 32)
    assert clean.bert.encoder.layer[1].output.dense.weight.shape == (32, 0)
    for attn in ("eager", "sdpa"):
        clean.config._attn_implementation = attn
        with torch.no_grad():
            torch.testing.assert_close(clean(**inputs()).logits, masked, rtol=0, atol=1e-5)
    out = save_clean_pretrained(clean, tmp_path / "zero")
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, masked, rtol=0, atol=1e-5)


def test_remote_code_loads_without_cap_ds(tmp_path):
    model, cfg, _ = fo_pruned()
    with torch.no_grad():
        masked = model(**inputs()).logits
    out = save_clean_pretrained(model, tmp_path / "remote", deepspeed_config=cfg)  # cleans on the way
    torch.save({"inputs": inputs(), "logits": masked}, tmp_path / "io.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
assert "cap_ds" not in sys.modules, "remote code must not need cap_ds"
io = torch.load({str(tmp_path / "io.pt")!r})
with torch.no_grad():
    torch.testing.assert_close(model(**io["inputs"]).logits, io["logits"], rtol=0, atol=1e-5)
print("OK", type(model).__name__, model.config.layer_heads)
"""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    assert run.returncode == 0 and "OK CapPrunedBertForSequenceClassification" in run.stdout, run.stderr[-2000:]


def test_deepspeed_style_topk_groups_clean_to_exact_sizes():
    cfg = {"compression_training": {
        "row_pruning": {"shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": 0},
                        "different_groups": {"rp1": {"params": {"dense_ratio": 0.25}, "modules": ["intermediate.dense"],
                                                     "related_modules": [["layer.\\w+.output.dense"]]}}},
        "head_pruning": {"shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": 0, "num_heads": 4},
                         "different_groups": {"rp1": {"params": {"dense_ratio": 0.75},
                                                      "modules": ["attention.output.dense"],
                                                      "related_modules": [["self.query", "self.key", "self.value"]]}}}}}
    model = init_compression(tiny(), cfg)
    CompressionScheduler(model, cfg)
    with torch.no_grad():
        masked = model(**inputs()).logits
    clean = redundancy_clean(model, cfg)
    assert clean.config.layer_heads == [3, 3, 3] and clean.config.layer_intermediate_sizes == [12, 12, 12]
    with torch.no_grad():
        torch.testing.assert_close(clean(**inputs()).logits, masked, rtol=0, atol=1e-5)
    # the input model is untouched and still masked
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, MaskedLinear)


def test_groups_without_related_modules_only_bake_zeros():
    cfg = {"compression_training": {
        "row_pruning": {"shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0},
                        "different_groups": {"rp1": {"params": {"dense_ratio": 0.5},
                                                     "modules": ["intermediate.dense"]}}}}}
    model = tiny()
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.bias.normal_()
    init_compression(model, cfg)
    CompressionScheduler(model, cfg)
    clean = redundancy_clean(model, cfg)
    assert clean.config.layer_intermediate_sizes == [48, 48, 48]
    w = clean.bert.encoder.layer[0].intermediate.dense
    assert int((w.weight.abs().sum(1) == 0).sum()) == 24 and int((w.bias == 0).sum()) == 24


def test_generic_model_is_sliced_in_place():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("up", nn.Linear(6, 10))
    net.add_module("act", nn.ReLU())
    net.add_module("down", nn.Linear(10, 4))
    cfg = {"compression_training": {"row_pruning": {
        "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0},
        "different_groups": {"g": {"params": {"dense_ratio": 0.3}, "modules": ["^up$"], "related_modules": [["down"]]}}}}}
    init_compression(net, cfg)
    CompressionScheduler(net, cfg)
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = net(x)
    out = redundancy_clean(net, cfg)
    assert out is net and type(net.up) is nn.Linear
    assert net.up.weight.shape == (3, 6) and net.down.weight.shape == (4, 3)
    torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)
    with pytest.raises(CompressionConfigError, match="supports BERT/RoBERTa"):
        save_clean_pretrained(net, "/nonexistent/never-written")


def test_bake_masks_plain_model():
    model, _, _ = fo_pruned()
    with torch.no_grad():
        masked = model(**inputs()).logits
    zeros = sparsity_report(model)["zeros"]
    bake_masks(model)
    assert not masked_modules(model)
    assert type(model.bert.encoder.layer[0].intermediate.dense) is nn.Linear
    assert sparsity_report(model)["zeros"] == zeros
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs()).logits, masked, rtol=0, atol=0)


def test_pruned_class_from_config_alone():
    from cap_ds.compression import CapPrunedBertConfig

    cfg = CapPrunedBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=48, layer_heads=[2, 0], layer_intermediate_sizes=[5, 48])
    model = CapPrunedBertForSequenceClassification(cfg).eval()
    assert model.bert.encoder.layer[0].attention.self.key.weight.shape == (16, 32)
    assert model(**inputs()).logits.shape == (3, 2)
    with pytest.raises(ValueError, match="layer_heads must list 2"):
        CapPrunedBertConfig(num_hidden_layers=2, layer_heads=[1])
