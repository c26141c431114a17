"""Pruned-model inference: ``sparsify(model)`` gives every mostly-zero ``nn.Linear`` the fastest of three formats
on the device and dtype it runs on (``dense``: left as it is; ``csr``: :class:`SparseLinear` on the
cap_masked_gemm CSR kernel; ``2:4``: :class:`SparseLinear` on torch's semi-structured GEMM), dense unless a sparse
one is measured (``policy="measure"``, default) or known (``"rule"``) to be faster; ``densify`` undoes it. Modules:
``formats`` (names, batch classes, sparsity tests), ``csr`` and ``semi`` (the two sparse paths), ``linear``
(:class:`SparseLinear`), ``policy`` (rule and choice), ``measure`` (timing and the decision cache), ``summary``,
``convert`` (the model walk), ``fusion`` (CPU: which blocks to fuse and the probe; the attention block and the
FFN each one kernel call with their residual adds and LayerNorms, the layer and encoder without Python between
kernels), with ``fused_base``, ``fused_blocks`` and ``fused_stack`` (the fused replacements), ``serve`` (shape
buckets run by CUDA graphs, compiled or eager). Figures behind the rules: docs/sparse_inference.md.

May import: ``cap_ds.ops`` and ``cap_ds.runtime`` only.
"""

from cap_ds.sparse.convert import SparsifyOptions, densify, sparsify
from cap_ds.sparse.csr import pack_csr
from cap_ds.sparse.formats import (
    FORMATS,
    POLICIES,
    REPRESENTATIVE_TOKENS,
    SMALL_BATCH_TOKENS,
    weight_sparsity,
)
from cap_ds.sparse.linear import SparseLinear
from cap_ds.sparse.measure import time_candidates
from cap_ds.sparse.policy import rule_format
from cap_ds.sparse.summary import SparsifySummary

__all__ = ["FORMATS", "POLICIES", "REPRESENTATIVE_TOKENS", "SMALL_BATCH_TOKENS", "SparseLinear", "SparsifyOptions",
           "SparsifySummary", "densify", "pack_csr", "rule_format", "sparsify", "time_candidates", "weight_sparsity"]
