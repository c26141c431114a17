"""Serving a model in shape buckets: each request is padded to the smallest bucket (batch, tokens) that holds it
and run by that bucket's captured CUDA graph (``mode="graphs"``), its ``torch.compile(mode="reduce-overhead")``
program (``"compile"``) or eagerly (``"eager"``, the CPU fallback and the reference).

Eager PyTorch is launch-bound for encoders at small batches: on an H200 a dense BERT-base in bf16 takes about the
same 8.6-8.8 ms at batch 1 and at batch 32 (docs/results.md), so a pruned or physically smaller model cannot show
its gain there. A CUDA graph replays every kernel of a forward with one launch; its inputs live in static buffers
the request is copied into. Padding is exact: padded rows are independent rows, padded tokens carry attention
mask 0. Time the dense baseline through the same server: compiled against compiled, never eager against compiled.

    from cap_ds.sparse.serve import BucketServer
    server = BucketServer(model.to("cuda", torch.bfloat16).eval(), buckets=[(1, 128), (32, 128)])
    logits = server(input_ids=ids, attention_mask=mask)   # [B, C] (QA: [B, 2, L])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cap_ds.runtime.outputs import output_logits

MODES = ("graphs", "compile", "eager")
PAD_TOKEN = 0


class BucketServer:
    """Runs ``model`` on requests padded to ``buckets`` [(batch, tokens), ...]; one program per bucket, built on
    its first request (``warmup()`` builds them all). ``mode``: graphs (CUDA only), compile, eager."""

    def __init__(self, model: nn.Module, buckets: Sequence[tuple[int, int]], mode: str = "graphs") -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; allowed: {', '.join(MODES)}")
        if not buckets or any(b < 1 or t < 1 for b, t in buckets):
            raise ValueError(f"buckets must be non-empty (batch, tokens) pairs >= 1, got {list(buckets)}")
        self.device = next(model.parameters()).device
        if mode == "graphs" and self.device.type != "cuda":
            raise ValueError("mode 'graphs' needs the model on a CUDA device; use 'compile' or 'eager' on the CPU")
        self.model, self.mode = model.eval(), mode
        self.buckets = sorted({(int(b), int(t)) for b, t in buckets}, key=lambda bt: (bt[0] * bt[1], bt))
        self._programs: dict[tuple[int, int, tuple[str, ...]], Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {}

    def bucket_for(self, batch: int, tokens: int) -> tuple[int, int]:
        """The smallest bucket holding a request of ``batch`` x ``tokens``; a ValueError names the largest."""
        for b, t in self.buckets:
            if b >= batch and t >= tokens:
                return b, t
        raise ValueError(f"a request of {batch} x {tokens} tokens fits no bucket; the buckets are {self.buckets}")

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        ids = inputs["input_ids"]
        batch, tokens = ids.shape
        b, t = self.bucket_for(batch, tokens)
        padded = {k: self._pad(v, k, b, t) for k, v in inputs.items() if v is not None}
        out = self._program(b, t, tuple(sorted(padded)))(padded)
        out = out[:batch]
        return out[..., :tokens] if out.dim() == 3 else out  # QA: [B, 2, L] over the request's tokens

    def warmup(self, names: Sequence[str] = ("input_ids", "attention_mask")) -> None:
        """Build every bucket's program now (capture or compile), not on its first request."""
        for b, t in self.buckets:
            self._program(b, t, tuple(sorted(names)))

    # ---- internals
    def _pad(self, x: torch.Tensor, name: str, b: int, t: int) -> torch.Tensor:
        x = x.to(self.device)
        out = torch.full((b, t), PAD_TOKEN if name != "attention_mask" else 0, dtype=x.dtype, device=self.device)
        out[: x.shape[0], : x.shape[1]] = x
        if name == "attention_mask":
            out[x.shape[0]:, 0] = 1  # a padded row attends to one token: no fully masked softmax
        return out

    def _program(self, b: int, t: int, names: tuple[str, ...]) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        key = (b, t, names)
        if key not in self._programs:
            self._programs[key] = {"graphs": self._capture, "compile": self._compile, "eager": self._eager}[
                self.mode](b, t, names)
        return self._programs[key]

    def _eager(self, b: int, t: int, names: tuple[str, ...]):
        def run(x: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.inference_mode():
                return output_logits(self.model(**x))
        return run

    def _compile(self, b: int, t: int, names: tuple[str, ...]):
        mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs inside; plain on the CPU
        compiled = torch.compile(self.model, mode=mode, dynamic=False)

        def run(x: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.inference_mode():
                return output_logits(compiled(**x)).clone()  # (cudagraph outputs are overwritten by the next replay)
        return run

    def _capture(self, b: int, t: int, names: tuple[str, ...]):
        static = {n: torch.zeros(b, t, dtype=torch.long, device=self.device) for n in names}
        if "attention_mask" in static:
            static["attention_mask"].fill_(1)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the graph: lazy inits, autotuning, allocator pools
                output_logits(self.model(**static))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            out = output_logits(self.model(**static))

        def run(x: dict[str, torch.Tensor]) -> torch.Tensor:
            for n, buf in static.items():
                buf.copy_(x[n])
            graph.replay()
            return out.clone()
        return run
