"""Why a run failed, as one line, and which rank says it (``train.cli`` prints it; issue 23).

- User errors (bad flags, files, data) exit 2 with the input's own message; faults exit 1 with one line naming
  the cause; ``CAP_DS_TRACEBACK=1`` shows the traceback instead.
- Bad input is any ``UserError`` (each layer's own error types subclass it); I/O faults name the path and the
  OS error (``runtime.iofaults``).
- With several ranks the first rank to fail claims the report in the process group's key-value store (hosted by
  rank 0 or the launcher's agent: no file, so it works on a full or read-only disk). It alone prints; ranks that
  then die of the collective's broken connection stay quiet, and rank 0 records the claimed cause.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cap_ds.runtime.errors import Fault, TrainingFailed, UserError
from cap_ds.runtime.iofaults import chain, first_line, io_error, io_line, one_line

# A collective that failed because another rank went away (gloo, NCCL, the c10d store).
PEER_LOSS = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited",
             "communicator was aborted", "socket timeout")
_CLAIM_KEY, _CAUSE_KEY = "cap_ds/failure/claims", "cap_ds/failure/cause"


@dataclass
class Failure:
    """How one rank reports an exception: ``line`` (without ``error: ``), the exit code, and whether this rank
    prints it (the first rank to fail does; the others stay quiet)."""

    line: str
    exit_code: int
    report: bool


def is_peer_loss(err: BaseException) -> bool:
    """The exception is a collective's (or the store's) broken connection to a rank that went away."""
    for exc in chain(err):
        if type(exc).__name__ in ("DistNetworkError", "DistStoreError"):
            return True
        if not isinstance(exc, OSError) and any(p in str(exc).lower() for p in PEER_LOSS):
            return True
    return False


def _where(err: BaseException) -> str:
    """`` (at cap_ds/x.py:N)``: the innermost cap_ds frame, a bug report's first clue."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "cap_ds" in Path(f.filename).parts]
    if not (ours or frames):
        return ""
    frame = (ours or frames)[-1]
    parts = Path(frame.filename).parts
    name = "/".join(parts[len(parts) - 1 - parts[::-1].index("cap_ds"):]) if ours else frame.filename
    return f" (at {name}:{frame.lineno})"


def _store():
    """The process group's key-value store, when several ranks run (None otherwise)."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        store.set_timeout(timedelta(seconds=10))
        return store
    except Exception:  # no store: every rank decides alone
        return None


def _world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def claim(line: str) -> bool:
    """True on the first rank to fail (it prints ``line``; the store keeps it for rank 0's train_state.json).
    Without a process group only rank 0 speaks: every rank runs the same checks before it exists."""
    store = _store()
    if store is None:
        return _world()[0] == 0
    try:
        first = store.add(_CLAIM_KEY, 1) == 1
        if first:
            store.set(_CAUSE_KEY, line)
        return first
    except Exception:  # the store went with rank 0: say it rather than lose it
        return True


def claimed_cause(wait_s: float = 5.0) -> str | None:
    """The line the first failing rank claimed (waiting up to ``wait_s``), None if no rank did."""
    store = _store()
    if store is None:
        return None
    try:
        store.wait([_CAUSE_KEY], timedelta(seconds=wait_s))
        return store.get(_CAUSE_KEY).decode()
    except Exception:
        return None


def describe(err: BaseException, output_dir: str | None = None) -> tuple[str, int]:
    """The one line (without ``error: ``) and exit code of ``err``, on this rank alone."""

    if isinstance(err, UserError):
        return one_line(str(err)), 2
    if isinstance(err, TrainingFailed):
        return f"training failed: {one_line(str(err))}", 1
    if isinstance(err, Fault):
        return one_line(str(err)), 1
    io = io_error(err, output_dir)
    if io is not None:
        return one_line(io_line(io)), 1
    if isinstance(err, MemoryError):
        return "out of host memory (MemoryError); use a smaller batch, --max_seq_length or bank", 1
    return (f"{type(err).__name__}: {one_line(first_line(err))}{_where(err)}; CAP_DS_TRACEBACK=1 shows the "
            "traceback"), 1


def settle(err: BaseException, output_dir: str | None = None) -> Failure:
    """How this rank reports ``err`` (computed once, kept on the exception for ``cli``). A rank that died of a
    peer's broken connection stays quiet; rank 0 then takes the cause the failing rank claimed."""
    cached = getattr(err, "_cap_ds_failure", None)
    if isinstance(cached, Failure):
        return cached

    rank, world = _world()
    named = isinstance(err, UserError | TrainingFailed | Fault)  # their text may quote a network error
    if world > 1 and not named and is_peer_loss(err):
        cause = claimed_cause() if rank == 0 else None
        if cause is not None or rank != 0:
            failure = Failure(cause or "lost the connection to another rank", 1, False)
        else:  # the peer was killed (out of memory?) or lost: nobody else will say so
            line = (f"lost the connection to another rank, which stopped without reporting a cause (killed? out "
                    f"of memory?): {one_line(first_line(err))}")
            failure = Failure(line, 1, claim(line))
    else:
        line, code = describe(err, output_dir)
        if world > 1 and code == 1:
            line += f" [rank {rank}]"
        failure = Failure(line, code, claim(line))
    try:
        err._cap_ds_failure = failure  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return failure
