"""Reliability (issue 13), with real runs of cap_ds/train.py on the 2-layer MiniLM and real SST-2 rows:

- a diverged run fails (status failed, non-zero exit, one error line, no final/), it never reports success;
- a checkpoint whose file would run code when loaded is refused, naming it, and nothing runs;
- a broken ``latest`` (or a truncated file) falls back to the newest complete checkpoint, with a warning, and the
  resumed run ends exactly as the uninterrupted one, with throughput over the whole run;
- an output folder holding a run is refused unless resumed or overwritten; resuming with flags that change the
  computation is refused, naming them; a folder with only a log is a new run;
- checkpoint files get the umask modes; a smoke run on the full training set with a few steps works and is short;
- SIGINT during a bank encode stops within a batch; SIGTERM to the DeepSpeed launcher (through cap_ds.launch)
  checkpoints and exits 0.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cap_ds.run.args import parse_args
from cap_ds.run.preflight import preflight
from cap_ds.run.rundir import RunDirError
from cap_ds.runtime.manifest import file_checksum
from cap_ds.training.checkpoint import MANIFEST, CheckpointError, check_complete, find_resume_tag, safe_load
from tests.conftest import REPO, free_port, run_env

TINY = ["--config_overrides", "num_hidden_layers=2", "--task_name", "sst2", "--max_train_samples", "64",
        "--max_eval_samples", "32", "--max_seq_length", "32", "--per_device_train_batch_size", "8",
        "--extra_negatives", "16", "--disable_tqdm", "--logging_steps", "1"]
CKPT_RUN = [*TINY, "--max_steps", "4", "--cap", "prc,snc", "--snapshot_steps", "2", "--save_steps", "1"]


def train(args, timeout=600, **env):
    """Run cap_ds/train.py; returns the finished process (output captured)."""
    full_env = run_env(**env)
    return subprocess.run([sys.executable, "cap_ds/train.py", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def kill_tree(pid: int) -> None:
    import psutil

    procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory, glue_dir, model_path):
    """A completed 4-step CAP run that checkpointed at steps 1-3 (steps 2 and 3 kept)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    proc = train([*CKPT_RUN, "--data_dir", str(glue_dir), "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ---------------------------------------------------------------- item 2: a diverged run fails
def test_diverged_run_fails_without_publishing(glue_dir, model_path, tmp_path):
    out = tmp_path / "diverged"
    proc = train([*TINY, "--cap", "none", "--pruning_method", "magnitude", "--max_steps", "8", "--learning_rate",
                  "1e6", "--max_nonfinite_steps", "1", "--data_dir", str(glue_dir), "--output_dir", str(out)])
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = error_lines(proc)
    assert "training diverged" in line and "--learning_rate" in line and "--max_nonfinite_steps 1" in line
    assert "Traceback" not in proc.stderr
    state = json.loads((out / "train_state.json").read_text())
    assert state["status"] == "failed" and state["step"] >= 2 and "diverged" in state["error"]
    assert not (out / "final").exists() and not (out / "metrics.json").exists()
    assert not (out / "eval_logits.npy").exists()


def test_a_schedule_short_of_its_target_fails():
    from cap_ds.compression import check_schedule_reached, parse_compression_config
    from cap_ds.run.args import PruningArguments
    from cap_ds.runtime.errors import TrainingFailed
    from cap_ds.training.pruning import sparse_section

    pargs = PruningArguments(pruning_method="magnitude", target_sparsity=0.9, prune_modules="encoder")
    cfg = parse_compression_config({"compression_training": sparse_section(pargs, 2, 6)})
    # DeepSpeed skipped 4 of the run's 8 steps
    with pytest.raises(TrainingFailed, match="did not reach its target.*ends at step 6 but only 4"):
        check_schedule_reached(cfg, 4, 8, 0.55)
    with pytest.raises(TrainingFailed, match="measured sparsity 0.0000 is below"):  # NaN weights: top-k keeps all
        check_schedule_reached(cfg, 8, 8, 0.0)
    check_schedule_reached(cfg, 8, 8, 0.9)


# ---------------------------------------------------------------- item 3: no code runs from a checkpoint
class _Trap:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_trap(folder: Path, name: str, marker: Path) -> Path:
    """Replace a checkpoint file by a pickle that runs a shell command, and record it as complete."""
    path = folder / name
    torch.save({"module": _Trap(str(marker))}, path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = path.stat().st_size
    if "checksums" in manifest:  # (issue 23) a forger records the checksum too: safe loading still refuses it
        manifest["checksums"][name] = file_checksum(path)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return path


def test_booby_trapped_checkpoint_is_refused(ckpt_run, glue_dir, tmp_path):
    out = copy_run(ckpt_run, tmp_path / "trap")
    marker = tmp_path / "PWNED"
    trap = plant_trap(out / "checkpoints" / "step3", "mp_rank_00_model_states.pt", marker)  # DeepSpeed's own file
    proc = train([*CKPT_RUN, "--data_dir", str(glue_dir), "--output_dir", str(out), "--resume", "auto"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = error_lines(proc)
    assert str(trap) in line and "refused" in line and "weights_only=True" in line and "posix.system" in line
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    # our own state file too, and a corrupt file is named
    plant_trap(out / "checkpoints" / "step2", "cap_state_rank0.pt", marker)
    with pytest.raises(CheckpointError, match="refused"):
        safe_load(out / "checkpoints" / "step2" / "cap_state_rank0.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=f"checkpoint file {garbage} is corrupt"):
        safe_load(garbage)
    assert not marker.exists()


# ---------------------------------------------------------------- items 4 and 6: fallback resume, timing
def test_broken_latest_falls_back_and_resumes_exactly(ckpt_run, glue_dir, tmp_path):
    out = copy_run(ckpt_run, tmp_path / "broken")
    for name in ("metrics.json", "final", "eval_logits.npy", "train_state.json"):  # as if killed after step 3
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "step3")  # `latest` names a checkpoint that is gone
    assert (out / "checkpoints" / "latest").read_text() == "step3"
    step2 = safe_load(out / "checkpoints" / "step2" / "cap_state_rank0.pt")
    proc = train([*CKPT_RUN, "--data_dir", str(glue_dir), "--output_dir", str(out), "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "checkpoint step3 skipped" in proc.stderr and "resumed from step2 at step 2" in proc.stderr
    np.testing.assert_array_equal(np.load(out / "eval_logits.npy"), np.load(ckpt_run / "eval_logits.npy"))
    m = json.loads((out / "metrics.json").read_text())
    # throughput and step time cover the whole run (steps 1-4, before and after the resume); issue 15: step_time_s
    # is the median of the steady-state steps (here a short run: all but each process's first step)
    assert m["train_examples"] == 4 * 8 and step2["timed_examples"] == 2 * 8 and step2["timed_steps"] == 2
    assert m["train_time_s"] > step2["train_time"] > 0
    assert len(step2["step_timer"]["segments"][0]) == 2 and step2["step_timer"]["examples"] == 2 * 8
    assert m["step_time_mean_s"] == pytest.approx(m["train_time_s"] / 4)
    assert m["first_step_time_s"] == step2["step_timer"]["segments"][0][0]
    assert m["step_time_steady_steps"] == 2 and m["train_examples_per_step"] == 8
    assert m["train_examples_per_second"] == pytest.approx(m["train_examples_per_step"] / m["step_time_s"])


def test_truncated_file_is_named_and_skipped(ckpt_run, tmp_path):
    out = copy_run(ckpt_run, tmp_path / "trunc")
    victim = out / "checkpoints" / "step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    tag, skipped = find_resume_tag(out / "checkpoints")
    assert tag == "step2" and skipped[0][0] == "step3"
    assert str(victim) in skipped[0][1] and "truncated" in skipped[0][1]
    assert check_complete(out / "checkpoints", "step2") is None
    (out / "checkpoints" / "step2" / MANIFEST).unlink()  # a write that never finished
    assert find_resume_tag(out / "checkpoints")[0] is None
    # A checkpoint from before manifests existed counts when `latest` names it, unless a file every checkpoint has
    # is gone (seen: a legacy checkpoint whose model states had been deleted crashed DeepSpeed's loader).
    (out / "checkpoints" / "latest").write_text("step2")
    assert find_resume_tag(out / "checkpoints")[0] == "step2"
    (out / "checkpoints" / "step2" / "mp_rank_00_model_states.pt").unlink()
    tag, skipped = find_resume_tag(out / "checkpoints")
    assert tag is None and "has no DeepSpeed *model_states.pt file" in dict(skipped)["step2"]


def test_checkpoint_files_get_umask_modes(ckpt_run):
    files = [p for p in (ckpt_run / "checkpoints").rglob("*") if p.is_file() and not p.name.endswith(".py")]
    assert any(p.name == "cap_state_rank0.pt" for p in files) and any(p.name == "latest" for p in files)
    mask = os.umask(0)
    os.umask(mask)
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


# ---------------------------------------------------------------- item 5: one run per output folder
def check(out: Path, glue_dir: Path, *extra: str):
    return preflight(parse_args([*CKPT_RUN, "--data_dir", str(glue_dir), "--output_dir", str(out), *extra]))


def test_output_folder_with_a_run_is_refused_unless_resumed_or_overwritten(ckpt_run, glue_dir, model_path,
                                                                          tmp_path):
    with pytest.raises(RunDirError, match="already holds a completed run .*--resume auto.*--overwrite_output_dir"):
        check(ckpt_run, glue_dir)
    assert check(ckpt_run, glue_dir, "--resume", "auto").rundir.resume_tag == "step3"
    # flags that change the computation: refused, named; --max_steps may change
    with pytest.raises(RunDirError, match=r"--learning_rate 3e-05 -> 0\.001; --max_train_samples 64 -> 32"):
        check(ckpt_run, glue_dir, "--resume", "auto", "--learning_rate", "1e-3", "--max_train_samples", "32")
    with pytest.raises(RunDirError, match="--target_sparsity 0.9 -> 0.5"):
        check(ckpt_run, glue_dir, "--resume", "auto", "--target_sparsity", "0.5")
    assert check(ckpt_run, glue_dir, "--resume", "auto", "--max_steps", "6").rundir.resume_tag == "step3"
    with pytest.raises(CheckpointError, match="--resume step9: no such checkpoint .*available: step2, step3"):
        check(ckpt_run, glue_dir, "--resume", "step9")

    out = copy_run(ckpt_run, tmp_path / "again")
    (out / "train.log").write_text("the user's log\n")
    pre = check(out, glue_dir, "--overwrite_output_dir")
    pre.rundir.apply()
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]  # the run's files are gone, the log is not
    assert pre.rundir.resume_tag is None

    fresh = tmp_path / "fresh"  # what benchmarks/reproduce_glue.py prepares: a folder with only its log
    fresh.mkdir()
    (fresh / "train.log").write_text("$ cap_ds/train.py ...\n")
    pre = check(fresh, glue_dir, "--resume", "auto")
    assert pre.rundir.resume_tag is None and pre.rundir.clear == []
    assert check(fresh, glue_dir).rundir.resume_tag is None

    done = copy_run(ckpt_run, tmp_path / "done")  # completed, no checkpoint left: nothing to continue
    shutil.rmtree(done / "checkpoints")
    with pytest.raises(RunDirError, match="holds a completed run with no checkpoint"):
        check(done, glue_dir, "--resume", "auto")


# ---------------------------------------------------------------- a new user's first hour
def test_smoke_run_on_the_full_training_set_is_short_and_quiet(glue_dir, model_path, tmp_path):
    """The README's kind of command with a small --max_steps: no data bound, reference warm-ups."""
    out = tmp_path / "smoke"
    proc = train(["--config_overrides", "num_hidden_layers=2", "--task_name", "sst2", "--data_dir", str(glue_dir),
                  "--max_steps", "5", "--per_device_train_batch_size", "16", "--max_seq_length", "64",
                  "--max_eval_samples", "64", "--cap", "prc,snc", "--snapshot_steps", "3", "--extra_negatives", "64",
                  "--deepspeed", str(REPO / "ds_configs" / "zero2.json"), "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "do not fit 5 steps: shrunk to" in log  # the warm-ups were shrunk, and it says so
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 5 and m["sparsity"] == pytest.approx(0.9, abs=0.01) and m["snapshots"] == 1
    assert m["bank_rows_per_rank"] == 5 * 16 + 64  # what 5 steps reach + the extra-negative pool, not 67,349
    assert "PrC bank: 144 rows on this rank" in log and "reaches 80 of the 67349 training rows" in log
    for noise in ("Setting accelerator to CPU", "LOAD REPORT", "UNEXPECTED", "built successfully", "\r", "\x1b["):
        assert noise not in log, noise


def test_sigint_stops_a_bank_encode_within_a_batch(glue_dir, model_path, tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, "cap_ds/train.py", "--config_overrides", "num_hidden_layers=2", "--task_name", "sst2",
           "--data_dir", str(glue_dir), "--max_train_samples", "4000", "--num_train_epochs", "1",
           "--max_seq_length", "64", "--cap", "prc", "--per_device_eval_batch_size", "16", "--output_dir", str(out)]
    env = run_env()
    log = tmp_path / "int.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while "PrC bank: 4,000 rows" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "got SIGINT" in text and "Traceback" not in text
    assert json.loads((out / "train_state.json").read_text()) == {"status": "preempted", "step": 0}
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


@pytest.mark.distributed
def test_sigterm_to_the_launcher_checkpoints_and_exits_zero(glue_dir, model_path, tmp_path):
    """What a scheduler or `kill <pid>` does to `deepspeed ...`: through cap_ds.launch the ranks checkpoint."""
    out = tmp_path / "launch"
    cmd = [sys.executable, "-m", "cap_ds.launch", "--num_gpus", "2", "--master_port", str(free_port()),
           "cap_ds/train.py", *TINY, "--max_steps", "8", "--cap", "prc", "--save_steps", "1",
           "--per_device_train_batch_size", "4", "--data_dir", str(glue_dir), "--output_dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (out / "checkpoints" / "latest").is_file():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)  # to the launcher only, not to its process group
            assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
    state = json.loads((out / "train_state.json").read_text())
    assert state["status"] == "preempted" and 1 <= state["step"] < 8, log.read_text()[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == f"step{state['step']}"
    for rank in range(2):
        assert (out / "checkpoints" / f"step{state['step']}" / f"cap_state_rank{rank}.pt").is_file()
    for noise in ("Setting accelerator to CPU", "Unable to find hostfile", "built successfully"):
        assert noise not in log.read_text(), noise
