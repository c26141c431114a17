"""The project's own batch scripts (slurm/*.sbatch), submitted to a real local Slurm cluster: one host, two
emulated nodes on loopback (tests/cluster/slurm_cluster.sh installs it from Debian packages, starts it once per
session and stops every daemon it started by PID). Each job is a real 2-rank CAP run: the 2-layer MiniLM on real
SST-2 rows, a few steps, checkpoints every 2 steps.

The scripts take their parameters from the environment (CAP_ARGS, OUTPUT_DIR, PYTHON, ...); the tests only
override the header's resources (--nodes, --gpus-per-node, --time, --output) on the sbatch command line. The
cluster's nodes advertise 2 fake GPUs each so the scripts' --gpus-per-node requests schedule on a CPU host.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.local_slurm import (
    TERMINAL,
    LocalSlurm,
    cluster_unavailable_reason,
    install,
    listening_ports,
    tiny_cap_args,
)
from tests.conftest import REPO, free_port

SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1")
# Emulated nodes share one host's /dev/shm: keep Open MPI (used only for rank discovery) on TCP over loopback.
MPI_ON_LOOPBACK = {"OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo",
                   "OMPI_MCA_oob_tcp_if_include": "lo"}
JOB_TIMEOUT = 300


@pytest.fixture(scope="session")
def cluster():
    reason = cluster_unavailable_reason()
    if reason:
        pytest.skip(reason)
    install()  # root + apt: a failure here is a real error, not a skip
    c = LocalSlurm()
    try:
        c.start()
        yield c
    finally:
        c.stop()


class CapJob:
    """One submission of a project batch script for a tiny CAP run in ``tmp/run``, log in ``tmp``."""

    def __init__(self, cluster: LocalSlurm, script: str, tmp: Path, glue_dir: Path, *sbatch: str, epochs: int = 2,
                 **env: str) -> None:
        self.cluster, self.tmp, self.out = cluster, tmp, tmp / "run"
        self.port = free_port()
        self.seen_port = False
        job_env = cluster.env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHON=sys.executable,
                              OUTPUT_DIR=str(self.out), DS_CONFIG=str(REPO / "ds_configs" / "zero2.json"),
                              SAVE_STEPS="2", MASTER_PORT=str(self.port), OMP_NUM_THREADS="1",
                              CAP_ARGS=" ".join(tiny_cap_args(glue_dir, epochs)))
        job_env.update(env)
        self.id = cluster.submit(REPO / "slurm" / script, "--time=10", f"--output={tmp}/%x-%j.out", *sbatch,
                                 cwd=REPO, env=job_env)

    @property
    def log_path(self) -> Path | None:
        return next(self.tmp.glob(f"*-{self.id}.out"), None)

    def log(self) -> str:
        path = self.log_path
        return path.read_text() if path else ""

    def _watch(self, _info) -> None:
        self.seen_port = self.seen_port or self.port in listening_ports()

    def wait(self, until, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        return self.cluster.wait(self.id, until, timeout, self.log_path, on_poll=self._watch)

    def wait_done(self, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        return self.wait(lambda i: i.get("JobState") in TERMINAL, timeout)

    def assert_completed(self, info: dict[str, str], steps: int, world: int = 2) -> dict:
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{self.log()[-4000:]}"
        assert json.loads((self.out / "train_state.json").read_text()) == {"status": "completed", "step": steps}
        metrics = json.loads((self.out / "metrics.json").read_text())
        assert metrics["world_size"] == world and metrics["steps"] == steps
        assert 0.0 <= metrics["eval"]["accuracy"] <= 1.0
        assert metrics["sparsity"] == pytest.approx(0.9, abs=0.01)
        assert (self.out / "final" / "config.json").is_file()
        assert any((self.out / "final").glob("*.safetensors"))
        latest = (self.out / "checkpoints" / "latest").read_text().strip()
        assert (self.out / "checkpoints" / latest).is_dir() and latest.startswith("step")
        for rank in range(world):
            assert (self.out / "checkpoints" / latest / f"cap_state_rank{rank}.pt").is_file()
        assert self.seen_port, f"nothing listened on MASTER_PORT={self.port} during the run"
        return metrics


# ---------------------------------------------------------------- no cluster needed
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_batch_script_header_and_syntax(script):
    text = script.read_text()
    for directive in ("--time=", "--signal=B:USR1@", "--requeue", "--output=logs/%x-%j.out", "--open-mode=append"):
        assert re.search(rf"^#SBATCH {re.escape(directive)}", text, re.M), f"{script.name}: no #SBATCH {directive}"
    assert "source slurm/common.sh" in text and "cap_run " in text
    subprocess.run(["bash", "-n", str(script)], check=True)


# ---------------------------------------------------------------- real jobs
@pytest.mark.slurm
def test_two_node_job_one_task_per_gpu(cluster, glue_dir, model_path, tmp_path):
    job = CapJob(cluster, "multi_node.sbatch", tmp_path, glue_dir, *TWO_NODES)
    info = job.wait_done()
    job.assert_completed(info, steps=8)
    assert info["NodeList"] == "n[1-2]" and info["Restarts"] == "0"
    log = job.log()
    assert job.log_path.name == f"cap-multi-{job.id}.out"  # logs per job: %x-%j
    assert f"job {job.id} (cap-multi) restart 0 on n[1-2] (2 nodes), master 127.0.0.1:{job.port}" in log
    assert "final eval" in log and "train_state: completed" in log


@pytest.mark.slurm
def test_pre_timeout_signal_checkpoints_requeues_and_resumes(cluster, glue_dir, model_path, tmp_path):
    job = CapJob(cluster, "multi_node.sbatch", tmp_path, glue_dir, *TWO_NODES, epochs=3)
    latest = job.out / "checkpoints" / "latest"
    info = job.wait(lambda i: latest.is_file() or i.get("JobState") in TERMINAL)
    assert info["JobState"] == "RUNNING", f"finished before the signal: {info}\n{job.log()[-3000:]}"
    # What `#SBATCH --signal=B:USR1@120` does 120 s before the time limit, sent now.
    cluster.run("scancel", "--signal=USR1", "--batch", str(job.id))
    info = job.wait(lambda i: int(i.get("Restarts", 0)) >= 1 and i.get("JobState") in {"PENDING", "RUNNING"} | TERMINAL)
    if info["JobState"] == "PENDING":
        # Slurm holds a requeued job ~2 minutes (BeginTime) so its nodes can finish cleaning up the cancelled run.
        # Release it early, but only once no node is still COMPLETING: a launch onto a node that is still
        # cleaning up fails at once (seen: FAILED, RunTime 0, ExitCode 1:0, nothing in the job log).
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            states = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).lower()
            if states.strip() and "comp" not in states and "drain" not in states:
                break
            time.sleep(1)
        time.sleep(2)
        cluster.run("scontrol", "update", f"jobid={job.id}", "StartTime=now", check=False)
    info = job.wait_done()
    job.assert_completed(info, steps=12)
    assert info["Restarts"] == "1"
    log = job.log()  # --open-mode=append: both runs of the job in one log
    stopped = re.search(r"stopped on signal at step (\d+) after writing a checkpoint", log)
    resumed = re.search(r"resumed from (step\d+) at step (\d+)", log)
    assert stopped and resumed, log[-5000:]
    assert resumed[1] == f"step{stopped[1]}" and 2 <= int(resumed[2]) == int(stopped[1]) < 12
    assert "got SIGUSR1" in log and f"requeueing job {job.id}; it resumes from step{stopped[1]}" in log
    assert f"job {job.id} (cap-multi) restart 1 on n[1-2]" in log
    assert log.index("requeueing job") < log.index("restart 1 on") < log.index("resumed from")


@pytest.mark.slurm
@pytest.mark.mpi
def test_two_node_job_through_deepspeed_launcher_and_srun_pmix(cluster, glue_dir, model_path, tmp_path):
    # deepspeed --hostfile <generated> --launcher slurm -> srun --mpi=pmix; ranks found by mpi4py discovery.
    job = CapJob(cluster, "multi_node_deepspeed.sbatch", tmp_path, glue_dir, *TWO_NODES, **MPI_ON_LOOPBACK)
    info = job.wait_done()
    job.assert_completed(info, steps=8)
    assert (job.out / f"hostfile.{job.id}").read_text() == "n1 slots=1\nn2 slots=1\n"
    assert "cmd = srun -n 2 --mpi=pmix" in job.log()


@pytest.mark.slurm
def test_single_node_job_through_deepspeed_launcher(cluster, glue_dir, model_path, tmp_path):
    job = CapJob(cluster, "single_node.sbatch", tmp_path, glue_dir, "--gpus-per-node=2", "--cpus-per-task=2")
    info = job.wait_done()
    job.assert_completed(info, steps=8)
    assert info["NodeList"] in {"n1", "n2"} and "--num_gpus 2" in job.log()


@pytest.mark.slurm
def test_roberta_large_mnli_recipe_composes_both_stages(cluster, glue_dir, tmp_path):
    # CAP_DRY_RUN: the recipe runs (allocation, setup, stage logic) but logs its two launches instead of running
    # RoBERTa-large, which needs GPUs and the hub.
    job = CapJob(cluster, "roberta_large_mnli_cap.sbatch", tmp_path, glue_dir, *TWO_NODES, CAP_DRY_RUN="1",
                 DATA_DIR=str(glue_dir), CAP_ARGS="--eval_steps 2000", DS_CONFIG="")
    info = job.wait_done(timeout=60)
    assert info["JobState"] == "COMPLETED", job.log()
    launches = [line for line in job.log().splitlines() if "launch:" in line]
    assert len(launches) == 2, job.log()
    teacher, cap = launches
    for line in launches:
        assert "srun --kill-on-bad-exit=1 bash -c" in line and "cap_ds/train.py" in line
        assert "--model_name_or_path roberta-large --task_name mnli" in line and "--resume auto" in line
        assert "--deepspeed ds_configs/zero2_bf16.json" in line and f"--data_dir {glue_dir}" in line
    assert "--mode finetune" in teacher and f"--output_dir {job.out}/teacher " in teacher
    assert f"--teacher_name_or_path {job.out}/teacher/final --cap prc,snc,fic" in cap
    assert "--target_sparsity 0.9" in cap and "--eval_steps 2000" in cap and f"--output_dir {job.out}/cap_m0.9 " in cap


def test_cluster_tests_run_only_when_asked(monkeypatch):
    from tests.cluster.local_slurm import cluster_unavailable_reason

    monkeypatch.delenv("CAP_CLUSTER_TESTS", raising=False)
    reason = cluster_unavailable_reason()
    assert reason and "CAP_CLUSTER_TESTS=1" in reason and "apt-install" in reason
