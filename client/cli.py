"""`embedline embed`: embed texts (one per line) through a running server.

    embedline embed --url 127.0.0.1:8001 --input texts.txt --output vectors.npy
    cat texts.txt | embedline embed --url 127.0.0.1:8001 > vectors.jsonl

Input: a UTF-8 file or stdin (`-`), one text per line; a blank line is an empty text, so line i is
always row i. Output by extension: `.npy` (an (n, dim) float32 array) or `.jsonl` / `-` (stdout),
one `{"text": ..., "embedding": [...], "truncated": ...}` per line. Also home of the helpers that
`embedline classify` (cli_classify.py) shares.

`embed` streams: it reads the input in blocks of --block-size lines (default 4096, or
$EMBEDLINE_CLI_BLOCK_SIZE), embeds each block with one client call (requests planned from the server's
config, see planning.plan_requests) and writes its rows before reading the next block. Memory holds one
block whatever the input's size. JSON lines are written as they come; a `.npy` file needs its row count
in its header, so the input's lines are counted first (stdin is first copied to a temporary file for
that) and the rows are written into a memory-mapped `FILE.npy.partial`, renamed to FILE.npy when
complete. While stderr is a terminal, a one-line progress report is kept up to date on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np

from embedline.client.connection import DEFAULT_TIMEOUT_S, DEFAULT_URL
from embedline.client.sync import EmbeddingClient
from embedline.errors import EmbedlineError

logger = logging.getLogger(__name__)

# Texts per client call: bounds memory for JSON lines output and makes --timeout apply to a block
# of this many texts, not to a whole (arbitrarily long) file.
BLOCK_SIZE = 1024
# `embed` reads and embeds its input this many lines at a time (--block-size, or this variable): a
# block is long enough that the client keeps the server busy (many requests in flight) and the pause
# between blocks is small, short enough to bound memory and to be done well within --timeout.
EMBED_BLOCK_SIZE = 4096
BLOCK_SIZE_ENV = "EMBEDLINE_CLI_BLOCK_SIZE"
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
                        help="texts per request (default: planned from the server's config; cap: its max_batch_size)")
    parser.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds allowed per block of texts (embed: --block-size, default {EMBED_BLOCK_SIZE}; "
                             f"classify: {BLOCK_SIZE}) (default {DEFAULT_TIMEOUT_S:g})")


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


def _input_name(source: str) -> str:
    return "stdin" if source == "-" else source


def iter_lines(handle: BinaryIO, source: str) -> Iterator[str]:
    """The texts of a binary stream, one per line, like `read_texts` but one at a time (strict UTF-8)."""
    offset = 0
    for raw in handle:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CliInputError(f"{_input_name(source)} is not valid UTF-8 (byte {offset + exc.start})") from None
        offset += len(raw)
        if line.endswith("\n"):
            line = line[:-1]
        yield line[:-1] if line.endswith("\r") else line


def iter_blocks(lines: Iterator[str], size: int) -> Iterator[list[str]]:
    """Lists of up to `size` consecutive items of `lines`."""
    block: list[str] = []
    for line in lines:
        block.append(line)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def count_lines(handle: BinaryIO, chunk: int = 1 << 20) -> int:
    """Texts in a seekable binary stream (as `iter_lines` will yield them); leaves it at its start."""
    count, last = 0, b"\n"
    while data := handle.read(chunk):
        count += data.count(b"\n")
        last = data[-1:]
    handle.seek(0)
    return count + (last != b"\n")


@contextmanager
def open_input(source: str, seekable: bool) -> Iterator[BinaryIO]:
    """The input as a binary stream; stdin is first copied to a temporary file when `seekable`."""
    try:
        if source != "-":
            handle = open(source, "rb")
        elif seekable:
            handle = tempfile.TemporaryFile()
            shutil.copyfileobj(sys.stdin.buffer, handle)
            handle.seek(0)
        else:
            handle = sys.stdin.buffer
    except OSError as exc:
        raise CliInputError(f"cannot read input {source}: {exc.strerror or exc}") from None
    try:
        yield handle
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


class Progress:
    """A one-line progress report on stderr, kept up to date while stderr is a terminal; silent otherwise."""

    def __init__(self, total: int | None, stream: IO[str] | None = None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled if enabled is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total
        self.done = 0
        self.started = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        percent = f" {100 * self.done / self.total:3.0f}%" if self.total else ""
        self.stream.write(f"\rembedded {self.done}{of} texts{percent} ({rate:,.0f} texts/s)")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


def block_size_from(args: argparse.Namespace) -> int:
    """--block-size, else $EMBEDLINE_CLI_BLOCK_SIZE, else EMBED_BLOCK_SIZE."""
    size = getattr(args, "block_size", None)
    if size is None:
        raw = os.environ.get(BLOCK_SIZE_ENV, "").strip()
        try:
            size = int(raw) if raw else EMBED_BLOCK_SIZE
        except ValueError:
            raise CliInputError(f"{BLOCK_SIZE_ENV} must be a positive int, got {raw!r}") from None
    if size < 1:
        raise CliInputError(f"block size must be >= 1, got {size}")
    return size


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
    parser.add_argument("--block-size", type=positive_int, default=None,
                        help=f"lines read and embedded at a time; --timeout applies to each block "
                             f"(default {EMBED_BLOCK_SIZE}, or ${BLOCK_SIZE_ENV})")
    parser.add_argument("--prompt-name", default=None,
                        help="one of the model's prompts (e.g. query, passage) prepended to every line "
                             "(default: the model's default prompt, if it has one)")


def run(args: argparse.Namespace) -> int:
    output = args.output
    as_npy = output != "-" and output.endswith(".npy")
    if output != "-" and not as_npy and not output.endswith(JSONL_SUFFIXES):
        raise CliInputError(f"--output must end in .npy or .jsonl (or be - for stdout), got {output}")
    size = block_size_from(args)
    started = time.perf_counter()
    truncated_count = 0
    # A file's lines are counted (for the progress total, and a .npy header); stdin only for .npy.
    with open_input(args.input, seekable=as_npy) as source, \
            EmbeddingClient(args.url, timeout=args.timeout, batch_size=args.batch_size) as client:
        total = count_lines(source) if as_npy or args.input != "-" else None
        info = client.info()
        dim = info.dim
        if args.prompt_name is not None and args.prompt_name not in info.prompts:
            have = ", ".join(sorted(info.prompts)) or "none"
            raise CliInputError(f"--prompt-name {args.prompt_name!r} is not one of the model's prompts ({have})")
        progress = Progress(total)
        texts = iter_blocks(iter_lines(source, args.input), size)
        try:
            if as_npy:
                truncated_count = _embed_to_npy(client, texts, total or 0, dim, output, progress, args.prompt_name)
            else:
                with open_text_output(output) as handle:
                    for block in texts:
                        result = client.embed_with_details(block, prompt_name=args.prompt_name)
                        truncated_count += int(result.truncated.sum())
                        handle.write("".join(
                            json.dumps({"text": text, "embedding": embedding.tolist(), "truncated": bool(truncated)},
                                       ensure_ascii=False) + "\n"
                            for text, embedding, truncated in zip(block, result.embeddings, result.truncated)))
                        handle.flush()
                        progress.update(len(block))
        finally:
            progress.close()
    logger.info("embedded %d texts (dim %d, %d truncated to max_seq_length) via %s in %.2f s -> %s",
                progress.done, dim, truncated_count, args.url, time.perf_counter() - started,
                "stdout" if output == "-" else output)
    return 0


def _embed_to_npy(client: EmbeddingClient, texts: Iterator[list[str]], total: int, dim: int, output: str,
                  progress: Progress, prompt_name: str | None = None) -> int:
    """Write the embeddings of `total` texts, block by block, into the .npy file `output`; -> truncated count."""
    partial = Path(output + ".partial")
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(total, dim))
    except OSError as exc:
        raise CliInputError(f"cannot write {output}: {exc.strerror or exc}") from None
    truncated_count = 0
    done = False
    try:
        row = 0
        for block in texts:
            result = client.embed_with_details(block, prompt_name=prompt_name)
            if row + len(block) > total:  # the input grew after it was counted
                raise CliInputError(f"input changed while it was read: more than the {total} lines counted")
            array[row:row + len(block)] = result.embeddings
            row += len(block)
            truncated_count += int(result.truncated.sum())
            progress.update(len(block))
        if row != total:
            raise CliInputError(f"input changed while it was read: {row} lines, {total} counted")
        array.flush()
        del array
        try:
            os.replace(partial, output)
        except OSError as exc:
            raise CliInputError(f"cannot write {output}: {exc.strerror or exc}") from None
        done = True
    finally:
        if not done:
            partial.unlink(missing_ok=True)
    return truncated_count
