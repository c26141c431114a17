"""Resumable checkpoints: DeepSpeed's own (model, optimizer, LR schedule) plus all CAP state per rank.

Layout: ``<output_dir>/checkpoints/<tag>/`` holds DeepSpeed's files and ``cap_state_rank<r>.pt`` (bank shards,
cached teacher logits, pruning-scheduler step, the extra-negative generator, loop position, RNG states);
``checkpoints/latest`` names the newest complete tag and is replaced atomically only after every rank has
written, so a kill at any moment leaves the previous checkpoint usable. CAP state loads with
``torch.load(weights_only=True)`` (tensors, numbers, strings, lists and dicts only).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves/loads checkpoints of one run; every method is a collective (all ranks call it)."""

    def __init__(self, output_dir: str | os.PathLike, engine, rank: int = 0, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.engine = engine
        self.rank = rank
        self.keep = keep

    def latest_tag(self) -> str | None:
        path = self.root / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        return tag if (self.root / tag).is_dir() else None

    def save(self, tag: str, cap_state: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        _barrier()
        self.engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        target = self.root / tag / f"cap_state_rank{self.rank}.pt"
        fd, tmp = tempfile.mkstemp(prefix=".cap_state.", dir=target.parent)
        os.close(fd)
        torch.save(cap_state, tmp)
        os.replace(tmp, target)
        _barrier()
        if self.rank == 0:
            fd, tmp = tempfile.mkstemp(prefix=".latest.", dir=self.root)
            with os.fdopen(fd, "w") as f:
                f.write(tag)
            os.replace(tmp, self.root / LATEST)
            self._prune(tag)
        _barrier()
        return self.root / tag

    def _prune(self, current: str) -> None:
        tags = sorted((p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step")),
                      key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
        for old in tags[: -self.keep] if self.keep > 0 else []:
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, tag: str) -> dict[str, Any]:
        path = self.root / tag
        state_file = path / f"cap_state_rank{self.rank}.pt"
        if not state_file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {state_file.name}: was it written with another "
                                    "world size? resume with the same number of ranks")
        load_path, _ = self.engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        return torch.load(state_file, map_location="cpu", weights_only=True)
