"""`embedline embed`: embed texts (one per line) through a running server.

    embedline embed --url 127.0.0.1:8001 --input texts.txt --output vectors.npy
    cat texts.txt | embedline embed --url 127.0.0.1:8001 > vectors.jsonl

Input: a UTF-8 file or stdin (`-`), one text per line; a blank line is an empty text, so line i is
always row i. Output by extension: `.npy` (an (n, dim) float32 array) or `.jsonl` / `-` (stdout),
one `{"text": ..., "embedding": [...], "truncated": ...}` per line. Also home of the helpers that
`embedline classify` (cli_classify.py) shares.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from embedline.client._common import DEFAULT_TIMEOUT_S, DEFAULT_URL
from embedline.client.sync import EmbeddingClient
from embedline.errors import EmbedlineError

logger = logging.getLogger(__name__)

# Texts per client call: bounds memory for JSON lines output and makes --timeout apply to a block
# of this many texts, not to a whole (arbitrarily long) file.
BLOCK_SIZE = 1024
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class CliInputError(EmbedlineError):
    """Unreadable input or an unsupported output path."""


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def add_common_arguments(parser: argparse.ArgumentParser, output_help: str) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server gRPC endpoint HOST:PORT (default {DEFAULT_URL})")
    parser.add_argument("--input", default="-", help="text file, one text per line, or - for stdin (default -)")
    parser.add_argument("--output", default="-", help=output_help)
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="texts per request (default and cap: the server's max_batch_size)")
    parser.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds allowed per block of {BLOCK_SIZE} texts (default {DEFAULT_TIMEOUT_S:g})")


def read_texts(source: str) -> list[str]:
    """One text per line from a file or stdin, strict UTF-8; line endings are not part of the text."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise CliInputError(f"cannot read input {source}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        name = "stdin" if source == "-" else source
        raise CliInputError(f"{name} is not valid UTF-8 (byte {exc.start})") from None
    # split("\n") rather than splitlines(): the latter also splits on \x0b, \x1c, \u2028... inside a text.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last text; it does not start an empty one
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def blocks(texts: list[str], size: int = BLOCK_SIZE) -> Iterator[list[str]]:
    for start in range(0, len(texts), size):
        yield texts[start:start + size]


@contextmanager
def open_text_output(destination: str) -> Iterator[IO[str]]:
    """stdout for `-`, else the file (created with its parent folders)."""
    if destination == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    path = Path(destination)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("w", encoding="utf-8")
    except OSError as exc:
        raise CliInputError(f"cannot write {destination}: {exc.strerror or exc}") from None
    with handle:
        yield handle


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "FILE.npy, FILE.jsonl, or - for JSON lines on stdout (default -)")


def run(args: argparse.Namespace) -> int:
    output = args.output
    as_npy = output != "-" and output.endswith(".npy")
    if output != "-" and not as_npy and not output.endswith(JSONL_SUFFIXES):
        raise CliInputError(f"--output must end in .npy or .jsonl (or be - for stdout), got {output}")
    texts = read_texts(args.input)
    started = time.perf_counter()
    truncated_count = 0
    with EmbeddingClient(args.url, timeout=args.timeout, batch_size=args.batch_size) as client:
        dim = client.info().dim
        if as_npy:
            parts = []
            for block in blocks(texts):
                result = client.embed_with_details(block)
                parts.append(result.embeddings)
                truncated_count += int(result.truncated.sum())
            embeddings = np.concatenate(parts) if parts else np.empty((0, dim), dtype=np.float32)
            try:
                Path(output).parent.mkdir(parents=True, exist_ok=True)
                np.save(output, embeddings)
            except OSError as exc:
                raise CliInputError(f"cannot write {output}: {exc.strerror or exc}") from None
        else:
            with open_text_output(output) as handle:
                for block in blocks(texts):
                    result = client.embed_with_details(block)
                    truncated_count += int(result.truncated.sum())
                    for text, embedding, truncated in zip(block, result.embeddings, result.truncated):
                        record = {"text": text, "embedding": embedding.tolist(), "truncated": bool(truncated)}
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    logger.info("embedded %d texts (dim %d, %d truncated to max_seq_length) via %s in %.2f s -> %s",
                len(texts), dim, truncated_count, args.url, time.perf_counter() - started,
                "stdout" if output == "-" else output)
    return 0
