"""Unstructured pruning pieces used by the CAP trainer: cubic schedule, exact top-k masks, STE gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cap_ds.compression import (
    CompressionScheduler,
    MaskedLinear,
    bake_masks,
    cubic_schedule,
    init_compression,
    sparsity_report,
    warmup_offsets,
)
from cap_ds.compression.config import CompressionConfigError, as_compression_config
from cap_ds.compression.methods import num_kept, sigmoid_threshold_mask, topk_mask
from cap_ds.compression.scheduler import quantile_threshold


def test_cubic_schedule_reference_values():
    # Reference GLUE: iw=2, fw=3, warmup 11000, total 114000 -> dense to 22000, final from 81000.
    off, end = warmup_offsets(114000, 11000, 2, 3)
    assert (off, end) == (22000, 81000)
    assert cubic_schedule(0, off, end, 1.0, 0.1) == 1.0
    assert cubic_schedule(22000, off, end, 1.0, 0.1) == 1.0
    assert cubic_schedule(81000, off, end, 1.0, 0.1) == pytest.approx(0.1)
    assert cubic_schedule(100000, off, end, 1.0, 0.1) == pytest.approx(0.1)
    mid = cubic_schedule(51500, off, end, 1.0, 0.1)  # progress 0.5 -> 0.1 + 0.9 * 0.125
    assert mid == pytest.approx(0.2125)
    with pytest.raises(ValueError, match="schedule is empty"):
        warmup_offsets(10, 5, 2, 3)


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.1, 0.03, 0.0])
def test_topk_mask_keeps_exact_count(keep):
    torch.manual_seed(0)
    w = torch.randn(37, 53)
    mask = topk_mask(w.abs(), keep)
    assert int(mask.sum()) == num_kept(w.numel(), keep) == int(keep * w.numel() + 1e-6)
    if 0 < keep < 1:
        assert w.abs()[mask.bool()].min() >= w.abs()[~mask.bool()].max()


def test_soft_movement_floor():
    scores = torch.full((20, 20), -10.0)
    scores[0, 0] = 5.0
    mask = sigmoid_threshold_mask(scores, 0.1)
    assert int(mask.sum()) == int(0.005 * 400) + 1  # floor of 0.5 % + 1 entries


def test_movement_ste_gradient_is_grad_times_weight():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    m = MaskedLinear.from_linear(lin, "movement")
    m.threshold = 0.5
    x = torch.randn(3, 6)
    m(x).pow(2).sum().backward()
    mask = m.get_mask().detach()
    # dL/dW' for W' = W * mask, computed by hand:
    w_eff = (lin.weight * mask).detach().requires_grad_(True)
    F.linear(x, w_eff, lin.bias.detach()).pow(2).sum().backward()
    assert torch.allclose(m.mask_scores.grad, w_eff.grad * lin.weight.detach(), atol=1e-6)
    assert torch.allclose(m.weight.grad, w_eff.grad * mask, atol=1e-6)
    assert int(mask.sum()) == 12


def test_magnitude_mask_has_no_score_and_keeps_largest():
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -5.0, 0.1, 2.0], [-3.0, 0.2, 4.0, 0.3]]))
    m = MaskedLinear.from_linear(lin, "magnitude")
    m.threshold = 0.5
    assert m.mask_scores is None
    assert m.get_mask().tolist() == [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]


def test_mask_in_weight_dtype_bf16():
    m = MaskedLinear.from_linear(nn.Linear(8, 8).to(torch.bfloat16), "movement")
    m.threshold = 0.5
    out = m(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and m.get_mask().dtype == torch.bfloat16


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(16, 16), "b": nn.Linear(16, 8)})
                                            for _ in range(2)])
        self.head = nn.Linear(8, 2)


def _section(method="movement", ratio=0.1, offset=2, end=6, **extra):
    return {"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": method, "schedule_offset": offset,
                              "schedule_offset_end": end, **extra},
        "different_groups": {"sp1": {"params": {"dense_ratio": ratio}, "modules": [r"encoder\.layer\.\d+\."]}}}}}


def test_scheduler_drives_all_modules_to_target_and_bake():
    model = Tiny()
    init_compression(model, _section())
    sched = CompressionScheduler(model, _section())
    assert isinstance(model.encoder.layer[0]["a"], MaskedLinear) and not isinstance(model.head, MaskedLinear)
    assert sparsity_report(model)["sparsity"] == 0.0
    for _ in range(6):
        sched.step()
    rep = sparsity_report(model)
    total = 2 * (16 * 16 + 16 * 8)
    assert rep["total"] == total
    assert rep["zeros"] == total - 2 * (int(0.1 * 256) + int(0.1 * 128))
    x = torch.randn(3, 16)
    before = model.encoder.layer[1]["a"](x)
    bake_masks(model)
    assert type(model.encoder.layer[1]["a"]) is nn.Linear
    assert torch.equal(model.encoder.layer[1]["a"](x), before)
    assert sparsity_report(model)["zeros"] == rep["zeros"]


def test_soft_movement_regulariser_follows_threshold():
    model = Tiny()
    cfg = _section("soft_movement", final_lambda=10.0, final_threshold=0.1)
    init_compression(model, cfg)
    sched = CompressionScheduler(model, cfg)
    model.encoder.layer[0]["a"](torch.randn(1, 16))  # forward stashes mean(sigmoid(scores))
    assert sched.regularization().item() == 0.0  # threshold 0 at step 0 -> lambda_t 0
    sched.set_step(6)
    assert sched.regularization_lambda == pytest.approx(10.0)
    # sigmoid(0) = 0.5 for every score -> regulariser = lambda * 0.5
    assert sched.regularization().item() == pytest.approx(5.0)


def test_quantile_threshold_keeps_at_most_the_asked_fraction():
    hist = torch.tensor([4.0, 3.0, 2.0, 1.0])  # bins [0, .25), [.25, .5), [.5, .75), [.75, 1]
    assert quantile_threshold(hist, 1.0) == 0.0
    assert quantile_threshold(hist, 0.3) == 0.5  # 3 of 10 entries lie at or above 0.5
    assert quantile_threshold(hist, 0.25) == 0.75  # 0.5 would keep 3 > 2.5: the next edge up
    assert quantile_threshold(hist, 0.0) == 1.0


def _train_soft(control: bool, final_lambda: float, seed: int, target: float = 0.8) -> tuple[float, CompressionScheduler]:
    """A few Adam steps of a Tiny model on a fixed random task with soft movement."""
    torch.manual_seed(seed)
    model = Tiny()
    cfg = _section("soft_movement", ratio=1 - target, offset=5, end=30, final_lambda=final_lambda,
                   threshold_control=control)
    init_compression(model, cfg)
    sched = CompressionScheduler(model, cfg)
    scores = [p for n, p in model.named_parameters() if n.endswith("mask_scores")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("mask_scores")]
    opt = torch.optim.Adam([{"params": rest, "lr": 1e-3}, {"params": scores, "lr": 0.2}])
    x, y = torch.randn(64, 16), torch.randint(0, 2, (64,))
    for _ in range(40):
        h = x
        for layer in model.encoder.layer:
            h = layer["b"](torch.relu(layer["a"](h)))
            h = torch.cat([h, h], 1)
        loss = F.cross_entropy(model.head(h[:, :8]), y) + sched.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return sparsity_report(model)["sparsity"], sched


def test_soft_movement_threshold_control_reaches_the_target_whatever_lambda():
    # The reference threshold schedule reaches whatever sparsity lambda gives; the quantile threshold reaches the
    # target (and follows the cubic schedule on the way) for any lambda and seed.
    reached = {lam: _train_soft(False, lam, 0)[0] for lam in (1.0, 100.0)}
    assert reached[1.0] < 0.7 and reached[100.0] > 0.95
    for lam in (1.0, 100.0):
        for seed in (0, 1):
            sparsity, sched = _train_soft(True, lam, seed)
            assert sparsity == pytest.approx(0.8, abs=0.005)
            assert sched.scalars()["scheduled_sparsity"] == pytest.approx(0.8)
            assert 0.0 < sched.results()["soft_threshold"] < 1.0
            assert sched.regularization_lambda == pytest.approx(lam)  # lambda keeps the reference's ramp


def test_soft_movement_threshold_control_resumes_its_threshold():
    _, sched = _train_soft(True, 10.0, 0)
    model = Tiny()
    cfg = _section("soft_movement", ratio=0.2, offset=5, end=30, final_lambda=10.0, threshold_control=True)
    init_compression(model, cfg)
    fresh = CompressionScheduler(model, cfg)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.training_steps == 40 and fresh.soft_threshold == sched.soft_threshold > 0
    assert model.encoder.layer[0]["a"].threshold == sched.soft_threshold
    # pruning on the schedule from the ramp's first step needs the magnitude prior, as movement does
    assert as_compression_config(cfg).sparse_pruning.mask_init == "magnitude"
    assert as_compression_config(_section("soft_movement")).sparse_pruning.mask_init == "constant"
    with pytest.raises(CompressionConfigError, match="threshold_control needs method soft_movement"):
        init_compression(Tiny(), _section("movement", threshold_control=True))
    with pytest.raises(CompressionConfigError, match="threshold_control must be true or false"):
        init_compression(Tiny(), _section("soft_movement", threshold_control="yes"))


def test_score_histogram_under_zero3_comes_from_the_last_forward():
    layer = MaskedLinear.from_linear(nn.Linear(8, 8), "soft_movement")
    layer.track_scores = True
    assert int(layer.latest_score_histogram().sum()) == 64  # whole scores: histogram of the current ones
    layer.mask_scores.ds_id = 0  # what ZeRO-3 puts on a partitioned parameter
    assert layer.latest_score_histogram() is None  # no training forward yet
    layer.train()
    layer(torch.randn(2, 8))
    assert int(layer.latest_score_histogram().sum()) == 64
    assert layer.latest_score_histogram() is None  # consumed: one histogram per forward


# ---- agreement with the reference code (HF emmental / CAP's UnstructuredPruning) and the magnitude score init
def _reference_topk(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """emmental's TopKBinarizer: sort descending, keep the first int(threshold * numel)."""
    out = torch.zeros(scores.numel())
    idx = scores.flatten().sort(descending=True).indices
    out[idx[: int(threshold * scores.numel())]] = 1.0
    return out.view_as(scores)


def _reference_schedule(step, total, warmup, initial, final, iw, fw):
    """emmental's schedule_threshold (as in CAP's masked_run_glue.py)."""
    if step <= iw * warmup:
        return initial
    if step > total - fw * warmup:
        return final
    mul = 1 - (step - iw * warmup) / (total - (iw + fw) * warmup)
    return final + (initial - final) * mul ** 3


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1, 0.03])
def test_topk_binarizer_matches_reference(keep):
    scores = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(topk_mask(scores, keep), _reference_topk(scores, keep))


def test_cubic_schedule_matches_reference_at_every_step():
    total, warmup = 375, 38
    off, end = warmup_offsets(total, warmup, 2, 3)
    for step in range(total + 1):
        assert cubic_schedule(step, off, end, 1.0, 0.1) == pytest.approx(
            _reference_schedule(step, total, warmup, 1.0, 0.1, 2, 3), abs=1e-12), step


def test_magnitude_init_first_masks_are_the_magnitude_masks():
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    m = MaskedLinear.from_linear(lin, "movement", mask_init="magnitude")
    assert m.mask_scores.mean().item() == pytest.approx(1.0, rel=1e-5)  # default scale 1 = mean |W| / mean |W|
    assert torch.allclose(m.mask_scores, lin.weight.abs() / lin.weight.abs().mean())
    for keep in (0.7, 0.3, 0.1):
        m.threshold = keep
        assert torch.equal(m.get_mask(), topk_mask(lin.weight.abs(), keep))
    scaled = MaskedLinear.from_linear(nn.Linear(8, 8), "soft_movement", mask_init="magnitude", mask_scale=3.0)
    assert scaled.mask_scores.mean().item() == pytest.approx(3.0, rel=1e-5)


def test_reference_init_is_constant_zero():
    m = MaskedLinear.from_linear(nn.Linear(8, 8), "movement", mask_init="constant")
    assert torch.count_nonzero(m.mask_scores) == 0


def test_magnitude_init_through_the_compression_config():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    section = {"sparse_pruning": {"shared_parameters": {"enabled": True, "method": "movement", "schedule_offset": 0,
                                                       "mask_init": "magnitude", "mask_scale": 2.0},
                                  "different_groups": {"g": {"params": {"dense_ratio": 0.25}, "modules": [r"\d"]}}}}
    init_compression(model, {"compression_training": section})
    CompressionScheduler(model, {"compression_training": section})  # switches on at step 0
    for lin in model:
        assert lin.mask_scores.mean().item() == pytest.approx(2.0, rel=1e-5)
        assert torch.equal(lin.get_mask(), topk_mask(lin.weight.abs(), 0.25))
    section["sparse_pruning"]["shared_parameters"]["mask_init"] = "gaussian"
    from cap_ds.compression import CompressionConfigError

    with pytest.raises(CompressionConfigError, match="mask_init: 'gaussian'; allowed: magnitude, constant"):
        init_compression(nn.Sequential(nn.Linear(4, 4)), {"compression_training": section})


def test_magnitude_init_for_row_and_head_scores():
    lin = nn.Linear(8, 6)
    m = MaskedLinear.from_linear(lin, None)
    m.enable_row_pruning("topk", mask_init="magnitude")
    m.enable_head_pruning("topk", num_heads=2, mask_init="magnitude")
    rows = lin.weight.detach().abs().sum(1, keepdim=True)
    heads = lin.weight.detach().abs().reshape(6, 2, 4).sum((0, 2)).unsqueeze(0)
    assert torch.allclose(m.row_mask_scores, rows / rows.mean())
    assert torch.allclose(m.head_mask_scores, heads / heads.mean())


def test_optimizer_groups_match_reference(model_path):
    """Reference (CAP's masked_run_glue.py): scores in their own group at the score LR with no weight decay;
    biases and LayerNorm without decay; the embeddings frozen (MaskedBertModel) and so in no group."""
    from cap_ds.compression.stats import ENCODER_LINEAR_PATTERN
    from cap_ds.data.models import load_student
    from cap_ds.training.optim import optimizer_groups

    model = load_student(model_path, 2, ("negative", "positive"), "num_hidden_layers=1")
    section = {"sparse_pruning": {"shared_parameters": {"enabled": True, "method": "movement", "schedule_offset": 0},
                                  "different_groups": {"g": {"params": {"dense_ratio": 0.1},
                                                             "modules": [ENCODER_LINEAR_PATTERN]}}}}
    init_compression(model, {"compression_training": section})
    for p in model.base_model.embeddings.parameters():
        p.requires_grad_(False)  # as cap_ds/train.py does
    groups = optimizer_groups(model, weight_decay=0.01, score_lr=1e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = [[names[id(p)] for p in g["params"]] for g in groups]
    scores = [g for g, ns in zip(groups, by_group) if all(n.endswith("mask_scores") for n in ns)]
    assert len(scores) == 1 and scores[0]["lr"] == 1e-2 and scores[0]["weight_decay"] == 0.0
    assert len(scores[0]["params"]) == 6  # Q, K, V, attention out, FFN in, FFN out of the one layer
    flat = [n for ns in by_group for n in ns]
    assert not any("embeddings" in n for n in flat)
    for g, ns in zip(groups, by_group):
        if any(n.endswith("bias") or "LayerNorm" in n for n in ns):
            assert g["weight_decay"] == 0.0 and all(n.endswith("bias") or "LayerNorm" in n for n in ns)


# ---- masks computed once per optimizer step
def _train_tiny(method: str, cache: bool, monkeypatch) -> tuple[dict, list, int]:
    """A tiny BERT pruned along a ramp with 2 micro-batches per step and an eval pass between steps."""
    from transformers import BertConfig, BertForSequenceClassification

    from cap_ds.compression import masked_modules
    from cap_ds.compression.methods import masks as methods

    calls = {"n": 0}
    real_topk, real_sigmoid = methods.topk_mask, methods.sigmoid_threshold_mask

    def counted(fn):
        def wrapper(*a, **k):
            calls["n"] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(methods, "topk_mask", counted(real_topk))
    monkeypatch.setattr(methods, "sigmoid_threshold_mask", counted(real_sigmoid))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    section = {"sparse_pruning": {"shared_parameters": {"enabled": True, "method": method, "schedule_offset": 1,
                                                       "schedule_offset_end": 5, "final_lambda": 5.0},
                                  "different_groups": {"g": {"params": {"dense_ratio": 0.2},
                                                             "modules": [r"encoder\.layer\.\d+\."]}}}}
    init_compression(model, {"compression_training": section})
    sched = CompressionScheduler(model, {"compression_training": section})
    for m in masked_modules(model).values():
        m.mask_cache_enabled = cache  # the scheduler turned the cache on
    from cap_ds.training.optim import optimizer_groups

    opt = torch.optim.AdamW(optimizer_groups(model, 0.01, 0.1), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (4, 9), generator=gen) for _ in range(2)]
    labels = torch.tensor([0, 1, 1, 0])
    evals = []
    model.train()
    for _ in range(7):
        for ids in batches:  # gradient accumulation: the weights do not change between micro-batches
            out = model(input_ids=ids, labels=labels)
            loss = out.loss + (sched.regularization() if sched.regularization() is not None else 0.0)
            (loss / 2).backward()
        model.eval()
        with torch.no_grad():
            evals.append(model(input_ids=batches[0]).logits.clone())
        model.train()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, evals, calls["n"]


@pytest.mark.parametrize("method", ["movement", "magnitude", "soft_movement"])
def test_cached_masks_train_exactly_as_recomputed_ones(method, monkeypatch):
    state_c, evals_c, n_cached = _train_tiny(method, True, monkeypatch)
    state_r, evals_r, n_recomputed = _train_tiny(method, False, monkeypatch)
    for k in state_r:
        assert torch.equal(state_c[k], state_r[k]), k  # bit for bit, scores included
    for a, b in zip(evals_c, evals_r):
        assert torch.equal(a, b)
    # 12 masked linears; cached: one mask per layer and step (7 steps); recomputed: 3 forwards per step.
    assert n_recomputed == 3 * n_cached and n_cached == 12 * 7


def test_mask_cache_follows_a_threshold_set_by_hand():
    lin = nn.Linear(20, 10)
    cfg = {"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": "magnitude", "schedule_offset": 0},
        "different_groups": {"g": {"params": {"dense_ratio": 0.5}, "modules": ["0"]}}}}}
    model = init_compression(nn.Sequential(lin), cfg)
    CompressionScheduler(model, cfg)
    assert int(model[0].get_mask().sum()) == 100
    model[0].threshold = 0.2
    assert int(model[0].get_mask().sum()) == 40
