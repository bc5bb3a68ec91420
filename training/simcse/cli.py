"""The `embedline train` verb.

    embedline train --objective unsup|sup|triplet|contrastive|cosine|supcon --model DIR --train-file FILE
                    [--dev-file FILE] --output DIR [--resume] [--key=value ...]
    embedline train --objective retrieval --corpus FILE --queries FILE --qrels FILE
                    [--dev-queries FILE --dev-qrels FILE] --output DIR [--key=value ...]   (retrieval.py)

Every field of `TrainConfig` is an option (`--batch_size=128` or `--batch-size=128`); an unknown key is
an error listing the valid ones. Multi-GPU: `torchrun --nproc_per_node=N -m embedline.cli train ...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from embedline.training.simcse.config import TrainConfig, add_options, apply_overrides, field_names, given_options


def configure(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # --temp must not silently mean --temperature
    parser.epilog = "Training-config keys (--key=value): " + ", ".join(field_names())
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --output from its checkpoint")
    add_options(parser)
    original_error = parser.error

    def error(message: str) -> NoReturn:
        if "unrecognized arguments" in message:
            message += "; valid training-config keys: " + ", ".join(field_names())
        original_error(message)

    parser.error = error  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    # The trainer (torch) is imported here, not at the top: `embedline train --help` stays instant.
    from embedline.training.simcse import checkpoint as ckpt
    from embedline.training.simcse.config import from_dict
    from embedline.training.simcse.trainer import TrainingInterrupted, train

    overrides = given_options(args)
    base = TrainConfig()
    if args.resume:
        if "output" not in overrides:
            raise ckpt.CheckpointError("--resume needs --output, the directory of the interrupted run")
        saved = ckpt.load_config(ckpt.RunPaths(Path(overrides["output"]).expanduser().resolve()))
        base = from_dict(saved)
    config = apply_overrides(base, overrides)
    try:
        result = train(config, resume=args.resume)
    except TrainingInterrupted as exc:
        print(f"embedline train: {exc}", file=sys.stderr)
        return 130
    print(f"artifact: {result.artifact.path}", file=sys.stderr)
    for key in ("dev_spearman_start", "dev_spearman", "dev_ndcg@10_start", "dev_ndcg@10", "best_step", "train_loss",
                "skipped_queries", "false_negatives_labelled", "false_negatives_margin"):
        if key in result.metrics:
            print(f"{key}: {result.metrics[key]}", file=sys.stderr)
    return 0
