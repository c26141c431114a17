"""CAP contrastive loss: against a hand-computed case and a loop-by-loop reading of the reference formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from cap_ds.cap import CapObjective, MemoryBank, build_candidates, contrastive_terms, kd_loss


def naive_terms(anchors, idx, labels, keys, src, key_labels, self_pos, tau, reduction):
    """Direct transcription of cap_algorithm.md §5 with python loops."""
    out = []
    for pos_kind in ("u", "s"):
        num = 0.0
        pos_total = 0
        per_anchor = []
        for b in range(anchors.shape[0]):
            logits = [float(anchors[b] @ keys[k]) / tau for k in range(keys.shape[0])]
            denom = math.log(sum(math.exp(v) for k, v in enumerate(logits) if k != self_pos[b]))
            if pos_kind == "u":
                pos = [k for k in range(keys.shape[0]) if k != self_pos[b] and src[k] == idx[b]]
            else:
                pos = [k for k in range(keys.shape[0]) if k != self_pos[b] and key_labels[k] == labels[b]]
            if not pos:
                continue
            mean_lp = sum(logits[k] - denom for k in pos) / len(pos)
            num += mean_lp
            pos_total += len(pos)
            per_anchor.append(mean_lp)
        if reduction == "reference":
            out.append(-num / pos_total)
        else:
            out.append(-sum(per_anchor) / len(per_anchor))
    return out


def test_hand_computed_two_anchor_case():
    # Anchors along the axes; one bank column; one extra example (idx 5, label 0).
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    idx = torch.tensor([0, 1])
    labels = torch.tensor([0, 1])
    batch_rows = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]])
    extra_idx = torch.tensor([5])
    extra_rows = torch.tensor([[[0.0, -1.0]]])
    extra_labels = torch.tensor([0])
    cand = build_candidates(anchors, idx, labels, batch_rows, extra_idx, extra_rows, extra_labels)
    assert cand.keys.shape == (5, 2)
    assert cand.src.tolist() == [0, 1, 0, 1, 5]
    assert cand.labels.tolist() == [0, 1, 0, 1, 0]
    tau = 0.5
    loss_u, loss_s = contrastive_terms(anchors, idx, labels, cand, tau, "reference")
    # Anchor 0: keys (self masked) a1=[0,1] -> 0, bank0=[1,0] -> 2, bank1=[.6,.8] -> 1.2, extra=[0,-1] -> 0.
    lse0 = math.log(math.exp(0) + math.exp(2) + math.exp(1.2) + math.exp(0))
    # Anchor 1: a0 -> 0, bank0 -> 0, bank1 -> 1.6, extra -> -2.
    lse1 = math.log(math.exp(0) + math.exp(0) + math.exp(1.6) + math.exp(-2))
    # Unsupervised positives: anchor0 -> bank0 (logit 2); anchor1 -> bank1 (1.6); |P| = 1 each.
    expected_u = -((2 - lse0) + (1.6 - lse1)) / 2
    # Supervised: anchor0 (label 0) -> bank0 (2), extra (0); anchor1 (label 1) -> bank1 (1.6).
    expected_s = -(((2 - lse0) + (0 - lse0)) / 2 + (1.6 - lse1)) / 3
    assert loss_u.item() == pytest.approx(expected_u, rel=1e-6)
    assert loss_s.item() == pytest.approx(expected_s, rel=1e-6)
    loss_u2, loss_s2 = contrastive_terms(anchors, idx, labels, cand, tau, "supcon")
    assert loss_u2.item() == pytest.approx(expected_u, rel=1e-6)  # |P|=1: both reductions agree
    assert loss_s2.item() == pytest.approx(-(((2 - lse0) + (0 - lse0)) / 2 + (1.6 - lse1)) / 2, rel=1e-6)


@pytest.mark.parametrize("reduction", ["reference", "supcon"])
def test_matches_naive_formula_random(reduction):
    g = torch.Generator().manual_seed(0)
    b, r, h, e = 4, 3, 8, 5
    anchors = F.normalize(torch.randn(b, h, generator=g), dim=-1)
    idx = torch.tensor([3, 7, 1, 9])
    labels = torch.tensor([0, 1, 0, 2])
    batch_rows = F.normalize(torch.randn(b, r, h, generator=g), dim=-1)
    extra_idx = torch.tensor([7, 2, 4, 11, 0])  # 7 is also in the batch: doubles its positives
    extra_rows = F.normalize(torch.randn(e, r, h, generator=g), dim=-1)
    extra_labels = torch.tensor([1, 0, 2, 1, 0])
    cand = build_candidates(anchors, idx, labels, batch_rows, extra_idx, extra_rows, extra_labels)
    loss_u, loss_s = contrastive_terms(anchors, idx, labels, cand, 0.1, reduction)
    ref_u, ref_s = naive_terms(anchors, idx.tolist(), labels.tolist(), cand.keys, cand.src.tolist(),
                               cand.labels.tolist(), cand.self_index.tolist(), 0.1, reduction)
    assert loss_u.item() == pytest.approx(ref_u, rel=1e-5)
    assert loss_s.item() == pytest.approx(ref_s, rel=1e-5)


def test_gradient_flows_only_into_anchor():
    anchors = F.normalize(torch.randn(3, 4), dim=-1).requires_grad_(True)
    rows = F.normalize(torch.randn(3, 2, 4), dim=-1).requires_grad_(True)
    extra = F.normalize(torch.randn(2, 2, 4), dim=-1)
    idx = torch.tensor([0, 1, 2])
    cand = build_candidates(anchors, idx, None, rows.detach(), torch.tensor([3, 4]), extra, None)
    loss_u, loss_s = contrastive_terms(anchors, idx, None, cand, 0.1)
    assert loss_s is None
    loss_u.backward()
    assert anchors.grad is not None and anchors.grad.abs().sum() > 0
    assert rows.grad is None


def test_self_copy_is_the_only_masked_key():
    # An anchor identical to another anchor: that other copy is a legit (non-masked) negative.
    a = F.normalize(torch.ones(2, 3), dim=-1)
    idx = torch.tensor([0, 1])
    cand = build_candidates(a, idx, None, a.unsqueeze(1).clone(), torch.tensor([], dtype=torch.long),
                            torch.zeros(0, 1, 3), None)
    loss_u, _ = contrastive_terms(a, idx, None, cand, 1.0)
    # 3 unmasked keys, all logit 1 -> log p = -log 3 for the single positive.
    assert loss_u.item() == pytest.approx(math.log(3), rel=1e-6)


def test_kd_loss_matches_definition():
    s = torch.tensor([[1.0, -1.0, 0.5], [0.2, 0.1, -0.3]])
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    temp = 2.0
    p_t = F.softmax(t / temp, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    assert kd_loss(s, t, temp).item() == pytest.approx(expected.item(), rel=1e-6)
    assert kd_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.5], [2.0]]), 2.0, True).item() == pytest.approx(0.125)


def test_objective_extra_sampling_and_weights():
    n, h = 50, 8
    g = torch.Generator().manual_seed(1)
    bank = MemoryBank("prc", n, h)
    bank.add_column(F.normalize(torch.randn(n, h, generator=g), dim=-1))
    snc = MemoryBank("snc", n, h)
    labels = torch.randint(0, 2, (n,), generator=g)
    obj = CapObjective({"prc": bank, "snc": snc}, labels, temperature=0.1, extra_negatives=20,
                       unsup_weight=0.1, sup_weight=10.0)
    extra = obj.sample_extra(bank)
    assert len(extra) == 20 and len(set(extra.tolist())) == 20  # without replacement
    snc.add_column(torch.zeros(n, h) + 0.1)
    snc.add_column(torch.zeros(n, h) + 0.2)
    assert len(obj.sample_extra(snc)) == 10  # 20 // R with R = 2
    anchors = F.normalize(torch.randn(4, h, generator=g), dim=-1)
    idx = torch.tensor([0, 1, 2, 3])
    parts = obj.module_loss(bank, anchors, idx, labels[idx], extra_idx=extra)
    assert parts["total"].item() == pytest.approx(0.1 * parts["unsup"].item() + 10 * parts["sup"].item(), rel=1e-6)
    out = obj(anchors, idx, labels[idx])
    assert set(out) == {"prc", "snc"}


def test_empty_bank_module_is_skipped():
    obj = CapObjective({"snc": MemoryBank("snc", 10, 4)}, None)
    assert obj(F.normalize(torch.randn(2, 4), dim=-1), torch.tensor([0, 1]), None) == {}
