"""Resumable checkpoints: DeepSpeed's own (model, optimizer, LR schedule) plus all CAP state per rank.

Layout: ``<output_dir>/checkpoints/<tag>/`` holds DeepSpeed's files, ``cap_state_rank<r>.pt`` (bank shards,
cached teacher logits, pruning-scheduler step, the extra-negative generator, loop position, timing, RNG states),
``run_config.json`` (the flags and DeepSpeed config of the run) and, written last, ``checkpoint_complete.json``:
the size and CRC-32 checksum (:mod:`cap_ds.runtime.manifest`) of every file of the checkpoint. Each rank hashes the files
it wrote (DeepSpeed's, through its checkpoint engine, and its CAP state) right after writing them and leaves them in
a hidden per-rank file; after a barrier rank 0 merges those, hashes its own late files (``run_config.json``) and
writes the manifest. ``checkpoints/latest`` names the newest complete tag and is replaced atomically after that, so
a kill at any moment leaves the previous checkpoint usable. Resuming takes the newest checkpoint whose files are all
there at their recorded sizes and checksums; an incomplete, truncated or corrupt one (bytes changed at the same
size) is named and skipped with a warning, and an explicit ``--resume <tag>`` of one is refused. A manifest without
checksums (an older cap_ds) is checked by sizes only. A checkpoint is only ever deleted once a newer one of the same
run is complete.

Every file is loaded with ``torch.load(weights_only=True)``, DeepSpeed's included (its checkpoint engine is
replaced by :class:`SafeCheckpointEngine`), with only DeepSpeed's own plain-data classes allow-listed: a file that
would run code when unpickled is refused with an error naming it. Files get the umask modes of the exports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from cap_ds.runtime import manifest as fm
from cap_ds.runtime.atomic import atomic_file, publish_modes, write_json
from cap_ds.runtime.collectives import barrier
from cap_ds.runtime.errors import UserError

logger = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "checkpoint_complete.json"
RUN_CONFIG = "run_config.json"
STATE_FILE = "cap_state_rank{rank}.pt"
RANK_SUMS = ".checksums_rank{rank}.json"  # hidden: what one rank wrote and its checksums, merged by rank 0
_STEP_TAG = re.compile(r"^step(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, corrupt, or refused as unsafe); names the file."""


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


def _inspect(root: str | os.PathLike, tag: str) -> tuple[str, str] | None:
    """None when checkpoint ``tag`` is usable, else ``("incomplete" | "corrupt", what is wrong, naming the file)``."""
    folder = Path(root) / tag
    if not folder.is_dir():
        return "incomplete", f"{folder} does not exist"
    manifest = folder / MANIFEST
    if not manifest.is_file():
        # Written before cap_ds recorded completeness: `latest` was only ever moved to a complete checkpoint, but
        # a file may have gone since (a cleanup, a copy that left the large files behind), so the two files every
        # checkpoint has must still be there.
        if read_latest(root) == tag:
            if not (folder / STATE_FILE.format(rank=0)).is_file():
                return "incomplete", f"{folder / STATE_FILE.format(rank=0)} is missing"
            if not any(folder.glob("*model_states.pt")):
                return "incomplete", f"{folder} has no DeepSpeed *model_states.pt file"
            return None
        return "incomplete", f"{folder} has no {MANIFEST} (its writing was interrupted)"
    try:
        data = json.loads(manifest.read_text())
        files, sums = data["files"], data.get("checksums")
        if not isinstance(files, dict) or not isinstance(sums, dict | None):
            raise TypeError("files/checksums are not objects")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return "incomplete", f"{manifest} is unreadable ({err})"
    # sizes of every file first (a truncated file is not read), then checksums when the manifest has them (a
    # manifest of an older cap_ds has sizes only); digests are cached per process, so the verification at preflight
    # and the one before loading read each file once
    problems = fm.file_problems(folder, files, sums)
    if not problems:
        return None
    kind, text = problems[0]
    return ("corrupt" if kind == "checksum" else "incomplete"), text


def check_complete(root: str | os.PathLike, tag: str) -> str | None:
    """None when checkpoint ``tag`` is complete and intact, else what is wrong with it (naming the file): missing
    or truncated files, or (manifests with checksums) a file whose checksum differs."""
    found = _inspect(root, tag)
    return None if found is None else found[1]


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
    found = _inspect(root, resume)
    if found is not None:
        kind, problem = found
        hint = "; use --resume auto for the newest intact checkpoint" if kind == "corrupt" else ""
        raise CheckpointError(f"--resume {resume}: checkpoint is {kind}: {problem}{hint}")
    return resume, []


def read_run_config(root: str | os.PathLike, tag: str) -> dict[str, Any] | None:
    path = Path(root) / tag / RUN_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt ({err})") from None


# ------------------------------------------------------------------------------------------------ checksums
@contextlib.contextmanager
def _recording_saves(engine):
    """Collect the paths DeepSpeed's checkpoint engine writes on this rank (its model and optimizer states)."""
    written: list[str] = []
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        yield written
        return
    had_own = "save" in vars(ce)
    original = ce.save

    def save(state_dict, path, *args, **kwargs):
        out = original(state_dict, path, *args, **kwargs)
        written.append(str(path))
        return out

    ce.save = save
    try:
        yield written
    finally:
        if had_own:
            ce.save = original
        else:
            del ce.save


def _relative(folder: Path, paths: list) -> list[str]:
    out = []
    for p in paths:
        try:
            rel = Path(p).resolve().relative_to(folder.resolve())
        except ValueError:  # written elsewhere (not part of this checkpoint folder)
            continue
        if str(rel) not in out:
            out.append(str(rel))
    return out


def describe_rank_files(folder: str | os.PathLike, names: list[str]) -> dict[str, Any]:
    """The sizes and checksums of the files one rank wrote into checkpoint ``folder`` (complete, on disk). A file
    an asynchronous checkpoint engine has not finished yet is left to rank 0's manifest pass."""
    folder = Path(folder)
    present = [rel for rel in names if (folder / rel).is_file()]
    sizes, sums = fm.describe_files(folder, present)
    return {"files": sizes, "checksums": sums}


def write_manifest(folder: str | os.PathLike, tag: str) -> dict[str, Any]:
    """Rank 0, after every rank wrote its files and their checksums: the completion marker, written atomically and
    last, with the size and checksum of every file of the checkpoint. Checksums come from the rank that wrote the
    file (``.checksums_rank<r>.json``, removed once merged) while its size is unchanged; any other file (rank 0's
    ``run_config.json``, DeepSpeed's copied scripts) is hashed here."""
    folder = Path(folder)
    known: dict[str, str] = {}
    rank_files = sorted(folder.glob(RANK_SUMS.format(rank="*")))
    for path in rank_files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path} (a rank's checksums) is unreadable ({err})") from None
        sizes = data.get("files", {})
        for rel, digest in data.get("checksums", {}).items():
            if (folder / rel).is_file() and (folder / rel).stat().st_size == sizes.get(rel):
                known[rel] = digest
    sizes, sums = fm.describe_files(folder, fm.folder_files(folder, exclude=(MANIFEST,)), known)
    manifest = {"tag": tag, "step": step_of(tag), "files": sizes, "checksums": sums}
    write_json(folder / MANIFEST, manifest)
    for path in rank_files:
        path.unlink(missing_ok=True)
    return manifest


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
        with _recording_saves(self.engine) as written:
            self.engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        state_file = atomic_file(folder / STATE_FILE.format(rank=self.rank), lambda tmp: torch.save(cap_state, tmp))
        # this rank's files, hashed while they are in its page cache (a shared filesystem: the other ranks' files
        # are not read again by rank 0)
        mine = _relative(folder, [*written, state_file])
        write_json(folder / RANK_SUMS.format(rank=self.rank), describe_rank_files(folder, mine))
        barrier()
        if self.rank == 0:
            if self.run_config is not None:
                write_json(folder / RUN_CONFIG, self.run_config)
            publish_modes(folder)
            write_manifest(folder, tag)
            atomic_file(self.root / LATEST, lambda tmp: Path(tmp).write_text(tag))
            self._prune(tag)
        barrier()
        return folder

    def _prune(self, current: str) -> None:
        """Delete older checkpoints beyond ``keep``; never one newer than ``current`` (not superseded)."""
        if self.keep <= 0 or step_of(current) is None:
            return
        older = [t for t in list_tags(self.root) if step_of(t) is not None and step_of(t) < step_of(current)]
        kept: set[str] = set()
        for tag in reversed(older):  # the newest keep-1 complete ones, verified newest first (no more than needed)
            if len(kept) >= self.keep - 1:
                break
            if check_complete(self.root, tag) is None:
                kept.add(tag)
        for tag in older:
            if tag not in kept:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    def load(self, tag: str) -> dict[str, Any]:
        path = self.root / tag
        found = _inspect(self.root, tag)  # verified at preflight already: cached digests, no second read
        if found is not None:
            raise CheckpointError(f"checkpoint {tag} is {found[0]}: {found[1]}")
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
