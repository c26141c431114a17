"""cap_ds.sparse.fusion and its kernels: csr_ffn (two CSR products, the activation between, a residual and a
LayerNorm, one token tile at a time), csr_attention (Q, K, V, SDPA, the output projection, residual and LayerNorm)
and csr_linear's residual and LayerNorm; in a model, the same logits as the unfused model, the same module tree
and state dict, and the original path wherever the kernel cannot run."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cap_ds.sparse import SparseLinear, densify, pack_csr, sparsify
from cap_ds.sparse.fusion import (
    ACT_GELU,
    ACT_NONE,
    ACT_RELU,
    FusedEncoder,
    FusedFeedForward,
    FusedLayer,
    FusedResidualOutput,
    FusedSelfAttention,
    fused_modules,
)

ACTS = {ACT_NONE: lambda h: h, ACT_GELU: F.gelu, ACT_RELU: F.relu}


def sparse_weight(n_out: int, n_in: int, sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) / n_in**0.5
    w[torch.rand(n_out, n_in, generator=g) < sparsity] = 0
    return w


def ffn_call(op, x, w1, b1, act, w2, b2, residual=None):
    return op.csr_ffn(x, *pack_csr(w1), b1, w1.shape[0], act, *pack_csr(w2), b2, w2.shape[0], w2.shape[1],
                      residual)


@pytest.mark.parametrize("tokens", [1, 16, 17, 45, 130])
@pytest.mark.parametrize("act", [ACT_NONE, ACT_GELU, ACT_RELU])
def test_csr_ffn_matches_dense(op, two_threads, tokens, act):
    w1, w2 = sparse_weight(70, 24, 0.8, 1), sparse_weight(19, 70, 0.8, 2)  # odd sizes: partial row blocks
    b1, b2 = torch.randn(70), torch.randn(19)
    x, res = torch.randn(tokens, 24) * 3, torch.randn(tokens, 19)
    want = F.linear(ACTS[act](F.linear(x, w1, b1)), w2, b2)
    torch.testing.assert_close(ffn_call(op, x, w1, b1, act, w2, b2), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ffn_call(op, x, w1, None, act, w2, None, res),
                               F.linear(ACTS[act](F.linear(x, w1)), w2) + res, rtol=1e-5, atol=1e-5)
    xt = torch.randn(24, tokens).t()  # a non-contiguous input packs like a contiguous one
    torch.testing.assert_close(ffn_call(op, xt, w1, b1, act, w2, b2),
                               F.linear(ACTS[act](F.linear(xt, w1, b1)), w2, b2), rtol=1e-5, atol=1e-5)


def test_kernel_gelu_against_exact_gelu(op):
    """The kernel's own erf GELU (identity weights around it) against float64 GELU over the useful range: within
    4e-7 (torch's own fp32 GELU is within 7e-7 here), exact at the extremes."""
    x = torch.cat([torch.linspace(-12, 12, 4801), torch.tensor([-1e4, -80.0, -1e-30, 0.0, 1e-30, 80.0, 1e4])])
    eye = torch.eye(1)
    got = op.csr_ffn(x[:, None], *pack_csr(eye), None, 1, ACT_GELU, *pack_csr(eye), None, 1, 1, None)[:, 0]
    exact = F.gelu(x.double())
    assert float((got.double() - exact).abs().max()) < 4e-7
    torch.testing.assert_close(got[-7:], exact[-7:].float(), rtol=1e-6, atol=1e-30)


def test_csr_ffn_both_tile_widths(op):
    code = """
import torch, torch.nn.functional as F
from cap_ds.ops import load_kernels
from cap_ds.sparse import pack_csr
torch.set_num_threads(2)
op, g = load_kernels(), torch.Generator().manual_seed(0)
w1 = torch.randn(96, 40, generator=g) * (torch.rand(96, 40, generator=g) > 0.9)
w2 = torch.randn(40, 96, generator=g) * (torch.rand(40, 96, generator=g) > 0.9)
for m in (1, 31, 33, 64, 200):
    x = torch.randn(m, 40, generator=g)
    y = op.csr_ffn(x, *pack_csr(w1), None, 96, 1, *pack_csr(w2), None, 40, 96, x)
    torch.testing.assert_close(y, F.linear(F.gelu(F.linear(x, w1)), w2) + x, rtol=1e-5, atol=1e-5)
    y = op.csr_linear(x, *pack_csr(w2.t().contiguous()), None, 96, ln_eps=1e-5)
    torch.testing.assert_close(y, F.layer_norm(F.linear(x, w2.t()), (96,), eps=1e-5), rtol=1e-5, atol=1e-5)
print("ok")
"""
    for tile in ("32", "64"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "CAP_DS_CSR_TILE": tile})
        assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_csr_ffn_low_precision(op, two_threads, dtype):
    w1, w2 = sparse_weight(64, 32, 0.9, 3), sparse_weight(32, 64, 0.9, 4)
    x, res = torch.randn(40, 32), torch.randn(40, 32)
    got = ffn_call(op, x.to(dtype), w1.to(dtype), None, ACT_GELU, w2.to(dtype), None, res.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), F.linear(F.gelu(F.linear(x, w1)), w2) + res, rtol=3e-2, atol=3e-2)


def test_csr_linear_residual(op, two_threads):
    w, b = sparse_weight(48, 20, 0.9, 5), torch.randn(48)
    for tokens in (3, 40, 257):  # the row-split schedule and the tile one
        x, res = torch.randn(tokens, 20), torch.randn(tokens, 48)
        torch.testing.assert_close(op.csr_linear(x, *pack_csr(w), b, 48, res), F.linear(x, w, b) + res,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(op.csr_linear(x, *pack_csr(w), b, 48, res.t().contiguous().t()),
                                   F.linear(x, w, b) + res, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [3, 17, 40, 130])  # the row-split schedule (3), partial and whole token tiles
def test_layer_norm_after_the_write_back(op, two_threads, tokens):
    """LN(x W^T + b + residual) and LN(FFN(x) + x) as F.layer_norm computes them, with and without its weight and
    bias, over a feature count that is not a multiple of 16 (19) and one that is (48)."""
    g = torch.Generator().manual_seed(tokens)
    for n in (19, 48):
        w, b = sparse_weight(n, 20, 0.9, n), torch.randn(n, generator=g)
        x, res = torch.randn(tokens, 20, generator=g), torch.randn(tokens, n, generator=g) * 4 + 3
        gamma, beta = torch.randn(n, generator=g), torch.randn(n, generator=g)
        for lw, lb in ((gamma, beta), (None, None), (None, beta)):
            got = op.csr_linear(x, *pack_csr(w), b, n, res, ln_weight=lw, ln_bias=lb, ln_eps=1e-12)
            want = F.layer_norm(F.linear(x, w, b) + res, (n,), lw, lb, 1e-12)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w1, w2 = sparse_weight(70, 24, 0.8, 1), sparse_weight(24, 70, 0.8, 2)
    x, gamma, beta = torch.randn(tokens, 24, generator=g), torch.randn(24, generator=g), torch.randn(24, generator=g)
    got = op.csr_ffn(x, *pack_csr(w1), None, 70, ACT_GELU, *pack_csr(w2), None, 24, 70, x, ln_weight=gamma,
                     ln_bias=beta, ln_eps=1e-5)
    want = F.layer_norm(F.linear(F.gelu(F.linear(x, w1)), w2) + x, (24,), gamma, beta, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # bf16: the sum rounded to bf16 once, then normalized in fp32 (the unfused path rounds it twice)
    xb, wb = x.bfloat16(), w2.t().contiguous().bfloat16()
    got = op.csr_linear(xb, *pack_csr(wb), None, 70, ln_weight=None, ln_bias=None, ln_eps=1e-5)
    want = F.layer_norm(F.linear(xb.float(), wb.float()), (70,), eps=1e-5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_bad_arguments_raise_one_clear_error(op):
    w1, w2 = pack_csr(sparse_weight(8, 4, 0.5, 6)), pack_csr(sparse_weight(4, 8, 0.5, 7))
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="second weight takes 9 inputs but the first gives 8"):
        op.csr_ffn(x, *w1, None, 8, ACT_GELU, *w2, None, 4, 9, None)
    with pytest.raises(RuntimeError, match="activation code 7"):
        op.csr_ffn(x, *w1, None, 8, 7, *w2, None, 4, 8, None)
    with pytest.raises(RuntimeError, match="residual must be"):
        op.csr_ffn(x, *w1, None, 8, ACT_GELU, *w2, None, 4, 8, torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="residual must be"):
        op.csr_linear(x, *w1, None, 8, torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="ln_weight / ln_bias given without ln_eps"):
        op.csr_linear(x, *w1, None, 8, ln_weight=torch.ones(8))
    with pytest.raises(RuntimeError, match="ln_eps must be a finite number >= 0"):
        op.csr_ffn(x, *w1, None, 8, ACT_GELU, *w2, None, 4, 8, None, ln_eps=float("nan"))
    with pytest.raises(RuntimeError, match="ln_bias must be \\[out_features\\]"):
        op.csr_linear(x, *w1, None, 8, ln_bias=torch.zeros(4), ln_eps=1e-5)


# ---- csr_attention

HID, HEADS = 64, 4


def attention_weights(seed: int = 10, dtype=torch.float32, hid: int = HID):
    """Q, K, V and output weights (80 % zeros) with biases, as csr_attention's tuples and as dense tensors."""
    dense = [(sparse_weight(hid, hid, 0.8, seed + i), torch.randn(hid, generator=torch.Generator().manual_seed(i)))
             for i in range(4)]
    tuples = [(*pack_csr(w.to(dtype)), b.to(dtype), hid, hid) for w, b in dense]
    return tuples, dense


def attention_reference(x, batch, dense, mask=None, residual=True, ln=None, heads=HEADS, scale=0.25):
    seq, hid = x.shape[0] // batch, x.shape[1]
    q, k, v = (F.linear(x.view(batch, seq, hid), w, b).view(batch, seq, heads, -1).transpose(1, 2)
               for w, b in dense[:3])
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2).reshape(-1, hid)
    y = F.linear(ctx, *dense[3]) + (x if residual else 0)
    return F.layer_norm(y, (hid,), *ln, 1e-6) if ln else y


def masks(batch: int, seq: int) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    keep = torch.rand(batch, 1, seq, seq, generator=g) > 0.3
    keep[..., 0] = True  # every query attends to something
    padding = torch.zeros(batch, 1, 1, seq)
    padding[-1, ..., seq // 2:] = torch.finfo(torch.float32).min  # additive, broadcast over the queries
    per_head = torch.rand(batch, HEADS, seq, seq, generator=g) > 0.5
    per_head[..., 1] = True
    return {"none": None, "bool": keep, "additive": padding, "shared": keep[:1], "per head": per_head}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,seq", [(1, 7), (1, 45), (2, 33), (3, 20), (8, 16)])  # phased and per sequence
@pytest.mark.parametrize("attention", ["own", "aten"])  # our attention kernel, ATen's SDPA (CAP_DS_ATTENTION)
def test_csr_attention_matches_sdpa(op, threads, batch, seq, attention, monkeypatch):
    if attention == "aten":
        monkeypatch.setenv("CAP_DS_ATTENTION", "aten")
    tuples, dense = attention_weights()
    ln = (torch.randn(HID), torch.randn(HID))
    x = torch.randn(batch * seq, HID, generator=torch.Generator().manual_seed(seq))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, mask in masks(batch, seq).items():
            got = op.csr_attention(x, batch, *tuples, HEADS, 0.25, mask=mask, residual=x, ln_weight=ln[0],
                                   ln_bias=ln[1], ln_eps=1e-6)
            want = attention_reference(x, batch, dense, mask, ln=ln)
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=f"mask {name}")
        # no residual, no LayerNorm: the bare block
        got = op.csr_attention(x, batch, *tuples, HEADS, 0.25)
        torch.testing.assert_close(got, attention_reference(x, batch, dense, residual=False), rtol=0, atol=2e-5)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("hid,heads", [(64, 2), (64, 1), (128, 1), (48, 4)])  # head sizes 32, 64, 128; 12: ATen's
def test_csr_attention_head_sizes(op, two_threads, hid, heads):
    tuples, dense = attention_weights(hid=hid)
    for batch, seq in ((1, 37), (4, 19)):
        x = torch.randn(batch * seq, hid, generator=torch.Generator().manual_seed(hid))
        keep = torch.rand(batch, 1, 1, seq, generator=torch.Generator().manual_seed(1)) > 0.4
        keep[..., 0] = True
        for mask in (None, keep):
            got = op.csr_attention(x, batch, *tuples, heads, 0.3, mask=mask, residual=x)
            want = attention_reference(x, batch, dense, mask, heads=heads, scale=0.3)
            torch.testing.assert_close(got, want, rtol=0, atol=3e-5)


def test_csr_attention_rows_that_attend_to_nothing_are_zero(op):
    """A query whose keys are all masked: SDPA's CPU kernel gives zeros (not NaN), so does ours."""
    tuples, dense = attention_weights()
    x = torch.randn(2 * 8, HID)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    mask[1, :, 3] = False
    got = op.csr_attention(x, 2, *tuples, HEADS, 0.25, mask=mask)
    want = attention_reference(x, 2, dense, mask, residual=False)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(got[8 + 3], dense[3][1], rtol=0, atol=1e-6)  # context 0: only the output bias


def test_csr_attention_on_the_task_pool_and_in_bf16(op, two_threads):
    tuples, dense = attention_weights()
    x = torch.randn(4 * 24, HID, generator=torch.Generator().manual_seed(1))
    want = attention_reference(x, 4, dense)
    op.set_cpu_threading(1)
    try:
        got = op.csr_attention(x, 4, *tuples, HEADS, 0.25, residual=x)
    finally:
        op.set_cpu_threading(0)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    low, _ = attention_weights(dtype=torch.bfloat16)
    got = op.csr_attention(x.bfloat16(), 4, *low, HEADS, 0.25, residual=x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.1)


def test_csr_attention_bad_arguments(op):
    tuples, _ = attention_weights()
    x = torch.randn(12, HID)
    with pytest.raises(RuntimeError, match="12 rows are not 5 sequences"):
        op.csr_attention(x, 5, *tuples, HEADS, 0.25)
    with pytest.raises(RuntimeError, match="64 features do not split into 5 heads"):
        op.csr_attention(x, 2, *tuples, 5, 0.25)
    with pytest.raises(RuntimeError, match="key takes 32 inputs, expected 64"):
        op.csr_attention(x, 2, tuples[0], (*tuples[1][:5], 32), *tuples[2:], HEADS, 0.25)
    with pytest.raises(RuntimeError, match="mask must be bool or x's dtype"):
        op.csr_attention(x, 2, *tuples, HEADS, 0.25, mask=torch.ones(2, 1, 6, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="mask must be bool or x's dtype"):
        op.csr_attention(x, 2, *tuples, HEADS, 0.25, mask=torch.ones(2, 1, 6, 6, dtype=torch.long))
    with pytest.raises(RuntimeError, match="residual must be"):
        op.csr_attention(x, 2, *tuples, HEADS, 0.25, residual=torch.randn(12, 3))


@pytest.mark.gpu
def test_csr_linear_cuda_residual_and_layer_norm(cuda_kernels):
    """On CUDA csr_linear adds the residual and normalizes after its product (ATen ops, not fused); csr_ffn is
    CPU only and says so."""
    op = cuda_kernels.load_kernels()
    g = torch.Generator().manual_seed(5)
    w, b = sparse_weight(48, 20, 0.9, 48), torch.randn(48, generator=g)
    x, res = torch.randn(37, 20, generator=g), torch.randn(37, 48, generator=g)
    gamma, beta = torch.randn(48, generator=g), torch.randn(48, generator=g)
    arrays = [t.cuda() for t in pack_csr(w)]
    for lw, lb, eps in ((gamma, beta, 1e-12), (None, None, 1e-5), (None, None, None)):
        got = op.csr_linear(x.cuda(), *arrays, b.cuda(), 48, res.cuda(), ln_weight=None if lw is None else lw.cuda(),
                            ln_bias=None if lb is None else lb.cuda(), ln_eps=eps)
        want = F.linear(x, w, b) + res
        want = want if eps is None else F.layer_norm(want, (48,), lw, lb, eps)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    w2 = sparse_weight(20, 48, 0.9, 3)
    with pytest.raises(RuntimeError, match="csr_ffn: CPU only"):
        op.csr_ffn(x.cuda(), *arrays, None, 48, ACT_GELU, *[t.cuda() for t in pack_csr(w2)], None, 20, 48, None)


# ---- in a model

#: sparsify's fusion counts for tiny_bert(): everything, and nothing
FULL = {"encoder": 1, "layer": 2, "self_attention": 2, "feed_forward": 2, "residual_output": 4}
NONE = dict.fromkeys(FULL, 0)


def tiny_bert(act: str = "gelu", layers: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3, hidden_act=act)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".encoder." in f".{name}":
                module.weight.mul_((torch.rand_like(module.weight) > 0.9).float())
    return model


def inputs(batch: int = 3, seq: int = 21):
    ids = torch.randint(0, 120, (batch, seq), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[min(1, batch - 1), seq - 6:] = 0
    return {"input_ids": ids, "attention_mask": attn}


def logits(model, **kw):
    with torch.inference_mode():
        return model(**kw).logits


def test_sparsify_fuses_bert_and_keeps_its_numbers(op, two_threads):
    dense = tiny_bert()
    unfused = sparsify(copy.deepcopy(dense), policy="csr", fuse=False)
    fused = sparsify(copy.deepcopy(dense), policy="csr")
    assert unfused.sparsify_summary.fused == {} and not fused_modules(unfused)
    # the encoder (a loop over its layers' kernels); per layer: the layer (its two fused parts called directly),
    # the attention block, the FFN, and both dense -> LayerNorm(h + input) blocks (used when the attention block or
    # the FFN runs unfused)
    assert fused.sparsify_summary.fused == FULL
    assert ("fused: 1 encoder, 2 layer, 2 self attention, 2 feed forward, 4 residual output"
            in fused.sparsify_summary.line())
    kinds = {(name, type(f)) for name, f in fused_modules(fused)}
    assert {("bert.encoder", FusedEncoder), ("bert.encoder.layer.0", FusedLayer),
            ("bert.encoder.layer.0", FusedFeedForward), ("bert.encoder.layer.0.attention", FusedSelfAttention),
            ("bert.encoder.layer.1.attention.output", FusedResidualOutput)} <= kinds
    for batch, seq in ((1, 1), (1, 7), (3, 21), (2, 64)):
        x = inputs(batch, seq)
        torch.testing.assert_close(logits(fused, **x), logits(dense, **x), rtol=0, atol=1e-5)
        torch.testing.assert_close(logits(fused, **x), logits(unfused, **x), rtol=0, atol=1e-5)
    # the module tree and the state dict are the sparsified model's own
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in unfused.named_modules()]
    assert fused.state_dict().keys() == unfused.state_dict().keys()


def test_fused_model_calls_the_kernel(op, monkeypatch):
    """The speed comes from csr_ffn actually running: count the kernel calls of one forward."""
    model = sparsify(tiny_bert(), policy="csr")
    calls = []
    import cap_ds.sparse.csr as csr_mod

    real = csr_mod.kernel_for

    class Counting:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            fn = getattr(self.module, name)
            return lambda *a, **kw: calls.append(name) or fn(*a, **kw)

    monkeypatch.setattr(csr_mod, "kernel_for", lambda x: None if real(x) is None else Counting(real(x)))
    logits(model, **inputs())
    assert calls.count("csr_ffn") == 2  # one per layer, instead of two csr_linear and a GELU
    # one per layer, instead of csr_linear for q, k, v and the attention output, and SDPA between (with the
    # padding mask of inputs())
    assert calls.count("csr_attention") == 2 and calls.count("csr_linear") == 0


def test_layer_norms_run_in_the_kernel(op, monkeypatch):
    """A plain nn.LayerNorm after a fused block runs inside the kernel (only the embeddings' LayerNorm is called as
    a module); any other normalization module runs after the kernel, as itself."""
    model = sparsify(tiny_bert(), policy="csr")
    names = {m: name for name, m in model.named_modules()}
    called = []
    forward = nn.LayerNorm.forward
    # counted in the class, not by a hook: a hook on a LayerNorm would make its block run unfused, to be seen
    monkeypatch.setattr(nn.LayerNorm, "forward", lambda self, x: called.append(names.get(self)) or forward(self, x))
    logits(model, **inputs())
    assert called == ["bert.embeddings.LayerNorm"]
    assert all("LayerNorm" in repr(f) for _, f in fused_modules(model) if not isinstance(f, FusedEncoder))

    class Norm(nn.LayerNorm):  # a subclass may compute anything: the kernel leaves it to its module
        pass

    dense = tiny_bert()
    for layer in dense.bert.encoder.layer:
        for block in (layer.attention.output, layer.output):
            plain = block.LayerNorm
            block.LayerNorm = Norm(plain.normalized_shape, eps=plain.eps)
            block.LayerNorm.load_state_dict(plain.state_dict())
    fused = sparsify(copy.deepcopy(dense), policy="csr")
    assert fused.sparsify_summary.fused == FULL
    assert not any("LayerNorm" in repr(f) for _, f in fused_modules(fused))
    torch.testing.assert_close(logits(fused, **inputs()), logits(dense, **inputs()), rtol=0, atol=1e-5)


def test_copy_densify_and_refuse(op):
    dense = tiny_bert()
    fused = sparsify(copy.deepcopy(dense), policy="csr")
    twin = copy.deepcopy(fused)
    (layer,) = [f for n, f in fused_modules(twin) if n == "bert.encoder.layer.0" and isinstance(f, FusedLayer)]
    assert layer.layer is twin.bert.encoder.layer[0]  # the copy's fusions point into the copy
    x = inputs()
    torch.testing.assert_close(logits(twin, **x), logits(fused, **x), rtol=0, atol=0)
    densify(fused)
    assert not fused_modules(fused) and not any(isinstance(m, SparseLinear) for m in fused.modules())
    torch.testing.assert_close(logits(fused, **x), logits(dense, **x), rtol=0, atol=1e-5)
    again = sparsify(twin, policy="csr")  # sparsify twice: the fusions are rebuilt, not stacked
    assert again.sparsify_summary.fused == FULL and len(fused_modules(again)) == 11


def test_gradients_and_training_take_the_original_path(op):
    dense, fused = tiny_bert(), sparsify(tiny_bert(), policy="csr")
    emb = dense.bert.embeddings(input_ids=inputs()["input_ids"]).detach()
    for model in (dense, fused):
        x = emb.clone().requires_grad_(True)
        model.bert.encoder(x).last_hidden_state.sum().backward()
        model.grad = x.grad
    torch.testing.assert_close(fused.grad, dense.grad, rtol=1e-4, atol=1e-5)
    layer = fused.bert.encoder.layer[0]
    x = torch.randn(1, 5, 64)
    layer.train()
    assert not layer.feed_forward_chunk.applies(x) and not layer.attention.output.forward.applies(x, x)
    assert not layer.attention.forward.applies(x)
    layer.eval()
    with torch.inference_mode():
        assert layer.feed_forward_chunk.applies(x) and layer.attention.forward.applies(x)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_activations_fused(op, act):
    dense = tiny_bert(act)
    fused = sparsify(copy.deepcopy(dense), policy="csr")
    assert fused.sparsify_summary.fused["feed_forward"] == 2
    torch.testing.assert_close(logits(fused, **inputs()), logits(dense, **inputs()), rtol=0, atol=1e-5)


def test_what_it_cannot_compute_stays_unfused(op):
    # tanh-approximated GELU: not the kernel's activation
    fused = sparsify(tiny_bert("gelu_new"), policy="csr")
    assert fused.sparsify_summary.fused == {**NONE, "self_attention": 2, "residual_output": 4}
    # an output block that is not LayerNorm(h + input): the probe disagrees, the block keeps its forward
    model = tiny_bert()
    for layer in model.bert.encoder.layer:
        block = layer.attention.output
        block.forward = (lambda b: lambda h, x: b.LayerNorm(b.dense(h)) + x)(block)
    ref = logits(model, **inputs())
    fused = sparsify(model, policy="csr")  # nor the attention blocks around them
    assert fused.sparsify_summary.fused == {**NONE, "feed_forward": 2, "residual_output": 2}
    torch.testing.assert_close(logits(fused, **inputs()), ref, rtol=0, atol=1e-5)
    # a layer kept dense is not fused
    dense_ffn = sparsify(tiny_bert(), policy="csr", min_sparsity=0.95)
    assert dense_ffn.sparsify_summary.fused == NONE


def test_bf16_model(op, two_threads):
    dense = tiny_bert().to(torch.bfloat16)
    unfused = sparsify(copy.deepcopy(dense), policy="csr", fuse=False)
    fused = sparsify(copy.deepcopy(dense), policy="csr")
    assert fused.sparsify_summary.fused["feed_forward"] == 2
    x = inputs()
    out = logits(fused, **x)
    assert out.dtype == torch.bfloat16
    # the fused FFN keeps its intermediate in fp32 (unfused: rounded to bf16): as close to fp32 as unfused is
    ref = logits(tiny_bert(), **x)
    assert (out.float() - ref).abs().max() <= 2 * (logits(unfused, **x).float() - ref).abs().max() + 1e-2


def test_attention_block_takes_the_original_path_where_it_must(op):
    """Another attention implementation, a cache or an extra argument: HF's own forward runs."""
    eager = tiny_bert()
    eager.config._attn_implementation = "eager"  # weights to record, an additive mask: not the kernel's job
    fused = sparsify(copy.deepcopy(eager), policy="csr")
    assert fused.sparsify_summary.fused["self_attention"] == 0
    torch.testing.assert_close(logits(fused, **inputs()), logits(eager, **inputs()), rtol=0, atol=1e-5)
    model = sparsify(tiny_bert(), policy="csr")
    block = model.bert.encoder.layer[0].attention
    x = torch.randn(2, 5, 64)
    with torch.inference_mode():
        assert block.forward.applies(x, None, cache=None)
        assert not block.forward.applies(x, None, encoder_hidden_states=x)
        assert not block.forward.applies(x, torch.ones(2, 5, dtype=torch.bool))  # a 2-D mask: HF's to expand
        out, weights = block(x)
        assert weights is None
        torch.testing.assert_close(out, block.forward.original(x)[0], rtol=0, atol=1e-5)


def test_layers_and_encoder_run_their_kernels_directly_and_step_aside_for_hooks(op, two_threads):
    """The fused encoder loops over the layers' kernels without calling the layer modules; where a layer hook or
    HF's output capture needs the layers called, they are (each through FusedLayer), with the same numbers."""
    dense = tiny_bert()
    fused = sparsify(copy.deepcopy(dense), policy="csr")
    encoder, layer = fused.bert.encoder, fused.bert.encoder.layer[0]
    x = inputs()
    called = []
    original = encoder.forward.original
    with torch.inference_mode():
        emb = fused.bert.embeddings(input_ids=x["input_ids"])
        assert encoder.forward.applies(emb) and layer.forward.applies(emb, None, None)
        want = logits(dense, **x)
        torch.testing.assert_close(logits(fused, **x), want, rtol=0, atol=1e-5)
        # HF's output_hidden_states: its capture needs every layer's output, so the layers are called
        out = fused(**x, output_hidden_states=True)
        ref = dense(**x, output_hidden_states=True)
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for got, exp in zip(out.hidden_states, ref.hidden_states):
            torch.testing.assert_close(got, exp, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits(fused, **x), want, rtol=0, atol=1e-5)  # capture hooks idle: fused again
        assert encoder.forward.applies(emb)
        # a user's hook on a layer: the encoder steps aside, the hook sees the layer's output
        handle = layer.register_forward_hook(lambda mod, a, out: called.append(out.shape))
        assert not encoder.forward.applies(emb)
        torch.testing.assert_close(logits(fused, **x), want, rtol=0, atol=1e-5)
        assert called == [torch.Size([3, 21, 64])]
        handle.remove()
        assert encoder.forward.applies(emb)
        # training mode, or an argument the fused path does not take: the original forwards
        assert not layer.forward.applies(emb, None, emb)  # encoder_hidden_states
        assert encoder.forward.original is original
    fused.train()
    assert not encoder.forward.applies(emb) and not layer.forward.applies(emb)


@pytest.mark.parametrize("hooked", ["attention.self.query", "attention.self", "attention.output.LayerNorm",
                                    "intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"])
def test_hooks_on_what_a_kernel_computes_still_run(op, hooked):
    """A hook (or pre-hook) on a module whose forward a fused call would skip (a projection, a LayerNorm, the
    activation) sees every call: the block holding it runs unfused, the other blocks stay fused, the numbers are
    the same; removed, everything fuses again. A global module hook turns all fusion off while it is there."""
    dense = tiny_bert()
    fused = sparsify(copy.deepcopy(dense), policy="csr")
    encoder, layer = fused.bert.encoder, fused.bert.encoder.layer[1]
    x = inputs()
    want = logits(dense, **x)
    seen, pre = [], []
    module = layer.get_submodule(hooked)
    handles = [module.register_forward_hook(lambda mod, a, out: seen.append(mod)),
               module.register_forward_pre_hook(lambda mod, a: pre.append(mod))]
    with torch.inference_mode():
        emb = fused.bert.embeddings(input_ids=x["input_ids"])
        assert not encoder.forward.applies(emb) and not layer.forward.applies(emb)
        assert fused.bert.encoder.layer[0].forward.applies(emb)  # the other layer stays fused
        ffn_hooked = hooked.startswith(("intermediate", "output"))
        assert layer.feed_forward_chunk.applies(emb) != ffn_hooked
        assert layer.attention.forward.applies(emb) == ffn_hooked
        torch.testing.assert_close(logits(fused, **x), want, rtol=0, atol=1e-5)
        assert seen == pre == [module]
        for h in handles:
            h.remove()
        assert encoder.forward.applies(emb) and layer.forward.applies(emb)
        probes = [(f, f.probe_inputs(8, torch.Generator().manual_seed(0))) for _, f in fused_modules(fused)]
        assert len(probes) == sum(FULL.values()) and all(f.applies(*a) for f, a in probes)
        handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, a, out: None)
        try:
            assert not any(f.applies(*a) for f, a in probes)
            torch.testing.assert_close(logits(fused, **x), want, rtol=0, atol=1e-5)
        finally:
            handle.remove()
        assert encoder.forward.applies(emb)


def test_a_submodule_replaced_by_another_kind_is_not_computed_as_the_old_one(op):
    """After sparsify, an activation or an attention module replaced by another kind sends its block down the
    original path (the kernel would compute the probed one); one of the probed kind fuses again."""
    from transformers.activations import GELUActivation

    dense = tiny_bert()
    fused = sparsify(copy.deepcopy(dense), policy="csr")
    layer, x = fused.bert.encoder.layer[1], inputs()
    emb = fused.bert.embeddings(input_ids=x["input_ids"])

    class Doubled(type(layer.attention.self)):  # another attention: twice HF's output
        def forward(self, *args, **kwargs):
            out, weights = super().forward(*args, **kwargs)
            return 2 * out, weights

    for model in (dense, fused):
        model.bert.encoder.layer[1].intermediate.intermediate_act_fn = nn.ReLU()
        doubled = copy.deepcopy(model.bert.encoder.layer[0].attention.self)
        doubled.__class__ = Doubled
        model.bert.encoder.layer[0].attention.self = doubled
    with torch.inference_mode():
        assert not layer.feed_forward_chunk.applies(emb) and not layer.forward.applies(emb)
        attention0 = fused.bert.encoder.layer[0].attention
        assert not attention0.forward.applies(emb) and layer.attention.forward.applies(emb)
        torch.testing.assert_close(logits(fused, **x), logits(dense, **x), rtol=0, atol=1e-5)
        layer.intermediate.intermediate_act_fn = GELUActivation()  # the probed kind, a new instance
        assert layer.feed_forward_chunk.applies(emb) and layer.forward.applies(emb)
