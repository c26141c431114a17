"""The two ways a run fails, each with its own exit code in ``train.cli``: bad input (2) or a failed run (1)."""


class UserError(Exception):
    """Bad input found before training: printed as one line, exit code 2."""


class TrainingFailed(RuntimeError):
    """The run cannot produce a valid result (diverged, non-finite outputs, schedule not completed)."""
