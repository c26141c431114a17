"""The one kernel switch (``CAP_DS_KERNELS``) and the loading of the ``cap_masked_gemm`` op it governs."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from types import ModuleType

import torch

ENV = "CAP_DS_KERNELS"
MODES = ("auto", "on", "off")
# Values CAP_DS_KERNELS took when it was only an on/off switch (on meant what auto means now).
_ALIASES = {"": "auto", "1": "auto", "true": "auto", "yes": "auto", "0": "off", "false": "off", "no": "off"}
_RETIRED_ENV = "CAP_DS_MASKED_KERNEL"  # the training kernel's own switch before CAP_DS_KERNELS took it over

logger = logging.getLogger(__name__)

_lock = threading.Lock()
# The one load attempt of this process: tried, the module (None if disabled or unbuildable), the build error.
_state: dict[str, object] = {"tried": False, "module": None, "error": None}


def kernel_mode() -> str:
    """``CAP_DS_KERNELS`` as ``auto`` (default; also ``1``), ``on`` or ``off`` (also ``0``); read at every call.

    Raises ValueError for any other value: a mistyped switch should not silently pick a path.
    """
    raw = os.environ.get(ENV, "")
    mode = _ALIASES.get(raw.strip().lower(), raw.strip().lower())
    if mode not in MODES:
        raise ValueError(f"{ENV}={raw!r} is not a kernel mode; allowed: {', '.join(MODES)} (or 1 = auto, 0 = off)")
    if os.environ.get(_RETIRED_ENV):
        warnings.warn(f"{_RETIRED_ENV} is no longer read: {ENV}=on|auto|off is the one kernel switch "
                      f"({ENV}=on for the training kernel)", FutureWarning, stacklevel=2)
    return mode


def kernels_enabled() -> bool:
    """False when ``CAP_DS_KERNELS=off``: every caller takes its PyTorch path and the op is never built."""
    return kernel_mode() != "off"


def load_kernels(verbose: bool | None = None) -> ModuleType | None:
    """The compiled ``cap_masked_gemm`` module (built on the first call), or None when disabled or unbuildable.

    A failed build (no compiler, no ninja, ...) warns once and is not retried in this process.
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
                   f"log, CAP_DS_KERNELS=off silences this.")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            logger.debug("cap_masked_gemm build failure", exc_info=err)
        _state["module"] = module
        _state["tried"] = True
    return module


def kernels_available() -> bool:
    """True when the op is enabled and built (builds it on the first call)."""
    return load_kernels() is not None


def kernels_for(device: torch.device | str) -> ModuleType | None:
    """The loaded op when it has kernels for tensors on ``device`` (CPU always; CUDA if compiled in), else None
    (one lookup of the op: the sparse layers call this on every forward)."""
    module = load_kernels()
    if module is None:
        return None
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return module if kind == "cpu" or (kind == "cuda" and bool(module.with_cuda())) else None


def kernels_support(device: torch.device | str) -> bool:
    """True when the loaded op has kernels for tensors on ``device`` (CPU always; CUDA if compiled in)."""
    return kernels_for(device) is not None
