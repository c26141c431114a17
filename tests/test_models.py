"""Model loading, config overrides, sentence vectors and teacher/student checks (real offline BERT)."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from cap_ds.data.models import (
    SentenceVectorHook,
    check_teacher,
    check_tokenizers,
    load_student,
    load_tokenizer,
    parse_config_overrides,
)


def test_parse_config_overrides_types_and_errors():
    assert parse_config_overrides("num_hidden_layers=2, hidden_dropout_prob=0.2,x=true,name=abc") == {
        "num_hidden_layers": 2, "hidden_dropout_prob": 0.2, "x": True, "name": "abc"}
    with pytest.raises(ValueError, match="key=value"):
        parse_config_overrides("num_hidden_layers")


def test_student_keeps_first_real_layers(model_path):
    model = load_student(model_path, 2, ("negative", "positive"), "num_hidden_layers=2")
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    assert model.config.id2label == {0: "negative", 1: "positive"}
    from safetensors.torch import load_file
    raw = load_file(f"{model_path}/model.safetensors")
    key = next(k for k in raw if k.endswith("encoder.layer.1.intermediate.dense.weight"))
    assert torch.equal(model.bert.encoder.layer[1].intermediate.dense.weight, raw[key])
    with pytest.raises(ValueError, match="no attribute 'not_a_field'"):
        load_student(model_path, 2, None, "not_a_field=1")


def test_bert_pooler_hook_before_and_after_dropout():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     hidden_dropout_prob=0.5, num_labels=2))
    hook = SentenceVectorHook(model, "pooler")
    ids = torch.randint(0, 50, (3, 7))
    model.eval()
    out = model(input_ids=ids)
    pooled = model.bert(input_ids=ids).pooler_output
    assert torch.allclose(hook.vector, pooled) and torch.allclose(hook.anchor, pooled)
    assert torch.allclose(model.classifier(hook.anchor), out.logits)
    model.train()
    model(input_ids=ids)
    assert not torch.allclose(hook.anchor, hook.vector)  # dropout only on the anchor
    assert hook.anchor.requires_grad


def test_roberta_head_hook_and_mean_pooling():
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
                        num_labels=3)
    model = RobertaForSequenceClassification(cfg).eval()
    hook = SentenceVectorHook(model, "pooler")
    ids = torch.randint(2, 60, (2, 5))
    logits = model(input_ids=ids).logits
    assert torch.allclose(model.classifier.out_proj(hook.vector), logits, atol=1e-6)
    hook.remove()
    mean_hook = SentenceVectorHook(model, "mean")
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    model(input_ids=ids, attention_mask=mask)
    hidden = model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(mean_hook.vector[0], hidden[0, :3].mean(0), atol=1e-6)


def test_pooler_on_unknown_head_is_a_clear_error():
    class NoHead(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="use --sentence_vector cls or mean"):
        SentenceVectorHook(NoHead(), "pooler")


def test_teacher_label_and_tokenizer_checks(model_path):
    cfg = BertConfig(num_labels=3)
    with pytest.raises(ValueError, match="has 3 labels but the task needs 2"):
        check_teacher(cfg, 2, ("negative", "positive"), "t")
    cfg = BertConfig(num_labels=2, id2label={0: "positive", 1: "negative"})
    with pytest.raises(ValueError, match="differ from the task"):
        check_teacher(cfg, 2, ("negative", "positive"), "t")
    check_teacher(BertConfig(num_labels=2), 2, ("negative", "positive"), "t")  # default names are fine
    tok = load_tokenizer(model_path)
    check_tokenizers(tok, tok, "a", "b")

    class OtherVocab:
        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_tokenizers(tok, OtherVocab(), "a", "b")
