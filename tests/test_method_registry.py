"""Pruning methods are registered objects: a new one needs its class and one registration, nothing outside the
method package compares method names, and unknown names fail with one line naming the allowed ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from cap_ds.compression import (
    CompressionConfigError,
    CompressionScheduler,
    init_compression,
    masked_modules,
    parse_compression_config,
    sparsity_report,
)
from cap_ds.compression.methods import (
    SPARSE,
    UNITS,
    PruningMethod,
    UnknownMethodError,
    get_method,
    masks,
    method_names,
    register_method,
    registered_methods,
    unregister_method,
)
from cap_ds.runtime.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "cap_ds"
METHOD_PACKAGE = PACKAGE / "compression" / "methods"  # the registry and the method modules may name methods
# Vocabularies that share a spelling with a method: (module, string) -> what the string means there.
OTHER_VOCABULARIES = {
    ("compression/topk.py", "topk"): "a top-k implementation (TOPK_IMPLS, CAP_DS_TOPK), not a pruning method",
}


class RandomKeep(PruningMethod):
    """Toy method: keep the entries where fixed-seed noise is largest (the docs/methods.md example)."""

    name = "random_keep"
    seed = 1234

    def keep_mask(self, weight: torch.Tensor, scores: torch.Tensor | None, threshold: float,
                  block: tuple[int, int] | None = None) -> torch.Tensor:
        noise = torch.rand(weight.shape, generator=torch.Generator().manual_seed(self.seed))
        return masks.topk_mask(noise.to(weight.device), threshold).to(weight.dtype)


@pytest.fixture
def random_keep():
    method = register_method(RandomKeep)
    try:
        yield method
    finally:
        unregister_method(method.name)


def _section(method: str, ratio: float) -> dict:
    return {"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": method, "schedule_offset": 1, "schedule_offset_end": 4},
        "different_groups": {"g": {"params": {"dense_ratio": ratio}, "modules": [r"encoder\.layer\.\d+\."]}}}}}


def test_a_method_registered_alone_prunes_a_bert_to_its_target(random_keep):
    assert "random_keep" in method_names() and "random_keep" in method_names(SPARSE)
    assert "random_keep" not in method_names(UNITS)  # it claims single weights only
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100)).eval()
    section = _section("random_keep", 0.25)
    init_compression(model, section)
    sched = CompressionScheduler(model, section)
    mods = masked_modules(model)
    assert len(mods) == 12 and all(m.strategy is random_keep and m.mask_scores is None for m in mods.values())
    assert sparsity_report(model)["sparsity"] == 0.0  # dense before schedule_offset
    ids = torch.randint(0, 100, (2, 6))
    for _ in range(4):
        sched.step()
        model(input_ids=ids)
    assert sparsity_report(model)["sparsity"] == pytest.approx(0.75, abs=1e-3)
    for name, m in mods.items():
        noise = torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(RandomKeep.seed))
        expect = masks.topk_mask(noise, 0.25)
        assert m.threshold == 0.25 and torch.equal(m.get_mask(), expect), name
        assert int(expect.sum()) == masks.num_kept(expect.numel(), 0.25)
    sched.check_reached(4, sparsity_report(model)["sparsity"])


def _names() -> set[str]:
    return {n for m in registered_methods() for n in (*m.spellings, m.unit_name)}


def _strings(node: ast.AST) -> list[str]:
    """The string constants a comparison operand is or holds (a tuple, list or set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [s for elt in node.elts for s in _strings(elt)]
    return []


def _dispatch_on_names(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every comparison, membership test, dict key, subscript, ``.get`` or ``case`` on a method
    name."""
    found = []
    for node in ast.walk(tree):
        operands: list[ast.AST] = []
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn)
                                                 for op in node.ops):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Dict):
            operands = [k for k in node.keys if k is not None]
        elif isinstance(node, ast.Subscript):
            operands = [node.slice]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            operands = node.args[:1]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        found += [(node.lineno, s) for op in operands for s in _strings(op) if s in names]
    return found


def test_no_module_outside_the_method_package_dispatches_on_a_method_name():
    names = _names()
    assert {"magnitude", "movement", "soft_movement", "first_order", "l1", "topk"} <= names
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if METHOD_PACKAGE in path.parents:
            continue
        rel = path.relative_to(PACKAGE).as_posix()
        for line, name in _dispatch_on_names(ast.parse(path.read_text()), names):
            if (rel, name) not in OTHER_VOCABULARIES:
                problems.append(f"cap_ds/{rel}:{line} compares or dispatches on method name {name!r}")
    assert not problems, "ask the method object instead (cap_ds.compression.methods):\n" + "\n".join(problems)


def test_the_scan_catches_name_dispatch():
    src = ('if m == "movement": pass\nif x in ("l1", "other"): pass\nd = {"first_order": 1}\n'
           'y = table["soft_movement"]\nz = table.get("topk")\nif a.method != b: pass\n')
    assert [n for _, n in _dispatch_on_names(ast.parse(src), _names())] == [
        "movement", "l1", "first_order", "soft_movement", "topk"]


@pytest.mark.parametrize("kind,allowed", [
    (None, "magnitude, movement, soft_movement, first_order, l1, topk"),
    (SPARSE, "magnitude, movement, soft_movement, l1, topk"),
    (UNITS, "l1, topk, first_order"),
])
def test_unknown_names_fail_with_one_line_naming_the_allowed_ones(kind, allowed):
    with pytest.raises(UnknownMethodError) as err:
        get_method("movment", kind)
    text = str(err.value)
    assert "\n" not in text and "'movment'" in text and text.endswith(f"allowed: {allowed}")
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_registry_resolves_spellings_and_kinds():
    assert get_method("l1") is get_method("magnitude") is get_method("l1", UNITS)
    assert get_method("topk", SPARSE) is get_method("movement")
    assert get_method("first_order").structured and not get_method("movement").structured
    with pytest.raises(UnknownMethodError, match="unknown sparse pruning method 'first_order'"):
        get_method("first_order", SPARSE)
    with pytest.raises(UnknownMethodError, match="allowed: l1, topk, first_order"):
        get_method("magnitude", UNITS)  # row/head pruning keep DeepSpeed's schema names


def test_config_and_registration_errors_name_the_allowed_ones():
    with pytest.raises(CompressionConfigError, match=r"sparse_pruning\.shared_parameters\.method: unknown method "
                                                     r"'nope'; allowed: l1, magnitude, movement, soft_movement, topk"):
        parse_compression_config(_section("nope", 0.5))
    with pytest.raises(ValueError, match="already mean 'movement'"):
        register_method(type("Clash", (PruningMethod,), {"name": "clash", "ds_name": "topk"}))
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Other", (PruningMethod,), {"name": "magnitude"}))
    with pytest.raises(TypeError, match="named PruningMethod"):
        register_method(PruningMethod)
    assert "clash" not in method_names()
