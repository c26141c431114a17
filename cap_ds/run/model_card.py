"""The model card every export carries: ``final/README.md`` with the YAML metadata the Hugging Face hub reads
(``base_model``, ``library_name``, ``tags``, ``datasets``, ``model-index`` with the eval metrics, and a
``cap_ds`` block with the measured sparsity) and a body that says what the model is: its results, the recipe
(method, target and measured sparsity overall and per layer type, CAP modules and weights, teacher, steps, seed),
the per-layer heat-map, the command that made it, its measured speed when ``speed.json`` is there, and what its
sparsity means for speed on which hardware."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cap_ds.data.tasks import TaskSpec

CARD_FILE = "README.md"
SPEED_FILE = "speed.json"
DEFAULT_BASE = "sentence-transformers/all-MiniLM-L6-v2"  # the offline package's model (data.models)
_LAYER_TYPE = re.compile(r"\.layer\.\d+\.(.+)$")


def layer_type_sparsity(per_module: dict[str, float]) -> dict[str, float]:
    """Mean sparsity per layer type (``attention.self.query``, ``intermediate.dense``, ...). Every layer's
    linear of one type has the same shape, so the mean of fractions is the share of zero weights."""
    groups: dict[str, list[float]] = {}
    for name, value in per_module.items():
        m = _LAYER_TYPE.search(name)
        groups.setdefault(m.group(1) if m else name, []).append(value)
    return {kind: sum(v) / len(v) for kind, v in groups.items()}


def _base_model(path: str) -> str | None:
    """A hub id for ``base_model`` (a local folder is not one; the offline default is all-MiniLM-L6-v2)."""
    from cap_ds.data.models import default_model_path

    if Path(path).exists():
        return DEFAULT_BASE if Path(path).resolve() == Path(default_model_path()).resolve() else None
    return path


def _dataset(spec) -> tuple[list[str], dict[str, Any]]:
    """(the ``datasets`` list, the model-index ``dataset`` entry) of the run's data."""
    data, task = spec.data, spec.task
    if data.task_name and not data.uses_files:
        return ["nyu-mll/glue"], {"name": f"GLUE {task.glue_dir}", "type": "nyu-mll/glue",
                                  "config": task.hub_config, "split": task.eval_split}
    if data.dataset_name:
        entry = {"name": data.dataset_name, "type": data.dataset_name, "split": "validation"}
        return [data.dataset_name], {**entry, **({"config": data.dataset_config_name}
                                                  if data.dataset_config_name else {})}
    return [], {"name": Path(data.validation_file or "validation").name, "type": "local-file",
                "split": "validation"}


@dataclass(frozen=True)
class CardFacts:
    """What a card says, whichever entry point made the model (``cap_ds/train.py``: :func:`facts_from_spec`; the
    Trainer integration builds its own). ``result`` holds ``eval`` (metrics), ``eval_examples``, ``sparsity``
    (when pruned), ``teacher_eval`` and ``kd_weight`` where known; ``recipe``: the Recipe table's rows."""

    title: str
    task: TaskSpec
    result: dict[str, Any]
    recipe: list[tuple[str, Any]]
    mode: str = "prune"
    pruning_method: str | None = None  # None: a dense (fine-tuned) model
    target_sparsity: float | None = None
    structured: bool = False
    modules: tuple[str, ...] = ()
    base_model: str | None = None
    datasets: tuple[str, ...] = ()
    dataset_entry: dict[str, Any] = field(default_factory=dict)
    command: str | None = None  # the shell line that made the model

    @property
    def prune(self) -> bool:
        return self.pruning_method is not None


def _front_matter(facts: CardFacts) -> dict[str, Any]:
    task, result = facts.task, facts.result
    pipeline_tag = "question-answering" if task.is_qa else "text-classification"
    tags = ["cap_ds"]
    if facts.prune:
        tags += ["pruning", "sparse", f"{facts.pruning_method.replace('_', '-')}-pruning"]
        tags += ["structured-pruning"] if facts.structured else ["unstructured-pruning"]
        tags += ["contrastive-pruning"] if facts.modules else []
    tags += ["knowledge-distillation"] if result.get("kd_weight") else []
    metrics = [{"type": k, "value": float(v), "name": k.replace("_", " ")} for k, v in result["eval"].items()]
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": pipeline_tag, "tags": tags}
    if facts.base_model:
        meta["base_model"] = facts.base_model
    if facts.datasets:
        meta["datasets"] = list(facts.datasets)
    meta["metrics"] = list(result["eval"])
    meta["model-index"] = [{"name": "-".join(re.findall(r"[A-Za-z0-9_.]+", facts.title)), "results": [{
        "task": {"type": pipeline_tag, "name": pipeline_tag.replace("-", " ")}, "dataset": facts.dataset_entry,
        "metrics": metrics}]}]
    meta["cap_ds"] = {"mode": facts.mode, "task": task.name, "task_type": task.kind,
                      **({"pruning_method": facts.pruning_method, "target_sparsity": facts.target_sparsity,
                          "sparsity": float(result["sparsity"]), "cap_modules": list(facts.modules)}
                         if facts.prune else {})}
    return meta


def _table(rows: list[tuple[str, Any]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _fmt(metrics: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in (metrics or {}).items()) or "n/a"


def contrastive_rows(cap, modules: list[str] | tuple[str, ...], sentence_vector: str) -> list[tuple[str, Any]]:
    """The Recipe row of the contrastive settings (``cap``: either entry point's CAP arguments), if CAP is on."""
    if not modules:
        return []
    return [("contrastive", f"temperature {cap.contrastive_temperature}, unsupervised weight {cap.cap_unsup_weight}, "
                            f"supervised weight {cap.cap_sup_weight}, sentence vector {sentence_vector}")]


def _recipe(spec, result: dict[str, Any]) -> list[tuple[str, Any]]:
    t, cap = spec.training, spec.cap
    rows: list[tuple[str, Any]] = [("mode", t.mode), ("task", f"{spec.task.name} ({spec.task.kind})"),
                                   ("student", f"`{spec.model_path}`")]
    if spec.prune:
        rows += [("pruning method", spec.pruning.pruning_method),
                 ("target sparsity", f"{spec.pruning.target_sparsity:.1%}"),
                 ("measured sparsity", f"{result['sparsity']:.2%} of encoder linear weights"
                  + (" (heads and FFN neurons removed)" if spec.structured else ""))]
        rows += [("CAP modules", ", ".join(spec.modules) or "none (plain pruning)")]
        rows += contrastive_rows(cap, spec.modules, spec.model.sentence_vector)
        rows += [("teacher", f"`{spec.model.teacher_name_or_path}` ({_fmt(result.get('teacher_eval'))})"
                  if spec.teacher_path else "none")]
    rows += [("loss weights", f"CE {result['ce_weight']}, KD {result['kd_weight']} (T {cap.kd_temperature})"),
             ("steps", f"{result['steps']} ({result['epochs']:g} epochs), {result['world_size']} rank(s), batch "
                       f"{t.per_device_train_batch_size} per rank x {t.gradient_accumulation_steps} accumulation"),
             ("optimizer", f"{result['optimizer']}, learning rate {t.learning_rate}"),
             ("max sequence length", spec.data.max_seq_length), ("seed", t.seed)]
    return rows


def speed_section(folder: Path) -> str:
    """The card's Speed section: ``speed.json`` as a table, or that it was not measured."""
    path = folder / SPEED_FILE
    if not path.is_file():
        return ("Not measured for this model: no `speed.json` beside it. `python -m cap_ds.run.speed <this folder>` "
                "measures it against its dense self on the machine that will serve it and writes the figures here.\n")
    speed = json.loads(path.read_text())
    def ort(r: dict) -> str:
        return f"{r['onnxruntime_ms']:.2f}" if "onnxruntime_ms" in r else "-"

    rows = "".join(f"| {r['dtype']} | {r['batch']} x {r['seq_length']} | {r['dense_ms']:.2f} | {r['model_ms']:.2f} | "
                   f"**{r['speedup']:.2f}x** | {ort(r)} |\n" for r in speed.get("rows", []))
    return (f"Measured by `python -m cap_ds.run.speed` on {speed.get('device')} ({speed.get('date')}, torch "
            f"{speed.get('torch')}, {speed.get('statistic')}); dense: {speed.get('dense')}.\n\n"
            "| dtype | batch x tokens | dense ms | this model ms | speed-up | ONNX Runtime ms |\n"
            "|---|---|---|---|---|---|\n" + rows + _accuracy_lines(speed) + _fastest_lines(speed)
            + _host_memory_line(speed) + _fused_line(speed) + _kept_dense_lines(speed)
            + "\nThe raw figures (and each layer's format) are in `speed.json`.\n")


def _fused_line(speed: dict[str, Any]) -> str:
    """That the sparse rows ran with sparsify()'s fused kernels (cap_ds/sparse/fusion.py), where they did."""
    from cap_ds.sparse.fusion import describe

    what = next((describe(r["fused"]) for r in speed.get("rows", []) if r.get("fused")), "")
    if not what:
        return ""
    return (f"\nThis model's rows ran through `cap_ds.sparse.sparsify()`, which on the CPU runs each layer's sparse "
            f"attention block and FFN, with their residual adds and LayerNorms, as single kernel calls ({what}): "
            f"serve it through `sparsify()` to get them.\n")


def _kept_dense_lines(speed: dict[str, Any]) -> str:
    """Per dtype, the layers that ran dense kernels because every sparse path measured slower, with both times."""
    seen, parts = set(), []
    for r in speed.get("rows", []):
        kept = r.get("kept_dense")
        if not kept or r["dtype"] in seen:
            continue
        seen.add(r["dtype"])
        every = "all " if kept["layers"] == sum((r.get("formats") or {}).values()) else ""
        parts.append(f"{r['dtype']}: {every}{kept['layers']} layers kept dense, as their fastest sparse paths took "
                     f"{kept['sparse_ms']:.2f} ms against the dense kernels' {kept['dense_ms']:.2f} ms per forward at "
                     f"{kept['tokens']:,} tokens")
    if not parts:
        return ""
    return ("\nWhere this model ran dense kernels (sparsify measured them faster on that machine; the rows of that "
            "dtype then time the same computation twice): " + "; ".join(parts) + ".\n")


def _host_memory_line(speed: dict[str, Any]) -> str:
    """How the CPU figures were taken with respect to page faults (cap_ds/runtime/host_memory.py)."""
    if speed.get("host_memory") != "retained":
        return ""
    return ("\nCPU figures taken with freed memory kept in the process (`cap_ds.runtime.host_memory."
            "retain_freed_memory()`, dense and this model alike): serve it so too, or glibc's page faults add "
            "the same milliseconds to both and shrink the speed-up.\n")


def _accuracy_lines(speed: dict[str, Any]) -> str:
    """What each dtype does to accuracy, where speed.json measured it."""
    acc = speed.get("accuracy")
    if not acc:
        return ""
    parts = []
    for dtype in ("fp32", "bf16"):
        if dtype in acc:
            dense = f"dense kernels {acc[dtype]['dense']:.4f}, " if "dense" in acc[dtype] else ""
            parts.append(f"{dtype}: {dense}this model {acc[dtype]['model']:.4f}")
    return (f"\nAccuracy on `{Path(acc['file']).name}` ({acc['examples']} rows): " + "; ".join(parts) + ".\n")


def _fastest_lines(speed: dict[str, Any]) -> str:
    """The fastest way measured to serve the model on that machine, per batch size."""
    best = speed.get("fastest") or []
    if not best:
        return ""
    items = [f"batch {b['batch']}: {b['path']} ({b['ms']:.2f} ms"
             + (f", accuracy {b['accuracy']:.4f})" if "accuracy" in b else ")") for b in best]
    return "\nFastest measured on that machine: " + "; ".join(items) + ".\n"


def _usage(facts: CardFacts) -> str:
    if facts.task.is_qa:  # transformers 5 has no question-answering pipeline
        return ("```python\nfrom cap_ds.data.answer import QuestionAnswerer\nqa = QuestionAnswerer.from_pretrained"
                "(\"<this folder>\")\nqa(\"Which team won?\", \"The Denver Broncos won Super Bowl 50.\")\n```\n")
    pre = "import cap_ds  # registers the cleaned model classes\n" if facts.prune and facts.structured else ""
    return (f"```python\n{pre}from transformers import pipeline\nclassifier = pipeline(\"text-classification\", "
            "model=\"<this folder>\")\n```\n")


def _limitations(facts: CardFacts) -> str:
    if not facts.prune:
        return "- A dense model: fine-tuned, not pruned.\n"
    if facts.structured:
        return ("- Heads and FFN neurons are physically removed: the model is smaller and faster on any hardware, "
                "but loads only after `import cap_ds` (or with `trust_remote_code=True`).\n")
    return ("- Unstructured sparsity: the zeros sit inside dense weight matrices. The files are as large as the "
            "dense model's, and dense kernels (PyTorch eager, ONNX Runtime, any GPU) run it at the dense model's "
            "speed. `cap_ds.sparse.sparsify` runs it faster on CPUs where a sparse kernel beats the dense one "
            "(docs/sparse_inference.md); on GPUs unstructured 90 % is not faster (docs/inference.md).\n")


def facts_from_spec(spec, result: dict[str, Any], command: list[str] | None = None) -> CardFacts:
    """The card's facts for a ``cap_ds/train.py`` run (``result``: its metrics.json content)."""
    datasets, dataset = _dataset(spec)
    return CardFacts(
        title=spec.title(), task=spec.task, result=result, recipe=_recipe(spec, result), mode=spec.training.mode,
        pruning_method=spec.pruning.pruning_method if spec.prune else None,
        target_sparsity=spec.pruning.target_sparsity if spec.prune else None, structured=spec.structured,
        modules=tuple(spec.modules), base_model=_base_model(spec.model_path), datasets=tuple(datasets),
        dataset_entry=dataset, command=f"python cap_ds/train.py {shlex.join(command)}" if command else None)


def model_card(spec, result: dict[str, Any], folder: Path, command: list[str] | None = None,
               sparsity: dict[str, Any] | None = None) -> str:
    """The card's text for the export of a ``cap_ds/train.py`` run in ``folder``."""
    return card_text(facts_from_spec(spec, result, command), folder, sparsity)


def card_text(facts: CardFacts, folder: Path, sparsity: dict[str, Any] | None = None) -> str:
    """The card's text for the export in ``folder`` (``sparsity``: ``compression.sparsity_report``'s, for the
    per-layer-type table and the heat-map)."""
    result = facts.result
    meta = yaml.safe_dump(_front_matter(facts), sort_keys=False, allow_unicode=True)
    what = (f"{facts.task.kind.replace('_', ' ')} model for `{facts.task.name}`, "
            + (f"pruned to {result['sparsity']:.1%} sparsity with cap_ds ({facts.pruning_method}"
               + (f" + CAP {'/'.join(facts.modules)}" if facts.modules else "") + ")" if facts.prune
               else "fine-tuned with cap_ds (the dense teacher)"))
    parts = [f"---\n{meta}---\n", f"# {facts.title}\n", f"A {what}. cap_ds implements CAP (ContrAstive Pruning, Xu "
             f"et al., AAAI 2022, arXiv 2112.07198) with DeepSpeed.\n",
             "## Results\n", f"Evaluated on {result['eval_examples']} examples of the validation data: "
             f"**{_fmt(result['eval'])}**" + (f"; the teacher: {_fmt(result.get('teacher_eval'))}" if
                                               result.get("teacher_eval") else "") + ".\n",
             "## Recipe\n", _table(facts.recipe)]
    if sparsity is not None:
        by_type = layer_type_sparsity(sparsity["per_module"])
        parts += ["\nSparsity by layer type (all encoder layers):\n\n"
                  + _table([(k, f"{v:.2%}") for k, v in sorted(by_type.items())]),
                  "\n![Sparsity per layer and module](sparsity_heatmap.png)\n"]
    if facts.command:
        parts += ["## How it was made\n", f"```bash\n{facts.command}\n```\n"]
    parts += ["## Use\n", _usage(facts), "## Speed\n", speed_section(folder), "## Limitations\n", _limitations(facts)
              + f"- Measured on {result['eval_examples']} validation examples; small dev sets move by several "
                "points between seeds.\n"]
    return "\n".join(parts)
