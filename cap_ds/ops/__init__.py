"""cap_ds's own kernels (op ``cap_masked_gemm``): masked linear for pruning, CSR sparse linear for inference.

The op is built on first use by a DeepSpeed-style builder (``cap_ds.ops.builder``): prebuilt at install with
``CAP_BUILD_OPS=1``, else JIT-compiled with ninja and cached under ``TORCH_EXTENSIONS_DIR``. Every caller has a
pure-PyTorch path with the same numbers, taken when the op is disabled (``CAP_DS_KERNELS=0``) or cannot be built
(a single warning says why): kernels are an optimisation, never a requirement.

May import: ``runtime`` only.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from types import ModuleType

import torch

from cap_ds.ops.masked_linear import (
    kernel_wanted,
    masked_kernel_mode,
    masked_linear,
    masked_linear_reference,
    recomputed_masked_linear,
    set_masked_kernel_mode,
    use_kernel,
)

__all__ = ["kernel_wanted", "kernels_enabled", "load_kernels", "kernels_available", "kernels_support", "masked_kernel_mode",
           "masked_linear", "masked_linear_reference", "recomputed_masked_linear", "set_masked_kernel_mode",
           "use_kernel"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "module": None, "error": None}


def kernels_enabled() -> bool:
    """``CAP_DS_KERNELS=0`` turns every kernel off (the PyTorch paths are used); default on."""
    return os.environ.get("CAP_DS_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def load_kernels(verbose: bool | None = None) -> ModuleType | None:
    """The compiled ``cap_masked_gemm`` module (built on the first call), or None when disabled or unbuildable.

    Never raises: a failed build (no compiler, no ninja, ...) warns once and is not retried in this process.
    """
    if not kernels_enabled():
        return None
    if _state["tried"]:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if _state["tried"]:
            return _state["module"]  # type: ignore[return-value]
        if verbose is None:
            verbose = os.environ.get("CAP_DS_KERNELS_VERBOSE", "0") == "1"
        module = None
        try:
            from cap_ds.ops.builder import CapMaskedGemmBuilder, CapMaskedGemmCPUBuilder, nvcc_available

            # torch with CUDA but no nvcc: still build the C++ kernels (CUDA tensors then use PyTorch).
            cpu_only = torch.cuda.is_available() and not nvcc_available()
            builder = CapMaskedGemmCPUBuilder() if cpu_only else CapMaskedGemmBuilder()
            module = builder.load(verbose=verbose)
        except Exception as err:  # any build failure means: use the PyTorch path
            _state["error"] = err
            first = str(err).strip().splitlines()[0].split(": [")[0][:300] if str(err).strip() else ""
            msg = (f"cap_ds: could not build/load the cap_masked_gemm kernels ({type(err).__name__}: {first}); "
                   f"using the pure-PyTorch path (same results, slower). CAP_DS_KERNELS_VERBOSE=1 shows the build "
                   f"log, CAP_DS_KERNELS=0 silences this.")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            logger.debug("cap_masked_gemm build failure", exc_info=err)
        _state["module"] = module
        _state["tried"] = True
    return module


def kernels_available() -> bool:
    """True when the op is enabled and built (builds it on the first call)."""
    return load_kernels() is not None


def kernels_support(device: torch.device | str) -> bool:
    """True when the loaded op has kernels for tensors on ``device`` (CPU always; CUDA if compiled in)."""
    module = load_kernels()
    if module is None:
        return False
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and bool(module.with_cuda()))


def _reset_for_tests() -> None:
    """Forget the load attempt (tests flip ``CAP_DS_KERNELS``)."""
    with _lock:
        _state.update(tried=False, module=None, error=None)
