"""Host memory for CPU serving: keep freed blocks in the process instead of handing them back to the OS.

Why: glibc's malloc serves a block above its mmap threshold (128 KiB, raised on the fly to at most 32 MiB) with a
fresh ``mmap`` and unmaps it on ``free``, and gives the heap's free top back to the OS beyond its trim threshold.
An encoder forward on a CPU allocates and frees dozens of activation tensors of several MiB; each comes back as
new pages that the kernel zero-fills on first touch. For the 6-layer MiniLM at batch 32 x 128 tokens that is
~43,000 minor page faults per forward under glibc's defaults (zero with :func:`retain_freed_memory`), and the
faults fall on whatever runs first on the new memory (the GELU after the FFN's first linear took 6 ms per layer
instead of 1.5 ms). They cost the same milliseconds to a dense and a sparse model, so they hide most of what
pruning saves (figures: docs/sparse_inference.md, "Page faults").

What the fix is: the same as a caching allocator (jemalloc or tcmalloc under ``LD_PRELOAD``, as PyTorch's CPU
launcher ``torch.backends.xeon.run_cpu`` does): no ``mmap`` for single blocks (``M_MMAP_MAX = 0``) and no trimming
(``M_TRIM_THRESHOLD = -1``), so a freed activation's pages serve the next one. The cost: the process keeps its
peak heap (what a server wants; memory still goes to whoever allocates next in the process). It is process-wide
and only asked for by serving code (``python -m cap_ds.run.speed``, the inference benchmarks, your server).
"""

from __future__ import annotations

import ctypes
import threading

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# glibc's compiled-in values, used to undo the change (its dynamic raise of the mmap threshold stays off then)
_DEFAULTS = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 128 * 1024), (_M_TRIM_THRESHOLD, 128 * 1024))

_lock = threading.Lock()
_mode = "default"


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (musl, macOS: AttributeError)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (see the module docstring). True when in effect; False
    where the C library is not glibc (nothing changed: other allocators have their own settings)."""
    global _mode
    libc = _glibc()
    if libc is None:
        return False
    with _lock:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
        _mode = "retained" if ok else _mode
    return ok


def restore_default_memory() -> bool:
    """Undo :func:`retain_freed_memory` for later blocks: glibc's compiled-in thresholds again, and free memory
    offered back to the OS (``malloc_trim``; blocks already free in the heap may still serve the next requests).
    glibc's dynamic raise of the mmap threshold stays off once set by hand."""
    global _mode
    libc = _glibc()
    if libc is None:
        return False
    with _lock:
        ok = all(libc.mallopt(param, value) == 1 for param, value in _DEFAULTS)
        libc.malloc_trim(0)
        _mode = "default" if ok else _mode
    return ok


#: the values of the ``--host_memory`` flag of ``cap_ds.run.speed`` and the CPU benchmarks
CHOICES = ("retain", "default")


def apply_choice(choice: str) -> str:
    """A ``--host_memory`` value applied: ``retain`` calls :func:`retain_freed_memory`, ``default`` leaves the
    allocator as it is; returns :func:`host_memory_mode` (what the figures were taken under)."""
    if choice not in CHOICES:
        raise ValueError(f"host memory {choice!r}: allowed {', '.join(CHOICES)}")
    if choice == "retain":
        retain_freed_memory()
    return host_memory_mode()


def host_memory_mode() -> str:
    """``"retained"`` after :func:`retain_freed_memory`, ``"default"`` before (or after the undo), and
    ``"unsupported"`` where the C library is not glibc."""
    return _mode if _glibc() is not None else "unsupported"
