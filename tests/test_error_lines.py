"""Issue 23: one line, exit 2, for user mistakes; one line naming the cause, exit 1, for faults; no traceback.

Real ``cap_ds/train.py`` subprocesses (most fail before any model loads); faults are injected by
tests/workers/faulty_train.py (monkeypatching: root ignores chmod). The in-process cases pin the pieces.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cap_ds.run import faults
from cap_ds.run.args import ArgumentError, parse_args
from cap_ds.runtime import iofaults
from cap_ds.runtime.atomic import atomic_dir, atomic_file
from tests.conftest import REPO, free_port, run_env

TINY = ["--config_overrides", "num_hidden_layers=2", "--task_name", "sst2", "--max_train_samples", "64",
        "--max_eval_samples", "32", "--max_seq_length", "32", "--per_device_train_batch_size", "8",
        "--disable_tqdm", "--logging_steps", "1", "--cap", "none", "--pruning_method", "magnitude"]
WORKER = str(REPO / "tests" / "workers" / "faulty_train.py")


def train(args, script="cap_ds/train.py", timeout=600, **env):
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=run_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(proc, code: int) -> str:
    """The process exited ``code`` with exactly one ``error:`` line on stderr and no traceback; returns it."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return lines[0]


# ---------------------------------------------------------------- user errors: exit 2, before any work
def test_max_seq_length_zero_is_one_line(tmp_path):
    out = tmp_path / "out"
    line = one_error_line(train(["--max_seq_length", "0", "--cap", "none", "--output_dir", str(out)]), 2)
    assert line.startswith("error: --max_seq_length must be >= 5, got 0")
    assert not out.exists()


@pytest.mark.parametrize("flags, match", [
    (["--max_seq_length", "4"], "--max_seq_length must be >= 5, got 4"),
    (["--warmup_steps=-1"], "--warmup_steps must be >= 0"),
    (["--seed=-1"], r"--seed must be in \[0, 2\*\*32 - 1\]"),
    (["--importance_batches=-2"], "--importance_batches must be >= 0"),
    (["--final_warmup=-1"], "--final_warmup must be >= 0"),
    (["--final_threshold", "1.5"], r"--final_threshold must be in \[0, 1\]"),
    (["--kd_weight=-0.5"], "--kd_weight must be >= 0"),
    (["--ce_weight=-1"], "--ce_weight must be >= 0"),
    (["--snapshot_steps=-1"], "--snapshot_steps must be >= 0"),
    (["--max_snapshots", "0"], "--max_snapshots must be >= 1"),
])
def test_numeric_flags_out_of_range(flags, match):
    with pytest.raises(ArgumentError, match=match):
        parse_args(["--output_dir", "/tmp/unused", "--cap", "none", *flags])


def test_output_dir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    line = one_error_line(train(["--cap", "none", "--output_dir", str(out)]), 2)
    assert f"--output_dir '{out}': {tmp_path / 'file'} is a file, not a folder" in line
    assert "Not a directory" in line


def test_output_dir_on_a_read_only_file_system_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "run"
    proc = train(["--cap", "none", "--output_dir", str(out)], script=WORKER, CAP_DS_TEST_FAULT=f"rofs:{ro}")
    line = one_error_line(proc, 2)
    assert f"--output_dir '{out}': cannot create it in {ro}" in line and "Read-only file system" in line
    assert not out.exists()


def test_offline_without_data_dir_is_one_line(tmp_path, model_path):
    out = tmp_path / "out"
    cache = tmp_path / "datasets-cache"
    proc = train([*TINY, "--output_dir", str(out)], HF_DATASETS_CACHE=str(cache))
    line = one_error_line(proc, 2)
    assert "no --data_dir and the HF hub is offline" in line and str(cache) in line
    assert "pass --data_dir" in line and "SST-2/train.tsv" in line
    assert not out.exists()


def test_stsb_score_outside_0_to_5_names_file_and_row(tmp_path):
    stsb = tmp_path / "STS-B"
    stsb.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    row = "{i}\tmain\tf\t2012\t0\tnone\tnone\tA man plays.\tA man is playing.\t{score}\n"
    (stsb / "train.tsv").write_text(header + row.format(i=0, score="4.2") + row.format(i=1, score="7.5"))
    (stsb / "dev.tsv").write_text(header + row.format(i=0, score="3.0"))
    out = tmp_path / "out"
    proc = train(["--task_name", "stsb", "--data_dir", str(tmp_path), "--cap", "none", "--output_dir", str(out)])
    line = one_error_line(proc, 2)
    assert f"{stsb / 'train.tsv'}:3: label '7.5' for task 'stsb' is outside its range" in line
    assert "from 0 to 5" in line and not out.exists()


# ---------------------------------------------------------------- faults: exit 1, the cause named
def test_disk_full_while_checkpointing_names_file_and_error(glue_dir, model_path, tmp_path):
    out = tmp_path / "full"
    proc = train([*TINY, "--max_steps", "2", "--save_steps", "1", "--data_dir", str(glue_dir), "--output_dir",
                  str(out)], script=WORKER, CAP_DS_TEST_FAULT="enospc:mp_rank_00_model_states")
    line = one_error_line(proc, 1)
    target = out / "checkpoints" / "step1" / "mp_rank_00_model_states.pt"
    assert line == (f"error: I/O error on {target}: No space left on device (errno ENOSPC); free space on that "
                    "file system or choose another --output_dir")
    state = json.loads((out / "train_state.json").read_text())
    assert state["status"] == "failed" and "No space left on device" in state["error"] and str(target) in state["error"]
    assert not (out / "final").exists() and not (out / "checkpoints" / "latest").exists()


@pytest.mark.distributed
def test_two_ranks_report_the_rank_that_failed_first(glue_dir, model_path, tmp_path):
    """Rank 1's disk fills while it writes its own checkpoint file; rank 0 then dies of the broken connection and
    stays quiet: one line, rank 1's cause, also in train_state.json."""
    out = tmp_path / "two"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**run_env(CAP_DS_TEST_FAULT="enospc:cap_state_rank1"), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, *TINY, "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size",
             "4", "--data_dir", str(glue_dir), "--output_dir", str(out)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    stderr = "".join(err for _, err in results)
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert [p.returncode for p in procs] == [1, 1] and len(lines) == 1, stderr[-6000:]
    assert "Traceback" not in stderr, stderr[-6000:]
    target = out / "checkpoints" / "step1" / "cap_state_rank1.pt"
    assert lines[0].startswith(f"error: I/O error on {target}: No space left on device (errno ENOSPC)")
    assert lines[0].endswith("[rank 1]")
    assert lines[0] in results[1][1]  # printed by rank 1, not rank 0
    state = json.loads((out / "train_state.json").read_text())
    assert state["status"] == "failed" and state["error"] == lines[0].removeprefix("error: ")
    assert not list((out / "checkpoints" / "step1").glob(".cap_state_rank1.*"))  # no temporary left behind


# ---------------------------------------------------------------- the pieces, in-process
def test_opaque_writer_error_is_named_by_a_probe(tmp_path, monkeypatch):
    """torch's writer says only 'file write failed': atomic_file names the target and the probed OS error, and
    leaves no temporary file."""
    monkeypatch.setattr(iofaults, "probe", lambda path: errno.ENOSPC)

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("basic_ios::clear: iostream error")

    target = tmp_path / "state.pt"
    with pytest.raises(OSError) as exc:
        atomic_file(target, write)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []

    def write_dir(tmp: Path) -> None:  # safetensors' message carries the OS error
        raise RuntimeError(f'Error while serializing: IoError(Os {{ code: 30, kind: ReadOnlyFilesystem, message: '
                           f'"Read-only file system" }}) {tmp / "model.safetensors"}')

    with pytest.raises(OSError) as exc:
        atomic_dir(tmp_path / "final", write_dir)
    assert exc.value.errno == errno.EROFS and list(tmp_path.iterdir()) == []


def test_describe_and_peer_loss():
    try:
        try:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/run/metrics.json")
        except OSError as inner:
            raise RuntimeError("export failed") from inner
    except RuntimeError as err:
        line, code = faults.describe(err)
    assert code == 1 and line == ("I/O error on /data/run/metrics.json: Read-only file system (errno EROFS); the "
                                  "file system is mounted read-only: choose another --output_dir")
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:29500")
    assert faults.is_peer_loss(gloo) and not faults.is_peer_loss(OSError(errno.EPIPE, "Broken pipe"))
    line, code = faults.describe(ValueError("bad\nsecond line"))
    assert code == 1 and line.startswith("ValueError: bad") and "CAP_DS_TRACEBACK=1" in line
    assert faults.describe(ArgumentError("--x must be >= 1"))[1] == 2
    assert faults.settle(KeyError("k")).report  # one process, no process group: it reports
