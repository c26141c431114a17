"""Atomic writes: fill a temporary sibling, then rename it into place, so a failure never leaves a half-written
file or folder; a failed write is raised as an OSError naming the target and the OS error. Temporary files are created private (0600/0700); what is published gets the modes a plain
``open``/``mkdir`` would have given under the process umask, so other users of a shared cluster can read it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cap_ds.runtime.iofaults import io_error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_modes(path: str | Path) -> None:
    """Give ``path`` (recursively for a folder) the default modes under the current umask."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def _named_io_error(err: BaseException, tmp: Path, target: Path) -> BaseException:
    """``err`` as an OSError naming the published path (not the hidden temporary one) and the OS error, when it is
    an I/O fault (torch's writer reports neither). Called before the temporary is removed, so a probe still sees
    the disk as the failed write left it."""
    if not isinstance(err, Exception):
        return err
    io = io_error(err, str(tmp if tmp.is_dir() else tmp.parent))
    if io is None:
        return err
    name = Path(io.filename) if io.filename else tmp
    try:
        name = target / name.relative_to(tmp) if name != tmp else target
    except ValueError:
        name = target
    return OSError(io.errno, io.strerror, str(name))


def atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder with ``write(tmp)`` and swap it in for ``target``.

    A failure leaves ``target`` as it was: no half-written export. The previous folder is removed only after the
    new one is in place.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        publish_modes(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        named = _named_io_error(err, tmp, target)
        shutil.rmtree(tmp, ignore_errors=True)
        if named is err:
            raise
        raise named from err


def atomic_file(path: str | Path, write: Callable[[str], None]) -> Path:
    """``write(tmp_path)`` then rename onto ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        publish_modes(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        named = _named_io_error(err, Path(tmp), path)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if named is err:
            raise
        raise named from err
    return path


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented, key-sorted JSON (non-JSON values as ``str``), written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")

    atomic_file(path, write)
