"""DeepSpeed-style op builder for ``cap_masked_gemm`` (training masked linear + CSR sparse linear).

Subclassing DeepSpeed's ``CUDAOpBuilder`` gives us its nvcc flags and arch handling and ``builder()`` for
ahead-of-time builds in ``setup.py``. Without CUDA (CPU torch, or no nvcc) the ``.cu`` sources are dropped and
only the C++ kernels are built.

JIT builds (ninja through ``torch.utils.cpp_extension.load``) go to a folder of their own per checkout and version:
``<TORCH_EXTENSIONS_DIR>/cap_masked_gemm-<key>``, the key hashing the sources' path and content, the flags and
the torch version, so two checkouts or versions never rebuild over each other. Builders take turns through an
``flock`` on ``cap_build.lock`` in that folder, which the kernel drops when a builder dies: torch's own ``lock``
file found there by the next builder is stale (an interrupted build) and is removed, instead of making every
later process wait for it forever. A process that waits longer than ``CAP_DS_KERNELS_BUILD_TIMEOUT`` seconds
(default 900) for another builder gives up and uses the PyTorch path (``cap_ds.ops`` warns once).

This module imports DeepSpeed at import time; ``cap_ds.ops`` imports it lazily, on first use of a kernel.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
from deepspeed.ops.op_builder.builder import (
    CUDAOpBuilder,
    MissingCUDAException,
    OpBuilder,
    installed_cuda_version,
)

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
BUILD_LOCK = "cap_build.lock"  # flock'ed by the process that builds; records who it is
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's lock file (a plain file: outlives a killed builder)
CPP_SOURCES = ("cap_ops.cpp", "masked_linear_cpu.cpp", "spmm_cpu.cpp")
CUDA_SOURCES = ("cuda_host.cpp", "masked_linear_cuda.cu", "spmm_cuda.cu")
TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


def extensions_root() -> Path:
    """Where torch puts JIT extensions: ``TORCH_EXTENSIONS_DIR``, else its default root per python/accelerator."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    accel = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    if getattr(torch.version, "hip", None):
        accel = f"rocm{torch.version.hip.replace('.', '')}"
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{accel}"


def build_timeout() -> float:
    try:
        return float(os.environ.get("CAP_DS_KERNELS_BUILD_TIMEOUT", "900"))
    except ValueError:
        return 900.0


@contextlib.contextmanager
def build_turn(directory: Path, name: str, timeout: float | None = None, poll: float = 0.5):
    """Hold the build turn for ``directory`` (an flock, released by the kernel if this process dies). Once held,
    a torch ``lock`` file there is left over from an interrupted build: it is removed. Waits at most ``timeout``
    seconds for another builder, then raises TimeoutError."""
    import fcntl

    timeout = build_timeout() if timeout is None else timeout
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / BUILD_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    t0 = time.monotonic()
    announced = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    _wait_for_lock_file(directory / TORCH_LOCK, name, timeout)  # no flock on this filesystem
                    yield
                    return
            waited = time.monotonic() - t0
            if not announced:
                logger.warning("%s: waiting for another process building it in %s (%s)", name, directory,
                               _owner(path) or "owner unknown")
                announced = True
            if waited >= timeout:
                raise TimeoutError(f"another process has been building {name} in {directory} for {waited:.0f} s "
                                   f"({_owner(path) or 'owner unknown'}); CAP_DS_KERNELS_BUILD_TIMEOUT={timeout:g}")
            time.sleep(poll)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        stale = directory / TORCH_LOCK
        if stale.exists():
            logger.warning("%s: removing %s, left by an interrupted build (no builder holds %s)", name, stale,
                           BUILD_LOCK)
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the flock


def _wait_for_lock_file(lock: Path, name: str, timeout: float) -> None:
    """Without flock: a torch lock file older than ``CAP_DS_KERNELS_LOCK_STALE_S`` (default 600 s) is stale and
    removed; a younger one is waited for, at most ``timeout`` seconds."""
    stale_after = float(os.environ.get("CAP_DS_KERNELS_LOCK_STALE_S", "600"))
    t0 = time.monotonic()
    while lock.exists():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            break
        if age > stale_after:
            logger.warning("%s: removing %s, %.0f s old (CAP_DS_KERNELS_LOCK_STALE_S=%g)", name, lock, age,
                           stale_after)
            lock.unlink(missing_ok=True)
            break
        if time.monotonic() - t0 >= timeout:
            raise TimeoutError(f"{lock} has been held for {age:.0f} s by another build of {name}")
        time.sleep(0.5)


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return ""
    return f"pid {info['pid']} on {info['host']} since {info['since']}" if "pid" in info else ""


def nvcc_available() -> bool:
    """True when a CUDA toolkit with a working nvcc is installed (torch's ``CUDA_HOME``)."""
    try:
        installed_cuda_version()
    except (MissingCUDAException, OSError, ValueError, IndexError):
        return False
    return True


class _CapSources:
    """Sources and host flags shared by the CUDA and the C++-only builders."""

    name: str
    build_for_cpu: bool

    def absolute_name(self) -> str:
        return f"cap_ds.ops.{self.name}"

    def _cuda_build(self) -> bool:
        return False

    def sources(self) -> list[str]:
        # Absolute paths: DeepSpeed's JIT resolves relative ones against its own package.
        names = CPP_SOURCES + (CUDA_SOURCES if self._cuda_build() else ())
        return [str(CSRC / n) for n in names]

    def include_paths(self) -> list[str]:
        return [str(CSRC)]

    def cxx_args(self) -> list[str]:
        # -fopenmp: at::parallel_for is inline OpenMP code (it links the libgomp torch already loaded).
        # -ffp-contract=fast: ISO C++ mode would otherwise forbid fusing the SpMM's multiply-adds into FMAs.
        args = ["-O3", "-std=c++20" if TORCH_VERSION >= (2, 12) else "-std=c++17", "-Wno-reorder", "-fopenmp",
                "-ffp-contract=fast", os.environ.get("CAP_OPS_MARCH", "-march=native"), "-g0"]
        if self._cuda_build():
            args.append("-DCAP_WITH_CUDA")
        return args

    def extra_ldflags(self) -> list[str]:
        return ["-fopenmp"]

    def load(self, verbose: bool = False):
        """The prebuilt module when installed with ``CAP_BUILD_OPS=1`` and loadable, else a JIT build."""
        if self.name in OpBuilder._loaded_ops:
            return OpBuilder._loaded_ops[self.name]
        try:
            module = importlib.import_module(self.absolute_name())
        except ImportError:  # not prebuilt, or built against another torch (undefined symbols)
            return self.jit_load(verbose)
        if self._wants_cuda() and not module.with_cuda():
            # Prebuilt for CPU, but this process has a GPU and nvcc: try a CUDA JIT build, keep the CPU one if not.
            try:
                return self.jit_load(verbose)
            except Exception:  # any build failure: the prebuilt CPU kernels still work
                pass
        OpBuilder._loaded_ops[self.name] = module
        return module

    def _wants_cuda(self) -> bool:
        return False

    def build_directory(self, cxx_args: list[str], nvcc_args: list[str], with_cuda: bool) -> Path:
        """``<extensions root>/<name>-<key>``: the key covers where the sources are, what they say, the flags
        and the torch/python versions (one folder per checkout and version)."""
        h = hashlib.sha256()
        for part in (str(CSRC), torch.__version__, sys.version, repr(cxx_args), repr(nvcc_args), repr(with_cuda),
                     repr(self.extra_ldflags())):
            h.update(part.encode() + b"\0")
        for path in sorted(CSRC.iterdir()):
            if path.is_file():
                h.update(path.name.encode() + b"\0" + path.read_bytes())
        return extensions_root() / f"{self.name}-{h.hexdigest()[:12]}"

    def jit_plan(self) -> tuple[list[str], list[str], bool, Path]:
        """(C++ flags, nvcc flags, with CUDA, build folder) of a JIT build in this process."""
        if isinstance(self, CUDAOpBuilder):
            self.build_for_cpu = not torch.cuda.is_available()
        with_cuda = isinstance(self, CUDAOpBuilder) and not self.build_for_cpu
        cxx_args = [*self.strip_empty_entries(self.cxx_args()), "-UC10_USE_GLOG"]
        nvcc_args = [*self.strip_empty_entries(self.nvcc_args()), "-UC10_USE_GLOG"] if with_cuda else []
        return cxx_args, nvcc_args, with_cuda, self.build_directory(cxx_args, nvcc_args, with_cuda)

    def jit_load(self, verbose: bool = False):
        """DeepSpeed's JIT build, into :meth:`build_directory` and taking turns with :func:`build_turn`."""
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:  # a clear message instead of a ninja log
            raise RuntimeError(f"no C++ compiler found ({cxx!r}, set CXX to point at one)")
        if not self.is_compatible(verbose):
            raise RuntimeError(f"{self.name} cannot be built here: {self.error_log}")
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
        saved, self.jit_mode = self.jit_mode, True
        try:
            cxx_args, nvcc_args, with_cuda, directory = self.jit_plan()
            with build_turn(directory, self.name):
                if not (directory / f"{self.name}.so").is_file():
                    logger.warning("building %s (first use, ~1 min; later runs load it from %s)", self.name,
                                   directory)
                t0 = time.perf_counter()
                module = load(name=self.name, sources=self.sources(), extra_include_paths=self.include_paths(),
                              extra_cflags=cxx_args, extra_cuda_cflags=nvcc_args,
                              extra_ldflags=self.strip_empty_entries(self.extra_ldflags()),
                              with_cuda=True if with_cuda else None, build_directory=str(directory), verbose=verbose)
                if verbose:
                    print(f"Time to load {self.name} op: {time.perf_counter() - t0:.1f} seconds")
        finally:
            self.jit_mode = saved
        OpBuilder._loaded_ops[self.name] = module
        return module


class CapMaskedGemmBuilder(_CapSources, CUDAOpBuilder):
    """``cap_masked_gemm`` with the CUDA kernels when torch sees a GPU (JIT) or an arch list is given
    (ahead of time); the C++ kernels alone otherwise."""

    BUILD_VAR = "CAP_BUILD_OPS"
    NAME = "cap_masked_gemm"

    def __init__(self) -> None:
        super().__init__(name=self.NAME)

    def _cuda_build(self) -> bool:
        return not self.build_for_cpu

    def _wants_cuda(self) -> bool:
        return torch.cuda.is_available() and nvcc_available()

    def nvcc_args(self) -> list[str]:
        if not self._cuda_build():
            return []
        return super().nvcc_args() + ["-DCAP_WITH_CUDA"]

    def builder(self):
        """The setuptools extension for ``CAP_BUILD_OPS=1 pip install --no-build-isolation .``."""
        gpu_target = torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        if torch.version.cuda is None or not gpu_target or not nvcc_available():
            return CapMaskedGemmCPUBuilder(name=self.NAME).builder()
        return super().builder()


class CapMaskedGemmCPUBuilder(_CapSources, OpBuilder):
    """The C++-only variant: used where torch has CUDA but no nvcc is installed (own cache entry)."""

    NAME = "cap_masked_gemm_cpu"

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name=name or self.NAME)
