"""``policy="measure"``: time every path a layer can take on the device it runs on, and remember the times.

Layers that share a decision key (shape, dtype, device and thread count, 5 % sparsity bucket, 2:4-ness, bias,
tokens, torch version) share one measurement: this process keeps every one it made or read, and a JSON file
(``cache_path``) carries them to later runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cap_ds.runtime.atomic import publish_modes
from cap_ds.sparse import csr, semi
from cap_ds.sparse.linear import SparseLinear
from cap_ds.sparse.summary import BF16_REFERENCE

logger = logging.getLogger(__name__)

#: (candidates: name -> no-argument call, the representative input x) -> seconds per call of each candidate
MeasureFn = Callable[[dict[str, Callable[[], object]], torch.Tensor], dict[str, float]]

# This process's decisions: key -> {"times_ms": {candidate: ms}}, shared by every sparsify call.
_DECISIONS: dict[str, dict[str, Any]] = {}


def cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX): a dense bf16 model is then the baseline to beat."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def choosable(times: dict[str, float]) -> dict[str, float]:
    """The candidates a layer may run (reference timings dropped)."""
    return {k: v for k, v in times.items() if not k.startswith("ref:")}


def time_candidates(candidates: dict[str, Callable[[], object]], device: torch.device, reps: int = 15,
                    target_s: float = 1e-3) -> dict[str, float]:
    """Seconds per call of each candidate: the fastest of ``reps`` interleaved rounds.

    In each round every candidate runs a batch of calls lasting ~``target_s`` (between CUDA syncs, so GPU work
    plus the host overhead eager inference pays is timed, not the sync). Load from other processes only ever
    adds time, so the least-disturbed round estimates each path's own cost, and many short rounds agree better
    than a few long ones on a shared machine (docs/sparse_inference.md).
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    inner: dict[str, int] = {}
    with torch.inference_mode():
        for name, fn in candidates.items():
            fn()  # warm-up: kernels built, caches filled
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            single = max(time.perf_counter() - t0, 1e-7)
            inner[name] = max(1, min(100, int(target_s / single)))
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(reps):
            for name, fn in candidates.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    fn()
                sync()
                times[name].append(max((time.perf_counter() - t0) / inner[name], 1e-12))
    return {name: min(ts) for name, ts in times.items()}


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device,
                      warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each call of each fn in ``rounds`` interleaved rounds (after ``warmup`` calls each), CUDA
    synchronised around every call: whole-model timing, where one call is long enough to time alone."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    return times


def candidates(layer: SparseLinear, dense: torch.Tensor, x: torch.Tensor, is_2to4: bool
               ) -> dict[str, Callable[[], object]]:
    """The paths that can run this layer on x's device: name -> no-argument call (``2:4/<backend>`` per backend)."""
    bias = layer.bias
    out: dict[str, Callable[[], object]] = {"dense": lambda: F.linear(x, dense, bias)}
    if csr.kernel_applies(x) or x.dtype in csr.TORCH_CSR_DTYPES:
        out["csr"] = lambda: layer.csr_forward(x)
    if x.device.type == "cpu" and x.dtype == torch.float32 and cpu_has_bf16():
        xb, wb = x.bfloat16(), dense.bfloat16()
        bb = bias.bfloat16() if bias is not None else None
        out[BF16_REFERENCE] = lambda: F.linear(xb, wb, bb)
    if is_2to4 and layer.allow_2to4 and semi.supported(x.device, x.dtype, layer.out_features, layer.in_features):
        for backend in semi.backends(x.device):
            try:
                compressed = semi.convert(dense, backend)
                semi.matmul(compressed, backend, x, bias)
            except (RuntimeError, ValueError, NotImplementedError, AttributeError, TypeError) as err:
                logger.info("2:4 %s unavailable for %s (%s)", backend, tuple(dense.shape), err)
                continue
            out[f"2:4/{backend}"] = lambda c=compressed, b=backend: semi.matmul(c, b, x, bias)
    return out


def _device_desc(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            major, minor = torch.cuda.get_device_capability(device)
            return f"cuda:{torch.cuda.get_device_name(device)}:sm{major}{minor}"
        except (RuntimeError, AssertionError):
            return "cuda"
    if device.type == "cpu":
        return f"cpu:{torch.get_num_threads()}threads"
    return device.type


def decision_key(layer: SparseLinear, tokens: int, is_2to4: bool) -> str:
    """What a measurement depends on; layers with equal keys share one."""
    bucket = math.floor(layer.sparsity * 20 + 1e-9) / 20  # 5 % buckets: layers of one shape share a measurement
    return (f"{layer.out_features}x{layer.in_features}|{str(layer.values.dtype).replace('torch.', '')}|"
            f"{_device_desc(layer.values.device)}|tokens={tokens}|sparsity>={bucket:.2f}|2:4={int(is_2to4)}|"
            f"bias={int(layer.bias is not None)}|torch={torch.__version__}")


class DecisionCache:
    """Measured times by decision key: this process's and, with ``path``, a JSON file's (read once, written by
    :meth:`save` if anything was measured). An unreadable file is ignored (the keys are measured again)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.file = self._load()
        self.dirty = False

    def _load(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError) as err:
            logger.warning("sparsify: ignoring unreadable decision cache %s (%s)", self.path, err)
            return {}

    def get(self, key: str) -> dict[str, Any] | None:
        hit = _DECISIONS.get(key) or self.file.get(key)
        if hit is not None:
            _DECISIONS[key] = hit
        return hit

    def put(self, key: str, hit: dict[str, Any]) -> None:
        _DECISIONS[key] = self.file[key] = hit
        self.dirty = True

    def save(self) -> None:
        """Write the file atomically (readers never see half of it); a failure is logged, not raised."""
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self.file, f, indent=1, sort_keys=True)
            publish_modes(tmp)  # the modes a plain open() would give under the umask
            os.replace(tmp, self.path)
        except OSError as err:
            logger.warning("sparsify: could not write the decision cache %s (%s)", self.path, err)


def measured_times(layer: SparseLinear, dense: torch.Tensor, is_2to4: bool, classes: dict[str, int],
                   cache: DecisionCache, measure: MeasureFn) -> tuple[dict[str, dict[str, float]], int]:
    """Times in ms per batch class and candidate, from ``cache`` or measured on a seeded random input of each
    class's size; also how many classes had to be measured."""
    per_class: dict[str, dict[str, float]] = {}
    measured = 0
    for cls_name, tokens in classes.items():
        key = decision_key(layer, tokens, is_2to4)
        hit = cache.get(key)
        if hit is None:
            gen = torch.Generator(device=dense.device).manual_seed(0)
            x = torch.randn(tokens, layer.in_features, generator=gen, device=dense.device).to(dense.dtype)
            times = measure(candidates(layer, dense, x, is_2to4), x)
            hit = {"times_ms": {k: v * 1e3 for k, v in times.items()}}
            cache.put(key, hit)
            measured += 1
        per_class[cls_name] = hit["times_ms"]
    return per_class, measured
