"""benchmarks/plot_sweeps.py: merged table, deltas against a --baseline folder, and the across-seeds table."""

import json
import sys

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO))
from benchmarks.plot_sweeps import main  # noqa: E402


def write_sweep(folder, seed, runs, extra=""):
    rows = [{"method": m, "label": label, "pruning": "magnitude", "cap": cap, "target_sparsity": 0.9,
             "sparsity": 0.9, "score": score, "step_time_s": 0.5, "train_runtime_s": 300.0, "eval_examples": 872}
            for m, label, cap, score in runs]
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({
        "settings": {"seed": seed, "extra_args": extra}, "teacher": 0.85, "metric": "accuracy", "runs": rows}))
    return str(folder)


KD = ("magnitude_kd", "magnitude + KD", "none")
CAP = ("cap_mag", "CAP-mag", "prc,snc,fic")


def run(capsys, *args):
    main(list(args))
    return capsys.readouterr().out


def test_baseline_folder_and_seed_table(tmp_path, capsys):
    s42 = write_sweep(tmp_path / "s42", 42, [(*KD, 0.76), (*CAP, 0.77)])
    s43 = write_sweep(tmp_path / "s43", 43, [(*KD, 0.74), (*CAP, 0.78)])
    temp = write_sweep(tmp_path / "temp", 42, [(*CAP, 0.80)], extra="--contrastive_temperature 0.05")
    other_seed = write_sweep(tmp_path / "neg0", 43, [(*CAP, 0.70)], extra="--extra_negatives 0")
    out = run(capsys, s42, s43, temp, other_seed, "--baseline", s42, "--output", str(tmp_path / "m.png"))
    # A CAP-only folder gets its delta from the --baseline folder's KD run, but only at the same seed.
    assert "| CAP-mag [--contrastive_temperature 0.05] (seed 42) | 42 | 90 % | 90.0 % | 80.00 | 94.1 % | +4.00 |" in out
    assert "| CAP-mag [--extra_negatives 0] (seed 43) | 43 | 90 % | 90.0 % | 70.00 | 82.4 % | - |" in out
    assert "| CAP-mag (seed 43) | 43 | 90 % | 90.0 % | 78.00 | 91.8 % | +4.00 |" in out  # its own folder's KD run
    # Across seeds: mean +- standard error, sample sd; paired differences +1 and +4 -> +2.50 +- 1.50 (sd 2.12).
    assert "| magnitude + KD | 90 % | 42,43 | 75.00 ± 1.00 | 1.41 | - |" in out
    assert "| CAP-mag | 90 % | 42,43 | 77.50 ± 0.50 | 0.71 | +2.50 ± 1.50 (n=2) |" in out
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_single_seed_has_no_seed_table(tmp_path, capsys):
    s42 = write_sweep(tmp_path / "s42", 42, [(*KD, 0.76), (*CAP, 0.77)])
    out = run(capsys, s42, "--output", str(tmp_path / "m.png"))
    assert "| CAP-mag | 42 | 90 % | 90.0 % | 77.00 | 90.6 % | +1.00 |" in out and "Across seeds" not in out


def test_one_sweep_with_several_seeds(tmp_path, capsys):
    """A --seeds sweep holds every seed in one results.json: deltas pair each run with the KD run of its seed."""
    rows = [{"method": m, "label": label, "pruning": "magnitude", "cap": cap, "target_sparsity": 0.9, "seed": seed,
             "sparsity": 0.9, "score": score, "steps": 564, "step_time_s": 0.5, "train_runtime_s": 300.0}
            for seed, kd, cap_score in ((42, 0.76, 0.77), (43, 0.74, 0.78), (44, 0.75, 0.75))
            for m, label, cap, score in ((*KD, kd), (*CAP, cap_score))]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "results.json").write_text(json.dumps({
        "settings": {"seeds": [42, 43, 44], "extra_args": ""}, "teacher": 0.85, "metric": "accuracy", "runs": rows}))
    out = run(capsys, str(tmp_path / "s"), "--output", str(tmp_path / "m.png"))
    assert "| CAP-mag (seed 43) | 43 | 90 % | 90.0 % | 78.00 | 91.8 % | +4.00 | 564 |" in out
    assert "| CAP-mag (seed 44) | 44 | 90 % | 90.0 % | 75.00 | 88.2 % | +0.00 | 564 |" in out
    # paired +1, +4, 0: mean 1.67, sd 2.08, SE 1.20
    assert "| CAP-mag | 90 % | 42,43,44 | 76.67 ± 0.88 | 1.53 | +1.67 ± 1.20 (n=3) |" in out


def test_missing_results_named(tmp_path):
    with pytest.raises(SystemExit, match="results.json: not found"):
        main([str(tmp_path), "--output", str(tmp_path / "m.png")])
