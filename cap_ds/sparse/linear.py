"""``SparseLinear``: an inference linear layer whose weight is stored as CSR and run in the format chosen for it."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cap_ds.sparse import csr, semi
from cap_ds.sparse.formats import FORMATS, SMALL_BATCH_TOKENS, is_2to4

logger = logging.getLogger(__name__)


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return -1


class SparseLinear(nn.Module):
    """Inference-only linear layer with a CSR weight; ``y = x @ W^T + b`` for x of shape [..., in_features].

    Buffers (moved by ``.to()``/``.cuda()``, cast by ``.half()``/``.to(dtype)`` like a weight, and the whole
    ``state_dict``): ``row_ptr``, ``col_idx``, ``values`` and ``bias``. Inputs must have the values' dtype, as with
    ``F.linear``. The execution format is ``format_small`` for forwards of at most ``small_tokens`` rows and
    ``format_large`` above (the same unless ``sparsify`` found that the batch size changes the winner); ``dense``
    and ``2:4`` build their weight from the CSR buffers once per (device, dtype, buffer version), so neither a
    per-call conversion nor a stale weight after ``load_state_dict`` (which writes into the same storage). A format
    the current device cannot run (2:4 off CUDA) falls back to the CSR path. With autograd recording a graph that
    needs gradients, a differentiable path is used (gradient for the input only).
    """

    def __init__(self, in_features: int, out_features: int, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                 values: torch.Tensor, bias: torch.Tensor | None = None, allow_2to4: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if row_ptr.numel() != self.out_features + 1 or col_idx.numel() != values.numel():
            raise ValueError("inconsistent CSR arrays for SparseLinear")
        self.register_buffer("row_ptr", row_ptr.to(torch.int32).contiguous())
        self.register_buffer("col_idx", col_idx.to(torch.int32).contiguous())
        self.register_buffer("values", values.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().to(values.dtype))
        self.allow_2to4 = allow_2to4
        self.format_small = self.format_large = "csr"
        self.small_tokens = SMALL_BATCH_TOKENS
        self.semi_backend: str | None = None  # None: the first of semi.backends()
        self._dense_cache: tuple[tuple, torch.Tensor] | None = None
        self._semi_cache: tuple[tuple, Any] | None = None  # (key, compressed weight or None if unavailable)
        self._semi_direct = True  # False once the direct aten call failed: torch's public route from then on
        self._fallback_logged = False

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, allow_2to4: bool = True) -> SparseLinear:
        """Pack ``linear``'s weight (masks baked in first for cap_ds's MaskedLinear); format ``csr``."""
        if hasattr(linear, "masked_weight") and hasattr(linear, "to_linear"):
            linear = linear.to_linear()
        row_ptr, col_idx, values = csr.pack_csr(linear.weight)
        return cls(linear.in_features, linear.out_features, row_ptr, col_idx, values, linear.bias,
                   allow_2to4=allow_2to4)

    def set_format(self, fmt: str, large: str | None = None, small_tokens: int = SMALL_BATCH_TOKENS,
                   semi_backend: str | None = None) -> SparseLinear:
        """Run ``fmt`` for every batch, or ``fmt`` up to ``small_tokens`` rows and ``large`` above."""
        for name, value in (("fmt", fmt), ("large", large)):
            if value is not None and value not in FORMATS:
                raise ValueError(f"SparseLinear.set_format: {name}={value!r}; allowed: {', '.join(FORMATS)}")
        if semi_backend is not None and semi_backend not in semi.BACKENDS:
            raise ValueError(f"SparseLinear.set_format: semi_backend={semi_backend!r}; allowed: "
                             f"{', '.join(semi.BACKENDS)} or None")
        self.format_small, self.format_large = fmt, large or fmt
        self.small_tokens = int(small_tokens)
        if semi_backend != self.semi_backend:
            self._semi_cache = None
        self.semi_backend = semi_backend
        return self

    def format_for(self, tokens: int) -> str:
        """The format a forward of ``tokens`` rows runs."""
        return self.format_small if tokens <= self.small_tokens else self.format_large

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.in_features * self.out_features)

    @property
    def format(self) -> str:
        """``csr``, ``dense`` or ``2:4``; ``csr(tokens<=256)|dense`` style when small and large batches differ."""
        if self.format_small == self.format_large:
            return self.format_small
        return f"{self.format_small}(tokens<={self.small_tokens})|{self.format_large}"

    def extra_repr(self) -> str:
        backend = ""
        if "2:4" in (self.format_small, self.format_large):
            backend = f", backend={self.semi_backend or (semi.backends(self.values.device) or ('none',))[0]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}{backend}, sparsity={self.sparsity:.4f}")

    # ---- weights derived from the CSR buffers
    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight with its zeros back (a new tensor)."""
        return csr.unpack_csr(self.row_ptr, self.col_idx, self.values, self.in_features)

    def _weight_key(self) -> tuple:
        """Changes when the weight may have: other device/dtype/storage, or an in-place write (load_state_dict)."""
        v = self.values
        return (v.device, v.dtype, v.data_ptr(), _version(v), _version(self.row_ptr), _version(self.col_idx))

    def cached_dense_weight(self) -> torch.Tensor:
        """The dense weight, built once per weight version (what the ``dense`` format multiplies)."""
        key = self._weight_key()
        if self._dense_cache is None or self._dense_cache[0] != key:
            with torch.inference_mode(False):  # a normal tensor: usable later in a graph that needs gradients
                self._dense_cache = (key, self.dense_weight())
        return self._dense_cache[1]

    def semi_weight(self) -> Any:
        """torch's compressed 2:4 weight, converted once per weight version and backend; None where unavailable."""
        if not self.allow_2to4:
            return None
        available = semi.backends(self.values.device)
        if not available:  # no 2:4 backend for this GPU: the CSR path runs
            return None
        backend = self.semi_backend or available[0]
        key = (*self._weight_key(), backend)
        if self._semi_cache is not None and self._semi_cache[0] == key:
            return self._semi_cache[1]
        compressed = None
        v = self.values
        if semi.supported(v.device, v.dtype, self.out_features, self.in_features):
            dense = self.dense_weight()
            if is_2to4(dense):
                try:
                    with torch.inference_mode(False):
                        compressed = semi.convert(dense, backend)
                except (RuntimeError, ValueError, NotImplementedError, AttributeError) as err:
                    logger.info("2:4 %s conversion failed (%s); using the CSR path", backend, err)
        self._semi_cache = (key, compressed)
        return compressed

    def to_linear(self) -> nn.Linear:
        """A plain dense ``nn.Linear`` with the same weight and bias."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            out.weight.copy_(self.dense_weight())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    # ---- forward paths, each on [tokens, in]
    def reference_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch: ``torch.sparse.mm`` on the CSR (fp32/fp64), else the densified weight."""
        y = csr.torch_csr_linear(x2, self.row_ptr, self.col_idx, self.values, (self.out_features, self.in_features))
        if y is None:
            return F.linear(x2, self.cached_dense_weight(), self.bias)
        return y + self.bias if self.bias is not None else y

    def csr_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """The CSR path: our kernel where it has this device/dtype, else PyTorch."""
        module = csr.kernel_for(x2)
        if module is not None:
            return csr.kernel_linear(x2, self, module)
        return self.reference_forward(x2)

    def semi_forward(self, x2: torch.Tensor) -> torch.Tensor | None:
        """The 2:4 path, or None where it cannot run here (the caller takes the CSR path)."""
        if torch.is_grad_enabled() and x2.requires_grad:
            return None
        compressed = self.semi_weight()
        if compressed is None:
            return None
        backend = self._semi_cache[0][-1]
        if self._semi_direct:
            try:
                return semi.matmul(compressed, backend, x2, self.bias)
            except (RuntimeError, NotImplementedError, TypeError, AttributeError) as err:
                # A private aten op changed in this torch: torch's public (slower) route, still correct.
                logger.info("2:4 %s direct call failed (%s); using F.linear on the semi-structured tensor",
                            backend, err)
                self._semi_direct = False
        return F.linear(x2, compressed, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"SparseLinear: expected input [..., {self.in_features}], got {tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            raise RuntimeError(f"SparseLinear: input dtype {x.dtype} differs from the weight dtype "
                               f"{self.values.dtype} (as F.linear, no implicit cast)")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        fmt = self.format_for(x2.shape[0])
        y = None
        if fmt == "dense":
            y = F.linear(x2, self.cached_dense_weight(), self.bias)
        elif fmt == "2:4":
            y = self.semi_forward(x2)
            if y is None and not self._fallback_logged:
                self._fallback_logged = True
                logger.info("SparseLinear %dx%d: 2:4 cannot run on %s/%s here; using the CSR path",
                            self.out_features, self.in_features, x2.device, x2.dtype)
        if y is None:
            y = self.csr_forward(x2)
        return y.reshape(*lead, self.out_features)
