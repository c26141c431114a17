"""cap_ds's own kernels (op ``cap_masked_gemm``): masked linear for pruning, CSR sparse linear for inference.

The op is built on first use by a DeepSpeed-style builder (``cap_ds.ops.builder``): prebuilt at install with
``CAP_BUILD_OPS=1``, else JIT-compiled with ninja and cached under ``TORCH_EXTENSIONS_DIR``. Every caller has a
pure-PyTorch path with the same numbers, taken when the switch keeps a kernel out or the op cannot be built (a
single warning says why): kernels are an optimisation, never a requirement.

One switch, ``CAP_DS_KERNELS`` (read at every use):

- ``auto`` (default; ``1`` too): each kernel only where it was measured faster. Inference: ``cap_ds.sparse``'s
  CSR path runs on the kernel (``sparsify`` keeps CSR only where it measured or knows it faster than dense).
  Training: the masked-linear kernel is not used (faster nowhere measured), so ``MaskedLinear`` takes
  :func:`recomputed_masked_linear` or the PyTorch expression and the op is never built for training.
- ``on``: additionally the training masked-linear kernel wherever it applies (it keeps ~1/3 less for the
  backward; benchmarks and tests of the kernel itself).
- ``off`` (``0`` too): no kernel anywhere; the op is never built.

May import: ``runtime`` only.
"""

from __future__ import annotations

from cap_ds.ops.loader import (
    kernel_mode,
    kernels_available,
    kernels_enabled,
    kernels_for,
    kernels_support,
    load_kernels,
)
from cap_ds.ops.masked_linear import (
    kernel_wanted,
    masked_linear,
    masked_linear_reference,
    recomputed_masked_linear,
)

__all__ = ["kernel_mode", "kernel_wanted", "kernels_available", "kernels_enabled", "kernels_for", "kernels_support",
           "load_kernels", "masked_linear", "masked_linear_reference", "recomputed_masked_linear"]
