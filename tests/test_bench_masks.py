"""benchmarks/bench_masks.py runs (tiny size) and reports every timing and ratio it prints; no timing is checked."""

import sys

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def test_bench_masks_tiny():
    from benchmarks.bench_masks import main

    out = main(["--size", "tiny", "--reps", "1", "--batch", "2", "--seq", "8"])
    for key in ("step_cached", "step_recomputed", "eval_cached", "eval_recomputed", "masks", "step_ratio",
                "eval_ratio", "mask_share_of_step"):
        assert out[key] > 0
