"""benchmarks/bench_train.py synthetic mode at --size tiny on CPU: the plain loop and harness runs really run, and
the table, the ratios and the JSON lines are reported (no timing is checked, only structure and formulas)."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, free_port

sys.path.insert(0, str(REPO))


def test_peak_flops_table():
    from benchmarks.bench_train import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A10") is None


def test_tiny_synthetic_benchmark_on_cpu(model_path, tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--device", "cpu", "--size", "tiny",
           "--steps", "7", "--batch", "8", "--runs", "plain,dense,capm", "--stages", "zero2,zero0",
           "--work_dir", str(tmp_path / "work"), "--port", str(free_port()), "--jsonl", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| none | plain |" in proc.stdout and "| zero2 | dense |" in proc.stdout and "| zero2 | capm |" in proc.stdout
    assert "zero2 capm/dense:" in proc.stdout and "zero2 dense/plain:" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["stage"], r["run"]) for r in rows if r["bench"] == "train"} == {
        ("none", "plain"), ("zero2", "dense"), ("zero2", "capm"), ("zero0", "dense"), ("zero0", "capm")}
    runs = {r["run"]: r for r in rows if r["bench"] == "train" and r["stage"] in ("none", "zero2")}
    for r in runs.values():
        assert r["step_time_s"] > 0 and r["first_step_time_s"] > 0 and r["steps"] == 7
        assert r["step_time_steady_steps"] == 2  # 7 steps less the 5-step warm-up
        assert r["train_examples_per_second"] == pytest.approx(8 / r["step_time_s"])
        assert r["params"] > 0 and "mfu" not in r  # no MFU on CPU
    [ratios] = [r for r in rows if r["bench"] == "train_ratios"]
    assert ratios["zero2 capm/dense"] == pytest.approx(runs["capm"]["step_time_s"] / runs["dense"]["step_time_s"])
    assert ratios["zero2 dense/plain"] == pytest.approx(runs["dense"]["step_time_s"] / runs["plain"]["step_time_s"])
    assert "zero0 capm/dense" in ratios

    # The issue-22 GPU script's profile stage, smoke-tested on the same tiny models: a torch.profiler table of one
    # steady CAP-m step and a status line.
    gpu_out = tmp_path / "gpu_out"
    proc = subprocess.run(["bash", "benchmarks/gpu/issue22_speed.sh"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "OUT": str(gpu_out),
                                            "DEVICE": "cpu", "SIZE": "tiny", "STAGES": "profile",
                                            "WORK": str(tmp_path / "work")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    status = [json.loads(line) for line in (gpu_out / "env.txt").read_text().splitlines() if line.startswith("{")]
    assert [(s["stage"], s["rc"]) for s in status] == [("profile", 0)], (gpu_out / "logs.txt").read_text()[-3000:]
    table = (gpu_out / "profile.txt").read_text()
    assert "optimizer steps 8..8" in table and "exit code 0" in table and "aten::" in table


def test_bad_runs_flag_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--device", "cpu",
                           "--runs", "plain,fast"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--runs/--stages: unknown fast; allowed: plain, dense, movement_kd, capm" \
        in proc.stderr
