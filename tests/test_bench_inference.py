"""benchmarks/bench_inference.py --size tiny on CPU: the table and JSON lines come out and the logits agree."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


def test_tiny_inference_benchmark_table_and_jsonl(tmp_path):
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_inference.py"), "--size", "tiny", "--device", "cpu",
           "--threads", "1", "--reps", "2", "--policy", "measure,rule", "--jsonl", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "pruning" and len(table) == 1 + 3 * 2 * 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12
    assert {(r["kind"], r["policy"], r["batch"]) for r in rows} == {
        (k, p, b) for k in ("90%", "2:4", "cap-f") for p in ("measure", "rule") for b in (1, 32)}
    for r in rows:
        assert r["device"] == "CPU" and r["host_memory"] == "retained" and r["dtype"] == "float32" and r["seq"] == 128
        assert r["max_logit_diff"] <= 1e-4, r  # fp32: sparsified (or cleaned) model == its dense reference
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["speedup"] > 0
        if r["kind"] == "cap-f":
            assert r["formats"] == {}  # the cleaned model has no zeros left for sparsify
        else:
            assert sum(r["formats"].values()) == 12  # 6 encoder linears x 2 layers, each given a format
            assert abs(r["weight_sparsity"] - (0.9 if r["kind"] == "90%" else 0.5)) < 0.01
    assert "rule policy never slower than dense here" in proc.stdout


def test_bf16_run_times_every_model_in_bf16(tmp_path):
    """--dtype bf16 on a CPU: the dense baseline is bf16 too (what CAP-f cleaned must beat on an AMX CPU)."""
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_inference.py"), "--size", "tiny", "--device", "cpu",
           "--threads", "1", "--reps", "1", "--kinds", "cap-f,90%", "--batches", "1", "--dtype", "bf16",
           "--jsonl", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r["dtype"]) for r in rows] == [("cap-f", "bfloat16"), ("90%", "bfloat16")]
    for r in rows:
        assert "dense_bf16_ms" not in r  # the baseline already is dense bf16
        assert r["max_logit_diff"] <= 0.05, r  # bf16 rounding, not a different model


def test_cpu_breakdown_splits_each_forward_by_operator_kind():
    """benchmarks/cpu_breakdown.py: our CSR kernel counts as the sparse model's linears, every model gets a wall
    time, and the printed bound is the dense forward over the sparse one's time outside its linears."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import cpu_breakdown

    [row] = cpu_breakdown.main(["--tiny", "--rounds", "1", "--batches", "2", "--seq", "16", "--dtypes", "fp32",
                                "--threads", "1"])
    dense, sparse = row["ms"]["dense"], row["ms"]["sparse"]
    assert dense["linears"] > 0 and sparse["linears"] > 0 and dense["wall"] > 0 and sparse["wall"] > 0
    assert {"attention", "layer_norm", "gelu"} <= set(sparse)
    split = {"dense": dense, "sparse": {**sparse, "linears": 0.0}}
    assert "at most" in cpu_breakdown.report("x", split)[-1]


def test_cpu_breakdown_fused_and_bad_flags(capsys):
    """--fuse puts the FFN's single kernel call in its own row (no separate GELU); a bad --dtypes or --batches is
    one parser error naming the flag."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import cpu_breakdown

    [row] = cpu_breakdown.main(["--tiny", "--rounds", "1", "--batches", "2", "--seq", "16", "--dtypes", "fp32",
                                "--threads", "1", "--fuse"])
    sparse = row["ms"]["sparse"]
    assert row["fuse"] and sparse["fused_ffn"] > 0 and sparse["fused_attention"] > 0 and "gelu" not in sparse
    for flags, named in ((["--dtypes", "float32"], "--dtypes 'float32'"), (["--batches", "1,x"], "--batches '1,x'")):
        with pytest.raises(SystemExit):
            cpu_breakdown.main(["--tiny", *flags])
        assert named in capsys.readouterr().err


def test_cpu_fusion_compares_fused_and_unfused_in_one_run():
    """benchmarks/cpu_fusion.py: dense, unfused and fused timed together; what was fused is reported and both
    sparse models give the dense logits."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import cpu_fusion

    [row] = cpu_fusion.main(["--tiny", "--rounds", "1", "--batches", "2", "--seq", "16", "--threads", "2"])
    assert row["fused"] == {"encoder": 1, "layer": 2, "self_attention": 2, "feed_forward": 2, "residual_output": 4}
    assert set(row["ms"]) == {"dense", "unfused", "fused"} and min(row["ms"].values()) > 0
    assert max(row["max_abs_logit_diff"].values()) < 1e-4
