"""Merge the results of several reproduce_glue.py sweeps (e.g. one per soft-movement lambda, one per seed, one per
CAP setting) into one table and one accuracy-vs-sparsity plot. Runs are labelled by method and the sweep's
``--extra_args``; points of one method join into a line. Deltas compare with the KD baseline of the same sweep
folder, or, for a folder that ran no baseline (e.g. a CAP-only variant), with that of ``--baseline`` when both
used the same seed. When one method ran at several seeds, a second table gives its mean ± standard error, its
standard deviation and the paired difference to its KD baseline over those seeds.

    python benchmarks/plot_sweeps.py runs/sst2 runs/sst2_soft_l12000 runs/sst2_soft_l80000 --output merged.png
    python benchmarks/plot_sweeps.py runs/sst2 runs/inv/temp005 runs/inv/neg0 --baseline runs/sst2 --output inv.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reproduce_glue import markdown, seed_table  # noqa: E402
from cap_ds.run.plots import plot_accuracy_vs_sparsity  # noqa: E402


def load_rows(folders: list[str], baseline: str | None = None) -> tuple[list[dict], float | None, str]:
    """Rows of every sweep's results.json, tagged with their folder ("group"), seed and extra_args."""
    rows, teacher, metric = [], None, None
    base_seed, base_seeds = None, set()
    if baseline is not None:
        base = _load(baseline)
        base_seed = base["settings"].get("seed")
        base_seeds = {r["seed"] for r in base["runs"] if "seed" in r}
    datas = [_load(folder) for folder in folders]
    several_seeds = len({r.get("seed", d["settings"].get("seed")) for d in datas for r in d["runs"]}) > 1
    for folder, data in zip(folders, datas):
        if metric is not None and data["metric"] != metric:
            raise SystemExit(f"{folder}/results.json: metric {data['metric']!r} differs from {metric!r}")
        metric, teacher = data["metric"], teacher if teacher is not None else data["teacher"]
        extra = data["settings"].get("extra_args") or ""
        for r in data["runs"]:
            seed = r.get("seed", data["settings"].get("seed"))  # sweeps before --seeds held one seed each
            same_seed = baseline is not None and (seed == base_seed or seed in base_seeds)
            name = r["label"] + (f" [{extra}]" if extra else "")
            rows.append({**r, "label": name + (f" (seed {seed})" if several_seeds else ""), "name": name,
                         "group": folder, "seed": seed, "extra_args": extra,
                         "baseline_group": baseline if same_seed else None})
    return rows, teacher, metric


def _load(folder: str) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run reproduce_glue.py into {folder} first)")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="sweep folders holding results.json")
    ap.add_argument("--output", required=True, help="PNG to write")
    ap.add_argument("--baseline", default=None,
                    help="sweep folder whose KD baselines serve folders that ran none (same seed only)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    rows, teacher, metric = load_rows(args.sweeps, args.baseline)
    print(markdown(rows, teacher, metric))
    summary = seed_table(rows, metric)
    if summary:
        print("Across seeds:\n\n" + summary)
    plot_accuracy_vs_sparsity([{"method": r["method"].replace("_", " "), "sparsity": r["sparsity"],
                                metric: r["score"]} for r in rows], args.output, metric=metric, dense=teacher,
                              title=args.title)


if __name__ == "__main__":
    main()
