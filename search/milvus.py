"""The Milvus store: the collections of a Milvus server (`milvus://host:port`), with the embedded store's semantics.

    milvus://host:port   ->  MilvusClient(uri="http://host:port"); a token (user:password, or an API key)
                             from $MILVUS_TOKEN when set

One Milvus collection per embedline collection, with these fields:

    id                    VARCHAR primary key: `upsert` replaces by id
    vector                FLOAT_VECTOR(dim), an HNSW index with the IP metric: the vectors are L2-normalized, so
                          the score is cosine similarity, the same number the embedded store gives
    text                  VARCHAR, analyzed (standard tokenizer, lowercase, English stemmer, the embedded store's
                          stop words) for full-text search
    lexical               SPARSE_FLOAT_VECTOR, written by a BM25 Function over `text` (Milvus >= 2.5; Milvus Lite
                          3.x has it too, without the stemmer): `search_text`
    metadata              JSON, the document's metadata as given: returned with each hit
    fingerprint           VARCHAR (a hash of text and metadata: what `embedline index` compares)
    by_bool, by_number,   JSON, the metadata's values split by type class: what filters run on (below)
    by_string

The model record (store.ModelRecord) is a collection property, `embedline.model` (JSON), sent in the same
CreateCollection request as the schema: a collection never exists without it, as an embedded collection counts as
created once its record is written, and no side collection can drift from the one it describes. (The schema's
description would do too, but Milvus Lite drops it.)

Filters mean what filters.py says: two-valued and type-strict. Milvus compares JSON values across types (`true ==
1`), and a comparison with a missing key is null, so `not (year > 1960)` would drop the documents without a year.
So each comparison is rendered over the typed field of its literal's class and guarded by `exists`:
`(exists by_number["year"] and by_number["year"] > 1960)` is false, never null, when the key is missing or holds
another type. `x in [a, b]` becomes `x == a or x == b` (Milvus Lite takes `in` only on a plain field).

Reads use the Strong consistency level: a search sees every write acknowledged before it began, by any client, as
the embedded store's readers see a writer's commits at their next search. (Session would miss `embedline index`
writing through another client; Bounded, Milvus's default, up to its 5 s staleness window.) On a Milvus cluster
that costs a search up to one time tick (200 ms by default) of waiting.

`search(..., exact=True)` scans: it reads every (allowed) vector with a query iterator and ranks them here by
inner product, exactly. It moves the whole collection over the network: meant for evaluation-sized collections
(tests, recall checks), not for serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from typing import Any, Iterator

import numpy as np

from embedline.lexical import STOP_WORDS
from embedline.search.embedded import EF_CONSTRUCTION, HNSW_LINKS, _chunks, beam_width
from embedline.search.filters import And, Compare, Filter, Not, Or, Truthy, _kind, parse_filter, to_milvus
from embedline.search.store import (CollectionNotFoundError, Hit, ModelRecord, StoreError, check_collection_name,
                                    check_k)

DEFAULT_TIMEOUT_S = 30.0
MODEL_PROPERTY = "embedline.model"
CONSISTENCY = "Strong"
TEXT_BYTES = 65535  # Milvus's longest VARCHAR
ID_BYTES = 1024
UPSERT_ROWS = 512  # rows per request: 512 of the longest texts stay under gRPC's 64 MiB message limit
READ_BATCH = 1000  # ids per `get`, rows per query-iterator batch
# The HNSW beam follows the collection's size (embedded.beam_width), counted again at most this often: a
# count is one more request, and a beam a little narrow for a few seconds costs little recall.
SIZE_REFRESH_S = 30.0
# What importing pymilvus (with pandas and grpc) adds to a process: 111 MiB RSS measured here.
CLIENT_MIB = 110
# Filters run on the metadata's values of one type class (filters._kind: bool, number, string) each.
TYPED_FIELDS = {"bool": "by_bool", "number": "by_number", "string": "by_string"}
ANALYZER = {"tokenizer": "standard",
            "filter": ["lowercase", {"type": "stemmer", "language": "english"},
                       {"type": "stop", "stop_words": sorted(STOP_WORDS)}]}

# Quieted unless whoever configures logging set their levels: a failed call reaches the caller as a StoreError with
# Milvus's message, and pymilvus would also log each one with a traceback; Milvus Lite has no MVCC timestamp for
# the query iterator, which pymilvus warns about at every exact search.
for _name, _level in (("pymilvus.decorators", logging.CRITICAL),
                      ("pymilvus.client.iterator.query_iterator", logging.ERROR)):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(_level)


def _one_line(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return re.sub(r"\s+", " ", str(message)).strip()


# -- filters ----------------------------------------------------------------------------------------------


def _guarded(field: str, key: str, test: Filter) -> str:
    """`test` (a comparison over `field`) as an expression that is false, never null, when the key is absent."""
    return f'(exists {field}["{key}"] and ({to_milvus(test, field)}))'


def milvus_filter(expr: Filter) -> str:
    """A parsed filter as a Milvus expression over the typed fields, with filters.matches' semantics (module doc)."""
    if isinstance(expr, (And, Or)):
        word = " and " if isinstance(expr, And) else " or "
        return "(" + word.join(milvus_filter(item) for item in expr.items) + ")"
    if isinstance(expr, Not):
        return f"(not {milvus_filter(expr.item)})"
    if isinstance(expr, Truthy):
        expr = Compare(expr.field, "==", True)
    if isinstance(expr, Compare):
        return _guarded(TYPED_FIELDS[_kind(expr.value)], expr.field, expr)
    field = TYPED_FIELDS[_kind(expr.values[0])]
    equal_any = Or(tuple(Compare(expr.field, "==", value) for value in expr.values))
    return _guarded(field, expr.field, Not(equal_any) if expr.negated else equal_any)


def _filter_expression(filter: str | None) -> str:
    """'' for no filter; FilterError for a bad one, before anything is sent."""
    return milvus_filter(parse_filter(filter)) if filter else ""


def _typed(metadata: dict) -> dict[str, dict]:
    """The metadata's values split into the typed fields; nulls, lists and objects match no filter, so go nowhere."""
    typed: dict[str, dict] = {field: {} for field in TYPED_FIELDS.values()}
    for key, value in metadata.items():
        kind = _kind(value)
        if kind is not None:
            typed[TYPED_FIELDS[kind]][key] = value
    return typed


# -- the store --------------------------------------------------------------------------------------------


def _http_uri(uri: str) -> str:
    """milvus://host:port -> http://host:port (StoreError for anything else)."""
    match = re.fullmatch(r"milvus://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})/?", uri)
    if not match:
        raise StoreError(f"store URI {uri!r}: expected milvus://host:port")
    return f"http://{match[1]}:{match[2]}"


class MilvusStore:
    """Collections of one Milvus server (or Milvus Lite's server). Connects on first use, so that a server
    serving search starts while Milvus is down, and connects again after a failed attempt."""

    def __init__(self, uri: str, timeout: float = DEFAULT_TIMEOUT_S):
        self.uri = uri
        self.timeout = timeout
        self._http_uri = _http_uri(uri)
        self._client = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def failures(self, doing: str) -> Iterator[None]:
        """Milvus's and gRPC's errors, as one-line StoreErrors naming the store."""
        import grpc
        from pymilvus.exceptions import MilvusException

        try:
            yield
        except (MilvusException, grpc.RpcError) as exc:
            raise StoreError(f"Milvus store {self.uri}: {doing} failed: {_one_line(exc)}") from exc

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                from pymilvus import MilvusClient  # the search extra

                with self.failures("connecting"):
                    self._client = MilvusClient(uri=self._http_uri, token=os.environ.get("MILVUS_TOKEN", ""),
                                                timeout=self.timeout)
            return self._client

    def collections(self) -> list[str]:
        """Every collection of the server (one call: the service asks at each search that names none)."""
        with self.failures("listing collections"):
            return sorted(self.client.list_collections())

    def resident_mib(self) -> int:
        """What searching this store adds to a process: not its collections, which live in the Milvus server, but
        the client library (CLIENT_MIB). Asks the server nothing: `serve --index` plans memory with Milvus down."""
        return CLIENT_MIB

    def open(self, name: str) -> "MilvusCollection":
        check_collection_name(name)
        with self.failures(f"opening collection {name!r}"):
            found = self.client.has_collection(name)
        if not found:
            have = ", ".join(self.collections()) or "none"
            raise CollectionNotFoundError(f"store {self.uri} has no collection {name!r} (it has: {have})")
        with self.failures(f"opening collection {name!r}"):
            described = self.client.describe_collection(name)
        record = (described.get("properties") or {}).get(MODEL_PROPERTY)
        if record is None:
            raise CollectionNotFoundError(f"store {self.uri}: collection {name!r} is not an embedline collection "
                                          f"(it has no {MODEL_PROPERTY} property)")
        collection = MilvusCollection(self, name, ModelRecord.from_json(json.loads(record)))
        collection.make_ready()
        return collection

    def create_or_open(self, name: str, model: ModelRecord) -> "MilvusCollection":
        """The collection `name`, created for `model` when new; ModelMismatchError when it holds another's."""
        check_collection_name(name)
        with self.failures(f"creating collection {name!r}"):
            if not self.client.has_collection(name):
                self._create(name, model)
        collection = self.open(name)
        collection.model.check_same_model(model, name)
        return collection

    def _create(self, name: str, model: ModelRecord) -> None:
        from pymilvus.exceptions import MilvusException

        try:
            self.client.create_collection(name, schema=_schema(model.dim), consistency_level=CONSISTENCY,
                                          properties={MODEL_PROPERTY: json.dumps(model.to_json())})
        except MilvusException:
            if not self.client.has_collection(name):  # not a race lost to another creator: a real failure
                raise

    def drop(self, name: str) -> None:
        check_collection_name(name)
        with self.failures(f"dropping collection {name!r}"):
            if self.client.has_collection(name):
                self.client.drop_collection(name)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _schema(dim: int):
    from pymilvus import DataType, Function, FunctionType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_BYTES)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("text", DataType.VARCHAR, max_length=TEXT_BYTES, enable_analyzer=True, analyzer_params=ANALYZER)
    schema.add_field("lexical", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("fingerprint", DataType.VARCHAR, max_length=ID_BYTES)
    for field in TYPED_FIELDS.values():
        schema.add_field(field, DataType.JSON)
    schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["text"],
                                 output_field_names=["lexical"]))
    return schema


def _index_params(client):
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_name="vector", index_type="HNSW", metric_type="IP",
                     params={"M": HNSW_LINKS, "efConstruction": EF_CONSTRUCTION})
    params.add_index(field_name="lexical", index_name="lexical", index_type="SPARSE_INVERTED_INDEX",
                     metric_type="BM25")
    return params


# -- a collection -----------------------------------------------------------------------------------------


class MilvusCollection:
    """One collection of a MilvusStore. Holds no state of its own beyond the model record: Milvus is the truth."""

    def __init__(self, store: MilvusStore, name: str, model: ModelRecord):
        self.store = store
        self.name = name
        self.model = model
        self._size, self._sized_at = 0, None

    def _beam(self, k: int) -> int:
        """The HNSW beam (Milvus's `ef`) for a k-search: the embedded store's rule for this collection's size."""
        now = time.monotonic()
        if self._sized_at is None or now - self._sized_at > SIZE_REFRESH_S:
            self._size, self._sized_at = self.count(), now
        return max(beam_width(self._size), k)

    @property
    def _client(self):
        return self.store.client

    def make_ready(self) -> None:
        """Indexes, then load: CreateCollection, CreateIndex and LoadCollection are separate requests, and a
        creator stopped between them leaves a collection that cannot be searched until this is done."""
        with self.store.failures(f"loading collection {self.name!r}"):
            if not {"vector", "lexical"} <= set(self._client.list_indexes(self.name)):
                self._client.create_index(self.name, _index_params(self._client))
            self._client.load_collection(self.name)

    def count(self) -> int:
        with self.store.failures(f"counting collection {self.name!r}"):
            [row] = self._client.query(self.name, filter="", output_fields=["count(*)"],
                                       consistency_level=CONSISTENCY)
        return int(row["count(*)"])

    def _get(self, ids: list[str], fields: list[str]) -> list[dict]:
        rows: list[dict] = []
        with self.store.failures(f"reading collection {self.name!r}"):
            for part in _chunks(list(ids), READ_BATCH):
                rows += self._client.get(self.name, ids=part, output_fields=fields, consistency_level=CONSISTENCY)
        return rows

    def fingerprints(self, ids: list[str]) -> dict[str, str]:
        """id -> the fingerprint (a hash of text and metadata) stored for it, for the ids present."""
        return {row["id"]: row["fingerprint"] for row in self._get(ids, ["fingerprint"])}

    def upsert(self, ids: list[str], vectors: np.ndarray, texts: list[str], metadata: list[dict],
               fingerprints: list[str]) -> None:
        """Insert the documents, replacing any with the same id. Checked whole before the first request; Milvus
        has no transaction across requests, but a block written again (as `embedline index` does after a crash)
        converges, as upserts by id do."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.model.dim):
            raise StoreError(f"collection {self.name!r}: expected {len(ids)} vectors of dim {self.model.dim}, "
                             f"got shape {vectors.shape}")
        for doc_id, text in zip(ids, texts):
            if len(text.encode("utf-8")) > TEXT_BYTES or len(doc_id.encode("utf-8")) > ID_BYTES:
                raise StoreError(f"collection {self.name!r}: document {doc_id[:80]!r} is too long for Milvus (a "
                                 f"text holds at most {TEXT_BYTES} bytes, an id {ID_BYTES})")
        rows = [{"id": i, "vector": v.tolist(), "text": t, "metadata": m, "fingerprint": f, **_typed(m)}
                for i, v, t, m, f in zip(ids, vectors, texts, metadata, fingerprints)]
        with self.store.failures(f"writing to collection {self.name!r}"):
            for part in _chunks(rows, UPSERT_ROWS):
                self._client.upsert(self.name, part)

    def delete(self, ids: list[str]) -> int:
        """Remove the documents with these ids (absent ids are ignored); how many were removed. Milvus counts
        every id it was asked to delete, so the present ones are looked up first."""
        present = [row["id"] for row in self._get(list(dict.fromkeys(ids)), ["id"])]
        with self.store.failures(f"deleting from collection {self.name!r}"):
            for part in _chunks(present, READ_BATCH):
                self._client.delete(self.name, ids=part)
        return len(present)

    def refresh(self) -> None:
        """Nothing to do: every read is Strong (module doc), so each search already sees the latest writes."""

    def save_index(self) -> None:
        """Flush: seal what was written into segments, which Milvus indexes and persists (once per indexing run)."""
        with self.store.failures(f"flushing collection {self.name!r}"):
            self._client.flush(self.name)

    def close(self) -> None:
        """Nothing to do: the connection is the store's (MilvusStore.close)."""

    # -- searching --------------------------------------------------------------------------------

    def _query_vectors(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self.model.dim:
            raise StoreError(f"collection {self.name!r} holds dim-{self.model.dim} vectors; got dim {vectors.shape[1]}")
        return vectors

    def search(self, vectors: np.ndarray, k: int, filter: str | None = None,
               exact: bool = False) -> list[list[Hit]]:
        """The k nearest documents of each query vector by cosine similarity, best first (HNSW; exact: a scan)."""
        check_k(k)
        expression = _filter_expression(filter)
        vectors = self._query_vectors(vectors)
        if exact:
            return self._exact(vectors, k, expression)
        with self.store.failures(f"searching collection {self.name!r}"):
            results = self._client.search(
                self.name, data=vectors.tolist(), anns_field="vector", limit=k, filter=expression,
                output_fields=["text", "metadata"], consistency_level=CONSISTENCY,
                search_params={"metric_type": "IP", "params": {"ef": self._beam(k)}})
        return [[_hit(hit, float(hit["distance"])) for hit in row] for row in results]

    def _scan(self, expression: str) -> tuple[list[str], np.ndarray]:
        """Every id and vector the expression allows, read in batches."""
        ids: list[str] = []
        blocks: list[np.ndarray] = []
        with self.store.failures(f"scanning collection {self.name!r}"):
            iterator = self._client.query_iterator(self.name, batch_size=READ_BATCH, filter=expression,
                                                   output_fields=["id", "vector"], consistency_level=CONSISTENCY)
            try:
                while batch := iterator.next():
                    ids += [row["id"] for row in batch]
                    blocks.append(np.asarray([row["vector"] for row in batch], dtype=np.float32))
            finally:
                iterator.close()
        return ids, (np.concatenate(blocks) if blocks else np.empty((0, self.model.dim), np.float32))

    def _exact(self, vectors: np.ndarray, k: int, expression: str) -> list[list[Hit]]:
        ids, matrix = self._scan(expression)
        if not ids:
            return [[] for _ in vectors]
        scores = vectors @ matrix.T
        top = min(k, len(ids))
        best = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        order = np.take_along_axis(best, np.argsort(-np.take_along_axis(scores, best, 1), 1, kind="stable"), 1)
        documents = {row["id"]: row for row in self._get(sorted({ids[p] for p in order.ravel()}),
                                                         ["text", "metadata"])}
        return [[Hit(ids[p], float(scores[q, p]), documents[ids[p]]["text"], documents[ids[p]]["metadata"])
                 for p in order[q] if ids[p] in documents]  # one deleted since the scan is left out
                for q in range(len(vectors))]

    def search_text(self, queries: list[str], k: int, filter: str | None = None) -> list[list[Hit]]:
        """BM25 ranking of each query (Milvus's full-text search over `text`), best first."""
        check_k(k)
        expression = _filter_expression(filter)
        wanted = [i for i, query in enumerate(queries) if re.search(r"\w", query)]  # no term: nothing to rank by
        results: list[list[Hit]] = [[] for _ in queries]
        if not wanted:
            return results
        with self.store.failures(f"searching collection {self.name!r}"):
            found = self._client.search(
                self.name, data=[queries[i] for i in wanted], anns_field="lexical", limit=k, filter=expression,
                output_fields=["text", "metadata"], consistency_level=CONSISTENCY,
                search_params={"metric_type": "BM25"})
        for i, row in zip(wanted, found):
            # BM25 scores are never negative; Milvus Lite 3.2 reports them negated (its internal distance).
            results[i] = [_hit(hit, abs(float(hit["distance"]))) for hit in row]
        return results


def _hit(hit: Any, score: float) -> Hit:
    entity = hit["entity"]
    return Hit(str(hit["id"]), score, entity["text"], entity["metadata"] or {})
