"""Stop requests: SIGTERM, SIGUSR1 (Slurm's pre-timeout warning, preemption) and SIGINT (Ctrl-C).

A signal never kills a rank mid-write. It sets a flag that the training loop agrees on at every optimizer step
and acts on at its next check (within ``--check_steps`` steps, ``agreement.py``: then every rank writes a
checkpoint and stops), and that the long passes without a step (bank encodes, SnC snapshots, CAP-f importance)
read after each batch: those stop with :class:`StopRequested` within a batch, discarding the partial pass (it is
redone on resume). A second Ctrl-C
interrupts at once. Exit code after a stop: 0 for SIGTERM/SIGUSR1 (preempted, resumable), 130 for SIGINT.

One line tells the user: the signal's arrival, logged by the first rank only (Ctrl-C reaches every rank of the
foreground process group, srun forwards to every task); under ``cap_ds.launch`` (which the ``deepspeed`` command
becomes for cap_ds runs) the launcher says it, and the ranks, which it sends SIGTERM for a Ctrl-C, stay quiet.
"""

from __future__ import annotations

import logging
import os
import signal

import torch

from cap_ds.runtime.collectives import any_rank, min_over_ranks

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
IN_LAUNCHER = "CAP_DS_LAUNCH"  # set by cap_ds/launch.py, which announces the signals it forwards


def announces_signals() -> bool:
    """Whether this process tells the user about a stop signal: the first rank, unless cap_ds.launch did."""
    if os.environ.get(IN_LAUNCHER):
        return False
    rank = next((os.environ[v] for v in _RANK_VARIABLES if os.environ.get(v)), "0")
    return rank.strip() == "0"


def describe(signum: int) -> str:
    """The one line a stop signal gets."""
    when = ("stopping with a checkpoint within --check_steps optimizer steps (before training: at the next "
            "batch, without one)")
    if signum == signal.SIGINT:
        return f"got SIGINT (Ctrl-C): {when}; Ctrl-C again quits at once"
    return f"got {signal.Signals(signum).name}: {when}"


class StopRequested(Exception):
    """A stop signal arrived during a pass that has no optimizer step to checkpoint at."""


class StopSignals:
    """The process's stop flag, set by the signal handlers installed with :meth:`install`."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            logger.log(logging.WARNING if announces_signals() else logging.DEBUG, "%s", describe(signum))

    def request(self, signum: int = signal.SIGTERM) -> None:
        self._handle(signum, None)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 130 if self.signum == signal.SIGINT else 0

    def request_from_peer(self) -> None:
        """Another rank was signalled: stop like it (exit code of a SIGTERM)."""
        if self.signum is None:
            self.signum = signal.SIGTERM

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank when any rank was signalled (a collective and a host read: used between passes;
        the training loop agrees on the device instead, ``agreement.py``)."""
        agreed = any_rank(self.requested, device)
        if agreed:
            self.request_from_peer()
        return agreed

    def pass_check(self, num_batches: int, device: torch.device | str = "cpu"):
        """A per-batch ``check(i)`` for a pass of ``num_batches`` on this rank (ranks may differ by one batch):
        raises StopRequested on every rank at the same batch once any rank was signalled."""
        common = min_over_ranks(num_batches, device)

        def check(i: int) -> None:
            if i < common and self.agreed(device):
                raise StopRequested

        return check
