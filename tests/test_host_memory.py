"""``retain_freed_memory``: a serving process stops page-faulting on every large activation (glibc only).

Counts minor page faults (``ru_minflt``), not time: with glibc's defaults each 40 MB tensor is a fresh ``mmap``
whose ~9,800 pages fault on first touch; retained, later tensors reuse the pages of the first ones.
Runs in a subprocess because the setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cap_ds.runtime.host_memory import host_memory_mode

SCRIPT = r"""
import json, resource, torch
from cap_ds.runtime.host_memory import host_memory_mode, restore_default_memory, retain_freed_memory

def faults_per_tensor():
    for _ in range(2):  # the first ones may grow the heap (posix_memalign may not fit the freed block at once)
        torch.empty(10_000_000).fill_(1.0)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(10_000_000).fill_(1.0)  # 40 MB: above glibc's largest mmap threshold
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 4

out = {"before": (host_memory_mode(), faults_per_tensor())}
out["retained"] = (retain_freed_memory(), host_memory_mode(), faults_per_tensor())
out["restored"] = (restore_default_memory(), host_memory_mode(), faults_per_tensor())
print(json.dumps(out))
"""


@pytest.mark.skipif(host_memory_mode() == "unsupported", reason="the C library is not glibc")
def test_retained_memory_stops_the_page_faults_and_can_be_undone():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    pages = 40_000_000 / 4096
    assert out["before"][0] == "default" and out["before"][1] > 0.8 * pages
    assert out["retained"][:2] == [True, "retained"] and out["retained"][2] < 0.02 * pages
    assert out["restored"][:2] == [True, "default"]  # (the retained blocks may still serve the next tensors)


@pytest.mark.skipif(host_memory_mode() == "unsupported", reason="the C library is not glibc")
def test_benchmark_shows_the_faults_of_an_encoder_forward_gone(tmp_path):
    """benchmarks/cpu_host_memory.py on the 2-layer MiniLM at batch 32: glibc's default page-faults on the FFN
    activations of every forward, dense and sparse alike; retained, none."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_host_memory.py"
    out = tmp_path / "hm.jsonl"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--batches", "32", "--rounds", "4",
                           "--processes", "1", "--threads", "2", "--jsonl", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r["mode"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"default", "retained"}
    # dense: 32 x 128 x 1536 fp32 = 25 MB (6,144 pages) per FFN activation, 12-26 k measured. The sparse model runs
    # each FFN fused (no such activation); its 6 MB activations fault or not as glibc's adaptive mmap threshold
    # happens to stand (750-4,200 measured), so only the retained mode is checked for it
    dense_default = rows["default"]["faults_per_forward"]["dense"]
    assert dense_default > 5000
    for kind in ("dense", "sparse"):
        assert rows["retained"]["faults_per_forward"][kind] < 0.1 * dense_default  # 0-400 measured
    assert "| retained | 32 |" in done.stdout
