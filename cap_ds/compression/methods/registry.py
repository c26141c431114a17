"""The one place that maps method names to method objects. Everything else (CLI choices, config validation,
layers) asks here, so adding a method is a module plus one entry in :data:`BUILTIN_METHODS` (or a
:func:`register_method` call from user code).

Spellings: the canonical name (``magnitude``), and DeepSpeed's schema name where it has one (``l1`` for magnitude,
``topk`` for movement). Row and head pruning keep DeepSpeed's schema: they accept only its spelling (``l1``,
``topk``, ``first_order``).
"""

from __future__ import annotations

from cap_ds.compression.methods.base import KINDS, SPARSE, UNITS, PruningMethod
from cap_ds.compression.methods.first_order import FirstOrder
from cap_ds.compression.methods.magnitude import Magnitude
from cap_ds.compression.methods.movement import Movement
from cap_ds.compression.methods.soft_movement import SoftMovement
from cap_ds.runtime.errors import UserError

_METHODS: dict[str, PruningMethod] = {}  # canonical name -> method, in registration order
_KIND_LABELS = {None: "pruning", SPARSE: "sparse pruning", UNITS: "row/head pruning"}


class UnknownMethodError(UserError, ValueError):
    """A method name the registry does not know (for that kind of mask); the message lists the allowed ones."""


def register_method(method: PruningMethod | type[PruningMethod]) -> PruningMethod:
    """Register ``method`` (a class is instantiated) under its spellings; returns the registered object.

    A spelling already taken by another method is an error; registering a class of the same module and name
    again (a reloaded module) replaces the old object."""
    obj = method() if isinstance(method, type) else method
    if not isinstance(obj, PruningMethod) or not obj.name:
        raise TypeError(f"register_method needs a named PruningMethod, got {method!r}")
    if not obj.kinds or not obj.kinds <= set(KINDS):
        raise ValueError(f"pruning method {obj.name!r}: kinds must be a non-empty subset of {KINDS}")
    old = _METHODS.get(obj.name)
    if old is not None and _qualified(old) != _qualified(obj):
        raise ValueError(f"pruning method {obj.name!r} is already registered ({_qualified(old)})")
    for other in _METHODS.values():
        clash = set(other.spellings + (other.unit_name,)) & set(obj.spellings + (obj.unit_name,))
        if other.name != obj.name and clash:
            raise ValueError(f"pruning method {obj.name!r}: name(s) {sorted(clash)} already mean {other.name!r}")
    _METHODS[obj.name] = obj
    return obj


def unregister_method(name: str) -> PruningMethod:
    """Remove a method registered under canonical ``name`` (user code replacing or retiring one); returns it."""
    return _METHODS.pop(get_method(name).name)


def _qualified(method: PruningMethod) -> str:
    return f"{type(method).__module__}.{type(method).__qualname__}"


def _accepts(method: PruningMethod, kind: str | None) -> tuple[str, ...]:
    """The spellings under which ``method`` may be asked for ``kind`` (none if it cannot mask that kind)."""
    if kind is None:
        return method.spellings
    if kind not in method.kinds:
        return ()
    return (method.unit_name,) if kind == UNITS else method.spellings


def registered_methods(kind: str | None = None) -> tuple[PruningMethod, ...]:
    """The registered methods (that can mask ``kind``), in registration order."""
    if kind not in _KIND_LABELS:
        raise ValueError(f"unknown mask kind {kind!r}; allowed: {', '.join(KINDS)}")
    return tuple(m for m in _METHODS.values() if kind is None or kind in m.kinds)


def method_names(kind: str | None = None, aliases: bool = False) -> tuple[str, ...]:
    """Registered names, in registration order: canonical ones of every method (``kind`` None) or of those that
    mask ``kind``; ``aliases`` adds DeepSpeed's spellings after them. Row/head pruning (UNITS) names a method
    only by its schema spelling."""
    names = [_accepts(m, kind) for m in registered_methods(kind)]
    first = [n[0] for n in names]
    return tuple(first + [a for n in names for a in n[1:]]) if aliases else tuple(first)


def find_method(name: object, kind: str | None = None) -> PruningMethod | None:
    """The method ``name`` (any spelling, or a method object) stands for, if it may mask ``kind``; else None."""
    if isinstance(name, PruningMethod):
        return name if kind is None or kind in name.kinds else None
    if not isinstance(name, str):
        return None
    return next((m for m in _METHODS.values() if name in _accepts(m, kind)), None)


def get_method(name: str | PruningMethod, kind: str | None = None) -> PruningMethod:
    """The method ``name`` stands for; :class:`UnknownMethodError` (one line, naming the allowed ones) if none."""
    method = find_method(name, kind)
    if method is None:
        allowed = ", ".join(method_names(kind, aliases=True))
        raise UnknownMethodError(f"unknown {_KIND_LABELS[kind]} method {name!r}; allowed: {allowed}")
    return method


# The built-in methods, in the order the CLI lists them. A new method: its module, and one entry here.
BUILTIN_METHODS = (Magnitude, Movement, SoftMovement, FirstOrder)
for _method in BUILTIN_METHODS:
    register_method(_method)
