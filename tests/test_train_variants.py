"""Trainer variants end to end: structured CAP-f with a physically smaller export, RoBERTa (random config,
synthetic labels from real SST-2 text), and 2 ranks with a ZeRO-3 student and a CPU-offloaded ZeRO-3 teacher."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import COMMON, REPO, free_port, run


def test_cap_f_structured_exports_smaller_model_with_same_logits(teacher_dir, glue_dir, tmp_path):
    out = tmp_path / "capf"
    run([sys.executable, "cap_ds/train.py", "--teacher_name_or_path", str(teacher_dir / "final"),
         "--pruning_method", "first_order", "--target_sparsity", "0.5", "--structured_step", "0.25",
         "--epochs_per_stage", "1", "--cap", "prc,snc,fic", "--kd_temperature", "1", "--extra_negatives", "128",
         "--data_dir", str(glue_dir), "--output_dir", str(out), *COMMON])
    m = json.loads((out / "metrics.json").read_text())
    assert (m["heads_kept"], m["heads_total"]) == (12, 24)  # 2 layers x 12 heads, 50 % pruned
    assert (m["neurons_kept"], m["neurons_total"]) == (1536, 3072)
    assert m["sparsity"] == pytest.approx(0.5)  # heads and neurons at 50 % remove half the encoder linears
    assert [s["fraction"] for s in m["stages"]] == [0.25, 0.5]
    assert m["snapshots"] == 1  # SnC snapshot before stage 1's mask
    assert all(v >= 1 for v in m["kept_per_layer"]["heads"].values())
    saved = json.loads((out / "final" / "sparsity.json").read_text())  # heat-map data travels with the model
    heads = {k.split(".layer.")[1].split(".")[0]: v["heads"][0] for k, v in saved["structured"].items() if "heads" in v}
    assert sum(heads.values()) == 12  # per layer, as in metrics.json
    assert (out / "final" / "sparsity_heatmap.png").stat().st_size > 1000
    # The export is the cleaned model: fewer parameters, loads after `import cap_ds`, same logits as the mask.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import cap_ds  # noqa: F401  (registers the pruned classes)

    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    assert model.config.model_type == "cap_pruned_bert"
    assert sum(model.config.layer_heads) == 12 and sum(model.config.layer_intermediate_sizes) == 1536
    dense = AutoModelForSequenceClassification.from_pretrained(teacher_dir / "final")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())
    tok = AutoTokenizer.from_pretrained(out / "final")
    rows = [line.split("\t")[0].strip() for line in (glue_dir / "SST-2" / "dev.tsv").read_text().splitlines()[1:129]]
    enc = tok(rows, truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits.numpy()
    np.testing.assert_allclose(logits, np.load(out / "eval_logits.npy"), atol=1e-5)


@pytest.fixture(scope="module")
def random_roberta(tmp_path_factory, model_path):
    """A small random RoBERTa (labelled synthetic) with the offline WordPiece tokenizer."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(model_path)
    cfg = RobertaConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=130, type_vocab_size=1,
                        pad_token_id=tok.pad_token_id, num_labels=2)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("roberta")
    RobertaForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_roberta_prunes_and_exports(random_roberta, glue_dir, tmp_path):
    out = tmp_path / "rob"
    args = [a for a in COMMON if a not in ("--config_overrides", "num_hidden_layers=2")]
    run([sys.executable, "cap_ds/train.py", "--model_name_or_path", str(random_roberta), "--cap", "prc,snc",
         "--pruning_method", "movement", "--target_sparsity", "0.8", "--num_train_epochs", "2",
         "--extra_negatives", "64", "--data_dir", str(glue_dir), "--output_dir", str(out), *args])
    m = json.loads((out / "metrics.json").read_text())
    assert abs(m["sparsity"] - 0.8) < 0.01 and m["snapshots"] == 1
    assert any("roberta.encoder.layer.1.output.dense" in k for k in m["sparsity_per_module"])
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert type(model).__name__ == "RobertaForSequenceClassification"
    w = model.roberta.encoder.layer[0].intermediate.dense.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.8, abs=0.01)


@pytest.mark.distributed
def test_two_ranks_zero3_student_offloaded_teacher(teacher_dir, glue_dir, tmp_path):
    out = tmp_path / "z3"
    port = str(free_port())
    cmd = [sys.executable, "cap_ds/train.py", "--deepspeed", str(REPO / "ds_configs" / "zero3.json"),
           "--teacher_name_or_path", str(teacher_dir / "final"), "--teacher_offload", "cpu", "--cap", "prc,snc,fic",
           "--num_train_epochs", "2", "--extra_negatives", "64", "--data_dir", str(glue_dir), "--output_dir",
           str(out), *[a for a in COMMON if not a.endswith("zero2.json") and a != "--deepspeed"]]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 20  # 320 rows / 2 ranks / 16 per rank x 2 epochs
    assert abs(m["sparsity"] - 0.9) < 0.01
    assert m["teacher_eval"]["accuracy"] > 0.6  # the offloaded ZeRO-3 teacher predicts like the dense one
    assert len(m["peak_rss_mb_per_rank"]) == 2 and all(mb > 100 for mb in m["peak_rss_mb_per_rank"])
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    w = model.bert.encoder.layer[1].attention.self.query.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.9, abs=0.01)


def test_old_deepspeed_compression_config_runs_through_the_trainer(glue_dir, tmp_path, model_path):
    """DeepSpeedExamples' BERT template (sparse l1 + row topk + head topk with related_modules) drives training."""
    from tests.test_compression import DS_TEMPLATE

    cfg = json.loads(json.dumps(DS_TEMPLATE))
    cfg["compression_training"]["head_pruning"]["shared_parameters"]["num_heads"] = 12  # MiniLM has 12 heads
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out = tmp_path / "old"
    run([sys.executable, "cap_ds/train.py", "--deepspeed", str(tmp_path / "ds.json"), "--cap", "prc",
         "--config_overrides", "num_hidden_layers=2", "--data_dir", str(glue_dir), "--max_train_samples", "128",
         "--max_eval_samples", "32", "--max_seq_length", "32", "--per_device_train_batch_size", "32",
         "--max_steps", "6", "--extra_negatives", "32", "--disable_tqdm", "--output_dir", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["sparsity"] > 0.5  # l1 50 % on top of half the heads and half the FFN rows
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["model_type"] == "cap_pruned_bert"
    assert config["layer_heads"] == [6, 6] and config["layer_intermediate_sizes"] == [768, 768]
