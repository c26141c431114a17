"""The ways a run fails, each with its exit code in ``train.cli``: bad input (2), or a failed run (1).

Every layer raises these (or subclasses of ``UserError``), so the entry point classifies a failure by type alone."""


class UserError(Exception):
    """Bad input found before training: printed as one line, exit code 2."""


class TrainingFailed(RuntimeError):
    """The run cannot produce a valid result (diverged, non-finite outputs, schedule not completed)."""


class Fault(RuntimeError):
    """A failure whose message already names its cause and what to do: printed as is, exit code 1."""
