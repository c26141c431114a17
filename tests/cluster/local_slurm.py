"""Python side of the local Slurm test cluster (``slurm_cluster.sh``): install, start, submit, wait, stop.

Every daemon is started by ``slurm_cluster.sh start`` into one scratch directory and stopped by PID from its pid
file by ``slurm_cluster.sh stop`` (also when a test fails: the session fixture's finaliser).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "slurm_cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
# Environment that must not leak from an outer job/launcher into the jobs we submit.
_DROP = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_DROP_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMIX_", "PMI_")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith(_DROP_PREFIXES)}
    env.update(extra)
    return env


OPT_IN = "CAP_CLUSTER_TESTS"


def cluster_unavailable_reason() -> str | None:
    """Why the cluster tests do not run here (then they skip); None when asked to and able (then they must run).

    They only run when asked (``CAP_CLUSTER_TESTS=1``; CI asks): as root they install Debian packages (Slurm,
    munge, Open MPI), pip-install mpi4py and start daemons."""
    if os.environ.get(OPT_IN) != "1":
        return (f"cluster tests not asked for: {OPT_IN}=1 runs them (as root they apt-install Slurm and Open MPI, "
                "pip-install mpi4py and start local daemons)")
    if os.environ.get("CAP_SKIP_CLUSTER_TESTS") == "1":
        return "CAP_SKIP_CLUSTER_TESTS=1"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the local Slurm cluster needs root (daemons run as root, packages from apt)"
    if not (shutil.which("slurmctld") or shutil.which("apt-get")):
        return "no Slurm and no apt-get to install it (Debian/Ubuntu only)"
    return None


def install(timeout: float = 900) -> None:
    """Debian packages (munge, Slurm, Open MPI) and mpi4py, if missing; raises with the script's output."""
    r = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=timeout,
                       env=clean_env(PYTHON=sys.executable))
    if r.returncode != 0:
        raise RuntimeError(f"slurm_cluster.sh install failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


def _ports_free(base: int, n: int) -> bool:
    for port in range(base, base + n):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this host (IPv4 and IPv6), from /proc/net."""
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class LocalSlurm:
    """A running two-node cluster; ``env()`` is the environment for clients and submitted jobs."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="capslurm-", dir="/tmp"))
        os.chmod(self.dir, 0o755)  # munged (user munge) must traverse it
        self.conf = self.dir / "slurm.conf"
        self.base_port = next(b for b in (random.randrange(17000, 19990) for _ in range(200)) if _ports_free(b, 3))
        self.started = False

    def start(self, timeout: float = 120) -> None:
        self.started = True  # from here on, stop() cleans up whatever did start
        r = subprocess.run(["bash", str(SCRIPT), "start", str(self.dir), str(self.base_port)], capture_output=True,
                           text=True, timeout=timeout, env=clean_env())
        if r.returncode != 0:
            raise RuntimeError(f"slurm_cluster.sh start failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")

    def stop(self, keep_dir: bool = False) -> None:
        if self.started:
            subprocess.run(["bash", str(SCRIPT), "stop", str(self.dir)], timeout=120, env=clean_env())
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(SLURM_CONF=str(self.conf), **extra)

    # ---------------------------------------------------------------- jobs
    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r.stdout

    def submit(self, script: str | Path, *sbatch_args: str, cwd: Path, env: dict[str, str]) -> int:
        r = subprocess.run(["sbatch", "--parsable", f"--chdir={cwd}", *sbatch_args, str(script)], cwd=cwd,
                           capture_output=True, text=True, timeout=30, env={**env, "SLURM_CONF": str(self.conf)})
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stdout}{r.stderr}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, NodeList, ...); {} once forgotten."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, until, timeout: float, log: Path | None = None, poll: float = 0.5,
             on_poll=None) -> dict[str, str]:
        """Poll the job until ``until(info)`` holds; on timeout cancel it and raise with the log's tail."""
        t0 = time.monotonic()
        while True:
            info = self.job(job_id)
            if on_poll is not None:
                on_poll(info)
            if info and until(info):
                return info
            if time.monotonic() - t0 > timeout:
                self.run("scancel", str(job_id), check=False)
                tail = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
                raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s: {info}\n--- log tail ---\n{tail}")
            time.sleep(poll)

    def wait_done(self, job_id: int, timeout: float, log: Path | None = None, on_poll=None) -> dict[str, str]:
        return self.wait(job_id, lambda i: i.get("JobState") in TERMINAL, timeout, log, on_poll=on_poll)


def tiny_cap_args(glue_dir: Path, epochs: int = 2, train_samples: int = 64) -> list[str]:
    """A real CAP job kept tiny: 2-layer all-MiniLM-L6-v2, real SST-2 rows, PrC + SnC (no teacher), movement
    pruning to 90 %. With 2 ranks: 4 steps per epoch."""
    return ["--config_overrides", "num_hidden_layers=2", "--data_dir", str(glue_dir), "--task_name", "sst2",
            "--max_train_samples", str(train_samples), "--max_eval_samples", "32", "--max_seq_length", "32",
            "--per_device_train_batch_size", "8", "--num_train_epochs", str(epochs), "--cap", "prc,snc",
            "--extra_negatives", "32", "--disable_tqdm"]
