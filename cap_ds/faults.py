"""Why a run failed, as one line, and which rank says it (``train.cli`` prints it; issue 23).

- User errors (bad flags, files, data) exit 2 with the input's own message; faults exit 1 with one line naming
  the cause; ``CAP_DS_TRACEBACK=1`` shows the traceback instead.
- I/O faults name the path and the OS error. Writers that fail inside C++ (torch's zip writer says only
  ``basic_ios::clear: iostream error``) drop both, so they are recovered here: the path from the failing call's
  frames, the error from the message or by probing that folder (read-only mount, a small synced write).
- With several ranks the first rank to fail claims the report in the process group's key-value store (hosted by
  rank 0 or the launcher's agent: no file, so it works on a full or read-only disk). It alone prints; ranks that
  then die of the collective's broken connection stay quiet, and rank 0 records the claimed cause.
"""

from __future__ import annotations

import errno
import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

# Messages of writers that fail below Python without an OS error (torch's PyTorchStreamWriter, safetensors).
OPAQUE_WRITE_ERRORS = ("unexpected pos", "iostream error", "pytorchstreamwriter failed", "file write failed",
                       "ioerror(os", "error while serializing")
# A collective that failed because another rank went away (gloo, NCCL, the c10d store).
PEER_LOSS = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited",
             "communicator was aborted", "socket timeout")
_CLAIM_KEY, _CAUSE_KEY = "cap_ds/failure/claims", "cap_ds/failure/cause"
_ERRNO_HINTS = {
    errno.ENOSPC: "free space on that file system or choose another --output_dir",
    errno.EDQUOT: "free space (or raise the quota) on that file system or choose another --output_dir",
    errno.EROFS: "the file system is mounted read-only: choose another --output_dir",
    errno.EACCES: "no permission: choose another --output_dir or fix the folder's permissions",
    errno.EPERM: "no permission: choose another --output_dir or fix the folder's permissions",
}


class Fault(RuntimeError):
    """A failure whose message already names its cause and what to do: printed as is, exit code 1."""


@dataclass
class Failure:
    """How one rank reports an exception: ``line`` (without ``error: ``), the exit code, and whether this rank
    prints it (the first rank to fail does; the others stay quiet)."""

    line: str
    exit_code: int
    report: bool


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions behind it, as a traceback shows them: ``raise ... from``, or the one being
    handled unless suppressed (cycle-safe)."""
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return out


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def is_peer_loss(err: BaseException) -> bool:
    """The exception is a collective's (or the store's) broken connection to a rank that went away."""
    for exc in _chain(err):
        if type(exc).__name__ in ("DistNetworkError", "DistStoreError"):
            return True
        if not isinstance(exc, OSError) and any(p in str(exc).lower() for p in PEER_LOSS):
            return True
    return False


def _written_path(err: BaseException, folder: str | None) -> str | None:
    """The file a failed write was writing: a path argument in the failing call's frames (innermost first),
    preferring one under ``folder``. Needed because torch's and safetensors' errors do not name it."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    found = []
    for frame in reversed(frames):
        for name in ("f", "path", "filename", "file", "name", "save_path", "tmp", "target", "save_dir"):
            value = frame.f_locals.get(name)
            if isinstance(value, str | os.PathLike) and os.path.isabs(os.fspath(value)):
                found.append(os.fspath(value))
    if folder is not None:
        root = os.path.abspath(folder)
        under = [p for p in found if os.path.abspath(p).startswith(root + os.sep) or os.path.abspath(p) == root]
        if under:
            return under[0]
    return found[0] if found else None


def probe(path: str) -> int | None:
    """The errno a write in ``path``'s folder (or its nearest existing ancestor) meets now: EROFS for a read-only
    mount, else what a 1 MiB synced write reports (ENOSPC, EDQUOT, EIO ...); None when writing works."""
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return errno.EROFS
    except OSError as err:
        return err.errno
    name = folder / f".cap_ds_probe-{os.getpid()}"
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        return err.errno
    try:
        os.write(fd, bytes(1 << 20))
        os.fsync(fd)
    except OSError as err:
        return err.errno
    finally:
        os.close(fd)
        try:
            os.unlink(name)
        except OSError:
            pass
    return None


def io_error(err: BaseException, folder: str | None = None) -> OSError | None:
    """The OS error behind ``err`` with the path it concerns: an OSError ``err`` was raised from, or, for a
    writer's opaque message, the errno its text names or a probe of the folder finds. None: not an I/O fault."""
    for exc in _chain(err):
        if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, ConnectionError):
            path = exc.filename or _written_path(err, folder)
            return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), path)
    for exc in _chain(err):
        text = str(exc)
        if not any(p in text.lower() for p in OPAQUE_WRITE_ERRORS):
            continue
        path = _written_path(exc, folder) or _written_path(err, folder) or folder or os.getcwd()
        named = [code for code in _ERRNO_HINTS if os.strerror(code).lower() in text.lower()]
        code = named[0] if named else probe(path)
        if code is None:
            return OSError(errno.EIO, f"write failed ({_first_line(exc)}); the file system reports no error now "
                                      "(a transient fault, or space freed since)", path)
        return OSError(code, os.strerror(code), path)
    return None


def io_line(err: OSError) -> str:
    """``I/O error on <path>: <strerror> (errno NAME); <what to do>``."""
    name = errno.errorcode.get(err.errno, str(err.errno))
    hint = _ERRNO_HINTS.get(err.errno)
    where = f" on {err.filename}" if err.filename else ""
    return f"I/O error{where}: {err.strerror} (errno {name})" + (f"; {hint}" if hint else "")


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


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2): the flags, files, data, configs or checkpoints given."""
    from .args import ArgumentError
    from .checkpoint import CheckpointError
    from .compression import CompressionConfigError
    from .ds_config import DeepSpeedConfigError
    from .errors import UserError
    from .plan import PlanError
    from .rundir import RunDirError

    return UserError, ArgumentError, CheckpointError, RunDirError, PlanError, DeepSpeedConfigError, \
        CompressionConfigError


def describe(err: BaseException, output_dir: str | None = None) -> tuple[str, int]:
    """The one line (without ``error: ``) and exit code of ``err``, on this rank alone."""
    from .errors import TrainingFailed

    if isinstance(err, user_error_types()):
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
    return (f"{type(err).__name__}: {one_line(_first_line(err))}{_where(err)}; CAP_DS_TRACEBACK=1 shows the "
            "traceback"), 1


def settle(err: BaseException, output_dir: str | None = None) -> Failure:
    """How this rank reports ``err`` (computed once, kept on the exception for ``cli``). A rank that died of a
    peer's broken connection stays quiet; rank 0 then takes the cause the failing rank claimed."""
    cached = getattr(err, "_cap_ds_failure", None)
    if isinstance(cached, Failure):
        return cached
    from .errors import TrainingFailed

    rank, world = _world()
    named = isinstance(err, user_error_types() + (TrainingFailed, Fault))  # their text may quote a network error
    if world > 1 and not named and is_peer_loss(err):
        cause = claimed_cause() if rank == 0 else None
        if cause is not None or rank != 0:
            failure = Failure(cause or "lost the connection to another rank", 1, False)
        else:  # the peer was killed (out of memory?) or lost: nobody else will say so
            line = (f"lost the connection to another rank, which stopped without reporting a cause (killed? out "
                    f"of memory?): {one_line(_first_line(err))}")
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
