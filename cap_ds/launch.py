"""The DeepSpeed launcher with working preemption: ``python -m cap_ds.launch`` takes exactly the arguments of the
``deepspeed`` command, e.g.

    python -m cap_ds.launch --num_gpus 8 cap_ds/train.py --deepspeed ds_configs/zero2.json --save_steps 500 ...

Why not ``deepspeed`` itself: on one node its runner process ignores nothing and handles nothing, so SIGTERM to it
(what ``kill <pid>``, a scheduler or a supervisor sends) ends the runner with 143 while its ``launch.py`` and the
ranks train on, with no checkpoint. A signal to the whole process group does reach the ranks, but ``launch.py``
then kills them 30 s later, checkpoint written or not, and the command still exits 143.

This wrapper starts the runner in a session of its own (group signals do not reach it), catches SIGTERM, SIGUSR1
and SIGINT, and forwards them to the ranks only (the runner's grandchildren; SIGINT as SIGTERM, so no rank
exits non-zero and makes ``launch.py`` kill the others). The ranks write a checkpoint at their next optimizer step
and exit 0 (``train_state.json`` status ``preempted``); the launcher chain then exits 0, and so does this command
(130 after Ctrl-C). A second Ctrl-C kills the whole tree at once. Single node only: multi-node runs start their
ranks through Slurm (``slurm/multi_node.sbatch``), whose srun delivers signals to every task. The launcher's own
log is quiet (``--log_level error`` unless you pass ``--log_level``/``--quiet``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

FORWARD = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1, signal.SIGINT: signal.SIGTERM}


def _ranks(runner_pid: int) -> list:
    """The training processes: children of the runner's children (runner -> launch.py -> ranks)."""
    import psutil

    try:
        return [rank for launch in psutil.Process(runner_pid).children() for rank in launch.children()]
    except psutil.Error:
        return []


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        procs = [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    script = next((i for i, a in enumerate(argv) if a.endswith(".py")), len(argv))
    if not any(a.startswith("--log_level") or a in ("-q", "--quiet") for a in argv[:script]):
        # The launcher's INFO lines (commands, "Unable to find hostfile" for a local run) are expected noise;
        # --log_level info brings them back. Errors and the ranks' own output are unaffected.
        argv = ["--log_level", "error", *argv]
    env = dict(os.environ)
    if "DS_ACCELERATOR" not in env:
        try:
            import torch

            if not torch.cuda.is_available():
                env["DS_ACCELERATOR"] = "cpu"  # else every process warns "Setting accelerator to CPU"
        except ImportError:
            pass
    received: list[int] = []

    def on_signal(signum, _frame):
        if signum == signal.SIGINT and signal.SIGINT in received:
            _kill_tree(runner.pid)  # second Ctrl-C: stop now
        received.append(signum)
        print(f"cap_ds.launch: got {signal.Signals(signum).name}; asking the ranks to checkpoint and stop",
              file=sys.stderr, flush=True)

    for sig in FORWARD:
        signal.signal(sig, on_signal)
    runner = subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.runner", *argv], env=env,
                              start_new_session=True)
    delivered: set[tuple[int, int]] = set()
    while runner.poll() is None:
        for signum in dict.fromkeys(received):
            for rank in _ranks(runner.pid):  # ranks that start after the signal get it too
                if (rank.pid, signum) not in delivered:
                    delivered.add((rank.pid, signum))
                    try:
                        rank.send_signal(FORWARD[signum])
                    except Exception:  # it ended meanwhile
                        pass
        time.sleep(0.2)
    code = runner.returncode
    if code < 0:
        code = 128 - code
    if code == 0 and signal.SIGINT in received:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
