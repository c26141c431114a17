"""Stop requests: SIGTERM, SIGUSR1 (Slurm's pre-timeout warning, preemption) and SIGINT (Ctrl-C).

A signal never kills a rank mid-write. It sets a flag that the training loop agrees on at every optimizer step
and acts on at its next check (within ``--check_steps`` steps, ``agreement.py``: then every rank writes a
checkpoint and stops), and that the long passes without a step (bank encodes, SnC snapshots, CAP-f importance)
read after each batch: those stop with :class:`StopRequested` within a batch, discarding the partial pass (it is
redone on resume). A second Ctrl-C
interrupts at once. Exit code after a stop: 0 for SIGTERM/SIGUSR1 (preempted, resumable), 130 for SIGINT.
"""

from __future__ import annotations

import logging
import signal

import torch

from cap_ds.runtime.collectives import any_rank, min_over_ranks

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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
            logger.warning("got %s: stopping at the next optimizer step (or batch of an encode pass)",
                           signal.Signals(signum).name)

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
