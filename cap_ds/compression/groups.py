"""Which linears each ``different_groups`` entry touches, and which related layer pairs with which owner.

DeepSpeed paired the j-th module matched by ``modules[i]`` with the j-th match of each ``related_modules[i]``
regex, so ``"output.dense"`` (which also matches ``attention.output.dense``) silently paired the wrong layers.
Here each owner is paired with the related match whose shape fits (row: ``in_features == owner.out_features``;
head: ``out_features == owner.in_features``) and that shares the longest module-name prefix with it (same layer);
no match, or a tie, is an error naming the key. Every regex must match at least one linear; a module may belong to
one group per technique (overlap across techniques is allowed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from cap_ds.compression.config import (
    HEAD_PRUNING,
    SPARSE_PRUNING,
    CompressionConfig,
    CompressionConfigError,
    TechniqueConfig,
)


@dataclass
class Assignment:
    """One owner module of a technique's group, with the related modules whose input (row) or output (head) dim
    shrinks with it."""

    technique: str
    group: str
    name: str
    related: list[str] = field(default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    """The user model inside a DeepSpeed engine / DDP wrapper (DeepSpeed's library did the same)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def _fits(technique: str, owner: nn.Linear, cand: nn.Linear) -> bool:
    if technique == HEAD_PRUNING:
        return cand.out_features == owner.in_features
    return cand.in_features == owner.out_features


def _pair(technique: str, key: str, owner: str, linears: dict[str, nn.Linear], pattern: str) -> str:
    regex = re.compile(pattern)
    matches = [n for n in linears if regex.search(n) and n != owner]
    if not matches:
        raise CompressionConfigError(f"{key} {pattern!r} matches no linear layer of the model")
    fits = [n for n in matches if _fits(technique, linears[owner], linears[n])]
    dim = "out_features" if technique == HEAD_PRUNING else "in_features"
    want = linears[owner].in_features if technique == HEAD_PRUNING else linears[owner].out_features
    if not fits:
        raise CompressionConfigError(
            f"{key} {pattern!r}: no match has {dim} == {want} to pair with {owner!r} (matches: {matches[:4]}...)")
    best = max(_common_prefix(owner, n) for n in fits)
    winners = [n for n in fits if _common_prefix(owner, n) == best]
    if len(winners) > 1:
        raise CompressionConfigError(
            f"{key} {pattern!r} is ambiguous for {owner!r}: {winners} fit equally; use a narrower regex such as "
            r"'layer\.\d+\.output\.dense'")
    return winners[0]


def resolve_technique(model: nn.Module, tech: TechniqueConfig,
                      excluded: list[str] | None = None) -> list[Assignment]:
    """Owners (and related modules) of every group of one enabled technique; validates the regexes."""
    if not tech.enabled:
        return []
    linears = linear_modules(model)
    excluded_re = [re.compile(p) for p in excluded or []]
    owner_of: dict[str, str] = {}
    related_of: dict[str, str] = {}
    out: list[Assignment] = []
    for group in tech.groups:
        gk = f"{tech.key}.different_groups.{group.name}"
        for i, pattern in enumerate(group.modules):
            regex = re.compile(pattern)
            hits = [n for n in linears if regex.search(n) and not any(e.search(n) for e in excluded_re)]
            if not hits:
                raise CompressionConfigError(f"{gk}.modules[{i}] {pattern!r} matches no linear layer of the model"
                                             + (" (after excluded_modules)" if excluded_re else ""))
            for name in hits:
                if name in owner_of and owner_of[name] != group.name:
                    raise CompressionConfigError(
                        f"module {name!r} is matched by {tech.technique} groups {owner_of[name]!r} and "
                        f"{group.name!r}; each module may belong to one group per technique")
                if name in owner_of:
                    continue  # matched again by another regex of the same group: fine
                owner_of[name] = group.name
                related: list[str] = []
                if group.related_modules is not None:
                    for k, rpattern in enumerate(group.related_modules[i]):
                        rname = _pair(tech.technique, f"{gk}.related_modules[{i}][{k}]", name, linears, rpattern)
                        if rname in related_of:
                            raise CompressionConfigError(
                                f"{gk}.related_modules[{i}][{k}] {rpattern!r}: {rname!r} is already related to "
                                f"{related_of[rname]!r}; it cannot also follow {name!r}")
                        related_of[rname] = name
                        related.append(rname)
                out.append(Assignment(tech.technique, group.name, name, related))
    return out


def resolve(model: nn.Module, cfg: CompressionConfig) -> dict[str, list[Assignment]]:
    """Assignments of every enabled technique, keyed by technique name."""
    return {t.technique: resolve_technique(model, t, getattr(t, "excluded_modules", None)
                                           if t.technique == SPARSE_PRUNING else None)
            for t in cfg.techniques() if t.enabled}
