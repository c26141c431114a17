"""BucketServer: requests padded to the smallest bucket give the eager model's logits for their real rows and
tokens (sequence classification and QA), one program per bucket, clear errors; CUDA graphs on a GPU."""

from __future__ import annotations

import pytest
import torch

from cap_ds.sparse.serve import BucketServer
from tests.test_speed_json import tiny_bert


def request(batch: int, tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 1200, (batch, tokens), generator=g),
            "attention_mask": torch.ones(batch, tokens, dtype=torch.long)}


def test_padded_buckets_give_the_eager_logits():
    model = tiny_bert()
    server = BucketServer(model, buckets=[(4, 32), (1, 16), (8, 64)], mode="eager")
    assert server.buckets == [(1, 16), (4, 32), (8, 64)]
    for batch, tokens, bucket in ((1, 10, (1, 16)), (3, 20, (4, 32)), (2, 40, (8, 64))):
        x = request(batch, tokens)
        assert server.bucket_for(batch, tokens) == bucket
        with torch.no_grad():
            ref = model(**x).logits
        torch.testing.assert_close(server(**x), ref, atol=1e-5, rtol=1e-5)
    assert len(server._programs) == 3
    with pytest.raises(ValueError, match="fits no bucket"):
        server(**request(9, 8))
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        BucketServer(model, buckets=[(1, 8)], mode="graphs")


def test_question_answering_logits_are_cut_to_the_request():
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    qa = BertForQuestionAnswering(BertConfig(vocab_size=1200, hidden_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=128)).eval()
    x = request(2, 12)
    out = BucketServer(qa, buckets=[(4, 32)], mode="eager")(**x)
    with torch.no_grad():
        ref = qa(**x)
    torch.testing.assert_close(out, torch.stack((ref.start_logits, ref.end_logits), 1), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graphs", "compile"])
def test_gpu_graphs_and_compile_match_eager(mode):
    model = tiny_bert().cuda()
    server = BucketServer(model, buckets=[(2, 32), (8, 64)], mode=mode)
    server.warmup()
    for batch, tokens in ((1, 7), (2, 32), (5, 50)):
        x = {k: v.cuda() for k, v in request(batch, tokens, seed=batch).items()}
        with torch.no_grad():
            ref = model(**x).logits
        torch.testing.assert_close(server(**x), ref, atol=1e-4, rtol=1e-4)
