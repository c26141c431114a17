"""benchmarks/reproduce_glue.py: a real (tiny) sweep writes table, JSON, plot and heat-maps, and resumes."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO, run_env

SCRIPT = str(REPO / "benchmarks" / "reproduce_glue.py")


def sweep(out, teacher_dir, glue_dir, *extra):
    cmd = [sys.executable, SCRIPT, "--output_dir", str(out), "--data_dir", str(glue_dir),
           "--teacher_name_or_path", str(teacher_dir / "final"), "--methods", "magnitude_kd,cap_m",
           "--sparsities", "0.5", "--max_train_samples", "64", "--max_eval_samples", "64",
           "--num_train_epochs", "2", "--extra_args", "--config_overrides num_hidden_layers=2 --extra_negatives 64",
           *extra]
    env = run_env()
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_sweep_writes_results_and_resumes(teacher_dir, glue_dir, tmp_path):
    out = tmp_path / "sweep"
    proc = sweep(out, teacher_dir, glue_dir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["runs"]] == ["magnitude_kd", "cap_m"]
    for r in data["runs"]:
        assert r["sparsity"] == pytest.approx(0.5, abs=0.01) and 0.0 <= r["score"] <= 1.0
        assert r["seed"] == 42 and r["steps"] > 0
        assert (out / f"{r['method']}_50_s42" / "final" / "sparsity_heatmap.png").is_file()
    assert data["teacher"] == data["runs"][0]["teacher"] > 0.5  # the given teacher, scored on the same dev rows
    table = (out / "results.md").read_text()
    assert "| CAP-m | 42 | 50 % | 50.0 % |" in table and "magnitude + KD" in table
    assert data["machine"]["description"].startswith("CPU only") and "Machine: CPU only" in table
    assert "Dev set: 64 examples; one standard error" in table
    assert (out / "accuracy_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"

    # Merging sweep folders: one table (deltas within the folder) and one plot.
    merged = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plot_sweeps.py"), str(out), "--output",
                             str(tmp_path / "all.png")], capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr
    assert "| CAP-m [--config_overrides num_hidden_layers=2 --extra_negatives 64] | 42 | 50 % |" in merged.stdout
    assert (tmp_path / "all.png").read_bytes()[:4] == b"\x89PNG"

    # Same command again: both runs are read back, none is retrained.
    again = sweep(out, teacher_dir, glue_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cap_ds/train.py" not in again.stdout
    assert (out / "cap_m_50_s42" / "train.log").read_text().count("$ ") == 1

    # A second seed joins the same sweep (seeds are not part of the budget), two runs side by side: the
    # seed-42 runs are read back, the seed-43 runs train, and the table gains the across-seeds summary.
    more = sweep(out, teacher_dir, glue_dir, "--seeds", "42,43", "--parallel", "2", "--discard_weights")
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in data["runs"]] == [
        ("magnitude_kd", 42), ("cap_m", 42), ("magnitude_kd", 43), ("cap_m", 43)]
    assert (out / "cap_m_50_s42" / "train.log").read_text().count("$ ") == 1
    # --discard_weights: the new runs keep metrics and heat-map, not their weights; the old ones are untouched.
    assert not list((out / "cap_m_50_s43").rglob("*.safetensors"))
    assert (out / "cap_m_50_s43" / "final" / "sparsity_heatmap.png").is_file()
    assert list((out / "cap_m_50_s42").rglob("*.safetensors"))
    table = (out / "results.md").read_text()
    # (CAP-m's paired baseline is movement + KD, not in this sweep; pairing is tested in test_plot_sweeps.)
    assert "Across seeds:" in table and "| CAP-m | 50 % | 42,43 |" in table and "| magnitude + KD | 50 % | 42,43 |" in table
    assert all(r["machine"]["description"].startswith("CPU only") for r in data["runs"])  # where each row ran

    # --collect rebuilds the results from the folder alone (e.g. runs carried back from a GPU machine), whatever
    # commands started the runs, and trains nothing.
    (out / "results.json").unlink()
    (out / "results.md").unlink()
    collected = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(out), "--collect"], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
    assert collected.returncode == 0, collected.stderr[-3000:]
    assert "cap_ds/train.py" not in collected.stdout
    again = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"], r["score"]) for r in again["runs"]] == [
        (r["method"], r["seed"], r["score"]) for r in data["runs"]]
    assert again["settings"]["max_train_samples"] == 64 and again["settings"]["seeds"] == [42, 43]
    assert "| CAP-m | 50 % | 42,43 |" in (out / "results.md").read_text()
    nothing = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(tmp_path / "empty"), "--collect"],
                             capture_output=True, text=True, timeout=120)
    assert nothing.returncode != 0 and "is not a sweep folder" in nothing.stderr

    # A different budget in the same folder is refused, naming the setting.
    other = sweep(out, teacher_dir, glue_dir, "--learning_rate", "5e-5")
    assert other.returncode != 0 and "learning_rate" in other.stderr


def test_bad_arguments_named():
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", "/tmp/unused", "--methods", "magic"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--methods: unknown ['magic']" in proc.stderr
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", "/tmp/unused", "--sparsities", "0.9,1.5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--sparsities" in proc.stderr
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", "/tmp/unused", "--seeds", "42,x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--seeds: comma list of integers" in proc.stderr


def test_data_args_run_the_sweep_on_your_own_data(tmp_path):
    """--data_args replaces --task_name/--data_dir in every run, and its --max_seq_length wins (dry run)."""
    data = "--task_type question_answering --train_file q.jsonl --validation_file d.jsonl --max_seq_length 192"
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(tmp_path / "sweep"), "--data_args", data,
                           "--methods", "cap_m", "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(commands) == 2  # the teacher, then CAP-m
    for line in commands:
        assert data in line and "--task_name" not in line and "--data_dir" not in line
        assert line.count("--max_seq_length") == 1
