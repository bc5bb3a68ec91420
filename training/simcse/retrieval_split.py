"""A deterministic split of a labelled query set into train, dev and test queries, written as files.

    python -m embedline.training.simcse.retrieval_split --queries queries.tsv --qrels qrels.tsv \\
        --output DIR [--test 75] [--dev 25] [--seed 0]

Fine-tuning on your own queries needs queries the model never saw to measure it on, and a dev set carved
from the training side for model selection (never the test queries). The split is a function of the files
and the seed alone: the queries that have a relevant judgment, in the queries file's order, shuffled by
`random.Random(seed)`; the first `--test` are the test queries, the next `--dev` the dev queries, the rest
the training queries. Queries without a relevant judgment go to no split (reported).

Writes DIR/{train,dev,test}.queries.tsv (query_id, text) and DIR/{train,dev,test}.qrels.tsv (query_id,
doc_id, score: every judgment of those queries), the formats `embedline train --objective retrieval` and
`embedline eval-retrieval` read, and DIR/split.json (the seed, the sizes and the query ids of each split).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

from embedline.errors import EmbedlineError
from embedline.retrieval import read_qrels, read_queries

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


class SplitError(EmbedlineError):
    """A split that cannot be made: more test and dev queries asked for than there are."""


def split_query_ids(query_ids: list[str], test: int, dev: int, seed: int) -> dict[str, list[str]]:
    """{"train": [...], "dev": [...], "test": [...]}: `query_ids` shuffled by `random.Random(seed)`, cut."""
    if test < 0 or dev < 0:
        raise SplitError("--test and --dev must be >= 0")
    if test + dev >= len(query_ids):
        raise SplitError(f"{len(query_ids)} labelled queries: --test {test} and --dev {dev} leave none to train on")
    shuffled = list(query_ids)
    random.Random(seed).shuffle(shuffled)
    return {"test": shuffled[:test], "dev": shuffled[test:test + dev], "train": shuffled[test + dev:]}


def _clean(text: str) -> str:
    """One TSV field: a tab or a line break inside the text (possible in CSV or JSON lines) becomes a space."""
    return " ".join(text.split("\t")).replace("\r", " ").replace("\n", " ")


def write_split(queries_path: str, qrels_path: str, output: str, test: int = 75, dev: int = 25,
                seed: int = 0) -> dict[str, list[str]]:
    """Split (see the module docstring) and write the files; -> the query ids of each split."""
    queries = read_queries(queries_path)
    qrels = read_qrels(qrels_path, queries=queries)
    labelled = [q for q in queries if any(score > 0 for score in qrels.get(q, {}).values())]
    if len(labelled) < len(queries):
        log.warning("%d of %d queries have no relevant judgment: in no split", len(queries) - len(labelled),
                    len(queries))
    splits = split_query_ids(labelled, test, dev, seed)
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        ids = sorted(splits[name], key=labelled.index)  # the queries file's order within a split
        lines = ["query_id\ttext"] + [f"{q}\t{_clean(queries[q])}" for q in ids]
        (folder / f"{name}.queries.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        judged = ["query_id\tdoc_id\tscore"] + [f"{q}\t{d}\t{s}" for q in ids for d, s in qrels[q].items()]
        (folder / f"{name}.qrels.tsv").write_text("\n".join(judged) + "\n", encoding="utf-8")
    record = {"queries": str(Path(queries_path).resolve()), "qrels": str(Path(qrels_path).resolve()), "seed": seed,
              "sizes": {name: len(splits[name]) for name in SPLITS}, "query_ids": splits}
    (folder / "split.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", required=True, help="queries file (query_id, text; TSV, CSV or JSON lines)")
    parser.add_argument("--qrels", required=True, help="judgments (query_id, doc_id, score)")
    parser.add_argument("--output", required=True, help="directory for the split's files")
    parser.add_argument("--test", type=int, default=75, help="test queries (default 75)")
    parser.add_argument("--dev", type=int, default=25, help="dev queries, carved from the training side (default 25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        splits = write_split(args.queries, args.qrels, args.output, args.test, args.dev, args.seed)
    except EmbedlineError as exc:
        print(f"retrieval_split: {exc}", file=sys.stderr)
        return 1
    print(", ".join(f"{name} {len(splits[name])}" for name in SPLITS) + f" queries in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
