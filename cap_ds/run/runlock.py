"""One run per output folder: a lock held for the run's whole life.

Two runs writing one ``--output_dir`` destroy each other (a ``--resume auto`` started seconds after another run
decides "no checkpoint yet", replaces the live run's files, and both report success). So the run takes an
``fcntl.flock`` on ``<output_dir>/.cap_ds.lock`` before it reads the folder to decide what to do, and keeps it
until the process exits. The file records the holder (host, pid, start time) so a refused run can name it.

- The OS releases a flock when its holder dies (even by SIGKILL), so a lock file whose flock is free belongs to a
  run that is gone: it is taken over, and the caller gets the old holder to warn about.
- The record is written to a temporary file that is locked, then renamed over the lock file: whoever reads the
  lock file sees a whole record. A waiter that locked the replaced inode sees that the path moved on and retries.
- Release (at exit, on success or failure) deletes the lock file while still holding it: a folder left by a run
  that ended normally has no lock file, so a lock file found later means its holder died.
- Filesystems without file locks (some network mounts): the recorded pid decides (alive on this host, or any
  holder on another host: refused, with the file to delete if that run is gone).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cap_ds.runtime.errors import UserError

LOCK_NAME = ".cap_ds.lock"


class RunLockError(UserError):
    """The output folder is in use by another live run (exit code 2, one line)."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run lock."""

    host: str
    pid: int
    started: float  # time.time() when the lock was taken

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.time())

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), float(data["started"]))
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return json.dumps({"host": self.host, "pid": self.pid, "started": self.started,
                           "started_utc": started}) + "\n"

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"the run started {started} on {self.host} (pid {self.pid})"

    def alive_here(self) -> bool:
        """The holder's pid exists on this host (False for another host: it cannot be checked from here)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # another user's process
        return True


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: held by someone else; None: this filesystem has no file locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class RunLock:
    """The lock of one output folder; :meth:`acquire` takes it or raises :class:`RunLockError`."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self.holder: Holder | None = None  # this process, once acquired
        self.previous: Holder | None = None  # the dead holder taken over from, if any
        self.created_dir = False  # acquire() made the output folder
        self.shared = True  # False: the filesystem has no file locks (the pid record decides)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock (creating the folder if missing), or raise RunLockError naming the live holder.
        Released by :meth:`release`, at the latest when the process exits."""
        if self._fd is not None:
            return self
        if not self.output_dir.is_dir():
            self.output_dir.mkdir(parents=True)
            self.created_dir = True
        me = Holder.me()
        for _ in range(50):  # each retry means another process replaced or released the file meanwhile
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                got = _try_flock(fd)
                if got is False:
                    raise RunLockError(self._in_use(self._holder_on_disk()))
                if got is None:
                    self._check_record_only()
                elif not _same_file(fd, self.path):
                    continue  # the holder released (deleted) or replaced it between our open and flock
                self.previous = Holder.parse(_read(self.path))
                self._fd = self._publish(me, lock=got is True)
                self.shared = got is True
                self.holder = me
                atexit.register(self.release)
                return self
            finally:
                os.close(fd)  # the published file has its own descriptor (and lock)
        raise RunLockError(f"{self.output_dir}: could not take {self.path} (it keeps changing); is another run "
                           "starting there?")

    def _publish(self, me: Holder, lock: bool) -> int:
        """Write our record to a locked temporary file and rename it over the lock file: readers see a whole
        record, and whoever waits on the old file finds the path moved on."""
        fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_NAME}.", dir=self.output_dir)
        try:
            if lock:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh inode: nobody else can hold it
            os.write(fd, me.dump().encode())
            os.fsync(fd)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return fd

    def _holder_on_disk(self) -> Holder | None:
        """The live holder's record (it may be being written: a short wait for a whole one)."""
        for _ in range(20):
            holder = Holder.parse(_read(self.path))
            if holder is not None:
                return holder
            time.sleep(0.05)
        return None

    def _check_record_only(self) -> None:
        """No file locks here: refuse a holder that may be alive (alive on this host, or on another host)."""
        holder = Holder.parse(_read(self.path))
        if holder is not None and (holder.alive_here() or holder.host != socket.gethostname()):
            raise RunLockError(f"{self._in_use(holder)} (this filesystem has no file locks: if that run is gone, "
                               f"delete {self.path})")

    def _in_use(self, holder: Holder | None) -> str:
        who = holder.describe() if holder is not None else f"another run (its lock file {self.path} names no holder)"
        return f"{self.output_dir} is in use by {who}; wait for it, or use another --output_dir"

    def release(self) -> None:
        """Delete the lock file (if it is still ours) and drop the lock; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass  # the folder went away (a failed new run removes the folder it created)
        finally:
            os.close(fd)
        atexit.unregister(self.release)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK_NAME", "Holder", "RunLock", "RunLockError"]
