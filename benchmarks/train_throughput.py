"""Training throughput: embedline's unsupervised SimCSE step vs sentence-transformers' MultipleNegativesRankingLoss.

Same model (all-MiniLM-L6-v2), same sentences (unsup_corpus.txt.gz), same batch size, max_seq_length,
temperature (scale 20), optimizer (AdamW, grad clip 1.0), threads. Unsupervised SimCSE in
sentence-transformers is MNRL on (sentence, sentence) pairs; its loss encodes the two columns in two
forward passes, embedline stacks both views into one. The two run interleaved in one process, round by
round (A B A B ...), so drift on the shared machine hits both alike; the ratio per round is reported.

sentences/s counts training sentences (one per example; each is encoded twice by both).

    .venv/bin/python -m benchmarks.train_throughput [--rounds 6] [--steps-per-round 5] [--batch_size=64]

Options other than the ones below are training-config fields (batch_size, max_seq_length, lr, temperature,
max_grad_norm, ...; the list: `embedline train --help`); both trainers take them from that one config.
Results: benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import command_line, data_dir, load_average, parse_with_train_config, pin_threads, save_results

log = logging.getLogger("train_throughput")


def read_sentences(path: str, n: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.strip() for _, line in zip(range(n), f) if line.strip()]


def embedline_runner(config) -> Callable[[list[str]], float]:
    import torch

    from embedline.tokenization import load_tokenizer
    from embedline.training.data import Batch
    from embedline.training.simcse.losses import make_loss
    from embedline.training.simcse.model import build_model
    from embedline.training.simcse.trainer import linear_schedule, param_groups, train_step

    torch.manual_seed(0)
    model = build_model(config).train()
    tokenizer = load_tokenizer(Path(config.model) / "tokenizer.json", config.max_seq_length)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(10**6, 0))
    loss_fn = make_loss("unsup", temperature=config.temperature)

    def step(texts: list[str]) -> float:
        return train_step(model, Batch([texts]), tokenizer, loss_fn, optimizer, scheduler, views=2,
                          max_grad_norm=config.max_grad_norm)

    return step


def sentence_transformers_runner(config) -> Callable[[list[str]], float]:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    model = SentenceTransformer(config.model, device="cpu")
    model.max_seq_length = config.max_seq_length
    model.train()
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / config.temperature)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def step(texts: list[str]) -> float:
        # What the sentence-transformers trainer does per batch: tokenize each column, loss, backward, step.
        features = [model.tokenize(texts), model.tokenize(texts)]
        value = loss(features, None)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(value)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    # The bundled all-MiniLM-L6-v2 (model ''), TrainConfig's defaults otherwise: batch 64, max_seq_length 32,
    # temperature 0.05 (scale 20), lr 3e-5 (the paper's for unsup), gradient clipping at 1.0.
    settings = {"objective": "unsup", "train_file": str(data_dir() / "corpus" / "unsup_corpus.txt.gz"),
                "output": "unused", "device": "cpu"}
    args, config = parse_with_train_config(parser, settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pin_threads(args.threads)

    from embedline.training.simcse.config import resolve_config

    config = resolve_config(config)
    batch_size = config.batch_size
    per_round = batch_size * args.steps_per_round
    sentences = read_sentences(config.train_file, per_round * (args.rounds + 1))
    runners = {"embedline": embedline_runner(config),
               "sentence_transformers_mnrl": sentence_transformers_runner(config)}
    for run in runners.values():  # warm-up step each (allocator, thread pools), untimed
        run(sentences[:batch_size])

    seconds: dict[str, list[float]] = {name: [] for name in runners}
    load_start = load_average()
    for r in range(args.rounds):
        batches = [sentences[per_round * (r + 1) + i * batch_size:][:batch_size]
                   for i in range(args.steps_per_round)]
        order = list(runners) if r % 2 == 0 else list(reversed(runners))  # alternate who goes first
        for name in order:
            start = time.perf_counter()
            for batch in batches:  # both see exactly the same batches
                runners[name](batch)
            seconds[name].append(time.perf_counter() - start)
        log.info("round %d: %s", r, {n: round(per_round / s[-1], 1) for n, s in seconds.items()})

    speed = {name: [round(per_round / s, 1) for s in values] for name, values in seconds.items()}
    ratios = [round(b / a, 3) for a, b in zip(seconds["embedline"], seconds["sentence_transformers_mnrl"])]
    summary = {
        "command": command_line(),
        "settings": vars(args),
        "train_config": dataclasses.asdict(config),
        "model": config.model,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "sentences_per_s_per_round": speed,
        "sentences_per_s_median": {name: statistics.median(v) for name, v in speed.items()},
        "ratio_embedline_over_st_per_round": ratios,
        "ratio_median": statistics.median(ratios),
    }
    path = save_results("train_throughput", summary)
    print(json.dumps(summary, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
