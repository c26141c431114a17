"""I/O faults named: the OS error and path behind a failed write, also when a writer failing inside C++
(torch's zip writer says only ``basic_ios::clear: iostream error``) drops both: the path comes from the failing
call's frames, the error from the message or by probing that folder (read-only mount, a small synced write)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Messages of writers that fail below Python without an OS error (torch's PyTorchStreamWriter, safetensors).
OPAQUE_WRITE_ERRORS = ("unexpected pos", "iostream error", "pytorchstreamwriter failed", "file write failed",
                       "ioerror(os", "error while serializing")
ERRNO_HINTS = {
    errno.ENOSPC: "free space on that file system or choose another --output_dir",
    errno.EDQUOT: "free space (or raise the quota) on that file system or choose another --output_dir",
    errno.EROFS: "the file system is mounted read-only: choose another --output_dir",
    errno.EACCES: "no permission: choose another --output_dir or fix the folder's permissions",
    errno.EPERM: "no permission: choose another --output_dir or fix the folder's permissions",
}


def chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions behind it, as a traceback shows them: ``raise ... from``, or the one being
    handled unless suppressed (cycle-safe)."""
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return out


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


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
    for exc in chain(err):
        if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, ConnectionError):
            path = exc.filename or _written_path(err, folder)
            return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), path)
    for exc in chain(err):
        text = str(exc)
        if not any(p in text.lower() for p in OPAQUE_WRITE_ERRORS):
            continue
        path = _written_path(exc, folder) or _written_path(err, folder) or folder or os.getcwd()
        named = [code for code in ERRNO_HINTS if os.strerror(code).lower() in text.lower()]
        code = named[0] if named else probe(path)
        if code is None:
            return OSError(errno.EIO, f"write failed ({first_line(exc)}); the file system reports no error now "
                                      "(a transient fault, or space freed since)", path)
        return OSError(code, os.strerror(code), path)
    return None


def io_line(err: OSError) -> str:
    """``I/O error on <path>: <strerror> (errno NAME); <what to do>``."""
    name = errno.errorcode.get(err.errno, str(err.errno))
    hint = ERRNO_HINTS.get(err.errno)
    where = f" on {err.filename}" if err.filename else ""
    return f"I/O error{where}: {err.strerror} (errno {name})" + (f"; {hint}" if hint else "")
