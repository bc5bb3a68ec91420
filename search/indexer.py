"""`embedline index`: a corpus file -> embeddings from a running server -> a collection of a store.

    embedline index --url 127.0.0.1:8001 --input corpus.tsv --title-field title --collection cranfield

Two passes over the file. The first checks every row (ids present and unique, texts non-empty, UTF-8,
the named fields exist) and writes nothing when one fails, naming it as file:line. The second streams:
it reads a block of documents, skips those the collection already holds with the same text and metadata
(so a run restarted after a crash embeds only what is missing), embeds the rest through the server (the
SDK's corpus path, with the model's passage prompt when it has one) and upserts the block by id in one
transaction on a writer thread. Two blocks are embedded at a time and one is written meanwhile, so memory
holds a few blocks whatever the corpus's size. `--delete FILE` removes the ids a file lists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from embedline.client.cli import Progress, iter_blocks, positive_float, positive_int
from embedline.client.connection import DEFAULT_TIMEOUT_S, DEFAULT_URL
from embedline.client.sync import EmbeddingClient
from embedline.documents import CorpusFormat, Document, check_corpus, read_documents, read_ids
from embedline.search.store import DEFAULT_COLLECTION, Collection, ModelRecord, Store, default_store_uri, open_store

# Documents per block: enough for the client to keep every server instance busy between blocks.
BLOCK_SIZE = 2048
EMBED_CALLS_IN_FLIGHT = 2


@dataclass(frozen=True)
class IndexReport:
    documents: int        # in the corpus (after skipped empty texts)
    collection_size: int  # documents the collection holds now
    embedded: int         # embedded and written by this run
    unchanged: int        # already in the collection with the same text and metadata
    skipped_empty: int
    seconds: float


def document_fingerprint(document: Document) -> str:
    """What decides whether a stored document is still current: its text and metadata."""
    payload = json.dumps([document.text, document.metadata], sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).hexdigest()


def served_model_record(client: EmbeddingClient) -> ModelRecord:
    info = client.info()
    return ModelRecord.for_model(info.model_name, info.dim, info.fingerprint, info.prompts)


class _Writer:
    """Upserts blocks on a thread of its own, so that the next block is embedded meanwhile."""

    def __init__(self, collection: Collection):
        self.collection = collection
        self.blocks: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="embedline-index-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.blocks.get()) is not None:
            if self.error is None:
                try:
                    self.collection.upsert(*item)
                except BaseException as exc:  # reported by put() / close() on the caller's thread
                    self.error = exc

    def put(self, documents: list[Document], vectors, fingerprints: list[str]) -> None:
        if self.error is not None:
            raise self.error
        self.blocks.put(([d.id for d in documents], vectors, [d.text for d in documents],
                         [d.metadata for d in documents], fingerprints))

    def close(self) -> None:
        self.blocks.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def index_corpus(client: EmbeddingClient, store: Store, name: str, path: str, fmt: CorpusFormat = CorpusFormat(),
                 block_size: int = BLOCK_SIZE, progress: Progress | None = None) -> IndexReport:
    """Make collection `name` hold every document of the file at `path`: checked first (see the module doc),
    then the collection is created for the served model, or opened when it was indexed with the same one."""
    started = time.perf_counter()
    checked = check_corpus(path, fmt)
    collection = store.create_or_open(name, served_model_record(client))
    progress = progress or Progress(checked.documents)
    writer = _Writer(collection)
    # Two blocks are embedded at once: while one block's last requests drain, the next one's keep the
    # server busy (one call at a time left the server idle at each block's end: 0.81x client.embed).
    embedding = ThreadPoolExecutor(EMBED_CALLS_IN_FLIGHT, thread_name_prefix="embedline-index")
    pending: deque = deque()
    embedded = unchanged = 0

    def finish_oldest() -> None:
        todo, vectors = pending.popleft()
        writer.put([d for d, _ in todo], vectors.result(), [f for _, f in todo])
        progress.update(len(todo))

    try:
        for block in iter_blocks(read_documents(path, fmt), block_size):
            stored = collection.fingerprints([d.id for d in block])
            fingerprints = [document_fingerprint(d) for d in block]
            todo = [(d, f) for d, f in zip(block, fingerprints) if stored.get(d.id) != f]
            unchanged += len(block) - len(todo)
            progress.update(len(block) - len(todo))
            if todo:
                pending.append((todo, embedding.submit(client.embed, [d.text for d, _ in todo],
                                                       prompt_name=collection.model.passage_prompt)))
                embedded += len(todo)
            if len(pending) == EMBED_CALLS_IN_FLIGHT:
                finish_oldest()
        while pending:
            finish_oldest()
    finally:
        for _, vectors in pending:
            vectors.cancel()
        embedding.shutdown(wait=True)
        writer.close()
        progress.close()
    collection.save_index()
    return IndexReport(checked.documents, collection.count(), embedded, unchanged, len(checked.skipped_empty),
                       time.perf_counter() - started)


def delete_documents(collection: Collection, path: str, block_size: int = BLOCK_SIZE) -> int:
    """Remove the ids listed in `path` (read whole first: a bad file removes nothing); how many were removed."""
    ids = [doc_id for doc_id, _ in read_ids(path)]
    removed = sum(collection.delete(ids[start:start + block_size]) for start in range(0, len(ids), block_size))
    collection.save_index()
    return removed


# ---- `embedline index` ----------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server gRPC endpoint HOST:PORT (default {DEFAULT_URL})")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="corpus: .txt (a text per line), .tsv, .csv, .jsonl or .parquet (.gz ok)")
    what.add_argument("--delete", metavar="FILE", help="remove the ids this file lists (one per line, or a corpus file)")
    parser.add_argument("--store", default=None, help=f"store URI: a directory or milvus://HOST:PORT (default {default_store_uri()})")
    parser.add_argument("--collection", default=DEFAULT_COLLECTION, help=f"default {DEFAULT_COLLECTION!r}")
    parser.add_argument("--id-field", default=None, help="default: the first of id, _id, doc_id, docid present")
    parser.add_argument("--text-field", default=None, help="default: text")
    parser.add_argument("--title-field", default=None, help="joined before the text (title + ' ' + text)")
    parser.add_argument("--metadata-fields", default="", help="comma-separated fields kept as metadata (filterable)")
    parser.add_argument("--skip-empty", action="store_true", help="skip (and count) empty texts instead of failing")
    parser.add_argument("--block-size", type=positive_int, default=BLOCK_SIZE, help=f"default {BLOCK_SIZE}")
    parser.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds allowed per block (default {DEFAULT_TIMEOUT_S:g})")


def run(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    if args.delete:
        removed = delete_documents(store.open(args.collection), args.delete, args.block_size)
        print(f"removed {removed} documents from collection {args.collection!r} of {store.uri}")
        return 0
    fmt = CorpusFormat(id_field=args.id_field, text_field=args.text_field, title_field=args.title_field,
                       metadata_fields=tuple(f for f in args.metadata_fields.split(",") if f),
                       skip_empty=args.skip_empty)
    with EmbeddingClient(args.url, timeout=args.timeout) as client:
        report = index_corpus(client, store, args.collection, args.input, fmt, args.block_size)
    print(f"collection {args.collection!r} of {store.uri}: {report.collection_size} documents; this run embedded "
          f"{report.embedded}, kept {report.unchanged} unchanged, skipped {report.skipped_empty} empty, "
          f"in {report.seconds:.1f} s ({report.documents / max(report.seconds, 1e-9):.0f} documents/s)")
    return 0
