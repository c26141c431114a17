"""A new user's first hour (issue 24, item 5), with the commands the README gives:

- a redirected log (every cluster job) shows a progress line every --logging_steps;
- Ctrl-C under the `deepspeed` command writes a checkpoint before the prompt returns, says so in one line, and
  exits 130 (cap_ds_launcher_hook.py makes DeepSpeed's runner cap_ds/launch.py);
- a mistyped flag, a prefix, a bad value or choice is one line naming the flag and the closest ones, exit 2;
- --help is grouped by topic, every flag explained;
- missing data while offline names the folders looked in and how to give --data_dir;
- the quick start leaves `git status` and `ruff check .` as they were.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import cap_ds_launcher_hook as hook
from cap_ds.launch import catches
from cap_ds.run.args import ArgumentError, parse_args
from cap_ds.runtime import signals
from cap_ds.runtime.monitor import clock, progress_line
from cap_ds.training.checkpoint import find_resume_tag, safe_load
from tests.conftest import REPO, free_port, run_env

TINY = ["--config_overrides", "num_hidden_layers=2", "--task_name", "sst2", "--max_train_samples", "64",
        "--max_eval_samples", "32", "--max_seq_length", "32", "--per_device_train_batch_size", "8",
        "--extra_negatives", "16", "--cap", "prc"]


def deepspeed_command() -> list[str]:
    """DeepSpeed's `deepspeed` console script of this interpreter's environment (what a user types)."""
    script = Path(sys.executable).with_name("deepspeed")
    if not script.is_file():
        found = shutil.which("deepspeed")
        if found is None:
            pytest.skip("no deepspeed command on this machine")
        script = Path(found)
    return [str(script)]


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until ``pattern`` shows in ``log`` (the process must still run)."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text(errors="replace")):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
        time.sleep(0.1)


# ---------------------------------------------------------------- progress lines
def test_progress_line_reads_at_a_glance():
    values = {"loss": 0.412, "ce": 0.2, "kd": 0.11, "prc": 0.05, "snc": 0.03, "fic": 0.02, "sparsity": 0.62,
              "lr": 8.1e-5, "examples_per_second": 31.2, "threshold": 0.3}
    assert progress_line(40, 900, values, 372) == \
        "step 40/900 | loss 0.412 (ce 0.2 kd 0.11 prc 0.05 snc 0.03 fic 0.02) | sparsity 0.620 | lr 8.1e-05 | " \
        "31.2 ex/s | ETA 6m12s"
    # a fine-tuning run: no pruning, no CAP terms; the first logging step may have no ETA yet
    assert progress_line(5, 5, {"loss": 0.69, "ce": 0.69, "lr": 0.0, "examples_per_second": 12.0}, None) == \
        "step 5/5 | loss 0.69 (ce 0.69) | lr 0 | 12.0 ex/s"
    assert [clock(s) for s in (0.4, 59, 61, 3599, 7501)] == ["0s", "59s", "1m01s", "59m59s", "2h05m"]


# ---------------------------------------------------------------- strict flags
def parse(*flags: str):
    return parse_args(["--output_dir", "/tmp/unused", "--cap", "none", *flags])


@pytest.mark.parametrize("flags, line", [
    (["--target_sparsty", "0.9"], "unknown flag --target_sparsty; did you mean --target_sparsity?"),
    (["--learning_rat", "1e-4"], "unknown flag --learning_rat; did you mean --learning_rate"),  # no prefixes
    (["--max_step=5"], "unknown flag --max_step; did you mean --max_steps"),
    (["--fp16"], "unknown flag --fp16; see --help for the flags"),
    (["--pruning_method", "movment"], "--pruning_method: invalid choice 'movment' (did you mean movement?); "
                                      "allowed: magnitude, movement, soft_movement, first_order"),
    (["--learning_rate", "abc"], "--learning_rate: invalid float value: 'abc'"),
    (["--max_steps"], "--max_steps: expected one argument"),
    (["--max_steps", "5", "6"], "unexpected argument '6'"),
])
def test_mistakes_are_one_line_naming_the_flag(flags, line):
    with pytest.raises(ArgumentError) as err:
        parse(*flags)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_what_the_launchers_pass_still_parses(monkeypatch):
    assert parse("--local_rank=1").run.local_rank == 1  # the DeepSpeed launcher's form
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert parse().run.local_rank == 3  # torchrun / srun wrappers
    assert parse("--target-sparsity", "0.5", "--no_threshold_control").pruning.target_sparsity == 0.5


def test_a_typo_is_one_line_and_exit_2_under_python_and_deepspeed(tmp_path):
    out = tmp_path / "out"
    for cmd in ([sys.executable, "cap_ds/train.py"],
                [*deepspeed_command(), "--num_gpus", "1", "--master_port", str(free_port()), "cap_ds/train.py"]):
        proc = subprocess.run([*cmd, "--target_sparsty", "0.9", "--output_dir", str(out)], cwd=REPO,
                              env=run_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [
            "error: unknown flag --target_sparsty; did you mean --target_sparsity?"], proc.stderr[-3000:]
        assert not out.exists()


# ---------------------------------------------------------------- --help
def test_help_is_grouped_by_topic_and_explains_every_flag(capsys):
    from cap_ds.run.args import HELP_SECTIONS

    with pytest.raises(SystemExit) as exc:
        parse("--help")
    assert exc.value.code == 0
    text = capsys.readouterr().out
    titles = list(HELP_SECTIONS.values())
    assert [t for t in re.findall(r"^(\S[^\n]*):$", text, re.M) if t in titles] == titles  # in this order
    sections = {t: text.split(f"\n{t}:\n", 1)[1].split("\n\n", 1)[0] for t in titles}
    output = "output, logging and checkpoints"
    where = {"--target_sparsity": "pruning", "--deepspeed": "DeepSpeed", "--local_rank": "DeepSpeed",
             "--output_dir": output, "--logging_steps": output,
             "--learning_rate": "training", "--data_dir": "data (GLUE, your files, question answering)", "--teacher_name_or_path": "model",
             "--kd_weight": "CAP contrastive losses and distillation"}
    for flag, title in where.items():
        assert re.search(rf"^  {flag}\b", sections[title], re.M), (flag, title)
    # every flag once, with words after it (not the dash aliases)
    flags = re.findall(r"^  (--\w+)(.*)$", text, re.M)
    assert len(flags) == len({f for f, _ in flags}) >= 60
    for section in sections.values():
        for entry in re.split(r"\n  (?=--)", "\n" + section)[1:]:
            assert len(entry.split(None, 2)) == 3, entry
    logging = " ".join(sections["output, logging and checkpoints"].split("--logging_steps", 1)[1].split())
    assert logging.startswith("N Every N optimizer steps (and at the last), rank 0 prints one progress line")


# ---------------------------------------------------------------- offline without data
def test_offline_without_data_dir_names_the_folders_and_the_flag(tmp_path):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine \t1\n")
    cache = tmp_path / "datasets-cache"
    proc = subprocess.run([sys.executable, "-m", "cap_ds.train", "--task_name", "sst2", "--mode", "finetune",
                           "--output_dir", str(tmp_path / "x")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=run_env(HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1",
                                                   PYTHONPATH=str(REPO)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: no --data_dir and the HF hub is offline (HF_HUB_OFFLINE=1)")
    assert f"datasets cache {cache}" in line and "pass --data_dir <GLUE folder holding SST-2/train.tsv" in line
    assert "(here: --data_dir glue)" in line  # the GLUE folder beside it
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- Ctrl-C
def test_the_deepspeed_command_becomes_cap_ds_launch_for_cap_ds_runs_only(tmp_path, monkeypatch):
    assert "cap_ds_launcher" in {e.name for e in entry_points(group="torch.backends")}, \
        "cap_ds is installed without its launcher hook: pip install -e ."
    launch = str(REPO / "cap_ds" / "launch.py")
    monkeypatch.chdir(REPO)
    assert hook.wrapped_launch(["--num_gpus", "2", "cap_ds/train.py", "--max_steps", "5"]) == launch
    assert hook.wrapped_launch(["--module", "cap_ds.train", "--cap", "none"]) == launch
    other = tmp_path / "train.py"
    other.write_text("")
    assert hook.wrapped_launch(["--num_gpus", "1", str(other)]) is None  # someone else's script
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    for multi in (["--hostfile", str(hostfile)], [f"--hostfile={hostfile}"], ["--num_nodes", "2"],
                  ["--force_multi"], ["--autotuning", "run"]):
        assert hook.wrapped_launch([*multi, "cap_ds/train.py"]) is None, multi
    monkeypatch.setattr(hook.sys, "argv", ["/usr/bin/python", "cap_ds/train.py"])
    hook.autoload()  # not DeepSpeed's runner: returns


def test_forwarded_signals_wait_for_the_ranks_handler(monkeypatch):
    # Python's own KeyboardInterrupt handler, set here: a process started in the background of a non-interactive
    # shell (nohup, `cmd &`) inherits SIGINT ignored and Python then installs none.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert catches(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not catches(child.pid, signal.SIGTERM)  # the default action would kill it: not yet
    finally:
        child.kill()
        child.wait()
    for env, says in (({}, True), ({"RANK": "1"}, False), ({"SLURM_PROCID": "0"}, True),
                      ({"RANK": "0", "CAP_DS_LAUNCH": "1"}, False)):
        for name in ("RANK", "SLURM_PROCID", "CAP_DS_LAUNCH", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert signals.announces_signals() is says, env


def test_ctrl_c_under_deepspeed_checkpoints_before_the_prompt_returns(glue_dir, model_path, tmp_path):
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group of `deepspeed ...`."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    cmd = [*deepspeed_command(), "--num_gpus", "1", "--master_port", str(free_port()), "cap_ds/train.py", *TINY,
           "--data_dir", str(glue_dir), "--output_dir", str(out), "--max_steps", "400", "--logging_steps", "1"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for(log, r"step 3/400 \| loss", proc)  # mid-training, and the progress line reaches a file
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=300)
            state = json.loads((out / "train_state.json").read_text())  # as the prompt comes back
            tag, skipped = find_resume_tag(out / "checkpoints")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 130, text[-4000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
    said = [line for line in text.splitlines() if re.search(r"SIGINT|Ctrl-C|interrupt", line, re.I)]
    assert len(said) == 1 and "Ctrl-C" in said[0], said
    assert not [line for line in text.splitlines() if line.startswith("error") or "ERROR" in line], text[-4000:]
    assert state["status"] == "preempted" and 3 <= state["step"] < 400
    assert tag == f"step{state['step']}" and not skipped  # complete, checksums verified
    assert safe_load(out / "checkpoints" / tag / "cap_state_rank0.pt")["global_step"] == state["step"]


# ---------------------------------------------------------------- the quick start leaves the checkout clean
def _status() -> set[str]:
    proc = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=all"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    return set(proc.stdout.splitlines())


def test_quick_start_leaves_git_status_and_ruff_unchanged(glue_dir, model_path):
    """examples/cap_sst2.sh (teacher, then CAP-m through `deepspeed`) at tiny size, in the checkout itself."""
    out = REPO / "outputs" / f"first-hour-{os.getpid()}"
    before = _status()
    try:
        proc = subprocess.run(["bash", "examples/cap_sst2.sh", "--config_overrides", "num_hidden_layers=2",
                               "--max_eval_samples", "64", "--num_train_epochs", "1", "--extra_negatives", "16",
                               "--save_steps", "2"],  # checkpoints: DeepSpeed drops its scripts beside them
                              cwd=REPO, capture_output=True, text=True, timeout=900,
                              env=run_env(TRAIN_SAMPLES="64", DATA_DIR=str(glue_dir), OUT=str(out)))
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert "SST-2 dev accuracy: dense teacher" in log
        assert re.search(r"step 4/4 \| loss \S+ \(ce \S+ kd \S+ prc \S+ fic \S+\) \| sparsity 0.9", log), \
            log[-4000:]  # the CAP run's progress line, in a captured (not a terminal) log
        assert list(out.rglob("zero_to_fp32.py")), "DeepSpeed's helper script: what .gitignore must cover"
        new = sorted(_status() - before)
        if not os.environ.get("CI"):  # a shared checkout where others add files meanwhile: what the run may write
            new = [e for e in new if "/" not in e[3:].rstrip("/") or out.name in e
                   or {"runs", "out", "outputs", "checkpoints", "final"} & set(Path(e[3:]).parts)]
        assert new == []
        lint = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert out.name not in lint.stdout + lint.stderr, lint.stdout[-3000:]
        ignored = subprocess.run(["git", "check-ignore", "--no-index", "out/teacher/final/model.safetensors",
                                  "runs/g/sst2/metrics.json", "logs/cap-1.out", ".devkit/env.sh",
                                  "my_run/checkpoints/zero_to_fp32.py", "my_run/.cap_ds.lock"],
                                 cwd=REPO, capture_output=True, text=True, timeout=60)
        assert len(ignored.stdout.splitlines()) == 6, ignored.stdout  # the README's other output folders
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if (REPO / "outputs").is_dir() and not any((REPO / "outputs").iterdir()):
            (REPO / "outputs").rmdir()
