"""Issue 23: one run per output folder, and every input checked before the folder is touched.

- a run lock (``<output_dir>/.cap_ds.lock``, flock) held for the run's life: a second run on a held folder refuses
  in one line naming the holder (exit 2), also under ``--resume auto`` (it must not replace the live run's files);
  a lock left by a dead run is taken over with a warning; the lock file is not a run file;
- ``--overwrite_output_dir`` with an input that fails late (corrupt teacher weights, a bad ``--config_overrides``
  value, a bad ``zero_optimization`` key) exits 2 in one line and leaves the earlier run byte-identical;
- replacing moves the earlier run aside, puts it back when the new run fails before training, and leaves nothing
  behind when the new run trains.

Fault injection works as root: corrupt files written by the test, a monkeypatched recipe step, never chmod.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cap_ds.run.args import parse_args
from cap_ds.run.preflight import preflight
from cap_ds.run.rundir import ASIDE_PREFIX, RUN_FILES, plan_output_dir, present_run_files
from cap_ds.run.runlock import LOCK_NAME, Holder, RunLock, RunLockError
from cap_ds.runtime.errors import UserError
from cap_ds.training.ds_config import DeepSpeedConfigError, build_ds_config, validate_ds_config
from tests.conftest import REPO, run_env

TINY = ["--config_overrides", "num_hidden_layers=2", "--task_name", "sst2", "--max_train_samples", "32",
        "--max_eval_samples", "16", "--max_seq_length", "32", "--per_device_train_batch_size", "8",
        "--cap", "none", "--pruning_method", "magnitude", "--disable_tqdm", "--logging_steps", "1",
        "--max_steps", "2", "--deepspeed", str(REPO / "ds_configs" / "zero2.json")]


def train(args, timeout=600, script=None):
    cmd = [sys.executable, "cap_ds/train.py", *args] if script is None else [sys.executable, "-c", script, *args]
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def old_run(out: Path) -> dict[str, bytes]:
    """An earlier (completed) run's files, and a user's log; returns every file's bytes by relative path."""
    (out / "final").mkdir(parents=True)
    (out / "final" / "config.json").write_text('{"old": true}\n')
    (out / "runs" / "cap").mkdir(parents=True)
    (out / "runs" / "cap" / "events.out").write_bytes(os.urandom(64))
    (out / "metrics.json").write_text('{"steps": 7, "eval": {"accuracy": 0.5}}\n')
    (out / "eval_logits.npy").write_bytes(os.urandom(128))
    (out / "train_state.json").write_text('{"status": "completed", "step": 7}\n')
    (out / "train.log").write_text("the user's log\n")
    return snapshot(out)


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the lock itself
def test_lock_acquire_refuse_release(tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out).acquire()
    assert lock.created_dir and lock.previous is None
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"] > 0
    # a second taker (another open file: as another process would) is refused, naming the holder
    with pytest.raises(RunLockError, match=rf"^{out} is in use by the run started \d{{4}}-\d\d-\d\d "
                                           rf"\d\d:\d\d:\d\d UTC on {socket.gethostname()} \(pid {os.getpid()}\); "
                                           "wait for it, or use another --output_dir$"):
        RunLock(out).acquire()
    assert isinstance(RunLockError("x"), UserError)  # exit code 2 in cli()
    # not a run file: a folder holding only the lock is a new run
    assert present_run_files(out) == [] and LOCK_NAME not in RUN_FILES
    assert plan_output_dir(str(out), "auto", False, {}).clear == []
    lock.release()
    lock.release()  # twice is fine
    assert not (out / LOCK_NAME).exists()
    with RunLock(out) as again:  # free again
        assert again.held and again.previous is None
    assert not (out / LOCK_NAME).exists()


def test_lock_of_a_dead_run_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone = Holder(socket.gethostname(), dead_pid(), 1.7e9)
    (out / LOCK_NAME).write_text(gone.dump())
    lock = RunLock(out).acquire()
    assert lock.previous == gone and not lock.created_dir
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_is_released_when_the_holder_exits_or_dies(tmp_path):
    """At exit (an exception included) the file is deleted; a SIGKILLed holder leaves it, with its flock free."""
    code = textwrap.dedent("""
        import os, sys, time
        from cap_ds.run.runlock import RunLock
        RunLock(sys.argv[1]).acquire()
        print("locked", flush=True)
        if sys.argv[2] == "raise":
            raise RuntimeError("boom")
        time.sleep(60)
    """)
    out = tmp_path / "a"
    proc = subprocess.run([sys.executable, "-c", code, str(out), "raise"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "locked" in proc.stdout and not (out / LOCK_NAME).exists()
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out), "sleep"], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError, match=rf"\(pid {proc.pid}\)"):
            RunLock(out).acquire()
    finally:
        proc.kill()
        proc.wait()
    assert (out / LOCK_NAME).exists()
    lock = RunLock(out).acquire()
    assert lock.previous is not None and lock.previous.pid == proc.pid
    lock.release()


# ---------------------------------------------------------------- checks before the folder is touched
def test_deepspeed_config_errors_name_the_key(tmp_path):
    for cfg, match in (({"zero_optimization": {"stage": 2, "bogus_key": 1}},
                        r"^zero_optimization\.bogus_key in --deepspeed my\.json: Extra inputs are not permitted$"),
                       ({"zero_optimization": {"stage": 7}}, r"^zero_optimization\.stage in --deepspeed my\.json: .*7"),
                       ({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}},
                        r"^zero_optimization\.offload_optimizer\.device in --deepspeed my\.json: "),
                       ({"bf16": {"enabled": "maybe"}}, r"^bf16\.enabled in --deepspeed my\.json: ")):
        cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, **cfg}
        with pytest.raises(DeepSpeedConfigError, match=match):
            validate_ds_config(cfg, "my.json")
    for shipped in sorted((REPO / "ds_configs").glob("*.json")):  # every shipped config passes as resolved
        cfg, _ = build_ds_config(shipped, micro_batch=8, grad_accum=1, world_size=None, max_grad_norm=1.0,
                                 output_dir=str(tmp_path), optimizer_flags={"lr": 1e-4, "eps": 1e-8, "weight_decay": 0.0})
        validate_ds_config(cfg, shipped)


def test_bad_config_override_values_are_named(model_path, glue_dir, tmp_path):
    base = ["--output_dir", str(tmp_path / "unused"), "--cap", "none", "--data_dir", str(glue_dir),
            "--model_name_or_path", model_path, "--max_train_samples", "32", "--max_steps", "2"]
    for value, match in (("num_hidden_layers=two", r"num_hidden_layers='two' is not an integer \(BertConfig"),
                         ("num_hidden_layers=0", "num_hidden_layers=0 must be >= 1"),
                         ("hidden_dropout_prob=yes", "hidden_dropout_prob='yes' is not a number"),
                         ("no_such_thing=1", "BertConfig has no attribute 'no_such_thing'")):
        with pytest.raises(ValueError, match=f"--config_overrides: {match}"):
            preflight(parse_args([*base, "--config_overrides", value]))
    assert not (tmp_path / "unused").exists()


def corrupt_teacher(model_path: str, dest: Path) -> Path:
    """The real model's config and tokenizer, with a truncated model.safetensors."""
    dest.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(model_path) / name, dest / name)
    (dest / "model.safetensors").write_bytes((Path(model_path) / "model.safetensors").read_bytes()[:4096])
    return dest


@pytest.mark.parametrize("case", ["teacher", "override", "zero_key"])
def test_overwrite_with_a_late_failing_input_keeps_the_old_run(case, glue_dir, model_path, tmp_path):
    out = tmp_path / "run"
    before = old_run(out)
    args = [*TINY, "--data_dir", str(glue_dir), "--output_dir", str(out), "--overwrite_output_dir"]
    if case == "teacher":
        teacher = corrupt_teacher(model_path, tmp_path / "teacher")
        args += ["--teacher_name_or_path", str(teacher)]
        expected = rf"--teacher_name_or_path {teacher}: {teacher / 'model.safetensors'} is not a readable safetensors"
    elif case == "override":
        args += ["--config_overrides", "num_hidden_layers=two"]
        expected = "--config_overrides: num_hidden_layers='two' is not an integer"
    else:
        cfg = tmp_path / "ds.json"
        cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                   "zero_optimization": {"stage": 2, "overlap_com": True}}))
        args += ["--deepspeed", str(cfg)]
        expected = f"zero_optimization.overlap_com in --deepspeed {cfg}: Extra inputs are not permitted"
    proc = train(args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = error_lines(proc)
    assert line.startswith("error: ") and expected in line, line
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(
        ["final", "runs", "metrics.json", "eval_logits.npy", "train_state.json", "train.log"])


def test_a_failure_after_the_folder_was_prepared_puts_the_old_run_back(glue_dir, tmp_path):
    """Past every check (a recipe step fails after the earlier run was moved aside): it comes back intact."""
    out = tmp_path / "run"
    before = old_run(out)
    script = textwrap.dedent("""
        import sys
        from pathlib import Path

        import cap_ds.train as t
        from cap_ds.runtime.errors import UserError

        def boom(*a, **k):
            assert any(p.name.startswith(".replaced-") for p in Path(sys.argv[-1]).iterdir()), "not moved aside"
            raise UserError("injected failure after the folder was prepared")

        t.load_student = boom
        sys.exit(t.cli(sys.argv[1:]))
    """)
    proc = train([*TINY, "--data_dir", str(glue_dir), "--overwrite_output_dir", "--output_dir", str(out)],
                 script=script)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_lines(proc) == ["error: injected failure after the folder was prepared"]
    assert "put the earlier run's" in proc.stderr
    assert snapshot(out) == before
    assert not any(p.name.startswith(ASIDE_PREFIX) or p.name == LOCK_NAME for p in out.iterdir())


def test_overwrite_that_trains_replaces_the_run_and_takes_over_a_dead_lock(glue_dir, tmp_path):
    out = tmp_path / "run"
    old_run(out)
    gone = Holder(socket.gethostname(), dead_pid(), 1.7e9)
    (out / LOCK_NAME).write_text(gone.dump())
    proc = train([*TINY, "--data_dir", str(glue_dir), "--overwrite_output_dir", "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"took over the lock of {out} from {gone.describe()}, which is gone" in proc.stderr
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert not (out / "final" / "config.json").read_text().startswith('{"old"')
    assert (out / "train.log").read_text() == "the user's log\n"
    assert not any(p.name.startswith(ASIDE_PREFIX) or p.name == LOCK_NAME for p in out.iterdir())


# ---------------------------------------------------------------- two runs, one folder
@pytest.mark.parametrize("flags", [[], ["--resume", "auto"], ["--overwrite_output_dir"]])
def test_a_second_run_on_a_held_folder_refuses_and_touches_nothing(flags, glue_dir, tmp_path):
    """The live run (here: this test process holding the lock) keeps its files, whatever the second run asks."""
    out = tmp_path / "run"
    (out / "runs" / "cap").mkdir(parents=True)  # an unfinished run before its first checkpoint
    (out / "runs" / "cap" / "events.out").write_bytes(b"live")
    (out / "train_state.json").write_text('{"status": "running"}\n')
    with RunLock(out) as held:
        before = snapshot(out)
        proc = train([*TINY, "--data_dir", str(glue_dir), "--output_dir", str(out), *flags])
        assert proc.returncode == 2, proc.stderr[-3000:]
        [line] = error_lines(proc)
        assert line == (f"error: {out} is in use by {held.holder.describe()}; wait for it, or use another "
                        "--output_dir")
        assert "Traceback" not in proc.stderr and "replacing" not in proc.stderr
        assert snapshot(out) == before


GATED = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path

    import cap_ds.train as t

    real = t.teacher_outputs

    def gated(*a, **k):  # after the engine is built (runs/ exists), before training: wait for the test
        gate = Path(os.environ["CAP_TEST_GATE"])
        (gate / "waiting").touch()
        while not (gate / "go").exists():
            time.sleep(0.1)
        return real(*a, **k)

    t.teacher_outputs = gated
    sys.exit(t.cli(sys.argv[1:]))
""")


def test_resume_auto_started_during_a_live_run_refuses_and_the_first_run_finishes(glue_dir, tmp_path):
    """The issue's race: a second run with --resume auto while the first has runs/ but no checkpoint yet."""
    out, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    first = subprocess.Popen([sys.executable, "-c", GATED, *TINY, "--data_dir", str(glue_dir), "--output_dir",
                              str(out)], cwd=REPO, env=run_env(CAP_TEST_GATE=str(gate)), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (gate / "waiting").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.2)
        assert (out / "runs").is_dir() and not (out / "checkpoints").exists()
        before = snapshot(out)
        second = train([*TINY, "--data_dir", str(glue_dir), "--output_dir", str(out), "--resume", "auto"])
        assert second.returncode == 2, second.stderr[-3000:]
        [line] = error_lines(second)
        assert line.startswith(f"error: {out} is in use by the run started ") and f"(pid {first.pid})" in line
        assert "Traceback" not in second.stderr and snapshot(out) == before
        (gate / "go").touch()
        log = first.communicate(timeout=300)[0]
        assert first.returncode == 0, log[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert json.loads((out / "train_state.json").read_text())["status"] == "completed"
    assert (out / "metrics.json").is_file() and not (out / LOCK_NAME).exists()
