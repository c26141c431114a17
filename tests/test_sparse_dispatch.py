"""cap_ds.sparse dispatch: which format sparsify() picks per layer, and that every choice computes the dense result.

Timing is never asserted: the "measure" policy is driven by injected fake timings (``measure_fn``), so the
decisions are deterministic. The 2:4 caching is tested on CPU with torch's conversion and GEMM replaced by
counting stand-ins; the real 2:4 GEMMs are covered by the ``gpu`` tests at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cap_ds.sparse as sp
from cap_ds import ops
from cap_ds.sparse import POLICIES, SparseLinear, measure, rule_format, semi, sparsify
from cap_ds.sparse.measure import cpu_has_bf16

from .test_sparse import sparse_weight, tiny_bert


@pytest.fixture(autouse=True)
def decisions(monkeypatch):
    """An empty in-process decision cache for each test (``decisions.clear()``: as a new process would start)."""
    fresh: dict = {}
    monkeypatch.setattr(measure, "_DECISIONS", fresh)
    return fresh


def fake_timer(table: dict[str, float] | None = None, by_tokens=None, calls: list | None = None):
    """measure_fn returning fixed seconds per candidate (``by_tokens(tokens) -> table`` for class-dependent ones)."""
    def measure(candidates, x):
        if calls is not None:
            calls.append((sorted(candidates), x.shape[0]))
        t = by_tokens(x.shape[0]) if by_tokens is not None else table
        return {name: t.get(name, t.get(name.split("/")[0], 10.0)) for name in candidates}
    return measure


def test_dense_bf16_is_timed_as_a_reference_never_chosen_and_named_in_the_summary(monkeypatch):
    """An fp32 model on a CPU with bf16 units: dense bf16 is timed beside the fp32 paths, never run (it would change
    the numbers), and the summary says so when it would have been faster, with the time of both."""
    monkeypatch.setattr(measure, "cpu_has_bf16", lambda: True)
    table = {"dense": 3e-3, "csr": 2e-3, "ref:dense_bf16": 1e-3}
    model = sparsify(tiny_bert(), batch_tokens=37, min_sparsity=0.0, measure_fn=fake_timer(table))
    summary = model.sparsify_summary
    assert summary.counts == {"csr": 14}  # the fastest choosable format, not the reference (12 + pooler + head)
    cmp = summary.bf16_comparison()
    assert cmp == {"layers": 14, "faster_in_bf16": 14, "chosen_ms": pytest.approx(28.0),
                   "dense_bf16_ms": pytest.approx(14.0)}
    assert "dense bf16 would be faster on this CPU (14 of 14 layers; 14.00 vs 28.00 ms" in summary.line()
    slower = {"dense": 3e-3, "csr": 2e-3, "ref:dense_bf16": 5e-3}
    assert "bf16" not in sparsify(tiny_bert(), batch_tokens=39, min_sparsity=0.0,
                                  measure_fn=fake_timer(slower)).sparsify_summary.line()


def test_layers_kept_dense_by_measurement_say_why(monkeypatch):
    """Where every sparse path measured slower (a bf16 model on an AMX CPU), the summary gives both times; where
    a sparse format was chosen, or nothing was measured, it says nothing of the kind."""
    monkeypatch.setattr(measure, "cpu_has_bf16", lambda: False)
    slower = {"dense": 1e-3, "csr": 3e-3}
    summary = sparsify(tiny_bert(), batch_tokens=41, min_sparsity=0.0, measure_fn=fake_timer(slower)).sparsify_summary
    assert summary.counts == {"dense": 14}
    assert summary.kept_dense() == {"layers": 14, "dense_ms": pytest.approx(14.0), "sparse_ms": pytest.approx(42.0)}
    assert ("14 kept dense as measured: their fastest sparse paths 42.00 ms vs dense 14.00 ms per forward"
            in summary.line())
    faster = {"dense": 3e-3, "csr": 1e-3}
    assert "kept dense" not in sparsify(tiny_bert(), batch_tokens=43, min_sparsity=0.0,
                                        measure_fn=fake_timer(faster)).sparsify_summary.line()
    assert sparsify(tiny_bert(), policy="rule", min_sparsity=0.0).sparsify_summary.kept_dense() is None


def bert_inputs():
    ids = torch.randint(0, 120, (3, 21), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 15:] = 0
    return {"input_ids": ids, "attention_mask": attn}


def logits(model):
    with torch.no_grad():
        return model(**bert_inputs()).logits


def sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def test_measure_keeps_dense_when_dense_is_faster():
    dense = tiny_bert()
    model = sparsify(copy.deepcopy(dense), measure_fn=fake_timer({"dense": 1e-3, "csr": 2e-3}))
    assert not sparse_layers(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    summary = model.sparsify_summary
    assert summary.counts == {"dense": 12} and not summary.replaced
    torch.testing.assert_close(logits(model), logits(dense), rtol=0, atol=0)


def test_measure_picks_csr_when_it_wins_and_reports_it(caplog):
    dense = tiny_bert()
    with caplog.at_level(logging.INFO, logger="cap_ds.sparse"):
        model = sparsify(copy.deepcopy(dense), measure_fn=fake_timer({"dense": 2e-3, "csr": 1e-3}))
    layers = sparse_layers(model)
    assert len(layers) == 12 and all(m.format == "csr" for m in layers)
    assert "format=csr" in repr(model.bert.encoder.layer[0].output.dense)
    summary = model.sparsify_summary
    assert summary.counts == {"csr": 12} and summary.sparsity == pytest.approx(0.9, abs=1e-3)
    assert summary.measured_keys == 6  # 3 shapes x 2 batch classes; the other layers reuse them
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sparsify(")]
    assert len(line) == 1 and "csr 12" in line[0] and "policy=measure" in line[0]
    torch.testing.assert_close(logits(model), logits(dense), rtol=0, atol=1e-4)


def test_measure_needs_a_margin_over_dense():
    model = sparsify(tiny_bert(), measure_fn=fake_timer({"dense": 1.00e-3, "csr": 0.98e-3}))
    assert not sparse_layers(model)  # 2 % faster is within noise: dense, the path that costs nothing
    model = sparsify(tiny_bert(), min_speedup=1.0, measure_fn=fake_timer({"dense": 1.00e-3, "csr": 0.98e-3}))
    assert len(sparse_layers(model)) == 12


def test_measure_shares_one_measurement_per_key_and_uses_real_weights_shape():
    calls: list = []
    sparsify(tiny_bert(), batch_tokens=40, measure_fn=fake_timer({"dense": 1e-3, "csr": 2e-3}, calls=calls))
    assert len(calls) == 3  # (64x64, 128x64, 64x128) at 40 tokens; 12 layers
    # an fp32 model on a CPU with bf16 units also times the dense bf16 layer, for the summary only
    expected = ["csr", "dense", *(["ref:dense_bf16"] if cpu_has_bf16() else [])]
    assert all(tokens == 40 and names == expected for names, tokens in calls)
    calls.clear()
    sparsify(tiny_bert(), batch_tokens=40, measure_fn=fake_timer({"dense": 1e-3}, calls=calls))
    assert not calls  # in-process cache


def test_batch_classes_hold_both_formats_when_cheap(monkeypatch, decisions):
    def by_tokens(tokens):  # CSR wins small batches, dense large ones (the GPU's memory-bound/compute-bound split)
        return {"dense": 1e-3, "csr": 0.5e-3} if tokens <= sp.SMALL_BATCH_TOKENS else {"dense": 1e-3, "csr": 3e-3}

    dense = tiny_bert()
    model = sparsify(copy.deepcopy(dense), measure_fn=fake_timer(by_tokens=by_tokens))
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, SparseLinear) and (layer.format_small, layer.format_large) == ("csr", "dense")
    assert "format=csr(tokens<=256)|dense" in repr(layer)
    assert model.sparsify_summary.counts == {"csr|dense": 12}

    used: list[str] = []
    monkeypatch.setattr(SparseLinear, "csr_forward",
                        lambda self, x2, f=SparseLinear.csr_forward: used.append("csr") or f(self, x2))
    w = layer.dense_weight()
    for tokens, path in ((8, "csr"), (300, "dense")):
        used.clear()
        x = torch.randn(tokens, 64)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)
        assert used == (["csr"] if path == "csr" else [])

    # No memory for a second format: one format not slower than dense in either class, i.e. dense here.
    decisions.clear()
    lean = sparsify(copy.deepcopy(dense), max_extra_memory=0.0, measure_fn=fake_timer(by_tokens=by_tokens))
    assert not sparse_layers(lean)


def test_measure_never_keeps_a_path_slower_than_dense(decisions):
    rng = random.Random(0)
    for trial in range(5):
        decisions.clear()
        tables: dict[int, dict[str, float]] = {}

        def by_tokens(tokens, tables=tables):
            return {"dense": 1e-3, "csr": rng.uniform(0.3e-3, 2e-3)}

        model = sparsify(tiny_bert(), max_extra_memory=[0.0, 0.5, 10][trial % 3],
                         measure_fn=fake_timer(by_tokens=by_tokens))
        modules = dict(model.named_modules())
        for row in model.sparsify_summary.layers:
            module = modules[row["name"]]
            for cls_name, times in row["times_ms"].items():
                tokens = sp.REPRESENTATIVE_TOKENS[cls_name]
                chosen = module.format_for(tokens) if isinstance(module, SparseLinear) else "dense"
                assert times[chosen] <= times["dense"], (trial, row)


def test_rule_policy_is_what_rule_format_documents():
    assert rule_format("cpu", torch.float32, 0.9, False, 128) == ("csr" if ops.kernels_support("cpu") else "dense")
    assert rule_format("cpu", torch.float32, 0.6, False, 128) == "dense"
    assert rule_format("cpu", torch.bfloat16, 0.95, False, 128) == "dense"
    for tokens in (1, 4096):
        assert rule_format("cuda", torch.bfloat16, 0.9, False, tokens) == "dense"
        assert rule_format("cuda", torch.bfloat16, 0.5, True, tokens) == "dense"
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    with torch.no_grad():
        model[0].weight.copy_(sparse_weight(48, 32, 0.9))
        model[2].weight.copy_(sparse_weight(16, 48, 0.6))
    sparsify(model, policy="rule")
    expect = "csr" if ops.kernels_support("cpu") else "dense"
    assert model.sparsify_summary.counts == ({"csr": 1, "dense": 1} if expect == "csr" else {"dense": 2})
    assert type(model[2]) is nn.Linear


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_computes_the_dense_logits(policy):
    dense = tiny_bert()
    model = sparsify(copy.deepcopy(dense), policy=policy, reps=2)  # "measure": real (untested) timings
    assert model.sparsify_summary.policy == policy
    torch.testing.assert_close(logits(model), logits(dense), rtol=0, atol=1e-4)
    for m in sparse_layers(model):
        assert f"format={m.format}" in m.extra_repr()


def test_bad_arguments_name_the_argument_and_the_allowed_values():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"policy='fast'.*'measure', 'rule', 'dense', 'csr', '2:4'"):
        sparsify(model, policy="fast")
    with pytest.raises(ValueError, match="batch_tokens"):
        sparsify(model, batch_tokens=0)
    with pytest.raises(ValueError, match="min_speedup"):
        sparsify(model, min_speedup=0.9)
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(model, min_sparsity=-0.1)
    layer = SparseLinear.from_linear(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="fmt='coo'; allowed: dense, csr, 2:4"):
        layer.set_format("coo")
    with pytest.raises(ValueError, match="semi_backend"):
        layer.set_format("2:4", semi_backend="cublas")


def test_decision_cache_file_is_reused_across_processes(tmp_path, decisions):
    path = tmp_path / "decisions" / "sparsify.json"
    model = sparsify(tiny_bert(), cache_path=path, measure_fn=fake_timer({"dense": 2e-3, "csr": 1e-3}))
    data = json.loads(path.read_text())
    assert len(data) == 6 and all("times_ms" in v for v in data.values())
    assert any(k.startswith("128x64|float32|cpu:") for k in data)

    decisions.clear()  # as a new process would start

    def no_timing(candidates, x):
        raise AssertionError("measured although the file had the decision")

    again = sparsify(tiny_bert(), cache_path=path, measure_fn=no_timing)
    assert again.sparsify_summary.measured_keys == 0 and again.sparsify_summary.cached_keys == 24
    assert [m.format for m in sparse_layers(again)] == [m.format for m in sparse_layers(model)]
    path.write_text("{not json")
    decisions.clear()
    sparsify(tiny_bert(), cache_path=path, measure_fn=fake_timer({"dense": 1e-3}))  # unreadable file: re-measured
    assert len(json.loads(path.read_text())) == 6


def test_state_dict_and_save_round_trip(tmp_path):
    fake = fake_timer({"dense": 2e-3, "csr": 1e-3})
    dense = tiny_bert()
    model = sparsify(copy.deepcopy(dense), measure_fn=fake)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    other = tiny_bert()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    other = sparsify(other, measure_fn=fake)
    other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    torch.testing.assert_close(logits(other), logits(dense), rtol=0, atol=1e-4)


def test_dense_format_weight_is_built_once_and_follows_load_state_dict(monkeypatch):
    dense = nn.Linear(16, 24)
    with torch.no_grad():
        dense.weight.copy_(sparse_weight(24, 16, 0.8))
    layer = SparseLinear.from_linear(dense).set_format("dense")
    builds: list[int] = []
    monkeypatch.setattr(SparseLinear, "dense_weight",
                        lambda self, f=SparseLinear.dense_weight: builds.append(1) or f(self))
    x = torch.randn(5, 16)
    with torch.no_grad():
        first = layer(x)
        for _ in range(4):
            torch.testing.assert_close(layer(x), first)
    assert len(builds) == 1
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["values"] = state["values"] * 3
    layer.load_state_dict(state)  # same storage, new numbers
    with torch.no_grad():
        out = layer(x)
    assert len(builds) == 2
    torch.testing.assert_close(out - layer.bias, 3 * (first - layer.bias), rtol=1e-5, atol=1e-5)


class _FakeSemi:
    def __init__(self, dense: torch.Tensor) -> None:
        self.dense = dense.clone()


@pytest.fixture
def fake_2to4(monkeypatch):
    """torch's 2:4 conversion and GEMM replaced by counting CPU stand-ins (the caching logic is ours)."""
    conversions: list[tuple] = []

    def convert(dense, backend):
        conversions.append((backend, tuple(dense.shape), dense.dtype))
        return _FakeSemi(dense)

    monkeypatch.setattr(semi, "supported", lambda device, dtype, n_out, n_in: True)
    monkeypatch.setattr(semi, "unavailable", lambda device, dtype, n_out, n_in: None)
    monkeypatch.setattr(semi, "backends", lambda device=None: ("cusparselt", "cutlass"))
    monkeypatch.setattr(semi, "convert", convert)
    monkeypatch.setattr(semi, "matmul", lambda compressed, backend, x2, bias: F.linear(x2, compressed.dense, bias))
    return conversions


def two_four_weight(n_out: int, n_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    keep = w.abs().view(n_out, -1, 4).topk(2, dim=-1).indices
    mask = torch.zeros(n_out, n_in // 4, 4).scatter_(-1, keep, 1.0).view(n_out, n_in)
    return w * mask


def test_2to4_weight_is_converted_once_not_per_call(fake_2to4):
    w = two_four_weight(64, 64)
    dense = nn.Linear(64, 64)
    with torch.no_grad():
        dense.weight.copy_(w)
    layer = SparseLinear.from_linear(dense).set_format("2:4", semi_backend="cutlass")
    assert "format=2:4, backend=cutlass" in repr(layer)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        for _ in range(5):
            torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert fake_2to4 == [("cutlass", (64, 64), torch.float32)]
    # load_state_dict writes into the same storage (same data_ptr): the old cache key missed this.
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["values"] = -state["values"]
    layer.load_state_dict(state)
    with torch.no_grad():
        dense.weight.neg_()
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
        layer(x)
    assert len(fake_2to4) == 2
    layer.double()  # new dtype and storage: converted again, once
    with torch.no_grad():
        for _ in range(3):
            layer(x.double())
    assert len(fake_2to4) == 3 and fake_2to4[-1][2] == torch.float64
    layer.set_format("2:4", semi_backend="cusparselt")  # another backend needs its own compressed weight
    with torch.no_grad():
        layer(x.double())
    assert len(fake_2to4) == 4 and fake_2to4[-1][0] == "cusparselt"


def test_measure_can_pick_2to4_and_reports_the_backend(fake_2to4, decisions):
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    with torch.no_grad():
        model[0].weight.copy_(two_four_weight(128, 64))
        model[2].weight.copy_(sparse_weight(64, 128, 0.9))  # not 2:4: no 2:4 candidate
    x = torch.randn(7, 64)
    with torch.no_grad():
        ref = model(x)
    calls: list = []
    times = {"dense": 1e-3, "csr": 0.9e-3, "2:4/cusparselt": 0.8e-3, "2:4/cutlass": 0.5e-3}
    sparsify(model, batch_tokens=7, measure_fn=fake_timer(times, calls=calls))
    names = [[n for n in c[0] if not n.startswith("ref:")] for c in calls]  # the bf16 reference: CPU-dependent
    assert names[0] == ["2:4/cusparselt", "2:4/cutlass", "csr", "dense"] and names[1] == ["csr", "dense"]
    assert model[0].format == "2:4" and model[0].semi_backend == "cutlass"
    assert "format=2:4, backend=cutlass" in repr(model[0]) and model[2].format == "csr"
    assert model.sparsify_summary.counts == {"2:4": 1, "csr": 1}
    n = len(fake_2to4)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert len(fake_2to4) == n + 1  # measuring converted its own copies; the layer converts once
    # allow_2to4=False keeps 2:4 out of the decision
    decisions.clear()
    again = nn.Sequential(nn.Linear(64, 128))
    with torch.no_grad():
        again[0].weight.copy_(two_four_weight(128, 64))
    sparsify(again, allow_2to4=False, batch_tokens=7, measure_fn=fake_timer(times))
    assert again[0].format == "csr"


def test_forced_2to4_policy_without_2to4_hardware_runs_csr():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(two_four_weight(64, 64))
        model[1].weight.copy_(sparse_weight(64, 64, 0.9))
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
        sparsify(model, policy="2:4")
        assert model[0].format == "2:4" and type(model[1]) is nn.Linear
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)  # CPU: the CSR path computes it


# ---- GPU: the real 2:4 GEMMs and the measured dispatch in bf16
def _bert_cuda(kind: str):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=256, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".encoder." in f".{name}":
                w = module.weight
                if kind == "2:4":
                    w.copy_(two_four_weight(*w.shape))
                else:
                    keep = w.abs().flatten().topk(int(w.numel() * 0.1)).indices
                    mask = torch.zeros(w.numel())
                    mask[keep] = 1
                    w.mul_(mask.view_as(w))
    return model.cuda().to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["90%", "2:4"])
@pytest.mark.parametrize("policy", POLICIES)
def test_gpu_dispatch_bf16_matches_dense(kind, policy):
    dense = _bert_cuda(kind)
    model = sparsify(copy.deepcopy(dense), policy=policy, reps=3)
    summary = model.sparsify_summary
    assert sum(summary.counts.values()) == 12 and summary.device.startswith("cuda")
    if policy == "rule":
        assert summary.counts == {"dense": 12}
    if policy == "2:4" and kind == "2:4" and torch.cuda.get_device_capability() >= (8, 0):
        assert summary.counts == {"2:4": 12}
    ids = torch.randint(0, 120, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for batch in (ids[:1], ids):
        with torch.no_grad():
            ref, out = dense(input_ids=batch).logits.float(), model(input_ids=batch).logits.float()
        torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
def test_gpu_2to4_converted_once_per_backend(monkeypatch, caplog):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need sm_80+")
    if not semi.backends(torch.device("cuda")):  # sm90 without cuSPARSELt: sparsify keeps such layers off 2:4
        pytest.skip(semi.unavailable(torch.device("cuda"), torch.bfloat16, 512, 256))
    conversions: list[str] = []
    real = semi.convert
    monkeypatch.setattr(semi, "convert", lambda dense, backend: conversions.append(backend) or real(dense, backend))
    dense = nn.Linear(256, 512).cuda().to(torch.bfloat16)
    with torch.no_grad():
        dense.weight.copy_(two_four_weight(512, 256).to(torch.bfloat16))
    for backend in semi.backends(torch.device("cuda")):
        layer = SparseLinear.from_linear(dense).set_format("2:4", semi_backend=backend)
        for tokens in (1, 77, 4096):  # 1 and 77 need padding to a multiple of 8
            x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad(), caplog.at_level(logging.INFO, logger="cap_ds.sparse"):
                for _ in range(3):
                    out = layer(x)
            torch.testing.assert_close(out.float(), dense(x).float(), rtol=2e-2, atol=2e-2)
            assert out.is_contiguous()
        assert conversions.count(backend) == 1, conversions
        assert layer._semi_cache[1] is not None
    assert not [r for r in caplog.records if "failed" in r.getMessage()], "a 2:4 path fell back"


@pytest.mark.gpu
def test_gpu_timer_returns_positive_times():
    x = torch.randn(256, 256, device="cuda")
    times = sp.time_candidates({"a": lambda: x @ x, "b": lambda: x + x}, x.device, reps=3)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())


@pytest.mark.parametrize("backend", semi.BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_semi_matmul_calling_convention(monkeypatch, backend, with_bias):
    """The direct aten calls get the operands torch's own dispatch would pass; padding and layout are undone.

    The ops are replaced by their documented semantics on a dense "packed" weight (CPU has no 2:4 GEMM); the
    real ops are checked against dense by the gpu tests.
    """
    calls: list[dict] = []

    def cslt(packed, dense_b, bias=None, transpose_result=False):
        calls.append({"rows": dense_b.shape[1], "b_is_xt": dense_b.stride(0) == 1})
        y = packed @ dense_b + (bias[:, None] if bias is not None else 0)
        return y.t().contiguous() if transpose_result else y

    def cutlass_mm(packed, meta, dense_b):
        calls.append({"rows": dense_b.shape[1], "b_is_xt": dense_b.stride(0) == 1})
        return packed @ dense_b

    monkeypatch.setattr(torch, "_cslt_sparse_mm", cslt)
    monkeypatch.setattr(torch, "_sparse_semi_structured_mm", cutlass_mm)
    monkeypatch.setattr(torch, "_sparse_semi_structured_addmm",
                        lambda bias, packed, meta, b: bias[:, None] + cutlass_mm(packed, meta, b))
    w = two_four_weight(64, 32)
    bias = torch.randn(64) if with_bias else None
    compressed = type("Semi", (), {"packed": w, "meta": None})()
    for tokens in (1, 8, 77):
        x = torch.randn(tokens * 2, 32)[::2]  # non-contiguous input
        y = semi.matmul(compressed, backend, x, bias)
        assert y.shape == (tokens, 64) and y.is_contiguous()
        torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
        assert calls[-1] == {"rows": tokens + (-tokens) % 8, "b_is_xt": True}  # x^T view, padded to 8 rows


def test_cache_built_in_inference_mode_serves_a_later_gradient():
    dense = nn.Linear(16, 24)
    with torch.no_grad():
        dense.weight.copy_(sparse_weight(24, 16, 0.8))
    layer = SparseLinear.from_linear(dense).set_format("dense")
    x = torch.randn(3, 16)
    with torch.inference_mode():
        layer(x)  # the dense weight is cached here
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(layer(xg).sum(), xg)
    torch.testing.assert_close(gx, dense.weight.detach().sum(0).expand(3, 16))


@pytest.mark.parametrize("capability, cusparselt, expected", [
    ((8, 0), True, ("cusparselt", "cutlass")), ((8, 6), False, ("cutlass",)), ((9, 0), True, ("cusparselt",)),
    ((9, 0), False, ()), ((7, 5), True, ())])
def test_2to4_backends_follow_the_compute_capability(monkeypatch, capability, cusparselt, expected):
    """Hopper (9.x) has no CUTLASS 2:4 kernel in torch: cuSPARSELt or nothing, with the reason in the summary."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
    cuda = torch.device("cuda")
    got = semi.backends(cuda)
    assert got == (expected if capability >= (8, 0) else tuple(b for b in expected if b != "cutlass"))
    reason = semi.unavailable(cuda, torch.bfloat16, 512, 256)
    assert (reason is None) == bool(got and capability >= (8, 0))
    if capability == (9, 0) and not cusparselt:
        assert "cuSPARSELt" in reason and "9.0" in reason
    summary = sp.SparsifySummary(policy="measure", device="cuda:0", dtype="bfloat16",
                                 layers=[{"format": "csr", "no_2to4": reason or "x", "numel": 4, "sparsity": 0.5}])
    assert "not run as 2:4" in summary.line()
