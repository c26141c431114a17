"""Sparsity heat-map and accuracy-vs-sparsity plots: layout of the grid, real PNGs, clear errors."""

import pytest

from cap_ds.run.plots import plot_accuracy_vs_sparsity, plot_sparsity_heatmap, sparsity_grid

PNG = b"\x89PNG\r\n\x1a\n"


def bert_report(layers=2, value=lambda layer, sub: 0.9):
    subs = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense"]
    per = {f"bert.encoder.layer.{i}.{s}": value(i, s) for i in range(layers) for s in subs}
    return {"per_module": per, "sparsity": sum(per.values()) / len(per), "structured": {}}


def test_grid_orders_layers_and_bert_columns():
    report = bert_report(layers=3, value=lambda layer, sub: layer / 10 + (0.5 if sub == "output.dense" else 0.0))
    report["per_module"]["classifier"] = 0.0  # not an encoder layer: ignored
    layers, columns, rows = sparsity_grid(dict(reversed(report["per_module"].items())))
    assert layers == [0, 1, 2]
    assert columns == ["query", "key", "value", "attn out", "ffn in", "ffn out"]
    assert rows[2][5] == pytest.approx(0.7) and rows[1][0] == pytest.approx(0.1)


def test_grid_keeps_unknown_submodules_and_gaps():
    layers, columns, rows = sparsity_grid({"roberta.encoder.layer.0.attention.self.query": 0.5,
                                           "roberta.encoder.layer.1.custom.proj": 0.25})
    assert layers == [0, 1] and columns == ["query", "custom.proj"]
    assert rows == [[0.5, None], [None, 0.25]]


def test_heatmap_png_written_atomically(tmp_path):
    report = bert_report()
    report["structured"] = {"bert.encoder.layer.0.attention.self.query": {"heads": [6, 12]},
                            "bert.encoder.layer.0.intermediate.dense": {"rows": [768, 1536]}}
    path = plot_sparsity_heatmap(report, tmp_path / "sub" / "heat.png", title="t")
    assert path.read_bytes()[:8] == PNG
    assert [p.name for p in path.parent.iterdir()] == ["heat.png"]  # no temporary file left behind


def test_heatmap_rejects_report_without_layers(tmp_path):
    with pytest.raises(ValueError, match="no 'layer.N.' modules"):
        plot_sparsity_heatmap({"per_module": {"classifier": 0.0}}, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_accuracy_plot(tmp_path):
    points = [{"method": "CAP-m", "sparsity": 0.9, "accuracy": 0.8}, {"method": "CAP-m", "sparsity": 0.97,
              "accuracy": 0.75}, {"method": "movement + KD", "sparsity": 0.9, "accuracy": 0.7}]
    path = plot_accuracy_vs_sparsity(points, tmp_path / "acc.png", dense=0.84, title="SST-2")
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no results"):
        plot_accuracy_vs_sparsity([], tmp_path / "none.png")


def test_export_of_a_masked_model_carries_its_heatmap(tmp_path, model_path):
    """export_pretrained measures the sparsity itself when the caller gives no report (compression-API users)."""
    import json

    from transformers import AutoTokenizer

    from cap_ds.compression import compression_scheduler, init_compression
    from cap_ds.run.export import export_pretrained
    from tests.test_compression import sparse_cfg, tiny_bert

    model = init_compression(tiny_bert(), sparse_cfg("l1", 0.25))
    compression_scheduler(model, sparse_cfg("l1", 0.25))  # schedule_offset 0: masks apply from step 0
    out = export_pretrained(model, AutoTokenizer.from_pretrained(model_path), tmp_path / "final")
    saved = json.loads((out / "sparsity.json").read_text())
    assert saved["sparsity"] == pytest.approx(0.75, abs=0.01) and len(saved["per_module"]) == 12
    assert (out / "sparsity_heatmap.png").read_bytes()[:8] == PNG
    assert (out / "model.safetensors").is_file()
