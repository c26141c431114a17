"""What the benchmark scripts share to start real ``cap_ds/train.py`` runs: the repo paths, the default GLUE
folder, the offline environment, and the command (plain python, or the DeepSpeed launcher for several ranks).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "cap_ds" / "train.py"
GLUE = REPO.parent / "shared" / "data" / "glue"
DEFAULT_GLUE = str(GLUE) if GLUE.is_dir() else None  # else the hub


def offline_env(**extra: str) -> dict[str, str]:
    """This environment with the hub offline unless the caller set HF_HUB_OFFLINE, plus ``extra``."""
    return {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **extra}


def train_command(flags: list[str], launcher_gpus: int = 0, port: int = 29500) -> list[str]:
    """``python train.py flags``, or ``deepspeed --num_gpus N --master_port P train.py flags`` for N > 0."""
    if launcher_gpus > 0:
        return ["deepspeed", "--num_gpus", str(launcher_gpus), "--master_port", str(port), str(TRAIN), *flags]
    return [sys.executable, str(TRAIN), *flags]


def run_checked(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` in the repo; on failure exit with the command and the tails of its output."""
    proc = subprocess.run(cmd, cwd=REPO, env=env if env is not None else offline_env(), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def split_train_argv(argv: list[str], usage: str) -> tuple[list[str], list[str]]:
    """(tool flags, train.py flags) of a ``TOOL [flags] -- <train.py flags>`` command line (in-process tools)."""
    if "--" not in argv:
        raise SystemExit(f"usage: {usage}")
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]
