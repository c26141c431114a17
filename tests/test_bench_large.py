"""benchmarks/bench_large.py at --size tiny on CPU: both DeepSpeed configurations really run and are reported."""

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO, free_port


def bench(tmp_path, size: str, batch: int, timeout: int):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_large.py"), "--size", size, "--steps", "10",
           "--batch", str(batch), "--work_dir", str(tmp_path), "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_tiny_large_model_benchmark_runs_both_configs(model_path, tmp_path):
    proc = bench(tmp_path, "tiny", 4, 600)
    assert "device: CPU" in proc.stdout and "| zero2 |" in proc.stdout and "| zero3_offload |" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("zero2", "zero3_offload"):
        r = summary["results"][name]
        assert r["train_examples_per_second"] > 0 and len(r["peak_rss_mb_per_rank"]) == 1
        assert abs(r["sparsity"] - 0.9) < 0.01
    # the synthetic data has real MNLI shapes: three labels, pairs long enough to fill 128 tokens
    rows = (tmp_path / "MNLI" / "train.tsv").read_text().splitlines()
    assert rows[0] == "sentence1\tsentence2\tgold_label" and len(rows) == 1 + 40
    assert {r.split("\t")[2] for r in rows[1:]} == {"entailment", "neutral", "contradiction"}
    metrics = json.loads((tmp_path / "runs" / "zero3_offload" / "metrics.json").read_text())
    assert metrics["teacher_name_or_path"].endswith("teacher")
    assert metrics["optimizer"] == "DeepSpeedCPUAdam"  # the zero3_offload config it is named after
    assert json.loads((tmp_path / "runs" / "zero2" / "metrics.json").read_text())["optimizer"] == "AdamW"


@pytest.mark.gpu
def test_large_on_gpu_reports_gpu_memory(model_path, tmp_path):
    summary = json.loads(bench(tmp_path, "large", 8, 1800).stdout.strip().splitlines()[-1])
    assert summary["device"] == torch.cuda.get_device_name(0)
    for r in summary["results"].values():
        assert r["peak_gpu_mb_per_rank"][0] > 1000  # a 355 M-parameter student does not fit in less
