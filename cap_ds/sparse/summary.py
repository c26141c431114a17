"""``SparsifySummary``: what ``sparsify`` chose, per layer and in total (``model.sparsify_summary``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cap_ds.sparse.fusion import describe

#: A timed path that is never chosen: the layer as dense bf16, what an fp32 model would run if cast to bf16 on a
#: CPU with bf16 units. Choosing it would change the model's numbers, so the summary only reports it.
BF16_REFERENCE = "ref:dense_bf16"


def largest_class(times: dict[str, dict[str, float]]) -> str:
    """The batch class of a row's ``times_ms`` measured at the most tokens (``large``, else the only one)."""
    return "large" if "large" in times else next(reversed(times))


@dataclass
class SparsifySummary:
    """One row per considered linear (``name``, ``shape``, ``numel``, ``sparsity``, ``is_2to4``, ``format``; with
    ``times_ms`` when measured, ``extra_bytes`` when replaced, ``backend`` for 2:4) and the decision's cost."""

    policy: str
    device: str
    dtype: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    measured_keys: int = 0
    cached_keys: int = 0
    seconds: float = 0.0
    fused: dict[str, int] = field(default_factory=dict)  # fused modules by kind (cap_ds.sparse.fusion)

    @property
    def counts(self) -> dict[str, int]:
        """Layers per format, e.g. ``{"csr": 36}`` (``csr|dense`` for a layer holding two)."""
        out: dict[str, int] = {}
        for row in self.layers:
            out[row["format"]] = out.get(row["format"], 0) + 1
        return dict(sorted(out.items()))

    @property
    def replaced(self) -> list[dict[str, Any]]:
        """The rows of layers that became a SparseLinear."""
        return [r for r in self.layers if r["format"] != "dense"]

    @property
    def sparsity(self) -> float:
        """Zeros over weights of all considered layers (dense ones included)."""
        total = sum(r["numel"] for r in self.layers)
        return sum(r["sparsity"] * r["numel"] for r in self.layers) / total if total else 0.0

    @property
    def extra_bytes(self) -> int:
        """Memory the replaced layers hold beyond their dense weights (negative: they save memory)."""
        return sum(r.get("extra_bytes", 0) for r in self.layers)

    def line(self) -> str:
        """The one-line summary ``sparsify`` logs."""
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items()) or "none"
        return (f"sparsify(policy={self.policy}, {self.device}, {self.dtype}): {len(self.layers)} linears considered,"
                f" formats: {counts}; weight sparsity {self.sparsity:.3f}; {len(self.replaced)} replaced by "
                f"SparseLinear" + self._fused() +
                f"; measured {self.measured_keys} keys ({self.cached_keys} from cache) in "
                f"{self.seconds:.2f} s" + self._no_2to4() + self._kept_dense() + self._bf16_hint())

    def _fused(self) -> str:
        done = describe(self.fused)
        return f"; fused: {done}" if done else ""

    def _no_2to4(self) -> str:
        """Why 2:4 weights were not run as 2:4 (e.g. no backend for this GPU), once per distinct reason."""
        reasons = list(dict.fromkeys(row["no_2to4"] for row in self.layers if "no_2to4" in row))
        n = sum(1 for row in self.layers if "no_2to4" in row)
        return f"; {n} 2:4 layer(s) not run as 2:4: {'; '.join(reasons)}" if reasons else ""

    def kept_dense(self) -> dict[str, Any] | None:
        """Why measured layers stayed dense: their time per forward at the largest measured batch as dense and in
        their fastest sparse format, summed over the layers kept dense (None where none was measured)."""
        dense = sparse = 0.0
        counted = 0
        for row in self.layers:
            times = row.get("times_ms") or {}
            if row["format"] != "dense" or not times:
                continue
            t = times[largest_class(times)]
            candidates = [v for k, v in t.items() if k != "dense" and k != BF16_REFERENCE]
            if "dense" not in t or not candidates:
                continue
            dense, sparse = dense + t["dense"], sparse + min(candidates)
            counted += 1
        return {"layers": counted, "dense_ms": dense, "sparse_ms": sparse} if counted else None

    def _kept_dense(self) -> str:
        """The measured reason for the layers left dense (e.g. a bf16 model on an AMX CPU, where the dense GEMM
        beats every sparse path)."""
        kept = self.kept_dense()
        if kept is None:
            return ""
        return (f"; {kept['layers']} kept dense as measured: their fastest sparse paths {kept['sparse_ms']:.2f} ms "
                f"vs dense {kept['dense_ms']:.2f} ms per forward at the largest batch measured")

    def bf16_comparison(self) -> dict[str, Any] | None:
        """Where measured (an fp32 model on a CPU with bf16 units): the considered layers' time per forward at the
        largest measured batch in their chosen formats and as dense bf16, and how many would be faster in bf16."""
        chosen = reference = 0.0
        faster = counted = 0
        for row in self.layers:
            times = row.get("times_ms") or {}
            if not times:
                continue
            t = times[largest_class(times)]
            if BF16_REFERENCE not in t:
                continue
            fmt = row["format"].split("|")[-1]
            own = t.get(fmt, min((v for k, v in t.items() if k.startswith(fmt + "/")), default=t["dense"]))
            chosen, reference = chosen + own, reference + t[BF16_REFERENCE]
            faster += t[BF16_REFERENCE] < own
            counted += 1
        if not counted:
            return None
        return {"layers": counted, "faster_in_bf16": faster, "chosen_ms": chosen, "dense_bf16_ms": reference}

    def _bf16_hint(self) -> str:
        """Why an fp32 model is left in fp32 although dense bf16 would be faster here (the reason, not a switch)."""
        cmp = self.bf16_comparison()
        if cmp is None or cmp["dense_bf16_ms"] >= cmp["chosen_ms"]:
            return ""
        return (f"; dense bf16 would be faster on this CPU ({cmp['faster_in_bf16']} of {cmp['layers']} layers; "
                f"{cmp['dense_bf16_ms']:.2f} vs {cmp['chosen_ms']:.2f} ms per forward at the largest batch "
                "measured): kept fp32 because bf16 changes the model's numbers; cast the model to bf16 before "
                "sparsify to serve it so (python -m cap_ds.run.speed --validation_file states what bf16 costs in "
                "accuracy)")

    def __str__(self) -> str:
        return self.line()
