"""Forward passes over a whole dataset that take no optimizer step: bank fills (FiC, PrC), SnC snapshots, the
cached teacher logits, and evaluation. Each places its outputs by the examples' global ``idx``, checks for a
stop request at every batch (the same batch on every rank), and leaves the model's train/eval mode as it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cap_ds.cap import MemoryBank, Shard, ShardSampler, encode_dataset
from cap_ds.data.batches import model_inputs
from cap_ds.data.models import SentenceVectorHook
from cap_ds.data.scoring import Scorer
from cap_ds.runtime.collectives import all_gather_cat
from cap_ds.runtime.errors import TrainingFailed, UserError
from cap_ds.runtime.monitor import RunLog
from cap_ds.runtime.outputs import output_logits
from cap_ds.runtime.rng import rng_state, set_rng_state
from cap_ds.runtime.signals import StopRequested, StopSignals
from cap_ds.runtime.transfer import to_device
from cap_ds.training.teachers import teacher_engine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoder:
    """Runs passes over this rank's training rows (``loader``: in order, restricted to the shard's pool)."""

    loader: DataLoader
    num_train: int
    shard: Shard
    device: torch.device
    stop: StopSignals
    show_progress: bool = False
    report: bool = False

    def run(self, encode_batch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
            desc: str) -> dict[str, torch.Tensor]:
        return encode_dataset(encode_batch, self.loader, self.num_train, desc=desc, show_progress=self.show_progress,
                              shard=self.shard, check=self.stop.pass_check(len(self.loader), self.device),
                              report=self.report)

    def vectors(self, model: torch.nn.Module, hook: SentenceVectorHook, *, train_mode: bool,
                with_logits: bool = False, desc: str = "encode") -> dict[str, torch.Tensor]:
        """Normalised sentence vectors (and logits) of every row, in ``train_mode`` (dropout) or eval mode."""
        was_training = model.training
        model.train(train_mode)

        def encode_batch(batch):
            batch = to_device(batch, self.device)
            logits = output_logits(model(**model_inputs(batch)))
            out = {"vectors": F.normalize(hook.vector.float(), dim=-1)}
            if with_logits:
                out["logits"] = logits.float()
            return out

        try:
            return self.run(encode_batch, desc)
        finally:
            model.train(was_training)

    def logits(self, model: torch.nn.Module, desc: str = "teacher logits") -> torch.Tensor:
        """Logits of every row (the cached KD targets without FiC): one forward pass."""
        def encode_batch(batch):
            batch = to_device(batch, self.device)
            return {"logits": output_logits(model(**model_inputs(batch))).float()}

        return self.run(encode_batch, desc)["logits"]


@dataclass(frozen=True)
class Snapshots:
    """SnC: the current student encoded as a new bank column; the time it takes goes to ``log.snapshot_time``."""

    encoder: Encoder
    bank: MemoryBank
    model: torch.nn.Module
    hook: SentenceVectorHook
    log: RunLog

    def take(self, train_mode: bool) -> None:
        """Append a column, encoded in ``train_mode`` (dropout on) or eval mode. A stop request aborts it with the
        RNG (dropout) as before it started, so the checkpoint written next retakes exactly this snapshot."""
        t0 = time.perf_counter()
        rng = rng_state()
        try:
            vecs = self.encoder.vectors(self.model, self.hook, train_mode=train_mode,
                                        desc=f"SnC snapshot {self.bank.num_columns + 1}")["vectors"]
        except StopRequested:
            set_rng_state(rng)
            raise
        self.bank.add_column(vecs)
        self.log.snapshot_time += time.perf_counter() - t0
        logger.info("SnC snapshot %d taken", self.bank.num_columns)


def fill_teacher_outputs(encoder: Encoder, teacher: torch.nn.Module, banks: dict[str, MemoryBank],
                         sentence_vector: str, cache_logits: bool) -> torch.Tensor | None:
    """The teacher's pass: FiC vectors (with the logits, in the same forward) or, with ``cache_logits``, the
    logits alone. Returns the logits (None when there is nothing to cache)."""
    if "fic" in banks:
        hook = SentenceVectorHook(teacher.module, sentence_vector)
        out = encoder.vectors(teacher, hook, train_mode=False, with_logits=True, desc="FiC bank")
        banks["fic"].add_column(out["vectors"])
        hook.remove()
        return out["logits"]
    return encoder.logits(teacher) if cache_logits else None


@dataclass
class TeacherOutputs:
    """What the student learns from: cached logits (KD without a live teacher; FiC's pass yields them anyway),
    the teacher's dev metrics, and the teacher itself when it runs every step (``--teacher_mode live``)."""

    logits: torch.Tensor | None = None
    metrics: dict[str, float] | None = None
    live: torch.nn.Module | None = None


@dataclass(frozen=True)
class TeacherSettings:
    """How the teacher runs: ``live`` (a forward every step) or its logits cached by one pass
    (``cache_logits``), its engine's offload and batch, bf16 compute, and the sentence vector FiC reads."""

    sentence_vector: str
    live: bool
    cache_logits: bool
    offload: str
    micro_batch: int
    bf16: bool


def teacher_outputs(teacher: torch.nn.Module | None, settings: TeacherSettings, *, resume: dict | None,
                    encoder: Encoder, banks: dict[str, MemoryBank], eval_loader: DataLoader,
                    scorer: Scorer) -> TeacherOutputs:
    """Wrap the teacher in its frozen engine (when it still has work: a fresh run's passes, or every step when
    ``live``), evaluate it and run its pass into FiC / the cached logits; a resumed run takes the logits and
    metrics from its checkpoint. A cached teacher is not returned, so it is released after its pass."""
    live = settings.live
    if teacher is not None and (resume is None or live):
        teacher = teacher_engine(teacher, settings.offload, settings.micro_batch, settings.bf16)
    if resume is not None:
        out = TeacherOutputs(resume["teacher_logits"], resume["teacher_metrics"])
    elif teacher is not None:
        metrics = evaluate(teacher, eval_loader, scorer, encoder.device).metrics
        out = TeacherOutputs(fill_teacher_outputs(encoder, teacher, banks, settings.sentence_vector,
                                                  settings.cache_logits), metrics)
    else:
        out = TeacherOutputs()
    out.live = teacher if live else None
    return out


def fill_prc(encoder: Encoder, banks: dict[str, MemoryBank], model: torch.nn.Module,
             hook: SentenceVectorHook) -> None:
    """PrC: the student before any update (eval mode)."""
    if "prc" in banks:
        banks["prc"].add_column(encoder.vectors(model, hook, train_mode=False, desc="PrC bank")["vectors"])


def bank_pool(train_sampler: ShardSampler, shard: Shard, reach: int, extra_negatives: int, world: int,
              seed: int) -> torch.Tensor | None:
    """Rows a run shorter than an epoch needs in its banks: the ``reach`` examples its steps draw (the sampler's
    first epoch) plus ``extra_negatives // world`` more of this rank's rows to draw extra negatives from. None:
    the run reaches every row (encode them all)."""
    if reach >= len(train_sampler):
        return None
    order = train_sampler.order()[:reach]
    rest = shard.indices[~torch.isin(shard.indices, order)]
    g = torch.Generator().manual_seed(seed + 7919 * shard.rank)
    extra = rest[torch.randperm(len(rest), generator=g)[: extra_negatives // world]]
    pool = torch.unique(torch.cat([order, extra]))
    return None if len(pool) >= shard.size else pool


def restrict_encoded_rows(shard: Shard, loaders, *, reach: int, resume: dict | None, encodes: bool,
                          extra_negatives: int, seed: int, max_steps: int) -> None:
    """Narrow the encode passes (and the extra negatives) to the rows a short run reaches: a fresh run computes
    the pool (``encodes``: it has a pass to run), a resumed one takes its checkpoint's and checks that the resumed
    steps stay inside it. ``loaders``: the run's (``train`` and ``encode`` samplers are ``ShardSampler``)."""
    train_sampler, encode_sampler = loaders.train.sampler, loaders.encode.sampler
    resuming, is_rank0 = resume is not None, shard.rank == 0
    resumed_pool = resume["encode_pool"] if resume is not None else None
    if resuming:
        shard.restrict(resumed_pool)
        if shard.pool is not None and not bool(torch.isin(train_sampler.order()[:reach], shard.pool).all()):
            raise UserError(f"--max_steps {max_steps}: the checkpoint's banks hold only the {len(shard.pool)} "
                            "rows per rank its shorter run reaches; resume with the --max_steps it was started with, "
                            "or start a new run (--overwrite_output_dir)")
    elif encodes:
        pool = bank_pool(train_sampler, shard, reach, extra_negatives, shard.world, seed)
        shard.restrict(pool)
        if pool is not None and is_rank0:
            logger.info("this run reaches %d of the %d training rows per rank: the encode passes cover those and %d "
                        "more for extra negatives (%d rows; a run of an epoch or more encodes all)",
                        min(reach, len(train_sampler)), shard.size, len(pool) - min(reach, len(pool)), len(pool))
    encode_sampler.restrict(shard.pool)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    logits: np.ndarray  # deduplicated, in dev-set order


def evaluate(model: torch.nn.Module, loader: DataLoader, scorer: Scorer, device: torch.device,
             step: int = 0) -> Evaluation:
    """The task's metrics on the dev set (every rank's shard gathered; collective). Non-finite logits fail the
    run: no metric is computed from a diverged model."""
    preds, gold = gather_logits(model, loader, device, step)
    return Evaluation(scorer(preds, gold), preds)


@torch.no_grad()
def gather_logits(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                  step: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of every row of ``loader``'s dataset in ``idx`` order, every rank's share gathered
    (collective); non-finite logits are a TrainingFailed."""
    was_training = model.training
    model.eval()
    all_idx, all_logits, all_labels = [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        logits = output_logits(model(**model_inputs(batch))).float()
        all_idx.append(batch["idx"])
        all_logits.append(logits)
        all_labels.append(batch["labels"].float())
    model.train(was_training)
    idx = torch.cat(all_idx).to(device)  # the gather runs on the backend's device
    logits = torch.cat(all_logits)
    labels = torch.cat(all_labels)
    # DistributedSampler pads shards to equal length; gather, then dedupe by idx below.
    idx, logits, labels = (all_gather_cat(t) for t in (idx, logits, labels))
    order = np.unique(idx.cpu().numpy(), return_index=True)[1]  # dedupe sampler padding, sort by idx
    preds = logits.cpu().numpy()[order]
    gold = labels.cpu().numpy()[order]
    bad = int((~np.isfinite(preds.reshape(len(preds), -1))).any(axis=-1).sum())
    if bad:
        raise TrainingFailed(f"evaluation at step {step}: {bad} of {len(preds)} examples got non-finite "
                             "logits (the model diverged); no metrics are computed from them")
    return preds, gold
