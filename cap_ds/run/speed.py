"""Speed next to the model: measure an exported model against its dense self on the machine at hand, write
``speed.json`` into the model folder and the figures into its model card.

    python -m cap_ds.run.speed out/cap/final                      # CPU, fp32 and bf16, batch 1 and 32, seq 128
    python -m cap_ds.run.speed out/cap/final --device cuda --dtypes bf16

"Its dense self" is the same architecture run with dense kernels: for an unstructured export, the exported weights
as they are (zeros inside dense matrices) against ``cap_ds.sparse.sparsify`` of them (``policy="measure"``: each
layer's fastest format here); for a CAP-f export (heads and FFN neurons removed), the model of the original,
unpruned sizes against the cleaned one as it is. Every pair is timed in interleaved rounds under the same load,
the median of the rounds reported (on the CPU with freed memory kept in the process, as a server should run:
``--host_memory``); the logits of the served path are compared with the dense path's (same
weights) in fp32. The export's ``files.json`` is rewritten to cover the new files, after the folder verified.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from cap_ds.run.model_card import CARD_FILE, SPEED_FILE, speed_section
from cap_ds.runtime.atomic import write_json
from cap_ds.runtime.errors import UserError
from cap_ds.runtime.host_memory import CHOICES as HOST_MEMORY_CHOICES
from cap_ds.runtime.host_memory import apply_choice, host_memory_mode
from cap_ds.runtime.manifest import verify_folder, write_folder_manifest

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_export(folder: Path) -> torch.nn.Module:
    """The exported model (a cleaned CAP-f model too), in eval mode on the CPU."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    import cap_ds.compression  # noqa: F401  (registers the cleaned model classes)

    config = AutoConfig.from_pretrained(folder)
    qa = any(a.endswith("ForQuestionAnswering") for a in (config.architectures or []))
    auto = AutoModelForQuestionAnswering if qa else AutoModelForSequenceClassification
    return auto.from_pretrained(folder).eval()


def dense_self(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(the dense model to compare with, what it is). A cleaned model's dense self has the original sizes (its
    weights are random: time does not depend on their values)."""
    from cap_ds.compression.pruned_modeling import AUTO_CLASSES

    config = model.config
    if type(config) in AUTO_CLASSES:
        from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

        values = {k: v for k, v in config.to_dict().items()
                  if k not in ("layer_heads", "layer_intermediate_sizes", "auto_map", "architectures", "model_type")}
        base_type = config.model_type.replace("cap_pruned_", "")
        dense_config = AutoConfig.for_model(base_type, **values)
        qa = "QuestionAnswering" in type(model).__name__
        auto = AutoModelForQuestionAnswering if qa else AutoModelForSequenceClassification
        torch.manual_seed(0)
        return auto.from_config(dense_config).eval(), "the unpruned architecture (random weights)"
    return model, "the same weights with dense kernels"


def _inputs(model: torch.nn.Module, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(1000, min(model.config.vocab_size, 20000), (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}


def _onnx_inputs(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from cap_ds.run.onnx_export import sample_inputs

    names = sample_inputs(model, 1, 2).keys()  # the graph's inputs, in order
    return {k: x.get(k, torch.zeros_like(x["input_ids"])) for k in names}


def _time_pair(fns: dict[str, Any], rounds: int, device: torch.device) -> dict[str, float]:
    """Median ms per call of each fn over ``rounds`` interleaved rounds."""
    from cap_ds.sparse.measure import interleaved_times

    return {k: 1000 * statistics.median(v) for k, v in interleaved_times(fns, rounds, device).items()}


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    from cap_ds.runtime.outputs import output_logits

    with torch.inference_mode():
        return output_logits(model(**inputs)).float()


def _onnx_sessions(exported: torch.nn.Module, dense: torch.nn.Module, folder: Path, tmp: Path) -> dict[str, Any]:
    """ONNX Runtime sessions of the export (its onnx/model.onnx when written) and, for a cleaned model, of its
    dense self (exported here); an unstructured model is its own dense self under ONNX Runtime."""
    from cap_ds.run.onnx_export import ONNX_FILE, export_onnx, onnx_session

    path = folder / ONNX_FILE
    if not path.is_file():
        path = export_onnx(copy.deepcopy(exported), tmp / "model.onnx")
    sessions = {"onnxruntime_ms": onnx_session(path, torch.get_num_threads())}
    if dense is not exported:
        sessions["dense_onnxruntime_ms"] = onnx_session(export_onnx(copy.deepcopy(dense), tmp / "dense.onnx"),
                                                        torch.get_num_threads())
    return sessions


def fastest(rows: list[dict[str, Any]], accuracy: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per batch size, the fastest way measured to serve this model here (dense or this model's path, in each
    dtype, or ONNX Runtime), with its accuracy where ``accuracy`` has it: a faster dtype is shown with its cost."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        paths: dict[str, tuple[float, float | None]] = {}
        for r in (r for r in rows if r["batch"] == batch):
            acc = (accuracy or {}).get(r["dtype"], {})
            if r.get("dense_is_this_model"):  # unstructured: the same weights with dense kernels
                paths[f"{r['dtype']} dense kernels"] = (r["dense_ms"], acc.get("dense"))
            paths[f"{r['dtype']} {r.get('path', 'this model')}"] = (r["model_ms"], acc.get("model"))
            if "onnxruntime_ms" in r:
                paths["fp32 ONNX Runtime"] = (r["onnxruntime_ms"], (accuracy or {}).get("fp32", {}).get("model"))
        name = min(paths, key=lambda k: paths[k][0])
        entry = {"batch": batch, "path": name, "ms": paths[name][0]}
        if paths[name][1] is not None:
            entry["accuracy"] = paths[name][1]
        out.append(entry)
    return out


def measure(folder: Path, *, device: torch.device, dtypes: list[str], batches: list[int], seq: int,
            rounds: int, onnx: bool = False, labelled=None) -> dict[str, Any]:
    """speed.json's content for the export in ``folder`` (``onnx``: ONNX Runtime times beside the fp32 CPU rows;
    ``labelled``: :class:`~cap_ds.run.dtype_accuracy.LabelledRows` to state each dtype's accuracy on)."""
    import tempfile

    from cap_ds.run.dtype_accuracy import accuracy as accuracy_of
    from cap_ds.sparse import sparsify

    exported = load_export(folder)
    dense, dense_what = dense_self(exported)
    if dense is exported and not any(float((m.weight == 0).float().mean()) > 0.3 for m in exported.modules()
                                     if isinstance(m, torch.nn.Linear)):
        raise UserError(f"{folder}: no pruned layer (fewer than 30 % zeros everywhere) and no removed heads or "
                        "neurons: a dense model has no dense self to be faster than")
    rows, accuracy = [], {}
    tmp = tempfile.TemporaryDirectory()
    sessions = _onnx_sessions(exported, dense, folder, Path(tmp.name)) if onnx and device.type == "cpu" else {}
    for name in dtypes:
        dtype = DTYPES[name]
        base = copy.deepcopy(dense).to(device, dtype)
        served = copy.deepcopy(exported).to(device, dtype)
        if dense is exported:  # unstructured: the layers' fastest formats for this device and dtype
            served = sparsify(served, policy="measure", batch_tokens=max(batches) * seq)
        summary = getattr(served, "sparsify_summary", None)
        formats = dict(getattr(summary, "counts", {}) or {})
        fused = {k: v for k, v in (getattr(summary, "fused", {}) or {}).items() if v}
        kept = summary.kept_dense() if summary is not None else None  # why layers stayed dense, as measured
        if labelled is not None:  # a cleaned model's dense self has random weights: no accuracy to state
            accuracy[name] = {"model": accuracy_of(served, labelled, device)}
            if dense is exported:
                accuracy[name]["dense"] = accuracy_of(base, labelled, device)
        for batch in batches:
            x = _inputs(exported, batch, seq, device)
            ms = _time_pair({"dense": lambda m=base, x=x: m(**x), "model": lambda m=served, x=x: m(**x)}, rounds,
                            device)
            if name == "fp32" and sessions:  # timed apart: ONNX Runtime's threads keep spinning after each run
                # and slowed the next torch call ~3x at batch 1 when interleaved with it (2-core CPUs)
                feed = {k: v.numpy() for k, v in _onnx_inputs(exported, x).items()}
                ms.update(_time_pair({key: lambda s=sess, f=feed: s.run(None, f) for key, sess in sessions.items()},
                                     rounds, device))
            row = {"dtype": name, "batch": batch, "seq_length": seq, "dense_ms": round(ms["dense"], 3),
                   "model_ms": round(ms["model"], 3), "speedup": round(ms["dense"] / ms["model"], 3),
                   "dense_is_this_model": dense is exported}
            row.update({key: round(ms[key], 3) for key in sessions if key in ms})
            if formats:
                row["formats"] = formats
            if fused:  # modules run as one fused kernel call (cap_ds.sparse.fusion)
                row["fused"] = fused
            if kept is not None:
                row["kept_dense"] = {"layers": kept["layers"], "tokens": max(batches) * seq,
                                     "dense_ms": round(kept["dense_ms"], 3), "sparse_ms": round(kept["sparse_ms"], 3)}
            if dense is exported and name == "fp32":
                row["max_abs_logit_diff"] = float((_logits(served, x) - _logits(base, x)).abs().max())
            rows.append(row)
    tmp.cleanup()
    speed = {"device": _device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
             "dense": dense_what, "rounds": rounds, "statistic": "median of interleaved rounds",
             "date": datetime.date.today().isoformat(), "rows": rows, "fastest": fastest(rows, accuracy)}
    if device.type == "cpu":
        speed["host_memory"] = host_memory_mode()
    if labelled is not None:
        speed["accuracy"] = {"file": labelled.path, "examples": len(labelled), **accuracy}
    return speed


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:  # Linux: the CPU's model name ("AMD EPYC ...", "Intel(R) Xeon(R) ...")
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} CPU ({torch.get_num_threads()} threads)"


def refresh_manifest(folder: Path):
    """Check that the export verifies (files added by these tools apart: they are replaced), and return the call
    that rewrites its manifest once they are written: a damaged export is never blessed with a new manifest."""
    problems = verify_folder(folder) if (folder / "files.json").exists() else []
    problems = [p for p in problems if SPEED_FILE not in p and "onnx" not in p]
    if problems:
        raise UserError(f"{folder}: the export does not verify ({problems[0]}); not writing into it")
    return lambda: write_folder_manifest(folder) if (folder / "files.json").exists() else None


def write_speed(folder: Path, speed: dict[str, Any]) -> None:
    """speed.json, the card's Speed section and the manifest."""
    refresh = refresh_manifest(folder)
    write_json(folder / SPEED_FILE, speed)
    card = folder / CARD_FILE
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        head, sep, rest = text.partition("## Speed\n")
        if sep:
            tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
            card.write_text(head + sep + "\n" + speed_section(folder) + tail, encoding="utf-8")
    refresh()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="an exported model folder (a run's final/)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--batches", default="1,32", help="comma list of batch sizes")
    ap.add_argument("--seq_length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (the median is kept)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--host_memory", choices=HOST_MEMORY_CHOICES, default="retain",
                    help="CPU: retain (default): freed activations stay in the process for reuse, as a server "
                         "should run (cap_ds.runtime.host_memory); default: glibc's own behaviour, which "
                         "page-faults on every large activation")
    ap.add_argument("--onnx", action="store_true",
                    help="also time the model (and a cleaned model's dense self) under ONNX Runtime (CPU, fp32)")
    ap.add_argument("--validation_file", default=None,
                    help="labelled rows (CSV/TSV/JSON Lines/JSON/Parquet) to state each dtype's accuracy on, dense "
                         "and served (classification models)")
    ap.add_argument("--text_column_names", default=None, help="--validation_file's text column(s), comma list")
    ap.add_argument("--label_column_name", default="label", help="--validation_file's label column")
    ap.add_argument("--max_eval_samples", type=int, default=None, help="the first N rows of --validation_file")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        ap.error(f"{folder}: not an exported model folder (no config.json)")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes {args.dtypes!r}: allowed: {', '.join(DTYPES)}")
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batches {args.batches!r}: a comma list of integers")
    if not batches or min(batches) < 1 or args.seq_length < 2 or args.rounds < 1:
        ap.error("--batches, --seq_length and --rounds must be positive (seq_length >= 2)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        apply_choice(args.host_memory)
    try:
        labelled = None
        if args.validation_file:
            import datasets
            from transformers import AutoConfig

            from cap_ds.run.dtype_accuracy import read_labelled

            datasets.disable_progress_bars()  # a CLI: the reading of one small file needs no bar

            labelled = read_labelled(args.validation_file, folder, AutoConfig.from_pretrained(folder),
                                     text_columns=args.text_column_names, label_column=args.label_column_name,
                                     max_samples=args.max_eval_samples, max_seq_length=args.seq_length)
        speed = measure(folder, device=torch.device(args.device), dtypes=dtypes, batches=batches,
                        seq=args.seq_length, rounds=args.rounds, onnx=args.onnx, labelled=labelled)
        write_speed(folder, speed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for row in speed["rows"]:
        print(json.dumps(row))
    if "accuracy" in speed:
        print(json.dumps({"accuracy": speed["accuracy"]}))
    for best in speed["fastest"]:
        print(f"fastest here at batch {best['batch']}: {best['path']} ({best['ms']:.2f} ms"
              + (f", accuracy {best['accuracy']:.4f})" if "accuracy" in best else ")"))
    print(f"wrote {folder / SPEED_FILE}" + (" and the card's Speed section" if (folder / CARD_FILE).is_file() else ""))
    return speed


if __name__ == "__main__":
    main()
