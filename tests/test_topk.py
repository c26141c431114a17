"""Top-k keep-masks (issue 15): every candidate keeps exactly k entries; kthvalue and sort follow the documented
tie rule (lowest index first among entries equal to the k-th largest); all agree with torch.topk without ties."""

from __future__ import annotations

import pytest
import torch

from cap_ds.compression import methods
from cap_ds.compression.methods import TOPK_IMPLS, num_kept, topk_impl, topk_mask

RULE_IMPLS = ("kthvalue", "sort")


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


def tied_inputs():
    g = torch.Generator().manual_seed(0)
    yield "few values", torch.randint(0, 5, (40, 25), generator=g).float()
    yield "all equal", torch.full((30, 20), 0.25)
    yield "all zero", torch.zeros(17, 9)
    yield "bf16 scores", torch.randn(64, 48, generator=g).to(torch.bfloat16)
    yield "signed zeros", torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, 2.0, 0.0, -1.0])
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


def test_k_zero_and_k_all():
    x = torch.randn(5, 4)
    for impl in TOPK_IMPLS:
        assert torch.equal(topk_mask(x, 0.0, impl=impl), torch.zeros(5, 4))
        assert torch.equal(topk_mask(x, 1.0, impl=impl), torch.ones(5, 4))
        assert torch.equal(topk_mask(x, 0.04, impl=impl), torch.zeros(5, 4))  # int(0.04 * 20) = 0


def test_env_selects_the_candidate_and_rejects_bad_values(monkeypatch):
    monkeypatch.delenv("CAP_DS_TOPK", raising=False)
    assert topk_impl() == methods.DEFAULT_TOPK
    calls = []
    real = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("CAP_DS_TOPK", "topk")
    topk_mask(torch.randn(10), 0.5)
    assert calls == [1]
    monkeypatch.setenv("CAP_DS_TOPK", "radix")
    with pytest.raises(ValueError, match=r"CAP_DS_TOPK='radix'.*allowed: kthvalue, topk, sort"):
        topk_mask(torch.randn(10), 0.5)


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
