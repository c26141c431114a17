"""benchmarks/mask_agreement.py on synthetic exports: magnitude masks agree fully, random ones at chance."""

import subprocess
import sys

import torch
from safetensors.torch import save_file

from .conftest import REPO


def test_agreement_with_magnitude_and_between_runs(tmp_path):
    torch.manual_seed(0)
    pre = {f"bert.encoder.layer.{i}.attention.self.query.weight": torch.randn(64, 64) for i in range(2)}
    pre["bert.embeddings.word_embeddings.weight"] = torch.randn(10, 64)  # not an encoder linear: ignored
    (tmp_path / "pre").mkdir()
    save_file(pre, str(tmp_path / "pre" / "model.safetensors"))
    runs = {}
    for name in ("magnitude", "random"):
        state = {}
        for key, w in pre.items():
            if ".layer." not in key:
                continue
            score = w.abs() if name == "magnitude" else torch.rand_like(w)
            keep = torch.zeros(w.numel(), dtype=torch.bool)
            keep[score.flatten().topk(w.numel() // 4).indices] = True
            state[key] = w * keep.view_as(w)
        (tmp_path / name / "final").mkdir(parents=True)
        save_file(state, str(tmp_path / name / "final" / "model.safetensors"))
        runs[name] = str(tmp_path / name)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mask_agreement.py"), runs["magnitude"],
                           runs["random"], "--pretrained", str(tmp_path / "pre")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first_table = proc.stdout.split("Pairwise")[0]
    rows = {line.split("|")[1].strip(): line for line in first_table.splitlines() if line.startswith("| ")}
    assert "| 25.0 % | 100.0 % | 25.0 % |" in rows["magnitude"]
    mass = {k: float(v.split("|")[5].strip().rstrip(" %")) for k, v in rows.items() if k in runs}
    assert mass["magnitude"] > 60.0 and 15.0 < mass["random"] < 35.0  # a random quarter keeps ~a quarter
    random_vs_mag = float(rows["random"].split("|")[3].strip().rstrip(" %"))
    assert 15.0 < random_vs_mag < 35.0  # chance is 25 %
    assert "| magnitude | 100.0 |" in proc.stdout  # a run agrees fully with itself


def test_runs_with_the_same_folder_name_stay_apart():
    sys.path.insert(0, str(REPO))
    from benchmarks.mask_agreement import run_labels

    assert run_labels(["a/sweep1/movement_kd_90", "b/sweep2/movement_kd_90", "a/sweep1/cap_m_90"]) == [
        "sweep1/movement_kd_90", "sweep2/movement_kd_90", "cap_m_90"]
