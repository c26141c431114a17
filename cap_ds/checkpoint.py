"""Resumable checkpoints: DeepSpeed's own (model, optimizer, LR schedule) plus all CAP state per rank.

Layout: ``<output_dir>/checkpoints/<tag>/`` holds DeepSpeed's files, ``cap_state_rank<r>.pt`` (bank shards,
cached teacher logits, pruning-scheduler step, the extra-negative generator, loop position, timing, RNG states),
``run_config.json`` (the flags and DeepSpeed config of the run) and, written last, ``checkpoint_complete.json``:
the size of every file of the checkpoint. ``checkpoints/latest`` names the newest complete tag and is replaced
atomically after that, so a kill at any moment leaves the previous checkpoint usable. Resuming takes the newest
checkpoint whose files are all there at their recorded sizes; an incomplete or truncated one is named and skipped
with a warning. A checkpoint is only ever deleted once a newer one of the same run is complete.

Every file is loaded with ``torch.load(weights_only=True)``, DeepSpeed's included (its checkpoint engine is
replaced by :class:`SafeCheckpointEngine`), with only DeepSpeed's own plain-data classes allow-listed: a file that
would run code when unpickled is refused with an error naming it. Files get the umask modes of the exports.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_file, publish_modes, write_json
from .collectives import barrier

logger = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "checkpoint_complete.json"
RUN_CONFIG = "run_config.json"
STATE_FILE = "cap_state_rank{rank}.pt"
_STEP_TAG = re.compile(r"^step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, corrupt, or refused as unsafe); names the file."""


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (the run's one global seed; loaders and samplers have their own)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# ------------------------------------------------------------------------------------------------ safe loading
def _safe_globals() -> list:
    """DeepSpeed's plain-data classes that appear in its checkpoints (ZeRO stage enum, loss scaler state, tensor
    fragment addresses): constructed from data only, they run no code of the file's choosing."""
    out = []
    for module, name in (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            out.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return out


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's data classes allowed; a clear error naming the file."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        code = next((ln for ln in lines if "GLOBAL" in ln), None)
        if code is not None:
            raise CheckpointError(f"checkpoint file {path} refused: loading it would call Python code ({code}); "
                                  "cap_ds loads checkpoints only with torch.load(weights_only=True). Was it written "
                                  "by another program, or tampered with?") from None
        detail = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else type(err).__name__)
        raise CheckpointError(f"checkpoint file {path} is corrupt or not a PyTorch checkpoint ({detail}); delete "
                              "its checkpoint folder to resume from an older one") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({first}); delete its checkpoint "
                              "folder to resume from an older one") from None


def make_safe_checkpoint_engine(config_params=None):
    """DeepSpeed's torch checkpoint engine with :func:`safe_load` (DeepSpeed's own loads with weights_only=False)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    return SafeCheckpointEngine(config_params)


def install_safe_loading(engine) -> None:
    """Make every checkpoint load of ``engine`` go through :func:`safe_load`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if current is None or type(current) is TorchCheckpointEngine:
        engine.checkpoint_engine = make_safe_checkpoint_engine(getattr(engine, "_config", None))
    else:  # another engine (decoupled, fast): keep its saving, replace its loading
        current.load = lambda path, map_location=None: safe_load(path, map_location=map_location)


# ------------------------------------------------------------------------------------------------ finding tags
def step_of(tag: str) -> int | None:
    m = _STEP_TAG.match(tag)
    return int(m.group(1)) if m else None


def list_tags(root: str | os.PathLike) -> list[str]:
    """Checkpoint folders under ``root`` (``<output_dir>/checkpoints``), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(tags, key=lambda t: (step_of(t) is None, step_of(t) or 0, t))


def read_latest(root: str | os.PathLike) -> str | None:
    path = Path(root) / LATEST
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def check_complete(root: str | os.PathLike, tag: str) -> str | None:
    """None when checkpoint ``tag`` is complete, else what is wrong with it (naming the file)."""
    folder = Path(root) / tag
    if not folder.is_dir():
        return f"{folder} does not exist"
    manifest = folder / MANIFEST
    if not manifest.is_file():
        # Written before cap_ds recorded completeness: `latest` was only ever moved to a complete checkpoint, but
        # a file may have gone since (a cleanup, a copy that left the large files behind), so the two files every
        # checkpoint has must still be there.
        if read_latest(root) == tag:
            if not (folder / STATE_FILE.format(rank=0)).is_file():
                return f"{folder / STATE_FILE.format(rank=0)} is missing"
            if not any(folder.glob("*model_states.pt")):
                return f"{folder} has no DeepSpeed *model_states.pt file"
            return None
        return f"{folder} has no {MANIFEST} (its writing was interrupted)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest} is unreadable ({err})"
    for rel, size in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path} is truncated or changed ({actual} bytes, {size} written)"
    return None


def find_resume_tag(root: str | os.PathLike) -> tuple[str | None, list[tuple[str, str]]]:
    """The checkpoint ``--resume auto`` continues from: the one ``latest`` names if complete, else the newest
    complete one. Returns it (None: no usable checkpoint) and the newer ``(tag, problem)`` pairs skipped."""
    root = Path(root)
    tags = list_tags(root)
    latest = read_latest(root)
    order = sorted(tags, key=lambda t: step_of(t) if step_of(t) is not None else -1, reverse=True)
    if latest is not None:
        order = [latest] + [t for t in order if t != latest]
    skipped = []
    for tag in order:
        problem = check_complete(root, tag)
        if problem is None:
            return tag, skipped
        skipped.append((tag, problem))
    return None, skipped


def resolve_resume(root: str | os.PathLike, resume: str) -> tuple[str | None, list[tuple[str, str]]]:
    """``--resume`` (none, auto or a tag) -> the tag to load and the skipped ones; CheckpointError if unusable."""
    if resume == "none":
        return None, []
    if resume == "auto":
        return find_resume_tag(root)
    tags = list_tags(root)
    if resume not in tags:
        available = ", ".join(tags) if tags else "none"
        raise CheckpointError(f"--resume {resume}: no such checkpoint in {root}; available: {available} "
                              "(or --resume auto for the newest complete one)")
    problem = check_complete(root, resume)
    if problem is not None:
        raise CheckpointError(f"--resume {resume}: checkpoint is incomplete: {problem}")
    return resume, []


def read_run_config(root: str | os.PathLike, tag: str) -> dict[str, Any] | None:
    path = Path(root) / tag / RUN_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt ({err})") from None


# ------------------------------------------------------------------------------------------------ the run's checkpoints
class Checkpointer:
    """Saves/loads checkpoints of one run; every method is a collective (all ranks call it)."""

    def __init__(self, output_dir: str | os.PathLike, engine, rank: int = 0, keep: int = 2,
                 run_config: dict[str, Any] | None = None) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.engine = engine
        self.rank = rank
        self.keep = keep
        self.run_config = run_config
        if engine is not None:
            install_safe_loading(engine)

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint (see :func:`find_resume_tag`)."""
        return find_resume_tag(self.root)[0]

    def save(self, tag: str, cap_state: dict[str, Any]) -> Path:
        folder = self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            # Rewriting a tag (a run resumed from an older checkpoint supersedes the newer ones): it stops
            # counting as complete before any of its files changes.
            (folder / MANIFEST).unlink(missing_ok=True)
        barrier()
        self.engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        atomic_file(folder / STATE_FILE.format(rank=self.rank), lambda tmp: torch.save(cap_state, tmp))
        barrier()
        if self.rank == 0:
            if self.run_config is not None:
                write_json(folder / RUN_CONFIG, self.run_config)
            publish_modes(folder)
            files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
                     if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
            write_json(folder / MANIFEST, {"tag": tag, "step": step_of(tag), "files": files})
            atomic_file(self.root / LATEST, lambda tmp: Path(tmp).write_text(tag))
            self._prune(tag)
        barrier()
        return folder

    def _prune(self, current: str) -> None:
        """Delete older checkpoints beyond ``keep``; never one newer than ``current`` (not superseded)."""
        if self.keep <= 0 or step_of(current) is None:
            return
        older = [t for t in list_tags(self.root) if step_of(t) is not None and step_of(t) < step_of(current)]
        complete = [t for t in older if check_complete(self.root, t) is None]
        kept = set(complete[len(complete) - (self.keep - 1):]) if self.keep > 1 else set()
        for tag in older:
            if tag not in kept:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    def load(self, tag: str) -> dict[str, Any]:
        path = self.root / tag
        problem = check_complete(self.root, tag)
        if problem is not None:
            raise CheckpointError(f"checkpoint {tag} is incomplete: {problem}")
        state_file = path / STATE_FILE.format(rank=self.rank)
        if not state_file.is_file():
            raise CheckpointError(f"checkpoint {path} has no {state_file.name}: was it written with another world "
                                  "size? resume with the same number of ranks")
        load_path, _ = self.engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path} (see its warning above)")
        state = safe_load(state_file)
        if self.rank == 0:
            logger.info("resumed from %s at step %d", tag, state["global_step"])
        return state
