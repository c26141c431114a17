"""``redundancy_clean``: bake masks into weights and physically remove pruned heads and FFN neurons; export it.

Groups with ``related_modules`` shrink: a row group slices the owner's rows (+bias) and the related layers' input
columns (FFN neurons: ``intermediate.dense`` rows, ``output.dense`` columns); a head group slices the owner's input
columns per head and the related layers' output rows (+bias) (heads: attention output columns, Q/K/V rows).
Groups without related modules only bake zeros (DeepSpeed's behaviour). Parameters are gathered module by module
(collective under ZeRO-3: every rank calls), so a live ZeRO engine is never edited. BERT/RoBERTa models come back
as ``CapPruned*`` models whose config records per-layer head and FFN sizes, saved by ``save_clean_pretrained``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cap_ds.compression.compress import _set_submodule, stored_config
from cap_ds.compression.config import (
    HEAD_PRUNING,
    ROW_PRUNING,
    CompressionConfig,
    CompressionConfigError,
    as_compression_config,
)
from cap_ds.compression.groups import resolve, unwrap
from cap_ds.compression.layers import MaskedLinear, is_score_parameter
from cap_ds.compression.pruned_modeling import (
    AUTO_CLASSES,
    CapPrunedBertConfig,
    CapPrunedBertForQuestionAnswering,
    CapPrunedBertForSequenceClassification,
    CapPrunedBertModel,
    CapPrunedRobertaConfig,
    CapPrunedRobertaForQuestionAnswering,
    CapPrunedRobertaForSequenceClassification,
    CapPrunedRobertaModel,
)
from cap_ds.compression.zero import gathered, model_is_zero3, module_params
from cap_ds.runtime.atomic import atomic_dir
from cap_ds.runtime.collectives import barrier, rank

MODELING_FILE = "modeling_cap_pruned.py"
_PRUNED_FOR = {  # exact class -> (pruned class, config class, prefix of the encoder in parameter names)
    "BertModel": (CapPrunedBertModel, CapPrunedBertConfig, ""),
    "BertForSequenceClassification": (CapPrunedBertForSequenceClassification, CapPrunedBertConfig, "bert."),
    "RobertaModel": (CapPrunedRobertaModel, CapPrunedRobertaConfig, ""),
    "RobertaForSequenceClassification": (CapPrunedRobertaForSequenceClassification, CapPrunedRobertaConfig,
                                         "roberta."),
    "CapPrunedBertModel": (CapPrunedBertModel, CapPrunedBertConfig, ""),
    "CapPrunedBertForSequenceClassification": (CapPrunedBertForSequenceClassification, CapPrunedBertConfig, "bert."),
    "CapPrunedRobertaModel": (CapPrunedRobertaModel, CapPrunedRobertaConfig, ""),
    "CapPrunedRobertaForSequenceClassification": (CapPrunedRobertaForSequenceClassification,
                                                  CapPrunedRobertaConfig, "roberta."),
    "BertForQuestionAnswering": (CapPrunedBertForQuestionAnswering, CapPrunedBertConfig, "bert."),
    "RobertaForQuestionAnswering": (CapPrunedRobertaForQuestionAnswering, CapPrunedRobertaConfig, "roberta."),
    "CapPrunedBertForQuestionAnswering": (CapPrunedBertForQuestionAnswering, CapPrunedBertConfig, "bert."),
    "CapPrunedRobertaForQuestionAnswering": (CapPrunedRobertaForQuestionAnswering, CapPrunedRobertaConfig,
                                             "roberta."),
}
PRUNED_CLASSES = tuple({v[0] for v in _PRUNED_FOR.values()})


@torch.no_grad()
def _gather_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor | None]]]:
    """Full CPU state with masks baked in, and each MaskedLinear's row/head masks (collective under ZeRO-3)."""
    state: dict[str, torch.Tensor] = {}
    masks: dict[str, dict[str, torch.Tensor | None]] = {}
    for name, module in model.named_modules():
        params = module_params(module)
        if not params:
            continue
        prefix = f"{name}." if name else ""
        with gathered(params):
            for pname, p in module.named_parameters(recurse=False):
                if not is_score_parameter(pname):
                    state[prefix + pname] = p.detach().clone().cpu()
            if isinstance(module, MaskedLinear):
                state[prefix + "weight"] = module.masked_weight().detach().clone().cpu()
                if module.bias is not None:
                    state[prefix + "bias"] = module.masked_bias().detach().clone().cpu()
                row, head = module.row_mask(), module.head_mask()
                masks[name] = {"row": None if row is None else row.detach().float().cpu(),
                               "head": None if head is None else head.detach().float().cpu(),
                               "head_size": module.head_size}
    # Persistent buffers (never partitioned under ZeRO).
    for key, value in model.state_dict(keep_vars=True).items():
        if key not in state and not is_score_parameter(key):
            if isinstance(value, nn.Parameter):
                continue
            state[key] = value.detach().clone().cpu()
    return state, masks


def baked_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict with every mask baked into weights and biases, no score parameters.

    A collective under ZeRO-3 (call on every rank). Shapes are unchanged: this is the export for unstructured
    pruning, loadable into the original (vanilla transformers) architecture.
    """
    return _gather_state(unwrap(model))[0]


def has_structured_masks(model: nn.Module) -> bool:
    """Whether any row/head mask is active (the export then needs the cleaned, per-layer-sized model)."""
    return any(isinstance(m, MaskedLinear) and (m.row_method is not None or m.head_method is not None)
               for m in unwrap(model).modules())


def _slices(model: nn.Module, cfg: CompressionConfig, masks: dict[str, dict[str, Any]]
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Rows / input columns to keep per module, from groups that have related modules."""
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}

    def put(table: dict[str, torch.Tensor], name: str, idx: torch.Tensor, what: str) -> None:
        if name in table and not torch.equal(table[name], idx):
            raise CompressionConfigError(f"{name!r}: its {what} are sliced by two groups with different masks")
        table[name] = idx

    plan = resolve(model, cfg)
    for a in plan.get(ROW_PRUNING, []):
        row = masks.get(a.name, {}).get("row")
        if row is None or not a.related:
            continue
        idx = torch.nonzero(row).flatten()
        put(rows, a.name, idx, "output rows")
        for r in a.related:
            put(cols, r, idx, "input columns")
    for a in plan.get(HEAD_PRUNING, []):
        info = masks.get(a.name, {})
        if info.get("head") is None or not a.related:
            continue
        size = info["head_size"]
        heads = torch.nonzero(info["head"]).flatten()
        idx = (heads.unsqueeze(1) * size + torch.arange(size)).flatten()
        put(cols, a.name, idx, "input columns")
        for r in a.related:
            put(rows, r, idx, "output rows")
    return rows, cols


def _slice_state(state: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], cols: dict[str, torch.Tensor]) -> None:
    for name, idx in rows.items():
        state[f"{name}.weight"] = state[f"{name}.weight"].index_select(0, idx)
        if f"{name}.bias" in state:
            state[f"{name}.bias"] = state[f"{name}.bias"].index_select(0, idx)
    for name, idx in cols.items():
        state[f"{name}.weight"] = state[f"{name}.weight"].index_select(1, idx)


def _layer_sizes(state: dict[str, torch.Tensor], prefix: str, num_layers: int, head_size: int
                 ) -> tuple[list[int], list[int]]:
    heads, inter = [], []
    for i in range(num_layers):
        p = f"{prefix}encoder.layer.{i}."
        q, k, v = (state[f"{p}attention.self.{n}.weight"].shape[0] for n in ("query", "key", "value"))
        o_in = state[f"{p}attention.output.dense.weight"].shape[1]
        if not q == k == v == o_in or q % head_size:
            raise CompressionConfigError(
                f"layer {i}: Q/K/V rows ({q}, {k}, {v}) and attention output columns ({o_in}) do not describe whole "
                f"heads of size {head_size}; prune heads with head_pruning on attention.output.dense and "
                "related_modules [[self.query, self.key, self.value]]")
        n_in, n_out = state[f"{p}intermediate.dense.weight"].shape[0], state[f"{p}output.dense.weight"].shape[1]
        if n_in != n_out:
            raise CompressionConfigError(
                f"layer {i}: intermediate.dense keeps {n_in} rows but output.dense {n_out} columns; prune FFN "
                r"neurons with row_pruning on intermediate.dense and related_modules [['layer\.\d+\.output\.dense']]")
        heads.append(q // head_size)
        inter.append(n_in)
    return heads, inter


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def redundancy_clean(model: nn.Module, deepspeed_config: str | Path | dict[str, Any] | CompressionConfig | None = None,
                     mpu: Any = None) -> nn.Module:
    """Bake masks and slice pruned heads/neurons away; returns the smaller model.

    Signature of DeepSpeed's former ``redundancy_clean`` (``deepspeed_config`` defaults to the config
    ``init_compression`` applied). BERT/RoBERTa (base or sequence classification, also inside a DeepSpeed engine
    at any ZeRO stage): a new ``CapPruned*`` model with per-layer sizes; the input model is left untouched. Other
    models: sliced in place (plain, non-ZeRO-3 models only) and the caller patches any size fields of its config.
    """
    target = unwrap(model)
    if deepspeed_config is not None:
        cfg = as_compression_config(deepspeed_config)
    else:
        cfg = stored_config(target) or CompressionConfig()
    device, dtype = _device_dtype(target)
    state, masks = _gather_state(target)
    rows, cols = _slices(target, cfg, masks)
    _slice_state(state, rows, cols)

    spec = _PRUNED_FOR.get(type(target).__name__)
    if spec is not None:
        pruned_cls, config_cls, prefix = spec
        base = target.config
        head_size = base.hidden_size // base.num_attention_heads
        heads, inter = _layer_sizes(state, prefix, base.num_hidden_layers, head_size)
        values = base.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version", "layer_heads",
                    "layer_intermediate_sizes"):
            values.pop(key, None)
        config = config_cls(**values, layer_heads=heads, layer_intermediate_sizes=inter)
        config._attn_implementation = base._attn_implementation
        clean = pruned_cls(config)
        state = {k: v for k, v in state.items() if k in clean.state_dict()}
        clean.load_state_dict(state, strict=True)
        return clean.to(device=device, dtype=dtype).train(target.training)

    if model_is_zero3(target):
        raise CompressionConfigError(
            f"redundancy_clean of a ZeRO-3 {type(target).__name__}: only BERT/RoBERTa are rebuilt from gathered "
            "weights; clean a consolidated (non-ZeRO-3) copy of other models")
    for name, module in list(target.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if not isinstance(module, MaskedLinear) and name not in rows and name not in cols:
            continue
        weight = state[f"{name}.weight"]
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=module.weight.device,
                        dtype=module.weight.dtype)
        new.weight.copy_(weight)
        if module.bias is not None:
            new.bias.copy_(state[f"{name}.bias"])
        new.train(module.training)
        _set_submodule(target, name, new)
    return target


def parameter_counts(dense: nn.Module, clean: nn.Module) -> tuple[int, int]:
    """(parameters of the dense/masked model, of the cleaned model); mask scores are not model parameters."""
    def count(model: nn.Module) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for n, p in unwrap(model).named_parameters() if not is_score_parameter(n))

    return count(dense), count(clean)


def save_clean_pretrained(model: nn.Module, out_dir: str | Path, tokenizer: Any = None,
                          deepspeed_config: str | Path | dict[str, Any] | CompressionConfig | None = None,
                          extra_files: Callable[[Path], None] | None = None) -> Path:
    """Clean (unless already clean) and save a model that ``from_pretrained`` loads; returns the directory.

    ``import cap_ds.compression`` then ``AutoModelForSequenceClassification.from_pretrained(out_dir)`` loads it
    with no remote code; the modelling file is also written with an ``auto_map`` for ``trust_remote_code=True``
    users without cap_ds. Call on every rank under ZeRO-3 (gathering is collective); rank 0 writes, atomically.
    ``extra_files(tmp)`` (rank 0) may add files (e.g. a sparsity heat-map) inside the same atomic write.
    """
    target = unwrap(model)
    clean = target if isinstance(target, PRUNED_CLASSES) else redundancy_clean(target, deepspeed_config)
    if not isinstance(clean, PRUNED_CLASSES):
        raise CompressionConfigError(
            f"save_clean_pretrained supports BERT/RoBERTa (base or sequence classification), not {type(target).__name__}")
    out = Path(out_dir)
    if rank() == 0:
        config_cls = type(clean.config)
        module = Path(MODELING_FILE).stem
        clean.config.auto_map = {"AutoConfig": f"{module}.{config_cls.__name__}"}
        for auto_name, model_cls in AUTO_CLASSES[config_cls].items():
            clean.config.auto_map[auto_name] = f"{module}.{model_cls.__name__}"

        def write(tmp: Path) -> None:
            clean.save_pretrained(tmp, safe_serialization=True)
            shutil.copyfile(Path(__file__).with_name("pruned_modeling.py"), tmp / MODELING_FILE)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if extra_files is not None:
                extra_files(tmp)

        atomic_dir(out, write)
    barrier()
    return out
