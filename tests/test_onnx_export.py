"""ONNX export of the masked (baked) model, the cleaned CAP-f model and a QA model: ONNX Runtime's logits equal
PyTorch's within 1e-4 at another batch and length than the export's; the command writes onnx/model.onnx into an
export whose manifest still verifies; speed.json gets ONNX Runtime times beside torch's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from cap_ds.run import onnx_export, speed  # noqa: E402
from cap_ds.runtime.manifest import verify_folder  # noqa: E402
from tests.test_speed_json import FAST, export, tiny_bert  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_masked_model_exports_with_equal_logits_and_is_timed_under_onnxruntime(tmp_path):
    from bench_inference import magnitude_prune_

    model = tiny_bert()
    magnitude_prune_(model, 0.9)
    folder = export(model, tmp_path / "final")
    path = onnx_export.main([str(folder)])
    assert path == folder / "onnx" / "model.onnx" and verify_folder(folder) == []
    x = onnx_export.sample_inputs(model, 4, 40, seed=3)
    with torch.no_grad():
        ref = model(**x).logits.numpy()
    np.testing.assert_allclose(onnx_export.run_onnx(path, x), ref, atol=1e-4, rtol=0)
    saved = speed.main([str(folder), *FAST, "--onnx"])
    assert all(r["onnxruntime_ms"] > 0 and "dense_onnxruntime_ms" not in r for r in saved["rows"])
    assert "ONNX Runtime ms" in (folder / "README.md").read_text() and verify_folder(folder) == []


def test_cleaned_and_qa_models_export(tmp_path):
    from bench_inference import capf_clean
    from transformers import BertConfig, BertForQuestionAnswering

    _, clean = capf_clean(tiny_bert(), kept=0.5)
    folder = export(clean, tmp_path / "capf")
    saved = speed.main([str(folder), *FAST[:2], "--batches", "2", "--seq_length", "16", "--rounds", "2", "--onnx"])
    assert saved["rows"][0]["dense_onnxruntime_ms"] > 0 and saved["rows"][0]["onnxruntime_ms"] > 0
    torch.manual_seed(0)
    qa = BertForQuestionAnswering(BertConfig(vocab_size=1200, hidden_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=128)).eval()
    path = onnx_export.export_onnx(qa, tmp_path / "qa" / "model.onnx")
    x = onnx_export.sample_inputs(qa, 2, 30, seed=5)
    with torch.no_grad():
        out = qa(**x)
    np.testing.assert_allclose(onnx_export.run_onnx(path, x),
                               torch.stack((out.start_logits, out.end_logits), 1).numpy(), atol=1e-4, rtol=0)
