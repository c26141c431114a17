"""What every rank must agree on after each optimizer step, without a host sync in the step.

Two facts decide whether the loop goes on: a stop request (a signal on any rank, ``signals.py``) and the run of
consecutive optimizer steps whose loss was NaN/inf on any rank or that DeepSpeed skipped. Reading either on the
host each step would stall the CPU until the GPU drained its queue. So both live on the device:

- each optimizer step folds this rank's flags into one 2-element tensor, takes the max over ranks (one small
  all-reduce on the device; none at world size 1) and updates the consecutive-run counter and its maximum there;
- every ``check_steps`` optimizer steps (and whenever the loop syncs anyway: logging, eval, snapshot, save, the
  last step) :meth:`StepAgreement.read` copies the four numbers to the host in one read.

Guarantee: the counts are exact (the same as a per-step check); a stop request or a divergence past
``max_nonfinite_steps`` is acted on at the first check at or after the step it happened, i.e. within
``check_steps - 1`` further optimizer steps, on every rank at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cap_ds.runtime.collectives import max_over_ranks_


@dataclass(frozen=True)
class Agreed:
    """The state every rank read at a check."""

    stop: bool  # a stop signal reached some rank since the run (or the last resume) started
    worst_run: int  # the longest run of consecutive bad steps since the previous check
    run: int  # the run of bad steps ending at this step (0: this step was fine)
    loss: float  # this rank's loss of the last step


class StepAgreement:
    """Device-side flags of the training loop, agreed over ranks every step, read every few steps."""

    def __init__(self, device: torch.device | str, run: int = 0) -> None:
        self.device = torch.device(device)
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)  # this step, this rank, so far
        self._run = torch.full((), float(run), device=self.device)
        self._worst = self._run.clone()
        self._stop = torch.zeros((), device=self.device)
        self._loss = torch.full((), float("nan"), device=self.device)

    def add_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss: non-finite marks the optimizer step bad (no host read)."""
        loss = loss.detach()
        self._bad = self._bad | ~torch.isfinite(loss)
        self._loss = loss.float().reshape(())

    def end_step(self, skipped: bool, stop_requested: bool) -> None:
        """Close one optimizer step: agree on (bad step, stop) over ranks and update the run on the device."""
        flags = torch.stack([(self._bad | skipped).float(), torch.full((), float(stop_requested), device=self.device)])
        flags = max_over_ranks_(flags)
        self._run = torch.where(flags[0] > 0, self._run + 1, 0.0)
        self._worst = torch.maximum(self._worst, self._run)
        self._stop = torch.maximum(self._stop, flags[1])
        self._bad = torch.zeros_like(self._bad)

    def read(self) -> Agreed:
        """One device-to-host read of the agreed state; the worst run restarts from the current one."""
        stop, worst, run, loss = torch.stack([self._stop, self._worst, self._run, self._loss]).tolist()
        self._worst = self._run.clone()
        return Agreed(stop=stop > 0, worst_run=int(worst), run=int(run), loss=loss)
