"""StepTimer (issue 15): warm-up rule, steady-state median, mean, first step, throughput formula, resume."""

from __future__ import annotations

import statistics

import pytest

from cap_ds.runtime.steptimer import StepTimer, warmup_steps


def test_warmup_rule_is_max_of_5_steps_and_10_percent():
    assert [warmup_steps(n) for n in (0, 1, 5, 30, 50, 51, 60, 100, 1000, 1001)] == \
        [5, 5, 5, 5, 5, 6, 6, 10, 100, 101]


def timed(durations, examples=32):
    t = StepTimer()
    for d in durations:
        t.record(d, examples)
    return t


def test_median_over_steady_state_steps():
    durations = [9.0, 5.0, 4.0, 3.0, 2.0] + [1.0, 1.2, 1.1, 5.0, 1.3] * 3  # 20 steps: warm-up 5
    m = timed(durations).metrics()
    steady = durations[5:]
    assert m["step_time_s"] == statistics.median(steady) == 1.2
    assert m["first_step_time_s"] == 9.0
    assert m["step_time_mean_s"] == pytest.approx(sum(durations) / 20)
    assert m["step_time_steady_steps"] == 15
    assert m["train_examples_per_step"] == 32
    assert m["train_examples_per_second"] == pytest.approx(32 / 1.2)


def test_ten_percent_warmup_for_long_runs():
    durations = [100.0] * 20 + [1.0] * 180  # 200 steps: the first 20 (10 %) are dropped
    m = timed(durations).metrics()
    assert m["step_time_s"] == 1.0 and m["step_time_steady_steps"] == 180


def test_micro_steps_add_up_to_one_optimizer_step():
    t = StepTimer()
    for _ in range(8):
        t.add_micro(0.25, 4)
        t.add_micro(0.5, 4)
        t.end_step()
    t.add_micro(7.0, 4)  # a trailing micro-batch without an optimizer step is not a step
    m = t.metrics()
    assert t.steps == 8 and m["step_time_s"] == 0.75 and m["train_examples_per_step"] == 8


def test_short_runs_and_empty():
    assert timed([]).metrics()["step_time_s"] == 0.0
    assert timed([]).metrics()["train_examples_per_second"] == 0.0
    assert timed([3.0]).metrics()["step_time_s"] == 3.0  # one step: that step
    m = timed([3.0, 1.0, 2.0]).metrics()  # within warm-up: all but the first
    assert m["step_time_s"] == 1.5 and m["step_time_steady_steps"] == 2 and m["first_step_time_s"] == 3.0


def test_resume_keeps_earlier_steps_and_warms_up_again():
    first = timed([9.0] + [1.0] * 9, examples=16)
    state = first.state_dict()
    resumed = StepTimer()
    resumed.load_state_dict(state)
    for d in [50.0] + [2.0] * 9:  # the new process's first step is slow again
        resumed.record(d, 16)
    m = resumed.metrics()
    # each process drops its own first 5 steps: the steady steps are 5 x 1.0 and 5 x 2.0
    assert m["step_time_steady_steps"] == 10 and m["step_time_s"] == 1.5
    assert m["first_step_time_s"] == 9.0  # the run's first step, from the checkpoint
    assert m["step_time_mean_s"] == pytest.approx((9 + 9 + 50 + 18) / 20)
    assert m["train_examples_per_step"] == 16 and resumed.steps == 20
    # a second resume from the resumed process's state keeps both segments
    again = StepTimer()
    again.load_state_dict(resumed.state_dict())
    assert again.segments[:2] == resumed.segments and again.segments[2] == []
    assert again.metrics() == m


def test_resume_from_a_checkpoint_without_timer_state_times_only_this_process():
    t = timed([5.0, 5.0])
    t.load_state_dict(None)
    t.record(1.0, 8)
    assert t.steps == 1 and t.metrics()["first_step_time_s"] == 1.0 and t.examples == 8


def test_state_dict_is_plain_data():
    state = timed([1.0, 2.0]).state_dict()
    assert state == {"segments": [[1.0, 2.0]], "examples": 64}
