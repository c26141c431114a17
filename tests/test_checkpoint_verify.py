"""Verified checkpoints and exports (issue 23): every file's checksum is recorded when it is written, and checked.

Real runs of cap_ds/train.py (the 2-layer MiniLM on real SST-2 rows, the COMMON flags) write checkpoints at steps
2, 4 and 6 (4 and 6 kept) of 7. Bytes flipped in the newest one at the same size: ``--resume auto`` falls back to the
previous checkpoint with a warning naming the file and finishes; ``--resume step6`` is refused with one line (exit
2); a manifest of an older cap_ds (sizes only) still resumes. The exported ``final/`` carries ``files.json``:
:func:`cap_ds.run.export.verify_folder` finds nothing, then the corruption. Unit tests cover the manifest functions on
small files.
"""

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from cap_ds.run.export import EXPORT_MANIFEST, verify_folder
from cap_ds.runtime import manifest as fm
from cap_ds.training.checkpoint import (
    MANIFEST,
    RANK_SUMS,
    CheckpointError,
    check_complete,
    find_resume_tag,
    resolve_resume,
    write_manifest,
)
from tests.conftest import COMMON, REPO, run_env

RUN = [*COMMON, "--cap", "prc", "--extra_negatives", "16", "--max_steps", "7", "--save_steps", "2"]


def train(args, timeout=600):
    return subprocess.run([sys.executable, "cap_ds/train.py", *args], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=timeout)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def flip(path: Path, offset: int | None = None) -> None:
    """Change bytes in place without changing the size (what bit rot or a bad copy does)."""
    size = path.stat().st_size
    offset = size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(8)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
    assert path.stat().st_size == size


def as_if_killed(out: Path) -> Path:
    """A completed run's folder as if it had been killed after its last checkpoint."""
    for name in ("metrics.json", "final", "eval_logits.npy", "train_state.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    return out


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory, glue_dir, model_path):
    out = tmp_path_factory.mktemp("verify") / "run"
    proc = train([*RUN, "--data_dir", str(glue_dir), "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


# ---------------------------------------------------------------- real runs
def test_checkpoint_manifest_has_a_checksum_of_every_file(ckpt_run):
    root = ckpt_run / "checkpoints"
    assert [p.name for p in sorted(root.iterdir()) if p.is_dir()] == ["step4", "step6"]
    for tag in ("step4", "step6"):
        folder = root / tag
        data = json.loads((folder / MANIFEST).read_text())
        on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                         if p.is_file() and p.name != MANIFEST)
        assert sorted(data["files"]) == sorted(data["checksums"]) == on_disk  # no hidden per-rank file left
        assert {"cap_state_rank0.pt", "mp_rank_00_model_states.pt", "run_config.json"} <= set(data["files"])
        assert any(name.endswith("optim_states.pt") for name in data["files"])
        for rel, digest in data["checksums"].items():
            assert digest == f"crc32:{zlib.crc32((folder / rel).read_bytes()):08x}", rel
        assert check_complete(root, tag) is None


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(ckpt_run, glue_dir, tmp_path):
    out = as_if_killed(shutil.copytree(ckpt_run, tmp_path / "corrupt", symlinks=True))
    victim = next((out / "checkpoints" / "step6").glob("*optim_states.pt"))
    flip(victim)
    proc = train([*RUN, "--data_dir", str(glue_dir), "--output_dir", str(out), "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    warning = next(line for line in proc.stderr.splitlines() if "checkpoint step6 skipped" in line)
    assert str(victim) in warning and "checksum differs" in warning
    assert "resumed from step4 at step 4" in proc.stderr
    assert json.loads((out / "train_state.json").read_text()) == {"status": "completed", "step": 7}
    assert check_complete(out / "checkpoints", "step6") is None  # rewritten by the resumed run
    assert verify_folder(out / "final") == []


def test_explicit_resume_of_a_corrupt_checkpoint_is_refused(ckpt_run, glue_dir, tmp_path):
    out = as_if_killed(shutil.copytree(ckpt_run, tmp_path / "explicit", symlinks=True))
    victim = out / "checkpoints" / "step6" / "mp_rank_00_model_states.pt"
    flip(victim)
    proc = train([*RUN, "--data_dir", str(glue_dir), "--output_dir", str(out), "--resume", "step6"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = error_lines(proc)
    assert line.startswith("error: --resume step6: checkpoint is corrupt: ") and str(victim) in line
    assert "checksum differs" in line and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["checkpoints", "runs"]


def test_legacy_manifest_without_checksums_still_resumes(ckpt_run, glue_dir, tmp_path):
    out = as_if_killed(shutil.copytree(ckpt_run, tmp_path / "legacy", symlinks=True))
    for tag in ("step4", "step6"):  # what an older cap_ds wrote: sizes only
        path = out / "checkpoints" / tag / MANIFEST
        data = json.loads(path.read_text())
        del data["checksums"]
        path.write_text(json.dumps(data))
    shutil.rmtree(out / "checkpoints" / "step6")
    (out / "checkpoints" / "latest").write_text("step4")
    proc = train([*RUN, "--data_dir", str(glue_dir), "--output_dir", str(out), "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from step4 at step 4" in proc.stderr and "skipped" not in proc.stderr
    assert json.loads((out / "train_state.json").read_text()) == {"status": "completed", "step": 7}


def test_exported_folder_verifies_then_shows_corruption(ckpt_run, tmp_path):
    final = shutil.copytree(ckpt_run / "final", tmp_path / "final")
    data = json.loads((final / EXPORT_MANIFEST).read_text())
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(data["files"])
    assert sorted(data["files"]) == sorted(data["checksums"])
    assert verify_folder(final) == []
    flip(final / "model.safetensors")
    [problem] = verify_folder(final)
    assert str(final / "model.safetensors") in problem and "checksum differs" in problem
    (final / "config.json").write_text("{}")
    (final / "notes.txt").write_text("mine")
    problems = verify_folder(final)
    assert any("config.json is truncated or changed" in p for p in problems)
    (final / EXPORT_MANIFEST).unlink()
    assert "files.json is missing" in verify_folder(final)[0]


# ---------------------------------------------------------------- the manifest functions, on small files
@pytest.fixture(autouse=False)
def fresh_cache():
    fm.clear_cache()  # a change within the filesystem's mtime resolution must not hit a cached digest
    yield
    fm.clear_cache()


def make_checkpoint(root: Path, tag: str, payload: bytes = b"x" * 5000) -> Path:
    folder = root / tag
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(payload)
    (folder / "cap_state_rank0.pt").write_bytes(payload[::-1])
    (folder / "cap_state_rank1.pt").write_bytes(b"rank1" * 100)
    (folder / "run_config.json").write_text("{}\n")
    return folder


def test_file_checksum_is_crc32_and_cached(tmp_path, fresh_cache):
    path = tmp_path / "f.bin"
    data = os.urandom((fm.CHUNK * 2) + 123)  # several chunks
    path.write_bytes(data)
    assert fm.file_checksum(path) == f"crc32:{zlib.crc32(data):08x}"
    fm.remember(path, "crc32:00000000")  # a digest another rank computed for the file as it is now
    assert fm.file_checksum(path) == "crc32:00000000"
    assert fm.file_checksum(path, cached=False) == f"crc32:{zlib.crc32(data):08x}"
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md5'"):
        fm.file_checksum(path, "md5")


def test_check_files_names_each_kind_of_problem(tmp_path, fresh_cache):
    (tmp_path / "a").write_bytes(b"a" * 100)
    (tmp_path / "b").write_bytes(b"b" * 100)
    sizes, sums = fm.describe_files(tmp_path, ["a", "b"])
    assert fm.file_problems(tmp_path, sizes, sums) == []
    flip(tmp_path / "b", 10)
    fm.clear_cache()
    [(kind, text)] = fm.file_problems(tmp_path, sizes, sums)
    assert kind == "checksum" and str(tmp_path / "b") in text and "checksum differs" in text
    assert fm.file_problems(tmp_path, sizes, None) == []  # a legacy manifest: sizes only
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").unlink()
    assert [k for k, _ in fm.file_problems(tmp_path, sizes, sums)] == ["size", "missing"]  # no file is read
    assert "has no checksum" in fm.check_files(tmp_path, {"a": 1}, {})[0]


def test_write_manifest_merges_the_ranks_checksums(tmp_path, fresh_cache):
    folder = make_checkpoint(tmp_path, "step2")
    # rank 1's digest of its own file is taken as is (not recomputed); a digest for a file whose size changed since
    # is not trusted
    rank1 = {"files": {"cap_state_rank1.pt": 500}, "checksums": {"cap_state_rank1.pt": "crc32:12345678"}}
    (folder / RANK_SUMS.format(rank=1)).write_text(json.dumps(rank1))
    stale = {"files": {"cap_state_rank0.pt": 1}, "checksums": {"cap_state_rank0.pt": "crc32:00000000"}}
    (folder / RANK_SUMS.format(rank=0)).write_text(json.dumps(stale))
    data = write_manifest(folder, "step2")
    assert data["checksums"]["cap_state_rank1.pt"] == "crc32:12345678"
    real = (folder / "cap_state_rank0.pt").read_bytes()
    assert data["checksums"]["cap_state_rank0.pt"] == f"crc32:{zlib.crc32(real):08x}"
    assert sorted(data["files"]) == ["cap_state_rank0.pt", "cap_state_rank1.pt", "mp_rank_00_model_states.pt",
                                     "run_config.json"]
    assert not list(folder.glob(".checksums_rank*"))  # merged, then removed
    assert json.loads((folder / MANIFEST).read_text()) == json.loads(json.dumps(data))


def test_resume_skips_or_refuses_a_corrupt_checkpoint(tmp_path, fresh_cache):
    root = tmp_path / "checkpoints"
    for tag in ("step2", "step4"):
        write_manifest(make_checkpoint(root, tag), tag)
    (root / "latest").write_text("step4")
    assert find_resume_tag(root) == ("step4", [])
    victim = root / "step4" / "mp_rank_00_model_states.pt"
    flip(victim)
    fm.clear_cache()
    tag, skipped = find_resume_tag(root)
    assert tag == "step2" and [t for t, _ in skipped] == ["step4"]
    assert str(victim) in skipped[0][1] and "checksum differs" in skipped[0][1]
    with pytest.raises(CheckpointError, match=r"^--resume step4: checkpoint is corrupt: .*checksum differs"):
        resolve_resume(root, "step4")
    assert resolve_resume(root, "step2") == ("step2", [])
    # a truncated file is still reported as before (and not read)
    (root / "step2" / "cap_state_rank0.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="checkpoint is incomplete: .*truncated or changed"):
        resolve_resume(root, "step2")
    assert find_resume_tag(root)[0] is None


# ---------------------------------------------------------------- two real ranks
@pytest.mark.distributed
def test_two_ranks_manifest_covers_every_ranks_files(glue_dir, model_path, tmp_path, fresh_cache):
    from tests.test_resume import start, wait

    out = tmp_path / "two"
    cmd = ["cap_ds/train.py", *COMMON, "--cap", "prc", "--extra_negatives", "16", "--max_steps", "3",
           "--save_steps", "2", "--data_dir", str(glue_dir), "--output_dir", str(out)]
    assert wait(start(cmd)) == [0, 0]
    folder = out / "checkpoints" / "step2"
    data = json.loads((folder / MANIFEST).read_text())
    names = set(data["checksums"])
    assert {"cap_state_rank0.pt", "cap_state_rank1.pt", "mp_rank_00_model_states.pt"} <= names
    assert [n for n in names if "rank_1_" in n and n.endswith("optim_states.pt")]  # rank 1's ZeRO shard
    assert not list(folder.glob(".checksums_rank*"))
    for rel, digest in data["checksums"].items():  # rank 1's digests, merged by rank 0, are the files' own
        assert digest == f"crc32:{zlib.crc32((folder / rel).read_bytes()):08x}", rel
    victim = next(folder.glob("*rank_1_*optim_states.pt"))
    flip(victim)
    tag, skipped = find_resume_tag(out / "checkpoints")
    assert tag is None and str(victim) in skipped[0][1] and "checksum differs" in skipped[0][1]
