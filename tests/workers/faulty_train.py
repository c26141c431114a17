"""cap_ds/train.py with one injected fault (tests/test_error_lines.py). Root ignores permission bits, so faults are
monkeypatched here rather than made with chmod. ``CAP_DS_TEST_FAULT`` picks one:

- ``rofs:<folder>``: ``os.statvfs`` reports ``<folder>`` (and below) as a read-only mount;
- ``enospc:<name>``: a ``torch.save`` whose file name contains ``<name>`` fails as torch's C++ writer does on a full
  disk (a partial file and a RuntimeError naming neither the path nor the OS error), and from then on Python
  writes through ``os.open``/``os.write`` in that file's folder fail with ENOSPC, as they would on that disk.
"""

import errno
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What torch 2.13 raises when its zip writer hits a full disk (torch.save to /dev/full): no path, no errno.
TORCH_WRITE_FAILURE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def read_only(folder: str) -> None:
    real = os.statvfs

    class ReadOnly:
        def __init__(self, st) -> None:
            self._st = st

        def __getattr__(self, name: str):
            value = getattr(self._st, name)
            return value | os.ST_RDONLY if name == "f_flag" else value

    def statvfs(path):
        st = real(path)
        p = os.path.abspath(os.fspath(path))
        return ReadOnly(st) if p == folder or p.startswith(folder + os.sep) else st

    os.statvfs = statvfs


def disk_full(name: str) -> None:
    import torch

    full: set[str] = set()
    fds: set[int] = set()
    real_save, real_open, real_write, real_close = torch.save, os.open, os.write, os.close

    def save(obj, f, *args, **kwargs):
        if isinstance(f, str | os.PathLike) and name in os.path.basename(os.fspath(f)):
            full.add(os.path.dirname(os.path.abspath(os.fspath(f))))
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04")
            raise RuntimeError(TORCH_WRITE_FAILURE)
        return real_save(obj, f, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if os.path.dirname(os.path.abspath(os.fspath(path))) in full:
            fds.add(fd)
        return fd

    def os_write(fd, data):
        if fd in fds:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    def os_close(fd):
        fds.discard(fd)
        return real_close(fd)

    torch.save, os.open, os.write, os.close = save, os_open, os_write, os_close


if __name__ == "__main__":
    kind, _, arg = os.environ.get("CAP_DS_TEST_FAULT", "").partition(":")
    {"rofs": read_only, "enospc": disk_full}[kind](arg)
    sys.argv = [os.path.join(REPO, "cap_ds", "train.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
