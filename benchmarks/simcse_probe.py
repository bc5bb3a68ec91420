"""How much STS signal sits in a model's embedding space before any training: a linear-probe diagnostic.

Embeds the STS-B dev sentences with the starting model of the unsupervised experiment (all-MiniLM-L6-v2's
config with random layers + its pretrained word embeddings, seed 42, as `benchmarks/simcse_unsup.py`
builds it) or with any artifact / model directory, and reports dev Spearman of the raw embeddings, after
centering, after removing the top-k principal components, and after whitening (all fitted on the dev
sentences themselves, so an upper-bound style diagnostic, not a result). It shows how much of the
"before" score is lost to anisotropy, which is what SimCSE's uniformity term acts on.

    .venv/bin/python benchmarks/simcse_probe.py                 # the random-layers starting model
    .venv/bin/python benchmarks/simcse_probe.py --model DIR     # any artifact or model directory

Results: benchmarks/results/simcse_probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import data_dir, pin_threads, save_results  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="artifact or model directory (default: random layers)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pin_threads(args.threads)

    import numpy as np
    import torch

    from embedline.tokenization import load_tokenizer
    from embedline.training.config import TrainConfig, resolve_config
    from embedline.training.data import read_sts
    from embedline.training.evaluate import embed_texts, load_any_encoder, spearman
    from embedline.training.model import build_model, describe_base

    dev = read_sts(data_dir() / "sts" / "stsb_dev.tsv.gz")
    if args.model:
        encoder, tokenizer_json, max_len = load_any_encoder(args.model)
        name = args.model
    else:
        config = resolve_config(TrainConfig(train_file="unused.txt", output="unused", random_layers=True,
                                            pooling="mean", seed=args.seed))
        torch.manual_seed(config.seed)  # the same initialization the trainer draws
        encoder = build_model(config).encoder
        base = describe_base(config)
        tokenizer_json, max_len = base.tokenizer_json, base.inference_max_seq_length
        name = "random layers (all-MiniLM-L6-v2 config) + MiniLM word embeddings, seed %d" % args.seed
    encoder.normalize = False  # the transforms below act on the pooled vectors
    texts = sorted(set(dev.sentences1) | set(dev.sentences2))
    position = {t: i for i, t in enumerate(texts)}
    embeddings = embed_texts(encoder.eval(), load_tokenizer(tokenizer_json, max_len), texts).double().numpy()
    left = [position[t] for t in dev.sentences1]
    right = [position[t] for t in dev.sentences2]

    def dev_spearman(x: np.ndarray) -> float:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return round(100 * spearman((x[left] * x[right]).sum(axis=1), np.asarray(dev.scores)), 2)

    centered = embeddings - embeddings.mean(axis=0)
    _, singular, components = np.linalg.svd(centered, full_matrices=False)
    results = {"raw": dev_spearman(embeddings), "centered": dev_spearman(centered)}
    for k in (1, 5, 10):
        top = components[:k]
        results[f"top{k}_pcs_removed"] = dev_spearman(centered - centered @ top.T @ top)
    results["whitened"] = dev_spearman(centered @ components.T / singular)
    path = save_results("simcse_probe", {"command": " ".join([".venv/bin/python", *sys.argv]), "model": name,
                                         "stsb_dev_spearman": results})
    print(json.dumps(results, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
