"""Top-k keep-masks (issues 15, 22): every candidate keeps exactly k entries; kthvalue, sort and radix follow the
documented tie rule (lowest index first among entries equal to the k-th largest); all agree with torch.topk without
ties. radix also runs batched (per-row k), never reads a tensor on the host, and backs the scheduler's prefill."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cap_ds.compression import methods, topk
from cap_ds.compression.methods import TOPK_IMPLS, num_kept, topk_impl, topk_keep_batched, topk_mask

RULE_IMPLS = ("kthvalue", "sort", "radix")


def rule_mask(values: torch.Tensor, keep: float) -> torch.Tensor:
    """The tie rule, spelled out slowly: rank by (value desc, index asc), NaN above everything; keep the first k."""
    flat = values.detach().flatten().double().tolist()
    k = num_kept(len(flat), keep)
    key = [(0 if v != v else 1, -v if v == v else 0.0, i) for i, v in enumerate(flat)]
    out = torch.zeros(len(flat), dtype=values.dtype)
    for _, _, i in sorted(key)[:k]:
        out[i] = 1
    return out.view_as(values)


KEEPS = [0.0, 0.001, 0.1, 0.5, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("impl", TOPK_IMPLS)
def test_candidates_equal_torch_topk_without_ties(impl, keep):
    scores = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    assert torch.unique(scores).numel() == scores.numel()
    mask = topk_mask(scores, keep, impl=impl)
    assert torch.equal(mask, topk_mask(scores, keep, impl="topk")) and mask.dtype == scores.dtype
    assert torch.equal(mask, rule_mask(scores, keep))
    assert int(mask.bool().sum()) == num_kept(scores.numel(), keep)


def special_floats(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """+NaN, -NaN and a NaN with another payload (all tie, above everything), +-inf, +-0.0 and ordinary values."""
    nans = torch.tensor([0x7FC00000, -0x400000, 0x7F800001], dtype=torch.int32).view(torch.float32)
    assert nans.isnan().all() and nans[1].view(torch.int32) < 0  # a negative NaN
    x = torch.tensor([1.0, 0.0, float("inf"), -0.0, -2.0, float("-inf"), 3.0, 0.0, -0.0, float("inf"), 1.0])
    x = torch.cat([x[:3], nans[:1], x[3:7], nans[1:], x[7:], nans[:1]])
    return x.to(dtype)


def tied_inputs():
    g = torch.Generator().manual_seed(0)
    yield "few values", torch.randint(0, 5, (40, 25), generator=g).float()
    yield "all equal", torch.full((30, 20), 0.25)
    yield "all zero", torch.zeros(17, 9)
    yield "bf16 scores", torch.randn(64, 48, generator=g).to(torch.bfloat16)
    yield "bf16 few levels", (2 * torch.randn(50, 30, generator=g)).round().to(torch.bfloat16)
    yield "fp16 scores", torch.randn(40, 24, generator=g).to(torch.float16)
    yield "fp64 few values", torch.randint(-3, 3, (30, 11), generator=g).double() / 3
    yield "signed zeros", torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, 2.0, 0.0, -1.0])
    yield "nan inf zeros", special_floats()
    yield "bf16 nan inf zeros", special_floats(torch.bfloat16)
    yield "negative only", -torch.rand(33, 7, generator=g) - 1e-3
    x = torch.randn(20, 10, generator=g)
    x[::3] = 0.5
    yield "block of ties", x


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("impl", RULE_IMPLS)
@pytest.mark.parametrize("name,values", list(tied_inputs()), ids=[n for n, _ in tied_inputs()])
def test_tie_rule_lowest_index_first(impl, keep, name, values):
    mask = topk_mask(values, keep, impl=impl)
    assert torch.equal(mask, rule_mask(values, keep)), name
    assert mask.dtype == values.dtype and mask.shape == values.shape


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("name,values", list(tied_inputs()), ids=[n for n, _ in tied_inputs()])
def test_torch_topk_keeps_the_same_count_and_the_same_entries_above_the_cut(keep, name, values):
    """The old path differs from the rule only in which tied entries at the cut it keeps."""
    old, new = topk_mask(values, keep, impl="topk"), topk_mask(values, keep)
    assert int(old.bool().sum()) == int(new.bool().sum()) == num_kept(values.numel(), keep)  # bf16 sums round
    k = num_kept(values.numel(), keep)
    if 0 < k < values.numel():
        kth = torch.kthvalue(values.flatten().float(), values.numel() - k + 1).values
        above = values.float() > kth
        assert torch.equal(old.bool() & above, above) and torch.equal(new.bool() & above, above)


@pytest.mark.parametrize("keep", KEEPS[1:-1])
@pytest.mark.parametrize("name,values", list(tied_inputs()), ids=[n for n, _ in tied_inputs()])
def test_the_no_sync_branch_gives_the_same_mask(keep, name, values):
    """The CUDA branch (no host sync, cumsum fix-up), run on CPU tensors: same masks as the CPU branch."""
    flat = values.flatten()
    k = num_kept(flat.numel(), keep)
    if not 0 < k < flat.numel():
        return  # handled before any selection
    kth = torch.kthvalue(flat, flat.numel() - k + 1).values
    assert torch.equal(methods._keep_from_kth(flat, kth, k, host_sync=False),
                       methods._keep_from_kth(flat, kth, k, host_sync=True))


@pytest.mark.parametrize("impl", RULE_IMPLS)
def test_nan_ranks_above_everything(impl):
    x = torch.tensor([1.0, float("nan"), 3.0, 2.0, float("nan"), float("inf"), 3.0])
    for k in range(0, x.numel() + 1):
        keep = k / x.numel()
        assert torch.equal(topk_mask(x, keep, impl=impl), rule_mask(x, keep)), k
    assert topk_mask(x, 2 / 7, impl=impl).tolist() == [0, 1, 0, 0, 1, 0, 0]


def test_nan_above_a_tie_at_the_cut():
    """kthvalue's CPU fix-up once counted the entries >= the k-th value without the NaNs above it: with a tie at the
    cut the two errors cancelled and the NaN was dropped."""
    nan = float("nan")
    pool = [nan, -nan, float("inf"), float("-inf"), 0.0, -0.0, 1.0]
    for dtype in (torch.float32, torch.bfloat16):
        for combo in itertools.product(pool, repeat=3):
            x = torch.tensor(combo, dtype=dtype)
            for k in (1, 2):
                expect = rule_mask(x, k / 3)
                for impl in RULE_IMPLS:
                    assert torch.equal(topk_mask(x, k / 3, impl=impl), expect), (impl, combo, k)
                kth = torch.kthvalue(x, 3 - k + 1).values
                for host_sync in (True, False):
                    assert torch.equal(methods._keep_from_kth(x, kth, k, host_sync).to(dtype), expect), combo
    assert topk_mask(torch.tensor([nan, 0.0, 0.0]), 2 / 3, impl="kthvalue").tolist() == [1, 1, 0]


def test_k_zero_and_k_all():
    x = torch.randn(5, 4)
    for impl in TOPK_IMPLS:
        assert torch.equal(topk_mask(x, 0.0, impl=impl), torch.zeros(5, 4))
        assert torch.equal(topk_mask(x, 1.0, impl=impl), torch.ones(5, 4))
        assert torch.equal(topk_mask(x, 0.04, impl=impl), torch.zeros(5, 4))  # int(0.04 * 20) = 0


def test_env_selects_the_candidate_and_rejects_bad_values(monkeypatch):
    monkeypatch.delenv("CAP_DS_TOPK", raising=False)
    assert topk_impl("cpu") == methods.DEFAULT_TOPK["cpu"] == topk_impl() == topk_impl("cpu", 768 * 768) == "radix"
    assert topk_impl("cpu", 4096) == "kthvalue"  # radix's fixed cost loses on small CPU inputs
    assert topk_impl("cuda") == topk_impl("cuda", 12) == "radix" and topk_impl("mps") == topk.DEFAULT_TOPK_OTHER
    calls = []
    real = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("CAP_DS_TOPK", "topk")
    topk_mask(torch.randn(10), 0.5)
    assert calls == [1] and topk_impl("cuda") == "topk" and topk_impl("cpu", 10) == "topk"
    monkeypatch.setenv("CAP_DS_TOPK", "bogus")
    with pytest.raises(ValueError, match=r"CAP_DS_TOPK='bogus'.*allowed: kthvalue, topk, sort, radix"):
        topk_mask(torch.randn(10), 0.5)


def test_default_follows_the_tensor_device(monkeypatch):
    monkeypatch.delenv("CAP_DS_TOPK", raising=False)
    seen = []
    monkeypatch.setattr(topk, "topk_impl", lambda device_type="cpu", numel=None: seen.append((device_type, numel))
                        or "kthvalue")
    topk_mask(torch.randn(8, 4), 0.5)
    assert seen == [("cpu", 32)]


def test_ste_gradient_unchanged():
    scores = torch.randn(12, 8, requires_grad=True)
    mask = methods.TopKBinarizer.apply(scores, 0.25)
    g = torch.randn(12, 8)
    mask.backward(g)
    assert torch.equal(scores.grad, g)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", TOPK_IMPLS)
def test_candidates_on_cuda_equal_the_cpu_rule(impl):
    g = torch.Generator().manual_seed(1)
    for values in (torch.randn(768, 3072, generator=g), torch.randn(1024, 96, generator=g).to(torch.bfloat16),
                   torch.randint(0, 3, (4096,), generator=g).float(), torch.full((64, 64), 1.5)):
        for keep in (0.0, 0.1, 0.5, 1.0):
            cuda = topk_mask(values.cuda(), keep, impl=impl).cpu()
            cpu = topk_mask(values, keep, impl="kthvalue")
            assert int(cuda.bool().sum()) == num_kept(values.numel(), keep)
            if impl in RULE_IMPLS or torch.unique(values).numel() == values.numel():
                assert torch.equal(cuda, cpu), (impl, keep, values.dtype)


# ---- radix (issue 22): batched, exact, no host read
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_radix_equals_kthvalue_on_random_data(dtype):
    g = torch.Generator().manual_seed(5)
    for values in (torch.randn(257, 129, generator=g), torch.randn(3000, generator=g) * 1e-30,
                   torch.rand(4099, generator=g) * 1e4 - 10):
        values = values.to(dtype)
        flat = values.flatten()
        for keep in KEEPS[1:-1]:
            k = num_kept(flat.numel(), keep)
            if 0 < k < flat.numel():
                assert torch.equal(topk.topk_keep(flat, k, "radix"), topk.topk_keep(flat, k, "kthvalue")), keep


def test_order_keys_follow_the_float_order():
    x = special_floats()
    keys = topk.order_keys(x)
    finite = ~x.isnan()
    for i in range(x.numel()):
        for j in range(x.numel()):
            if finite[i] and finite[j]:
                assert bool(keys[i] < keys[j]) == bool(x[i] < x[j]) and bool(keys[i] == keys[j]) == bool(x[i] == x[j])
    assert (keys[x.isnan()] == torch.iinfo(torch.int32).max).all() and bool(keys[x.isnan()].min() > keys[finite].max())
    assert topk.order_keys(torch.tensor([-0.0, 0.0], dtype=torch.bfloat16)).tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,make", [
    ("random", lambda g, n: torch.randn(6, n, generator=g)),
    ("few levels", lambda g, n: torch.randint(0, 4, (6, n), generator=g).float()),
    ("all equal", lambda g, n: torch.full((6, n), -1.5)),
    ("nan inf zeros", lambda g, n: special_floats()[torch.randint(0, 15, (6, n), generator=g)]),
])
def test_radix_batched_with_per_row_k_equals_single_calls(dtype, name, make):
    g = torch.Generator().manual_seed(7)
    n = 301
    values = make(g, n).to(dtype)
    ks = torch.tensor([0, 1, 150, 299, 300, 301])  # every row its own k, k = 0 and k = n included
    keep = topk_keep_batched(values, ks)
    assert keep.dtype == torch.bool and keep.shape == values.shape
    for row, k in zip(range(values.shape[0]), ks.tolist()):
        expect = topk_mask(values[row], k / n, impl="radix").bool()
        assert torch.equal(keep[row], expect), (name, k)
        assert torch.equal(keep[row], rule_mask(values[row], k / n).bool()), (name, k)
        assert int(keep[row].sum()) == k
    one_k = topk_keep_batched(values, 37)  # one int for every row
    assert torch.equal(one_k, topk_keep_batched(values, torch.full((6,), 37)))
    assert torch.equal(topk_keep_batched(values, torch.full((6,), n + 5)), torch.ones_like(keep))  # k clamped


class HostReads(TorchFunctionMode):
    """Records every torch call that reads a tensor's value on the host (a CUDA sync), or copies to the CPU."""

    NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.NAMES:
            self.reads.append(name)
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.reads.append(f"{name}[bool]")
        targets = [*args[1:], (kwargs or {}).get("device")]
        if name == "to" and any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
                                and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"
                                for a in targets):
            self.reads.append("to(cpu)")
        return func(*args, **(kwargs or {}))


def test_the_recorder_sees_host_reads():
    x = torch.randn(10)
    with HostReads() as rec:
        x.sum().item()
        int(x.argmax())
        bool(x.any())
        x[x > 0]
        x.nonzero()
        float(x.max())
        x.tolist()
    assert rec.reads == ["item", "__int__", "__bool__", "__getitem__[bool]", "nonzero", "__float__", "tolist"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_radix_reads_nothing_on_the_host(dtype, monkeypatch):
    monkeypatch.setenv("CAP_DS_TOPK", "radix")
    g = torch.Generator().manual_seed(2)
    values = torch.randint(0, 7, (48, 40), generator=g).to(dtype)
    values[3, :5] = float("nan")
    batch = torch.randn(5, 333, generator=g).to(dtype)
    per_row = torch.tensor([0, 1, 20, 332, 333])
    with HostReads() as rec:
        for keep in (0.0, 0.1, 0.5, 0.999, 1.0):
            topk_mask(values, keep)
            topk_mask(values, keep, impl="radix")
        topk_keep_batched(batch, per_row)
        topk_keep_batched(batch, 17)
    assert rec.reads == []
    with HostReads() as rec:  # kthvalue's CPU fix-up does read (the CPU branch); the recorder catches it
        topk_mask(values, 0.5, impl="kthvalue")
    assert rec.reads


# ---- the scheduler's batched prefill
def _pruned_tiny_bert(method: str, dtype: torch.dtype):
    from transformers import BertConfig, BertForSequenceClassification

    from cap_ds.compression import CompressionScheduler, init_compression

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(cfg)
    groups = {"a": {"params": {"dense_ratio": 0.3}, "modules": [r"encoder\.layer\.0\."]},
              "b": {"params": {"dense_ratio": 0.55}, "modules": [r"encoder\.layer\.1\.(attention|intermediate)"]}}
    section = {"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": method, "schedule_offset": 0, "schedule_offset_end": 4,
                              "mask_init": "magnitude"},
        "different_groups": groups}}}
    init_compression(model, section)  # layer.1.output.dense stays unpruned
    model.to(dtype)
    return model, CompressionScheduler(model, section)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["movement", "magnitude"])
def test_prefill_gives_each_layer_its_own_mask_in_one_call_per_size(method, dtype, monkeypatch):
    from cap_ds.compression import masked_modules, scheduler
    from cap_ds.compression.methods import masks

    monkeypatch.setenv("CAP_DS_TOPK", "radix")
    monkeypatch.setattr(scheduler, "PREFILL_DEVICES", ("cpu",))
    batched, single = [], []
    real_batched, real_mask = scheduler.topk_keep_batched, methods.topk_mask
    monkeypatch.setattr(scheduler, "topk_keep_batched", lambda v, k: batched.append(v.shape) or real_batched(v, k))
    monkeypatch.setattr(masks, "topk_mask", lambda *a, **kw: single.append(1) or real_mask(*a, **kw))
    model, sched = _pruned_tiny_bert(method, dtype)
    mods = [m for m in masked_modules(model).values() if m.method is not None]
    assert len(mods) == 11
    if dtype == torch.bfloat16:  # plenty of ties at the cut
        for m in mods:
            m.weight.data = m.weight.data.mul(8).round().div(8)
            if m.mask_scores is not None:
                m.mask_scores.data = m.mask_scores.data.mul(2).round()
    ids = torch.randint(0, 64, (2, 7))
    model(input_ids=ids)  # step 0 is dense: masks stored without any selection
    assert batched == [] and single == [] and all(bool(m._mask_cache[1].all()) for m in mods)
    for step in range(3):
        batched.clear()
        with HostReads() as rec:
            sched.step()
            sched.prefill_masks()
        assert rec.reads == [] and len(batched) == 2
        batched.clear()
        single.clear()
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        model(input_ids=ids)  # a second forward in the same step: all cached
        assert batched == [] and single == [], (step, batched, single)
        sched.step()  # now lazily, at the first forward
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        model(input_ids=ids)
        # two size groups, no per-layer top-k: 8 of 32x32 (Q, K, V, attention out), 3 of 48x32 with 32x48 (FFN)
        assert sorted(batched) == [(3, 1536), (8, 1024)] and single == [], (step, batched, single)
        for m in mods:
            cached = m._mask_cache[1]
            alone = methods.compute_mask(m.method, m.weight, m.mask_scores, m.threshold).bool()
            rule = methods.topk_mask(m.weight.detach().abs() if method == "magnitude" else m.mask_scores.detach(),
                                     m.threshold, impl="kthvalue").bool()
            assert torch.equal(cached, alone) and torch.equal(cached, rule), (step, m)
            assert int(cached.sum()) == num_kept(cached.numel(), m.threshold)
        with torch.no_grad():
            for m in mods:
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
                if m.mask_scores is not None:
                    m.mask_scores.add_(torch.randn_like(m.mask_scores))
    for m in masked_modules(model).values():
        m.mask_cache_enabled = False  # no cache: no prefill, one top-k per layer and forward
    sched.step()
    batched.clear()
    single.clear()
    model(input_ids=ids)
    assert batched == [] and len(single) == 11


def test_prefill_leaves_out_partitioned_and_cpu_layers(monkeypatch):
    from cap_ds.compression import masked_modules, scheduler

    monkeypatch.setenv("CAP_DS_TOPK", "radix")
    model, sched = _pruned_tiny_bert("movement", torch.float32)
    mods = [m for m in masked_modules(model).values() if m.method is not None]
    monkeypatch.setattr(scheduler, "PREFILL_DEVICES", ())  # the default leaves CPU out: nothing prefilled
    sched.step()
    sched.prefill_masks()
    assert all(m._mask_cache is None for m in mods)
    monkeypatch.setattr(scheduler, "PREFILL_DEVICES", ("cpu",))
    mods[0].mask_scores.ds_id = 7  # a ZeRO-3 partitioned parameter: the layer computes its own mask in forward
    sched.step()
    assert mods[0].topk_request() is None and mods[1].topk_request() is not None
    sched.prefill_masks()
    assert mods[0]._mask_cache is None and all(m._mask_cache is not None for m in mods[1:])
    monkeypatch.setenv("CAP_DS_TOPK", "kthvalue")  # another top-k in force: no prefill
    sched.step()
    sched.prefill_masks()
    assert all(m._mask_cache is None for m in mods)


@pytest.mark.gpu
def test_radix_on_cuda_batched_and_without_sync():
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        values = torch.randn(4, 1024 * 1024, generator=g).to(dtype)
        values[1] = values[1].mul(4).round()
        ks = torch.tensor([1, 104857, 524288, 1048575])
        cpu = topk_keep_batched(values, ks)
        dev, dev_ks = values.cuda(), ks.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cuda = topk_keep_batched(dev, dev_ks)
            single = topk.topk_keep(dev[2], 524288, "radix")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(cuda.cpu(), cpu) and torch.equal(single.cpu(), cpu[2])
        for row, k in enumerate(ks.tolist()):
            assert torch.equal(cpu[row], topk.topk_keep(values[row], k, "kthvalue"))
