"""The loop on its own: a CapTrainer built directly from small fakes (no DeepSpeed, no subprocess), checking its
cadence (log, eval, save, stop), that the pruning schedule moves once per optimizer step, and that callbacks run
before each step's first micro-batch."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler

from cap_ds.cap import ShardSampler
from cap_ds.compression import PruningSchedule
from cap_ds.data.scoring import Scorer
from cap_ds.data.tasks import get_task
from cap_ds.runtime.errors import TrainingFailed
from cap_ds.runtime.monitor import RunLog
from cap_ds.runtime.signals import StopSignals
from cap_ds.training.losses import TrainingLoss
from cap_ds.training.trainer import CapTrainer, LoopParts, LoopSettings

N, BATCH, DIM = 20, 2, 4


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, DIM)
        self.head = nn.Linear(DIM, 2)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.head(self.embed(input_ids).mean(1)))


class FakeEngine:
    """The slice of a DeepSpeed engine the loop uses; an optimizer step every ``accum`` micro-batches."""

    def __init__(self, module: nn.Module, accum: int = 1) -> None:
        self.module, self.accum, self.device = module, accum, torch.device("cpu")
        self.global_steps = self.micro_steps = 0
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        self.skipped: set[int] = set()  # optimizer steps reported as skipped (what an fp16 overflow does)

    def __call__(self, **inputs):
        return self.module(**inputs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.global_steps += 1

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    def was_step_applied(self) -> bool:
        return self.global_steps not in self.skipped

    def get_lr(self) -> list[float]:
        return [0.1]


class CountingSchedule(PruningSchedule):
    def __init__(self) -> None:
        self.steps, self.epochs = 0, []

    def epoch_start(self, epoch: int, step: int):
        self.epochs.append((epoch, step))
        return None

    def step(self) -> None:
        self.steps += 1

    def scalars(self) -> dict[str, float]:
        return {"threshold": 1.0 - 0.1 * self.steps}

    def sparsity(self) -> float:
        return 0.1 * self.steps


class RecordingScalars:
    def __init__(self) -> None:
        self.rows: list[tuple[str, int, dict]] = []

    def log(self, prefix: str, scalars: dict, step: int) -> None:
        self.rows.append((prefix, step, dict(scalars)))

    def flush(self) -> None:
        pass

    def steps(self, prefix: str) -> list[int]:
        return [step for p, step, _ in self.rows if p == prefix]


class RecordingCheckpointer:
    def __init__(self) -> None:
        self.saved: list[str] = []

    def save(self, tag: str, state: dict) -> str:
        assert state["global_step"] == int(tag[4:])
        self.saved.append(tag)
        return tag


class StopAt:
    """A callback that raises the stop flag before ``step`` (what SIGTERM does)."""

    def __init__(self, stop: StopSignals, step: int) -> None:
        self.stop, self.at, self.seen = stop, step, []

    def before_step(self, batch, step: int) -> None:
        self.seen.append(step)
        if step == self.at:
            self.stop.request()


def rows(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (n, 5), generator=g)
    return [{"input_ids": ids[i], "idx": torch.tensor(i), "labels": torch.tensor(i % 2)} for i in range(n)]


def make_trainer(*, accum: int = 1, epochs: int = 1, total: int | None = None, callbacks=(), stop=None, **cadence):
    torch.manual_seed(0)
    data = rows(N)
    engine = FakeEngine(TinyClassifier(), accum)
    steps_per_epoch = N // BATCH // accum
    settings = LoopSettings(total_steps=total or epochs * steps_per_epoch, num_epochs=epochs, show_progress=False,
                            log_sparsity=True, **cadence)
    schedule, scalars, checkpointer = CountingSchedule(), RecordingScalars(), RecordingCheckpointer()
    loaders = SimpleNamespace(
        train=DataLoader(data, batch_size=BATCH, sampler=ShardSampler(N, shuffle=True, seed=1)),
        evaluate=DataLoader(data[:6], batch_size=4, sampler=SequentialSampler(data[:6])))
    trainer = CapTrainer(
        engine=engine, scorer=Scorer(get_task("sst2")), settings=settings, log=RunLog(), scalars=scalars, loaders=loaders,
        loss=TrainingLoss(get_task("sst2")),
        parts=LoopParts(schedule=schedule, callbacks=callbacks, checkpointer=checkpointer, stop=stop))
    return trainer, schedule, scalars, checkpointer


def test_cadence_of_logging_evaluation_and_checkpoints():
    trainer, schedule, scalars, checkpointer = make_trainer(logging_steps=2, eval_steps=2, save_steps=2,
                                                            epochs=2, total=8)
    metrics = trainer.train()
    assert trainer.global_step == 8 and not trainer.preempted
    assert [row["step"] for row in trainer.log.history] == [2, 4, 6, 8]
    assert scalars.steps("Train") == [2, 4, 6, 8]
    assert {"ce", "loss", "lr", "examples_per_second", "threshold", "sparsity"} <= set(trainer.log.history[0])
    assert scalars.steps("Eval") == [2, 4, 6, 8] and set(metrics) == {"accuracy"}
    assert trainer.last_eval_logits.shape == (6, 2)
    assert checkpointer.saved == ["step2", "step4", "step6"]  # none at the last step: the run ends there
    assert trainer.log.examples_seen == 8 * BATCH and trainer.log.timed_steps == 8


def test_schedule_moves_once_per_optimizer_step_and_at_each_epoch_start():
    stop = StopSignals()
    seen = StopAt(stop, step=-1)
    trainer, schedule, _, _ = make_trainer(accum=2, epochs=2, callbacks=[seen], stop=stop)
    trainer.train()
    assert trainer.global_step == 10 and trainer.engine.micro_steps == 20  # 2 epochs x 10 batches, 2 per step
    assert schedule.steps == 10
    assert schedule.epochs == [(0, 0), (1, 5)]
    assert seen.seen == list(range(1, 11))  # callbacks run once per optimizer step, before its first batch


def test_eval_at_every_epoch_end_without_eval_steps():
    trainer, _, scalars, _ = make_trainer(epochs=3, logging_steps=100)
    trainer.train()
    assert scalars.steps("Eval") == [10, 20, 30]
    assert [row["step"] for row in trainer.log.history] == [30]  # logging_steps beyond the run: the last step


def test_a_stop_request_checkpoints_the_current_step_and_leaves():
    stop = StopSignals()
    trainer, schedule, _, checkpointer = make_trainer(callbacks=[StopAt(stop, step=3)], stop=stop, save_steps=100,
                                                      check_steps=1)
    trainer.train()
    assert trainer.preempted and trainer.global_step == 3 and schedule.steps == 3
    assert checkpointer.saved == ["step3"]


@pytest.mark.parametrize(("signal_at", "stops_at"), [(3, 4), (4, 4), (5, 8)])
def test_a_stop_request_is_acted_on_at_the_next_check(signal_at, stops_at):
    """Between checks a step reads nothing from the device: the stop waits for the next check_steps multiple."""
    stop = StopSignals()
    trainer, schedule, _, checkpointer = make_trainer(callbacks=[StopAt(stop, step=signal_at)], stop=stop,
                                                      check_steps=4, logging_steps=100)
    trainer.train()
    assert trainer.preempted and trainer.global_step == stops_at and schedule.steps == stops_at
    assert checkpointer.saved == [f"step{stops_at}"]


class NanLossAt:
    """The training loss, NaN at the given optimizer steps (as a diverging model's)."""

    def __init__(self, loss: TrainingLoss, steps: set[int], accum: int = 1) -> None:
        self.inner, self.steps, self.accum, self.calls = loss, steps, accum, 0
        self.objective = loss.objective
        self.teacher_logits = loss.teacher_logits

    def __call__(self, batch, forward):
        self.calls += 1
        loss, terms = self.inner(batch, forward)
        if (self.calls - 1) // self.accum + 1 in self.steps:
            loss = loss + float("nan")  # the value only: the gradient stays finite, so later steps are fine
            terms["loss"] = loss.detach()
        return loss, terms


@pytest.mark.parametrize(("bad", "check_steps", "fails_at"), [
    ({3, 4, 5}, 1, 5),  # the third consecutive bad step is one too many: caught at once with a check per step
    ({3, 4, 5}, 4, 8),  # the same run of 3, caught at the next check
    ({2, 4, 6, 7}, 1, None),  # never more than 2 in a row
])
@pytest.mark.parametrize("how", ["nan_loss", "skipped"])
def test_non_finite_steps_are_counted_exactly_and_fail_at_the_next_check(bad, check_steps, fails_at, how):
    trainer, *_ = make_trainer(epochs=1, check_steps=check_steps, logging_steps=100, max_nonfinite_steps=2)
    if how == "nan_loss":
        object.__setattr__(trainer, "loss", NanLossAt(trainer.loss, bad))
    else:
        trainer.engine.skipped = bad
    if fails_at is None:
        trainer.train()
        assert trainer.global_step == 10 and trainer.nonfinite_run == 0
        return
    with pytest.raises(TrainingFailed, match="3 consecutive optimizer steps up to step"):
        trainer.train()
    assert trainer.global_step == fails_at


def test_a_resumed_trainer_continues_where_the_checkpoint_stopped():
    stop = StopSignals()
    first, _, _, checkpointer = make_trainer(callbacks=[StopAt(stop, step=4)], stop=stop, check_steps=1)
    first.train()
    state = first.state_dict()
    trainer, schedule, scalars, _ = make_trainer()
    resumed = CapTrainer(
        engine=trainer.engine, scorer=trainer.scorer, settings=trainer.s, loss=trainer.loss, log=RunLog(),
        scalars=scalars, loaders=SimpleNamespace(train=trainer.train_loader, evaluate=trainer.eval_loader),
        parts=LoopParts(schedule=schedule))
    resumed.load_state_dict(state)
    assert (resumed.global_step, resumed.epoch, resumed.batch_in_epoch) == (4, 0, 4)
    resumed.train()
    assert resumed.global_step == 10 and trainer.engine.global_steps == 6  # only the remaining steps ran
    assert resumed.log.examples_seen == 10 * BATCH


def test_settings_are_frozen():
    trainer, *_ = make_trainer()
    with pytest.raises(AttributeError):
        trainer.s.total_steps = 3
