"""ONNX export of a cap_ds model (the masked model with its masks baked, or the cleaned CAP-f model), checked
against PyTorch, and its time under ONNX Runtime on the CPU.

    python -m cap_ds.run.onnx_export out/cap/final      # -> out/cap/final/onnx/model.onnx (logits within 1e-4)

The graph is exported with torch's dynamo exporter with a dynamic batch and sequence length (inputs
``input_ids``, ``attention_mask`` and ``token_type_ids`` when the model takes them; output ``logits``, or
``start_logits``/``end_logits`` stacked as ``[B, 2, L]`` for QA). ONNX Runtime has no sparse kernel for the
zeros of an unstructured model: it runs it at the dense model's speed; a cleaned CAP-f model is smaller there too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cap_ds.runtime.errors import UserError

ONNX_FILE = "onnx/model.onnx"
TOLERANCE = 1e-4


class _Logits(torch.nn.Module):
    """The model with tensor inputs and one logits output (what an ONNX graph holds)."""

    def __init__(self, model: torch.nn.Module, token_types: bool) -> None:
        super().__init__()
        self.model, self.token_types = model, token_types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        from cap_ds.runtime.outputs import output_logits

        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return output_logits(self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs))


def _needs_token_types(model: torch.nn.Module) -> bool:
    return getattr(model.config, "type_vocab_size", 0) > 1


def sample_inputs(model: torch.nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(model.config.vocab_size, 20000), (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if _needs_token_types(model):
        out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return out


def export_onnx(model: torch.nn.Module, path: str | Path) -> Path:
    """Write ``model`` (fp32, eval) as ONNX to ``path`` (atomically) and check ONNX Runtime's logits against
    PyTorch's on inputs of another shape than the export's (max |diff| <= 1e-4, else a UserError)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise UserError("ONNX export needs onnx, onnxscript and onnxruntime: pip install -e '.[onnx]'") from err
    model = model.float().eval()
    wrapper = _Logits(model, _needs_token_types(model)).eval()
    inputs = sample_inputs(model, 2, 16)
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("sequence", min=2, max=4096)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_file = Path(tmp) / path.name
        torch.onnx.export(wrapper, tuple(inputs.values()), str(tmp_file), input_names=list(inputs),
                          output_names=["logits"], dynamic_shapes=tuple(dims for _ in inputs), dynamo=True,
                          external_data=False, verbose=False)
        check = sample_inputs(model, 3, 24, seed=1)
        diff = float(np.abs(run_onnx(tmp_file, check) - wrapper(*check.values()).detach().numpy()).max())
        if not diff <= TOLERANCE:
            raise UserError(f"ONNX export of {type(model).__name__}: ONNX Runtime's logits differ from PyTorch's by "
                            f"{diff:.2e} (> {TOLERANCE}); not written")
        tmp_file.replace(path)
    return path


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path_or_session: Any, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    session = path_or_session if hasattr(path_or_session, "run") else onnx_session(path_or_session)
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="an exported model folder (a run's final/)")
    args = ap.parse_args(argv)
    from cap_ds.run.speed import load_export, refresh_manifest

    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        ap.error(f"{folder}: not an exported model folder (no config.json)")
    try:
        refresh = refresh_manifest(folder)
        path = export_onnx(load_export(folder), folder / ONNX_FILE)
        refresh()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {path} (ONNX Runtime's logits within {TOLERANCE} of PyTorch's)")
    return path


if __name__ == "__main__":
    main()
