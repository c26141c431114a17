"""``python -m cap_ds.run.speed``: speed.json beside an export (unstructured and CAP-f cleaned), the card's Speed
section rewritten, the manifest still verifying; a dense model refused in one line. Structure only, never timing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from cap_ds.run import speed
from cap_ds.runtime.host_memory import host_memory_mode, restore_default_memory
from cap_ds.runtime.manifest import verify_folder, write_folder_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
FAST = ["--dtypes", "fp32", "--batches", "1,2", "--seq_length", "16", "--rounds", "2"]
CARD = "---\nlibrary_name: transformers\n---\n# m\n\n## Speed\n\nNot measured.\n\n## Limitations\n\n- none\n"


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def export(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    (folder / "README.md").write_text(CARD)
    write_folder_manifest(folder)
    return folder


def test_unstructured_export_gets_speed_json_card_and_manifest(tmp_path):
    from bench_inference import magnitude_prune_

    model = tiny_bert()
    magnitude_prune_(model, 0.9)
    folder = export(model, tmp_path / "final")
    try:
        result = speed.main([str(folder), *FAST])  # --host_memory retain, the default
    finally:
        restore_default_memory()  # process-wide: give this test process glibc's behaviour back
    saved = json.loads((folder / "speed.json").read_text())
    assert saved == json.loads(json.dumps(result))
    glibc = host_memory_mode() != "unsupported"
    assert saved["host_memory"] == ("retained" if glibc else "unsupported")
    assert [(r["dtype"], r["batch"]) for r in saved["rows"]] == [("fp32", 1), ("fp32", 2)]
    for row in saved["rows"]:
        assert row["dense_ms"] > 0 and row["model_ms"] > 0 and row["speedup"] == pytest.approx(
            row["dense_ms"] / row["model_ms"], rel=0.01)
        assert row["max_abs_logit_diff"] < 1e-4 and sum(row["formats"].values()) == 12
    card = (folder / "README.md").read_text()
    assert "python -m cap_ds.run.speed" in card and "| fp32 | 1 x 16 |" in card and "Not measured" not in card
    assert ("retain_freed_memory()" in card) == glibc
    assert card.endswith("## Limitations\n\n- none\n")
    assert verify_folder(folder) == []  # the manifest covers speed.json and the new card
    speed.main([str(folder), *FAST, "--host_memory", "default"])  # measuring again replaces the figures
    assert verify_folder(folder) == []
    assert json.loads((folder / "speed.json").read_text())["host_memory"] == ("default" if glibc else "unsupported")
    assert "retain_freed_memory()" not in (folder / "README.md").read_text()


def test_capf_export_is_timed_against_the_unpruned_architecture(tmp_path):
    from bench_inference import capf_clean

    _, clean = capf_clean(tiny_bert(), kept=0.5)
    folder = export(clean, tmp_path / "final")
    saved = speed.main([str(folder), *FAST])
    assert saved["dense"].startswith("the unpruned architecture") and len(saved["rows"]) == 2
    dense, _ = speed.dense_self(speed.load_export(folder))
    assert dense.config.num_attention_heads == 4 and sum(p.numel() for p in dense.parameters()) > \
        sum(p.numel() for p in clean.parameters())


def test_dense_model_and_damaged_export_are_refused(tmp_path, capsys):
    folder = export(tiny_bert(), tmp_path / "dense")
    with pytest.raises(SystemExit) as exit_:
        speed.main([str(folder), *FAST])
    assert exit_.value.code == 2 and "a dense model has no dense self" in capsys.readouterr().err
    from bench_inference import magnitude_prune_

    model = tiny_bert()
    magnitude_prune_(model, 0.9)
    folder = export(model, tmp_path / "damaged")
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    with pytest.raises(SystemExit):
        speed.main([str(folder), *FAST])
    assert "does not verify" in capsys.readouterr().err and not (folder / "speed.json").exists()


def test_each_dtype_states_its_accuracy_and_the_fastest_path_is_named(tmp_path, model_path, capsys):
    """--validation_file: the accuracy of the dense kernels and of the served path in fp32 and bf16, on the user's
    labelled rows (names mapped through the model's label2id), in speed.json and the card, beside the fastest."""
    from bench_inference import magnitude_prune_
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=2,
                     id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    model = BertForSequenceClassification(cfg).eval()
    magnitude_prune_(model, 0.9)
    folder = tmp_path / "final"
    tokenizer.save_pretrained(folder)
    export(model, folder)
    texts = [f"review {i}: {'good' if i % 3 else 'bad'} film number {i * 7}" for i in range(40)]
    names = ["pos" if i % 2 else "neg" for i in range(40)]
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{n}\n" for t, n in zip(texts, names)))
    saved = speed.main([str(folder), "--dtypes", "fp32,bf16", "--batches", "1", "--seq_length", "16",
                        "--rounds", "1", "--validation_file", str(tmp_path / "dev.tsv")])
    with torch.inference_mode():
        enc = tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
        expected = float((model(**enc).logits.argmax(-1) == torch.tensor([i % 2 for i in range(40)])).float().mean())
    acc = saved["accuracy"]
    assert acc["examples"] == 40 and acc["fp32"]["dense"] == pytest.approx(expected)
    assert acc["fp32"]["model"] == pytest.approx(expected) and 0 <= acc["bf16"]["dense"] <= 1
    [best] = saved["fastest"]
    paths = {"fp32 dense kernels", "fp32 this model", "bf16 dense kernels", "bf16 this model"}
    assert best["batch"] == 1 and best["path"] in paths and best["accuracy"] in (
        acc["fp32"]["dense"], acc["fp32"]["model"], acc["bf16"]["dense"], acc["bf16"]["model"])
    card = (folder / "README.md").read_text()
    assert "Accuracy on `dev.tsv` (40 rows): fp32: dense kernels" in card and "Fastest measured" in card
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\nfine\tmaybe\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        speed.main([str(folder), *FAST, "--validation_file", str(tmp_path / "bad.tsv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "label 'maybe' is not a class of this model" in err[0]


def test_card_says_when_the_rows_ran_fused(tmp_path):
    from cap_ds.run.model_card import speed_section

    row = {"dtype": "fp32", "batch": 1, "seq_length": 128, "dense_ms": 10.0, "model_ms": 5.0, "speedup": 2.0}
    # (as speed.json stores it: keys sorted; the card names them outermost first)
    fused_all = {"encoder": 1, "feed_forward": 6, "layer": 6, "residual_output": 12, "self_attention": 6}
    for fused, said in ((fused_all, True), (None, False)):
        rows = [{**row, **({"fused": fused} if fused else {})}]
        (tmp_path / "speed.json").write_text(json.dumps({"device": "cpu", "rows": rows}))
        text = speed_section(tmp_path)
        assert ("(1 encoder, 6 layer, 6 self attention, 6 feed forward, 12 residual output): serve it through "
                "`sparsify()`" in text) == said


def test_card_says_why_layers_ran_dense(tmp_path):
    """A dtype whose layers sparsify kept dense (every sparse path measured slower) gets one line with both times."""
    from cap_ds.run.model_card import speed_section

    kept = {"layers": 36, "tokens": 4096, "dense_ms": 33.49, "sparse_ms": 105.1}
    rows = [{"dtype": "fp32", "batch": 1, "seq_length": 128, "dense_ms": 10.0, "model_ms": 5.0, "speedup": 2.0,
             "formats": {"csr": 36}},
            *({"dtype": "bf16", "batch": b, "seq_length": 128, "dense_ms": 5.0, "model_ms": 5.0, "speedup": 1.0,
               "formats": {"dense": 36}, "kept_dense": kept} for b in (1, 32))]
    (tmp_path / "speed.json").write_text(json.dumps({"device": "cpu", "rows": rows}))
    text = speed_section(tmp_path)
    assert text.count("layers kept dense") == 1
    assert ("bf16: all 36 layers kept dense, as their fastest sparse paths took 105.10 ms against the dense "
            "kernels' 33.49 ms per forward at 4,096 tokens.") in text
    (tmp_path / "speed.json").write_text(json.dumps({"device": "cpu", "rows": rows[:1]}))
    assert "kept dense" not in speed_section(tmp_path)
