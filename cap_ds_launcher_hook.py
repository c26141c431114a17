"""Makes the ``deepspeed`` command stop cap_ds runs cleanly on Ctrl-C (see cap_ds/launch.py for why it cannot).

DeepSpeed's runner (the ``deepspeed`` process) has no SIGINT handler: Ctrl-C, which reaches the whole foreground
process group, ends it at once with a KeyboardInterrupt traceback and gives the prompt back while the ranks are
still writing their checkpoint, and its per-node ``launch.py`` kills the ranks 30 s later, checkpoint written or
not. Nothing a rank does can change how its parents handle a signal, so the fix has to run in the runner process.

cap_ds installs this module as a ``torch.backends`` entry point, which torch calls when it is imported: the one
hook that runs inside DeepSpeed's runner (it imports torch before it parses its arguments). It does nothing,
cheaply, in every other process. In the runner, for a single-node run of cap_ds's own ``train.py``, it replaces the
process with cap_ds's launcher (``cap_ds/launch.py``, the same arguments), which starts DeepSpeed's runner in a
session of its own and turns Ctrl-C (and SIGTERM/SIGUSR1) into a checkpoint and a clean exit (130 after Ctrl-C).
Any other script, a multi-node run (a hostfile, ``--force_multi``, ``--num_nodes`` > 1, ...), autotuning, or
``CAP_DS_DEEPSPEED_HOOK=0`` (or ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``) leaves ``deepspeed`` exactly as it is.

This module imports only the standard library and never raises: a failure here would fail ``import torch``.
"""

from __future__ import annotations

import os
import sys

RUNNER_NAMES = ("deepspeed", "ds", "deepspeed.pt")  # DeepSpeed's console scripts that run its launcher runner
OFF = "CAP_DS_DEEPSPEED_HOOK"  # =0: leave the deepspeed command alone
IN_LAUNCHER = "CAP_DS_LAUNCH"  # set by cap_ds/launch.py for the processes it starts (no recursion)
_MULTI_NODE_FLAGS = ("--force_multi", "--no_ssh", "--autotuning", "--elastic_training")
_DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's DLTS_HOSTFILE


def _here() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def _option(args: list[str], *names: str) -> str | None:
    """The value of the last ``--name value`` / ``--name=value`` among ``args``, or None."""
    value = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def wrapped_launch(argv: list[str]) -> str | None:
    """The path of cap_ds/launch.py when ``argv`` (the runner's, without the program) is a single-node run of this
    checkout's cap_ds/train.py (or ``--module cap_ds.train``); None for anything the hook must leave alone."""
    root = _here()
    train, launch = os.path.join(root, "cap_ds", "train.py"), os.path.join(root, "cap_ds", "launch.py")
    if not (os.path.isfile(train) and os.path.isfile(launch)):
        return None
    script = next((i for i, a in enumerate(argv) if a.endswith(".py") or a == "cap_ds.train"), None)
    if script is None:
        return None
    target = argv[script]
    if target == "cap_ds.train":
        if "--module" not in argv[:script]:
            return None
    elif not (os.path.isfile(target) and os.path.samefile(target, train)):
        return None
    options = argv[:script]
    if any(a.split("=", 1)[0] in _MULTI_NODE_FLAGS for a in options):
        return None
    nodes = _option(options, "--num_nodes")
    if nodes is not None and nodes.strip() not in ("1", "-1"):
        return None
    if os.path.isfile(_option(options, "-H", "--hostfile") or _DEFAULT_HOSTFILE):
        return None  # a hostfile: possibly several nodes, DeepSpeed's own multi-node runners
    return launch


def autoload() -> None:
    """torch's backend-autoload hook: in DeepSpeed's runner, for a cap_ds run, become cap_ds's launcher."""
    try:
        argv = list(getattr(sys, "argv", None) or ())
        if not argv or os.path.basename(argv[0]) not in RUNNER_NAMES:
            return
        if os.environ.get(OFF, "1").strip() == "0" or os.environ.get(IN_LAUNCHER):
            return
        launch = wrapped_launch(argv[1:])
        if launch is None:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os.execv(sys.executable, [sys.executable, launch, *argv[1:]])
    except Exception:  # never break `import torch`; deepspeed then runs as it always did
        return
