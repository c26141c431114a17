"""What every fusion of ``cap_ds.sparse.fusion`` shares: the replaced method (:class:`Fusion`), its kernel
arguments prepared once per module tensors, the check that the CSR kernel can run a call, the activation and
LayerNorm arguments the kernels take."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from cap_ds.sparse import csr
from cap_ds.sparse.linear import SparseLinear

#: the kernel's activation codes (cap_ops.h)
ACT_NONE, ACT_GELU, ACT_RELU = 0, 1, 2
ACT_NAMES = {ACT_NONE: "none", ACT_GELU: "gelu", ACT_RELU: "relu"}


def activation_code(act: nn.Module) -> int | None:
    """The kernel's code for an activation module it computes (erf GELU, ReLU), else None."""
    try:
        from transformers.activations import GELUActivation
    except ImportError:  # transformers is optional for cap_ds.sparse
        GELUActivation = None  # noqa: N806
    if GELUActivation is not None and type(act) is GELUActivation:  # F.gelu or its Python erf form: one function
        return ACT_GELU
    if type(act) is nn.GELU and act.approximate == "none":
        return ACT_GELU
    if type(act) is nn.ReLU:
        return ACT_RELU
    return None


def layer_norm_args(norm: nn.Module, features: int) -> dict[str, object] | None:
    """The kernels' LayerNorm keywords (``ln_weight``, ``ln_bias``, ``ln_eps``) for a plain ``nn.LayerNorm`` over
    the last ``features`` (the kernel normalizes each token's outputs while they are in cache), else None (the
    module then runs after the kernel)."""
    if type(norm) is not nn.LayerNorm or tuple(norm.normalized_shape) != (features,):
        return None
    return {"ln_weight": norm.weight, "ln_bias": norm.bias, "ln_eps": float(norm.eps)}


def normalized(y: torch.Tensor, shape: torch.Size, norm: nn.Module, fused: bool) -> torch.Tensor:
    y = y.reshape(shape)
    return y if fused else norm(y)


def submodule(module: nn.Module | None, *path: str) -> nn.Module | None:
    """``module.a.b...`` through the ``_modules`` dicts, None where one is missing: no ``nn.Module.__getattr__``
    (about a microsecond each), as this runs several times per layer on every fused call."""
    for name in path:
        if module is None:
            return None
        module = module._modules.get(name)
    return module


def collecting() -> bool | None:
    """Whether HF's output capture (``output_hidden_states`` / ``output_attentions``) is collecting in this call;
    None where this transformers has no such collector."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    collected = _active_collector.get()
    return bool(collected) and any(k in collected for k in ("hidden_states", "attentions"))


def silent_hooks(module: nn.Module, collecting_now: bool | None) -> bool:
    """No hook on ``module`` would see a difference if its forward is not called: none at all, or only HF's
    output-capturing hooks (installed for good on the first ``output_hidden_states`` call) while nothing is
    collected."""
    if module._forward_pre_hooks:
        return False
    return all(collecting_now is False and "output_capturing_hook" in getattr(h, "__qualname__", "")
               for h in module._forward_hooks.values())


def unobserved(modules: tuple[nn.Module, ...]) -> bool:
    """A fused call may skip these modules' forwards: no global module hook, and no hook on any of them that
    would notice (:func:`silent_hooks`). A user's hook on a projection or a LayerNorm (feature capture, an
    observer) thus still sees every call: the block then runs unfused. One dict check per module per call."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return False
    hooked = [m for m in modules if m._forward_pre_hooks or m._forward_hooks]
    if not hooked:
        return True
    now = collecting()
    return all(silent_hooks(m, now) for m in hooked)


#: submodule assignments anywhere in this process so far (``module.x = ...``, ``add_module``): a fusion's prepared
#: arguments are rebuilt when this moved, so a replaced submodule is seen without walking the modules on every call
registrations = 0


def _count_registration(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    global registrations
    registrations += 1


torch_module.register_module_module_registration_hook(_count_registration)


def below(*modules: nn.Module | None) -> list[nn.Module]:
    """``modules`` and every module under them, through the ``_modules`` dicts (no generator per module: this runs
    on every fused call, to notice a replaced submodule)."""
    out, stack = [], [m for m in modules if m is not None]
    while stack:
        m = stack.pop()
        out.append(m)
        stack.extend(m._modules.values())
    return out


def csr_layers(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> bool:
    """Every layer is a SparseLinear in x's dtype that runs as csr for x's token count."""
    tokens = x.numel() // max(1, x.shape[-1])
    return all(isinstance(m, SparseLinear) and m.values.dtype == x.dtype and m.format_for(tokens) == "csr"
               for m in layers)


def csr_kernel(x: torch.Tensor, op: str, layers: tuple[nn.Module, ...], formats: dict | None = None):
    """The loaded op module when its ``op`` can run these CSR layers on x now (inference, CPU, their dtype and the
    csr format for this many tokens), else None. One op lookup per call: this runs on every forward.
    ``formats``: a cache of the layer checks by (token count, dtype), kept by the caller with the layers (its
    :meth:`Fusion.prepared` arguments, rebuilt with them)."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return None
    if formats is None:
        ok = csr_layers(x, layers)
    else:
        key = (x.numel() // max(1, x.shape[-1]), x.dtype)
        ok = formats.get(key)
        if ok is None:
            ok = formats[key] = csr_layers(x, layers)
    if not ok:
        return None
    module = csr.kernel_for(x)
    return module if hasattr(module, op) else None


class Fusion:
    """A fused replacement of one method (``method``) of one module instance; ``original`` is the method it
    replaced (the class's, or one the instance already had, which :meth:`remove` puts back)."""

    method = ""
    op = ""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.original: Callable = getattr(module, self.method)  # bound method (deepcopy re-binds it) or callable
        self.own = self.method in module.__dict__
        try:  # HF's apply_chunking_to_forward inspects feed_forward_chunk's signature on every call: answer at once
            self.__signature__ = inspect.signature(self.original)
        except (TypeError, ValueError):
            pass

    def output_of(self, result):
        """The tensor of a call's result that the probe compares."""
        return result

    def layers(self) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    def norm(self) -> nn.Module | None:
        """The normalization after the fused block, if any."""
        return None

    def norms(self) -> tuple[nn.Module, ...]:
        """The normalizations the fused call runs (their parameters are part of the kernel's arguments)."""
        norm = self.norm()
        return () if norm is None else (norm,)

    def skipped(self) -> list[nn.Module]:
        """The modules whose forward a fused call does not call (their hooks would not run): here every module
        below the fused one, whose own hooks still run."""
        return below(self.module)[1:]

    def prepare(self) -> SimpleNamespace:
        """The kernel's arguments that depend only on the modules' tensors (subclasses add to it). ``same_tree``:
        the skipped modules are of the types the probe checked (the first prepare is the probe's), so a module
        replaced by another kind (an activation, an attention) is never computed as the old one."""
        skipped = tuple(self.skipped())
        types = tuple(map(type, skipped))
        if self.__dict__.get("probed_types") is None:
            self.probed_types = types
        return SimpleNamespace(formats={}, layers=self.layers(), skipped=skipped, same_tree=types == self.probed_types)

    def free(self, p: SimpleNamespace) -> bool:
        """Nothing stops a fused call on ``p`` (its :meth:`prepared` arguments) but the kernel's own conditions:
        the probed tree, and no hook that would notice (:func:`unobserved`)."""
        return p.same_tree and unobserved(p.skipped)

    def prepared(self) -> SimpleNamespace:
        """:meth:`prepare`'s arguments, built again when a module was assigned anywhere since (a replaced
        submodule: :data:`registrations`) or a layer or the norm has other tensors than last time (``to()``): a
        fused call costs one tuple comparison, not rebuilding them on every forward (at batch 1 that Python was a
        tenth of the model's time)."""
        cached = self.__dict__.get("_prepared")
        layers, norms = cached[3] if cached is not None and cached[0] == registrations else (self.layers(), self.norms())
        items = []
        for m in layers:
            if m is not None:
                items.extend(m._buffers.values())
        for m in norms:
            if m is not None:
                items.extend(m._parameters.values())
        key = tuple(map(id, items))  # the items are kept with the key, so no id is reused while it is cached
        if cached is None or cached[0] != registrations or cached[1] != key:
            cached = self._prepared = (registrations, key, self.prepare(), (layers, norms), items)
        return cached[2]

    def install(self) -> None:
        setattr(self.module, self.method, self)

    def remove(self) -> None:
        if self.own:
            self.module.__dict__[self.method] = self.original
        else:
            del self.module.__dict__[self.method]
