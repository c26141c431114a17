"""The DeepSpeed launcher with working Ctrl-C and preemption: ``python -m cap_ds.launch`` takes exactly the
arguments of the ``deepspeed`` command, e.g.

    python -m cap_ds.launch --num_gpus 8 cap_ds/train.py --deepspeed ds_configs/zero2.json --save_steps 500 ...

and a single-node ``deepspeed cap_ds/train.py ...`` runs this too (cap_ds_launcher_hook.py turns DeepSpeed's runner
into it; ``CAP_DS_DEEPSPEED_HOOK=0`` turns that off).

Why DeepSpeed's runner alone does not do: on one node it handles no signal. Ctrl-C reaches the whole foreground
process group: the runner dies at once with a KeyboardInterrupt traceback and gives the prompt back, while its
``launch.py`` sends the ranks SIGTERM and kills them 30 s later, checkpoint written or not, and exits 1. SIGTERM
to the runner alone (``kill <pid>``, a scheduler, a supervisor) ends it with 143 while ``launch.py`` and the ranks
train on, with no checkpoint.

This launcher starts the runner in a session of its own (signals to this command's process group do not reach
it), catches SIGTERM, SIGUSR1 and SIGINT, says so in one line and forwards them to the ranks only (the runner's
grandchildren; SIGINT as SIGTERM, so no rank exits non-zero and makes ``launch.py`` kill the others; each rank
gets it once it has installed its handler, so a rank still starting is not killed by it). The ranks write a
checkpoint at their next optimizer step and exit 0 (``train_state.json`` status ``preempted``), the launcher chain
exits 0, and this command exits 0, or 130 after Ctrl-C, once every rank has ended. A second Ctrl-C kills the whole
tree at once (exit 130, no checkpoint). Single node only: multi-node runs start their ranks through Slurm
(``slurm/multi_node.sbatch``), whose srun delivers signals to every task. The launcher's own log is quiet
(``--log_level critical`` unless you pass ``--log_level``/``--quiet``): the ranks say what happened, and this
command says when a rank ended without a word (killed by a signal).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a file (cap_ds_launcher_hook.py does, to skip importing the package): do not let the package's own
    # folders shadow top-level modules.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

FORWARD = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1, signal.SIGINT: signal.SIGTERM}
IN_LAUNCHER = "CAP_DS_LAUNCH"  # set for the processes this command starts: the ranks leave the announcing to it


def _ranks(runner_pid: int) -> list:
    """The training processes: children of the runner's children (runner -> launch.py -> ranks)."""
    import psutil

    try:
        return [rank for launch in psutil.Process(runner_pid).children() for rank in launch.children()]
    except psutil.Error:
        return []


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (Linux ``SigCgt``; True where that cannot be read):
    a rank gets a forwarded signal only once its handler is in place, not while the default action kills it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return True


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


def _say(text: str) -> None:
    print(f"cap_ds.launch: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    script = next((i for i, a in enumerate(argv) if a.endswith(".py")), len(argv))
    if not any(a.startswith("--log_level") or a in ("-q", "--quiet") for a in argv[:script]):
        # The launcher's INFO lines (commands, "Unable to find hostfile" for a local run) are expected noise, and
        # its one ERROR line (the rank's whole command line "exits with return code = N") repeats what the rank
        # said in its own error line; a rank that ends without saying why is reported below. --log_level info
        # brings them back. The ranks' own output is unaffected.
        argv = ["--log_level", "critical", *argv]
    received: list[int] = []
    killed = False
    runner: subprocess.Popen | None = None

    def on_signal(signum, _frame):
        nonlocal killed
        if signum == signal.SIGINT and signal.SIGINT in received:
            if not killed:
                killed = True
                _say("second Ctrl-C: stopping the ranks now, without a checkpoint")
                if runner is not None:
                    _kill_tree(runner.pid)
            return
        repeated = signum in received
        received.append(signum)
        if runner is None:
            return  # before the ranks start: main() does not start them
        if signum == signal.SIGINT:
            _say("Ctrl-C: the ranks stop with a checkpoint within --check_steps optimizer steps; Ctrl-C again "
                 "quits at once without one")
        elif not repeated:
            _say(f"got {signal.Signals(signum).name}: the ranks stop with a checkpoint within --check_steps "
                 "optimizer steps")

    for sig in FORWARD:  # first: a Ctrl-C while torch is imported below is no traceback either
        signal.signal(sig, on_signal)
    env = {**os.environ, IN_LAUNCHER: "1"}
    if "DS_ACCELERATOR" not in env:
        try:
            import torch

            if not torch.cuda.is_available():
                env["DS_ACCELERATOR"] = "cpu"  # else every process warns "Setting accelerator to CPU"
        except ImportError:
            pass
    if received:
        _say(f"got {signal.Signals(received[0]).name} before the ranks started: not starting them")
        return 130 if received[0] == signal.SIGINT else 128 + received[0]
    runner = subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.runner", *argv], env=env,
                              start_new_session=True)
    delivered: set[tuple[int, int]] = set()
    while runner.poll() is None:
        for signum in dict.fromkeys(received):
            for rank in _ranks(runner.pid):  # ranks that start after the signal get it too, once they catch it
                key = (rank.pid, FORWARD[signum])
                if key not in delivered and catches(rank.pid, FORWARD[signum]):
                    delivered.add(key)
                    try:
                        rank.send_signal(FORWARD[signum])
                    except Exception:  # it ended meanwhile
                        pass
        time.sleep(0.2)
    code = runner.returncode
    if code < 0:
        code = 128 - code
    if signal.SIGINT in received and (code == 0 or killed):
        return 130
    if code not in SPOKEN_CODES:
        _say(f"a rank ended with exit code {code}{_signal_name(code)} without an error line (killed? out of "
             "memory?)")
    return code


# Exit codes whose rank printed its own line (cap_ds/train.py's cli()): done, fault, bad input, Ctrl-C.
SPOKEN_CODES = (0, 1, 2, 130)


def _signal_name(code: int) -> str:
    """`` (SIGKILL)`` for a rank's death by signal as the launcher chain reports it (launch.py exits with the
    rank's negative code, which the shell sees as 256 - signal; a shell convention gives 128 + signal)."""
    for signum in (256 - code, code - 128):
        try:
            return f" ({signal.Signals(signum).name})"
        except ValueError:
            continue
    return ""


if __name__ == "__main__":
    sys.exit(main())
