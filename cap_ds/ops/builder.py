"""DeepSpeed-style op builder for ``cap_masked_gemm`` (training masked linear + CSR sparse linear).

Subclassing DeepSpeed's ``CUDAOpBuilder`` gives us its JIT path (ninja through ``torch.utils.cpp_extension.load``,
cached under ``TORCH_EXTENSIONS_DIR``, file-locked so concurrent ranks build once), its nvcc flags and arch
handling, and ``builder()`` for ahead-of-time builds in ``setup.py``. Without CUDA (CPU torch, or no nvcc) the
``.cu`` sources are dropped and only the C++ kernels are built.

This module imports DeepSpeed at import time; ``cap_ds.ops`` imports it lazily, on first use of a kernel.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import torch
from deepspeed.ops.op_builder.builder import (
    CUDAOpBuilder,
    MissingCUDAException,
    OpBuilder,
    installed_cuda_version,
)

CSRC = Path(__file__).resolve().parent / "csrc"
CPP_SOURCES = ("cap_ops.cpp", "masked_linear_cpu.cpp", "spmm_cpu.cpp")
CUDA_SOURCES = ("cuda_host.cpp", "masked_linear_cuda.cu", "spmm_cuda.cu")
TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


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

    def jit_load(self, verbose: bool = False):
        # A clear message instead of a ninja log when there is no compiler at all.
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            raise RuntimeError(f"no C++ compiler found ({cxx!r}, set CXX to point at one)")
        return super().jit_load(verbose)


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
