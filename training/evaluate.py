"""STS evaluation: Spearman correlation, alignment and uniformity; the `embedline eval-sts` verb.

  * Spearman (x100) between the cosine similarity of each pair and its gold score: the standard STS metric.
  * Alignment and uniformity (Wang & Isola, ICML 2020), as SimCSE reports them: alignment is
    E ||f(x) - f(x+)||^2 over pairs with gold score >= 4 (positives); uniformity is
    log E exp(-2 ||f(x) - f(y)||^2) over all pairs of distinct dev sentences. Lower is better for both.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from embedline import artifact as art
from embedline.encoder import SentenceEncoder, load_encoder, load_transformer
from embedline.sts import StsPairs, spearman
from embedline.tokenization import Batch, embed_by_length, load_tokenizer
from embedline.training.data import read_sts

log = logging.getLogger(__name__)

POSITIVE_SCORE = 4.0  # SimCSE's threshold for alignment's positive pairs (STS-B 0-5, SICK 1-5)
UNIFORMITY_SAMPLE = 4000  # uniformity is over all pairs: O(n^2), so large sets use a fixed subset


@torch.no_grad()
def embed_texts(
    encoder: SentenceEncoder,
    tokenizer: Tokenizer,
    texts: list[str],
    batch_size: int = 128,
    progress: bool = False,
) -> torch.Tensor:
    """texts -> (n, dim) float32 embeddings on the CPU, as the encoder produces them (in eval mode)."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device

    def run(batch: Batch) -> np.ndarray:
        input_ids, attention_mask = (torch.from_numpy(batch[k]).to(device) for k in ("input_ids", "attention_mask"))
        return encoder(input_ids, attention_mask).float().cpu().numpy()

    def bar(starts: Iterable[int]) -> Iterable[int]:
        return tqdm(starts, desc="embedding", disable=not progress, leave=False)

    embeddings = embed_by_length(run, tokenizer, texts, batch_size, encoder.dim, bar)
    encoder.train(was_training)
    return torch.from_numpy(embeddings)


def pair_embeddings(
    encoder: SentenceEncoder, tokenizer: Tokenizer, data: StsPairs, batch_size: int = 128, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique sentences' normalized embeddings, left, right (pairs, dim)): each sentence is encoded once."""
    unique = sorted(set(data.sentences1) | set(data.sentences2))
    left, right = data.rows(unique)
    embeddings = torch.nn.functional.normalize(embed_texts(encoder, tokenizer, unique, batch_size, progress), dim=-1)
    return embeddings, embeddings[left], embeddings[right]


def sts_metrics(
    encoder: SentenceEncoder, tokenizer: Tokenizer, data: StsPairs, batch_size: int = 128, progress: bool = False
) -> dict[str, float]:
    """{"spearman" (x100), "alignment", "uniformity", "pairs"} of `encoder` on an STS set."""
    embeddings, left, right = pair_embeddings(encoder, tokenizer, data, batch_size, progress)
    cosine = (left * right).sum(dim=-1).numpy()
    scores = np.asarray(data.scores)
    positive = scores >= POSITIVE_SCORE
    alignment = float((left[positive] - right[positive]).norm(dim=-1).pow(2).mean()) if positive.any() else math.nan
    sample = embeddings
    if len(sample) > UNIFORMITY_SAMPLE:
        sample = sample[torch.randperm(len(sample), generator=torch.Generator().manual_seed(0))[:UNIFORMITY_SAMPLE]]
    uniformity = float(torch.pdist(sample).pow(2).mul(-2).exp().mean().log())
    return {
        "spearman": 100.0 * spearman(cosine, scores),
        "alignment": alignment,
        "uniformity": uniformity,
        "pairs": float(len(scores)),
    }


def load_any_encoder(source: str | os.PathLike | None) -> tuple[SentenceEncoder, Path, int]:
    """(encoder in eval mode, tokenizer.json, max_seq_length) of an artifact or a model directory."""
    path, is_artifact = art.resolve_model_source(source)
    if is_artifact:
        artifact = art.load_artifact(path)
        return load_encoder(artifact), artifact.tokenizer_path, artifact.max_seq_length
    info = art.describe_model_dir(path)
    encoder = SentenceEncoder(load_transformer(path), info["pooling"], normalize=True).eval()
    return encoder, path / "tokenizer.json", int(info["max_seq_length"])


# --- the `embedline eval-sts` verb -------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", default=None,
                        help="artifact or sentence-transformers/HF model directory (default: the bundled model)")
    parser.add_argument("--data", required=True, help="STS TSV: header, a score column, two sentence columns")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-seq-length", type=int, default=0, help="default: the artifact's")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = read_sts(args.data)
    encoder, tokenizer_json, max_seq_length = load_any_encoder(args.artifact)
    if torch.cuda.is_available():
        encoder.cuda()
    tokenizer = load_tokenizer(tokenizer_json, args.max_seq_length or max_seq_length)
    metrics = sts_metrics(encoder, tokenizer, data, args.batch_size, progress=True)
    result = {"data": str(Path(args.data).resolve()), "model": str(args.artifact or "bundled"), **metrics}
    print(json.dumps(result))
    if args.json:
        art.write_json(Path(args.json), result)
    return 0
