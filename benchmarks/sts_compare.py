"""Is a change in STS Spearman real? Paired bootstrap of (after - before) over the pairs of an STS file.

Both models score the same resampled pairs in each of --samples rounds, so the interval is that of the
difference, much narrower than either score's own. Used for supervised SimCSE from all-MiniLM-L6-v2,
where the STS-B dev change is a few hundredths of a point.

    .venv/bin/python benchmarks/sts_compare.py --after runs/benchmarks/simcse_sup_lr1e-5/hardneg \
        --name sts_compare_sup_lr1e-5

Results: benchmarks/results/<--name>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import data_dir, pin_threads, save_results  # noqa: E402


def pair_cosines(source: str | None, data) -> np.ndarray:
    """Cosine of each STS pair under an artifact or model directory (None = the bundled model)."""
    from embedline.tokenization import load_tokenizer
    from embedline.training.evaluate import load_any_encoder, pair_embeddings

    encoder, tokenizer_json, max_seq_length = load_any_encoder(source)
    _, left, right = pair_embeddings(encoder, load_tokenizer(tokenizer_json, max_seq_length), data)
    return (left * right).sum(dim=-1).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="artifact or model directory (default: the bundled model)")
    parser.add_argument("--after", required=True, help="artifact or model directory")
    parser.add_argument("--data", default=None, help="STS TSV (default: ../shared/data/sts/stsb_dev.tsv.gz)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="sts_compare")
    args = parser.parse_args()
    pin_threads(args.threads)

    from embedline.training.data import read_sts
    from embedline.training.evaluate import spearman

    data = read_sts(Path(args.data) if args.data else data_dir() / "sts" / "stsb_dev.tsv.gz")
    gold = np.asarray(data.scores)
    before, after = pair_cosines(args.before, data), pair_cosines(args.after, data)
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(args.samples):
        rows = rng.integers(0, len(gold), len(gold))
        diffs.append(100.0 * (spearman(after[rows], gold[rows]) - spearman(before[rows], gold[rows])))
    low, high = np.percentile(diffs, [2.5, 97.5])
    result = {"data": str(data.path), "before": args.before or "bundled all-MiniLM-L6-v2", "after": args.after,
              "spearman_before": round(100.0 * spearman(before, gold), 2),
              "spearman_after": round(100.0 * spearman(after, gold), 2),
              "difference": round(100.0 * (spearman(after, gold) - spearman(before, gold)), 3),
              "difference_95ci": [round(float(low), 3), round(float(high), 3)], "samples": args.samples,
              "command": " ".join([".venv/bin/python", *sys.argv])}
    print(result)
    print(f"saved {save_results(args.name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
