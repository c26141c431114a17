"""cap_ds.sparse: CSR packing, SparseLinear == dense F.linear on every edge case, sparsify on BERT models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cap_ds.sparse import SparseLinear, densify, pack_csr, sparsify, weight_sparsity


def sparse_weight(n_out: int, n_in: int, sparsity: float, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    w[torch.rand(n_out, n_in, generator=g) < sparsity] = 0
    return w.to(dtype)


def layer_pair(w: torch.Tensor, bias: bool = True, seed: int = 1) -> tuple[nn.Linear, SparseLinear]:
    dense = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        if bias:
            dense.bias.copy_(torch.randn(w.shape[0], generator=torch.Generator().manual_seed(seed)).to(w.dtype))
    return dense, SparseLinear.from_linear(dense)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")
def test_pack_csr_roundtrip():
    w = sparse_weight(37, 53, 0.8)
    w[5] = 0  # an empty row
    w[:, 7] = 0  # an empty column
    row_ptr, col_idx, values = pack_csr(w)
    assert row_ptr.dtype == col_idx.dtype == torch.int32 and values.dtype == w.dtype
    assert row_ptr[5] == row_ptr[6] and int(row_ptr[-1]) == int((w != 0).sum()) == values.numel()
    ref = w.to_sparse_csr()
    assert torch.equal(row_ptr.long(), ref.crow_indices()) and torch.equal(col_idx.long(), ref.col_indices())
    layer = SparseLinear(53, 37, row_ptr, col_idx, values)
    assert torch.equal(layer.dense_weight(), w)
    assert layer.sparsity == pytest.approx(weight_sparsity(w))


@pytest.mark.parametrize("tokens", [1, 5, 16, 64, 130, 256])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97, 1.0])
def test_sparse_linear_matches_dense_fp32(op, two_threads, tokens, sparsity):
    w = sparse_weight(96, 80, sparsity)
    dense, sparse = layer_pair(w)
    x = torch.randn(tokens, 80)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)


TILE_CHECK = r"""
import torch, torch.nn.functional as F
from cap_ds.ops import load_kernels
from cap_ds.sparse import pack_csr
op = load_kernels()
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
for tokens in (1, 17, 32, 33, 64, 65, 96, 130, 300):
    for n_out, n_in in ((37, 53), (64, 384), (130, 17)):
        w = torch.randn(n_out, n_in, generator=g)
        w[torch.rand(n_out, n_in, generator=g) < 0.9] = 0
        x, b = torch.randn(tokens, n_in, generator=g), torch.randn(n_out, generator=g)
        y = op.csr_linear(x, *pack_csr(w), b, n_out)
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("tile", ["32", "64"])
def test_both_token_tile_widths_match_dense(op, tile):
    """The kernel's tile width is fixed when it loads (32 tokens where L1 holds >= 48 KiB, else 64): run both, in
    a subprocess each, across the tile edges and both schedules."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", TILE_CHECK], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CAP_DS_CSR_TILE": tile})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("n_out,n_in", [(1, 1), (3, 7), (37, 53), (17, 300), (130, 17)])
def test_sparse_linear_odd_shapes_empty_rows_and_columns(op, two_threads, n_out, n_in):
    w = sparse_weight(n_out, n_in, 0.7, seed=n_out)
    w[n_out // 2] = 0
    w[:, n_in // 2] = 0
    for bias in (True, False):
        dense, sparse = layer_pair(w, bias=bias)
        for tokens in (1, 19, 83):
            x = torch.randn(tokens, n_in)
            with torch.no_grad():
                torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)


def test_sparse_linear_all_zero_weight_gives_bias(op):
    dense, sparse = layer_pair(torch.zeros(12, 20))
    with torch.no_grad():
        out = sparse(torch.randn(7, 20))
    assert sparse.nnz == 0
    assert torch.equal(out, dense.bias.detach().expand(7, 12))


def test_sparse_linear_3d_noncontiguous_and_batch_of_one(op, two_threads):
    w = sparse_weight(64, 48, 0.9)
    dense, sparse = layer_pair(w)
    x3 = torch.randn(3, 70, 48)
    base = torch.randn(140, 96)
    cases = [x3, torch.randn(1, 1, 48), base[::2, ::2], base[:, :48].t().contiguous().t(), x3.transpose(0, 1)]
    assert not cases[2].is_contiguous() and not cases[4].is_contiguous()
    with torch.no_grad():
        for x in cases:
            out = sparse(x)
            assert out.shape == (*x.shape[:-1], 64)
            torch.testing.assert_close(out, dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_linear_low_precision(op, two_threads, dtype):
    w = sparse_weight(72, 64, 0.9, dtype=dtype)
    dense, sparse = layer_pair(w)
    x = torch.randn(2, 33, 64).to(dtype)
    with torch.no_grad():
        out = sparse(x)
        ref = F.linear(x.float(), dense.weight.float(), dense.bias.float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match="dtype"):
        sparse(x.float())


def test_kernel_and_pytorch_fallback_agree(op, two_threads, kernel_switch):
    w = sparse_weight(50, 64, 0.9)
    dense, sparse = layer_pair(w)
    x = torch.randn(2, 41, 64)
    with torch.no_grad():
        ours = sparse(x)
        reference = sparse.reference_forward(x.reshape(-1, 64)).reshape(2, 41, 50)
        kernel_switch("off")  # every kernel off: the PyTorch path
        fallback = sparse(x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fallback, dense(x).detach(), rtol=1e-5, atol=1e-5)
    bf = SparseLinear.from_linear(dense.to(torch.bfloat16))  # densified fallback for dtypes torch CSR lacks
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(bf.reference_forward(xb.reshape(-1, 64)).float(),
                               dense(xb).reshape(-1, 50).float(), rtol=2e-2, atol=2e-2)


def test_input_gradient(op):
    w = sparse_weight(30, 20, 0.8)
    dense, sparse = layer_pair(w)
    x = torch.randn(6, 20, requires_grad=True)
    (gx,) = torch.autograd.grad(sparse(x).square().sum(), x)
    x2 = x.detach().requires_grad_()
    (gref,) = torch.autograd.grad(dense(x2).square().sum(), x2)
    torch.testing.assert_close(gx, gref, rtol=1e-5, atol=1e-5)


def test_sparsify_selects_by_sparsity_and_densify_restores():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight.copy_(sparse_weight(32, 16, 0.9))
    x = torch.randn(4, 16)
    with torch.no_grad():
        ref = model(x)
        sparsify(model, min_sparsity=0.5, policy="csr")
        assert isinstance(model[0], SparseLinear) and isinstance(model[2], nn.Linear)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        densify(model)
        assert type(model[0]) is nn.Linear
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        sparsify(model, min_sparsity=1.5)


def test_sparsify_bakes_masked_linear():
    from cap_ds.compression.layers import MaskedLinear

    torch.manual_seed(0)
    layer = MaskedLinear(24, 12, method="magnitude")
    layer.threshold = 0.1
    model = nn.Sequential(layer).eval()
    x = torch.randn(5, 24)
    with torch.no_grad():
        ref = model(x)
        sparsify(model, policy="csr")
        assert isinstance(model[0], SparseLinear) and model[0].sparsity > 0.85
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def tiny_bert(sparsity: float = 0.9):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # magnitude top-k per encoder linear: what an exported cap_ds model looks like
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".encoder." in f".{name}":
                w = module.weight
                keep = w.abs().flatten().topk(int(round(w.numel() * (1 - sparsity)))).indices
                mask = torch.zeros(w.numel())
                mask[keep] = 1
                w.mul_(mask.view_as(w))
    return model


def _check_bert(dense, sparse_model):
    ids = torch.randint(0, 120, (3, 21), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 15:] = 0
    with torch.no_grad():
        ref = dense(input_ids=ids, attention_mask=attn).logits
        out = sparse_model(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    n_sparse = sum(isinstance(m, SparseLinear) for m in sparse_model.modules())
    assert n_sparse == 6 * dense.config.num_hidden_layers  # q, k, v, attn out, FFN in, FFN out per layer
    assert isinstance(sparse_model.classifier, nn.Linear) and isinstance(sparse_model.bert.pooler.dense, nn.Linear)


def test_sparsify_bert_logits(op):
    dense = tiny_bert()
    _check_bert(dense, sparsify(copy.deepcopy(dense), policy="csr"))


def test_sparsify_bert_saved_and_reloaded(op, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tiny_bert().save_pretrained(tmp_path / "final")  # as an exported final/ directory
    dense = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    _check_bert(dense, sparsify(reloaded, policy="csr"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_cuda(dtype, cuda_kernels):
    w = sparse_weight(300, 256, 0.9, dtype=dtype)
    dense, sparse = layer_pair(w)
    dense, sparse = dense.cuda(), sparse.cuda()
    assert sparse.format == "csr"  # the CSR kernel
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for shape in [(1, 256), (2, 77, 256), (300, 256)]:
        x = torch.randn(shape, device="cuda").to(dtype)
        with torch.no_grad():
            torch.testing.assert_close(sparse(x).float(), dense(x).float(), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_sparse_linear_cuda_2to4():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need sm_80+")
    w = torch.randn(256, 256)
    w.view(256, 64, 4)[..., 2:] = 0  # 2:4 along the input dim
    dense, sparse = layer_pair(w.half())
    dense, sparse = dense.cuda(), sparse.cuda()
    sparse.set_format("2:4")
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        out = sparse(x)
    assert sparse._semi_cache is not None and sparse._semi_cache[1] is not None, "2:4 path not taken"
    torch.testing.assert_close(out.float(), dense(x).float(), rtol=2e-2, atol=2e-2)


def test_sparsify_leaves_multihead_attention_alone():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    with torch.no_grad():
        mha.out_proj.weight.zero_()
    sparsify(mha)
    assert type(mha.out_proj) is not SparseLinear
    x = torch.randn(2, 3, 16)
    mha(x, x, x)
