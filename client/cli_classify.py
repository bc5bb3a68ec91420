"""`embedline classify`: classify texts (one per line) through a running server's `classify` model.

    embedline classify --url 127.0.0.1:8001 --input texts.txt --output predictions.jsonl
    cat texts.txt | embedline classify --url 127.0.0.1:8001

Writes JSON lines, one per input line:
`{"text": ..., "label": ..., "score": ..., "probabilities": {label: p, ...}, "truncated": ...}`, plus
`"neighbour_labels": [...]` (the nearest training examples' labels) when the server keeps them.
A server without a `classify` model (an artifact without a classifier head) is a one-line error.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from embedline.client.cli import (
    JSONL_SUFFIXES,
    CliInputError,
    add_common_arguments,
    blocks,
    open_text_output,
    read_texts,
)
from embedline.client.sync import EmbeddingClient

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "FILE.jsonl, or - for JSON lines on stdout (default -)")


def run(args: argparse.Namespace) -> int:
    if args.output != "-" and not args.output.endswith(JSONL_SUFFIXES):
        raise CliInputError(f"--output must end in .jsonl (or be - for stdout), got {args.output}")
    texts = read_texts(args.input)
    started = time.perf_counter()
    with EmbeddingClient(args.url, timeout=args.timeout, batch_size=args.batch_size) as client:
        # Fails fast (ModelNotFoundError) on a server without `classify`, before any output is created.
        client.classify([])
        with open_text_output(args.output) as handle:
            for block in blocks(texts):
                for text, prediction in zip(block, client.classify(block)):
                    record = {"text": text, "label": prediction.label, "score": prediction.score,
                              "probabilities": prediction.probabilities, "truncated": prediction.truncated}
                    if prediction.neighbour_labels:
                        record["neighbour_labels"] = list(prediction.neighbour_labels)
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    logger.info("classified %d texts via %s in %.2f s -> %s", len(texts), args.url,
                time.perf_counter() - started, "stdout" if args.output == "-" else args.output)
    return 0
