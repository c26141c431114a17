"""Exact resume with 2 real ranks on the real 2-layer model and real SST-2 rows.

A run killed with SIGKILL mid-training and resumed with ``--resume auto`` ends with the same metrics and eval
logits (within 1e-6) as an uninterrupted run; SIGTERM writes a checkpoint and exits cleanly.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.distributed


def args(glue_dir, out):
    return ["cap_ds/train.py", "--config_overrides", "num_hidden_layers=2", "--data_dir", str(glue_dir),
            "--max_train_samples", "128", "--max_eval_samples", "64", "--max_seq_length", "32",
            "--per_device_train_batch_size", "8", "--num_train_epochs", "3", "--cap", "prc,snc",
            "--extra_negatives", "64", "--disable_tqdm", "--logging_steps", "1", "--save_steps", "3",
            "--learning_rate", "1e-4", "--deepspeed", str(REPO / "ds_configs" / "zero2.json"),
            "--output_dir", str(out)]


def start(cmd, world=2):
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        out = Path(cmd[cmd.index("--output_dir") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        log = open(out.parent / f"log_{out.name}_{rank}_{time.time_ns()}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait(procs, timeout=400):
    for p in procs:
        p.wait(timeout=timeout)
    return [p.returncode for p in procs]


def latest_step(out: Path) -> int:
    latest = out / "checkpoints" / "latest"
    return int(latest.read_text().strip()[4:]) if latest.is_file() else -1


def wait_for_checkpoint(procs, out: Path, step: int, timeout=300):
    t0 = time.time()
    while latest_step(out) < step:
        assert all(p.poll() is None for p in procs), "run ended before the checkpoint to interrupt at"
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, glue_dir, model_path):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert wait(start(args(glue_dir, out))) == [0, 0]
    return out


def _same_result(a: Path, b: Path):
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["steps"] == mb["steps"] == 24
    assert ma["eval"]["accuracy"] == pytest.approx(mb["eval"]["accuracy"], abs=1e-6)
    assert ma["sparsity"] == pytest.approx(mb["sparsity"], abs=1e-6)
    np.testing.assert_allclose(np.load(a / "eval_logits.npy"), np.load(b / "eval_logits.npy"), atol=1e-6, rtol=0)


def test_sigkill_then_resume_matches_uninterrupted(reference, glue_dir, tmp_path):
    out = tmp_path / "killed"
    procs = start(args(glue_dir, out))
    wait_for_checkpoint(procs, out, 12)  # epoch 2 of 3: after an SnC snapshot, mid-schedule
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
    wait(procs)
    assert not (out / "metrics.json").exists()
    killed_at = latest_step(out)
    assert 12 <= killed_at < 24
    assert wait(start([*args(glue_dir, out), "--resume", "auto"])) == [0, 0]
    assert json.loads((out / "train_state.json").read_text()) == {"status": "completed", "step": 24}
    _same_result(reference, out)


def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(reference, glue_dir, tmp_path):
    out = tmp_path / "term"
    procs = start(args(glue_dir, out))
    wait_for_checkpoint(procs, out, 6)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert wait(procs) == [0, 0]
    state = json.loads((out / "train_state.json").read_text())
    assert state["status"] == "preempted" and latest_step(out) == state["step"] >= 6
    assert wait(start([*args(glue_dir, out), "--resume", "auto"])) == [0, 0]
    _same_result(reference, out)
