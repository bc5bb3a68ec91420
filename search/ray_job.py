"""`embedline index-ray`: a corpus past one machine, embedded by many server replicas and loaded into a store
by a Ray Data job.

    embedline index-ray --url host1:8001,host2:8001 --input 'corpus/*.parquet' --output vectors/ \\
        --store milvus://milvus:19530 --collection wiki [--actors 8] [--ray-address auto]

Two steps, each resumable per shard (a crash or a lost node costs the shards in flight, nothing else):

1. **Embed.** Each input Parquet shard (id and text columns, optional metadata columns) is read by Ray Data
   and mapped in batches by a pool of actors, each holding one SDK client over all the replicas (the SDK
   spreads its requests over them and fails over between them). The shard's rows come out with their
   vectors as `OUTPUT/<shard>/` (Parquet), written under a temporary name and renamed when whole: an output
   that exists is a shard done, skipped when the job runs again.
2. **Load.** Each embedded shard is upserted by id into the collection, in large blocks, and marked loaded
   (`OUTPUT/<shard>/_loaded`): rerun, a loaded shard is skipped and a half-loaded one is upserted again
   (by id, so without duplicates).

The collection records the served model (as `embedline index` does) and the job refuses a collection of
another model before any shard is embedded.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedline.client.cli import positive_int
from embedline.client.connection import DEFAULT_TIMEOUT_S
from embedline.client.sync import EmbeddingClient
from embedline.errors import EmbedlineError
from embedline.search.indexer import served_model_record
from embedline.search.store import DEFAULT_COLLECTION, Collection, open_store

LOADED_MARK = "_loaded"
BATCH_ROWS = 512        # rows per actor call: several requests of the server's batch size in flight
LOAD_BLOCK_ROWS = 8192  # rows per upsert while loading
ACTOR_CPUS = 0.25


class RayJobError(EmbedlineError):
    """The job's input or output cannot be used."""


@dataclass(frozen=True)
class Columns:
    id: str = "id"
    text: str = "text"
    metadata: tuple[str, ...] = ()


class Embedder:
    """A Ray Data actor: one SDK client over every replica, kept for all the batches it is given."""

    def __init__(self, urls: list[str], text_column: str, prompt_name: str | None, timeout: float):
        self.client = EmbeddingClient(urls, timeout=timeout)
        self.text_column, self.prompt_name = text_column, prompt_name

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch[self.text_column]]
        vectors = self.client.embed(texts, prompt_name=self.prompt_name)
        return {**batch, "vector": list(vectors)}


def shards(pattern: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)))
    if not paths or not all(p.suffix == ".parquet" for p in paths):
        raise RayJobError(f"--input {pattern!r}: expected one or more .parquet shards, found "
                          f"{', '.join(p.name for p in paths[:5]) or 'none'}")
    return paths


def embed_shard(shard: Path, output: Path, urls: list[str], columns: Columns, prompt_name: str | None,
                actors: int, timeout: float) -> None:
    """OUTPUT/<shard stem>/ with the shard's rows and vectors, written whole or not at all."""
    import ray.data

    done = output / shard.stem
    partial = output / f".{shard.stem}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a run that died: redone
    # Blocks of a shard are what the actors share out: at least two per actor.
    dataset = ray.data.read_parquet(str(shard), columns=[columns.id, columns.text, *columns.metadata],
                                    override_num_blocks=2 * actors)
    # An actor waits on the servers, it computes nothing: a fraction of a CPU each, so that a pool as large
    # as the cluster's CPUs still leaves room for the read and write tasks (whole CPUs each deadlocked a
    # 2-CPU local cluster: the write never got one).
    embedded = dataset.map_batches(Embedder, batch_size=BATCH_ROWS, batch_format="numpy",
                                   compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=ACTOR_CPUS,
                                   fn_constructor_kwargs={"urls": urls, "text_column": columns.text,
                                                          "prompt_name": prompt_name, "timeout": timeout})
    embedded.write_parquet(str(partial))
    os.replace(partial, done)


def load_shard(done: Path, collection: Collection, columns: Columns) -> int:
    """Upsert an embedded shard's rows by id; mark it loaded. -> rows loaded."""
    import pyarrow.parquet as pq

    from embedline.search.indexer import document_fingerprint
    from embedline.documents import Document

    rows = 0
    for part in sorted(done.glob("*.parquet")):
        for batch in pq.ParquetFile(part).iter_batches(batch_size=LOAD_BLOCK_ROWS):
            table = batch.to_pydict()
            ids, texts = [str(i) for i in table[columns.id]], [str(t) for t in table[columns.text]]
            metadata = [{name: table[name][i] for name in columns.metadata} for i in range(len(ids))]
            vectors = np.asarray(table["vector"], dtype=np.float32)
            fingerprints = [document_fingerprint(Document(i, t, m, "")) for i, t, m in zip(ids, texts, metadata)]
            collection.upsert(ids, vectors, texts, metadata, fingerprints)
            rows += len(ids)
    (done / LOADED_MARK).touch()
    return rows


def run_job(urls: list[str], pattern: str, output: Path, store_uri: str, collection_name: str, columns: Columns,
            actors: int = 2, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Embed every shard not yet embedded, then load every shard not yet loaded; -> counts."""
    inputs = shards(pattern)
    output.mkdir(parents=True, exist_ok=True)
    with EmbeddingClient(urls, timeout=timeout) as client:
        record = served_model_record(client)
    collection = open_store(store_uri).create_or_open(collection_name, record)  # another model: refused now
    counts = {"shards": len(inputs), "embedded": 0, "skipped": 0, "loaded_rows": 0}
    for shard in inputs:
        if (output / shard.stem).is_dir():
            counts["skipped"] += 1
            continue
        started = time.perf_counter()
        embed_shard(shard, output, urls, columns, record.passage_prompt, actors, timeout)
        counts["embedded"] += 1
        print(f"embedded {shard.name} in {time.perf_counter() - started:.1f} s", flush=True)
    for shard in inputs:
        done = output / shard.stem
        if not (done / LOADED_MARK).exists():
            counts["loaded_rows"] += load_shard(done, collection, columns)
    collection.save_index()
    counts["collection_size"] = collection.count()
    return counts


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="server replicas HOST:PORT, comma-separated")
    parser.add_argument("--input", required=True, help="Parquet shards: a glob such as 'corpus/*.parquet'")
    parser.add_argument("--output", required=True, help="directory for the embedded shards (also the job's progress)")
    parser.add_argument("--store", required=True, help="store URI: milvus://HOST:PORT, or a directory")
    parser.add_argument("--collection", default=DEFAULT_COLLECTION, help=f"default {DEFAULT_COLLECTION!r}")
    parser.add_argument("--id-field", default="id")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--metadata-fields", default="", help="comma-separated columns kept as metadata")
    parser.add_argument("--actors", type=positive_int, default=2, help="embedding actors (each one SDK client)")
    parser.add_argument("--ray-address", default=None, help="a Ray cluster ('auto' inside one); default: local")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per batch")


def run(args: argparse.Namespace) -> int:
    import ray
    import ray.data

    urls = [u.strip() for u in args.url.split(",") if u.strip()]
    columns = Columns(args.id_field, args.text_field, tuple(f for f in args.metadata_fields.split(",") if f))
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    try:
        counts = run_job(urls, args.input, Path(args.output), args.store, args.collection, columns,
                         args.actors, args.timeout)
    finally:
        ray.shutdown()
    print(f"{counts['shards']} shards: {counts['embedded']} embedded now, {counts['skipped']} already embedded; "
          f"{counts['loaded_rows']} rows loaded; collection {args.collection!r} holds {counts['collection_size']}")
    return 0
