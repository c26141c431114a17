"""Merge the results of several reproduce_glue.py sweeps (e.g. one per soft-movement lambda) into one table and
one accuracy-vs-sparsity plot. Runs are labelled by method; points of one method join into a line; deltas compare
with the KD baseline of the same sweep folder.

    python benchmarks/plot_sweeps.py runs/sst2 runs/sst2_soft_l12000 runs/sst2_soft_l80000 --output merged.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reproduce_glue import markdown  # noqa: E402
from cap_ds.plots import plot_accuracy_vs_sparsity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="sweep folders holding results.json")
    ap.add_argument("--output", required=True, help="PNG to write")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    rows, teacher, metric = [], None, None
    for folder in args.sweeps:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise SystemExit(f"{path}: not found (run reproduce_glue.py into {folder} first)")
        data = json.loads(path.read_text())
        if metric is not None and data["metric"] != metric:
            raise SystemExit(f"{path}: metric {data['metric']!r} differs from {metric!r}")
        metric, teacher = data["metric"], teacher if teacher is not None else data["teacher"]
        extra = data["settings"].get("extra_args") or ""
        for r in data["runs"]:
            rows.append({**r, "label": r["label"] + (f" [{extra}]" if extra else ""), "group": folder})
    print(markdown(rows, teacher, metric))
    plot_accuracy_vs_sparsity([{"method": r["method"].replace("_", " "), "sparsity": r["sparsity"],
                                metric: r["score"]} for r in rows], args.output, metric=metric, dense=teacher,
                              title=args.title)


if __name__ == "__main__":
    main()
