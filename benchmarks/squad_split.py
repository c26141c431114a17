"""Split a nested SQuAD file by article into flat JSON Lines train and dev files (no article in both).

There is no SQuAD train set beside the project, so CPU-scale QA experiments train on the first articles of the
official v1.1 dev set and evaluate on its last ones:

    python benchmarks/squad_split.py ../shared/data/squad/dev-v1.1.json.gz --eval_articles 8 --output_dir /tmp/squad
    # -> /tmp/squad/train.jsonl, /tmp/squad/dev.jsonl, /tmp/squad/split.json (articles and counts)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cap_ds.data.squad import split_by_article  # noqa: E402
from cap_ds.runtime.atomic import atomic_file  # noqa: E402


def write_jsonl(path: Path, records: list[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

    atomic_file(path, write)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="nested SQuAD JSON (.json or .json.gz)")
    ap.add_argument("--eval_articles", type=int, default=8, help="the last N articles are the dev part")
    ap.add_argument("--output_dir", required=True)
    args = ap.parse_args(argv)
    train, dev = split_by_article(args.path, args.eval_articles)
    out = Path(args.output_dir)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "dev.jsonl", dev)
    titles = {part: list(dict.fromkeys(r["title"] for r in recs)) for part, recs in (("train", train), ("dev", dev))}
    info = {"source": args.path, "eval_articles": args.eval_articles, "train_questions": len(train),
            "dev_questions": len(dev), "train_articles": titles["train"], "dev_articles": titles["dev"]}
    atomic_file(out / "split.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    print(f"train: {len(train)} questions from {len(titles['train'])} articles; dev: {len(dev)} questions from "
          f"{len(titles['dev'])} articles -> {out}")
    return info


if __name__ == "__main__":
    main()
