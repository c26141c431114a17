"""`mpirun -np 2 python cap_ds/train.py ...` (no launcher, no RANK): DeepSpeed's MPI discovery (mpi4py) finds the
ranks and the run trains, checkpoints and exports as with any other launcher; the rendezvous uses the
MASTER_PORT passed with `-x` (unique per test), not DeepSpeed's default 29500.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.cluster.local_slurm import (
    clean_env,
    cluster_unavailable_reason,
    install,
    listening_ports,
    tiny_cap_args,
)
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.mpi


def _mpi_ready() -> bool:
    if not shutil.which("mpirun"):
        return False
    return subprocess.run([sys.executable, "-c", "import mpi4py"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def mpirun() -> str:
    reason = cluster_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if not _mpi_ready():
        install()  # root + apt: Open MPI and mpi4py (a failure is an error, not a skip)
    return shutil.which("mpirun")


def test_mpirun_two_ranks_through_mpi_discovery(mpirun, glue_dir, model_path, tmp_path):
    out, port = tmp_path / "run", free_port()
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2",
           "-x", "HF_HUB_OFFLINE=1", "-x", f"MASTER_PORT={port}", "-x", "OMP_NUM_THREADS=1",
           sys.executable, "cap_ds/train.py", *tiny_cap_args(glue_dir),
           "--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), "--save_steps", "2"]
    log = tmp_path / "mpirun.log"
    seen_port = False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(TOKENIZERS_PARALLELISM="false"), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        try:
            while proc.poll() is None:
                seen_port = seen_port or port in listening_ports()
                assert time.monotonic() - t0 < 300, "mpirun run did not finish in 300 s"
                time.sleep(0.3)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 8
    assert json.loads((out / "train_state.json").read_text()) == {"status": "completed", "step": 8}
    assert (out / "final" / "config.json").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step6"
    assert seen_port, f"nothing listened on MASTER_PORT={port}: the ranks did not rendezvous on the given port"
