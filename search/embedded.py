"""The embedded store: a directory of collections, each one SQLite file plus a FAISS HNSW index.

    STORE/NAME/collection.sqlite   the truth: documents (id, text, metadata, vector), the model record,
                                   a log of deleted rows, and an FTS5 full-text index (BM25)
    STORE/NAME/vectors.npz         a saved HNSW graph over the vectors: a cache, rebuilt from SQLite when
                                   missing, unreadable or of another layout

Why this shape:
- Crash safety comes from SQLite: each block of documents is one transaction (an upsert by id), so a
  `kill -9` leaves whole blocks, and running the same indexing again completes the corpus without duplicates.
  The HNSW file is written to a temporary name and renamed, so it is always some complete past state.
- Readers see writers' work without a restart: SQLite's WAL mode lets a server search while `embedline
  index` writes; before each search the reader asks SQLite whether another connection committed
  (`PRAGMA data_version`, no I/O) and adds the new rows to its graph. HNSW cannot remove a point, so a
  deleted or replaced document's row is logged (`deletions`) and masked out of every search.
- Metadata filters run in SQLite (filters.to_sql) and reach FAISS as a bitmap of allowed rows; when few
  rows pass, an exact scan over them is both faster and exact.
- The graph holds its vectors as float16 (IndexHNSWSQ): half the memory, and a walk of the graph is bound by
  memory reads (one search touches ~2,000 vectors scattered over the collection), so it is also faster. The
  hits' scores are then recomputed from SQLite's float32 vectors: a score is the exact cosine similarity.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path

import numpy as np

from embedline.lexical import FTS5_TOKENIZE, match_expression
from embedline.search.filters import parse_filter, to_sql
from embedline.search.store import (CollectionNotFoundError, Hit, ModelRecord, StoreError, check_collection_name,
                                    check_k)

log = logging.getLogger(__name__)

DATABASE_FILE = "collection.sqlite"
INDEX_FILE = "vectors.npz"
# HNSW: 32 links per node, an 80-wide beam while building, and while searching a beam that widens with the
# collection (`beam_width`): recall@10 against exact search is measured in benchmarks/search.py (and
# tests/test_search_store.py).
HNSW_LINKS = 32
EF_CONSTRUCTION = 80
EF_SEARCH = 128  # the beam up to EF_SEARCH_SIZE vectors
EF_SEARCH_SIZE = 100_000
MAX_EF_SEARCH = 2048
# Below this many allowed rows an exact scan is cheaper than a walk of the graph (and exact).
EXACT_SCAN_BELOW = 1024
_SQL_VARIABLES = 500  # ids per `IN (...)`: under SQLite's variable limit on every build
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS deletions (seq INTEGER PRIMARY KEY AUTOINCREMENT, row INTEGER NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS lexical USING fts5(text, content='docs', content_rowid='row',
                                                      tokenize='{FTS5_TOKENIZE}');
CREATE TRIGGER IF NOT EXISTS docs_added AFTER INSERT ON docs BEGIN
    INSERT INTO lexical(rowid, text) VALUES (new.row, new.text);
END;
CREATE TRIGGER IF NOT EXISTS docs_removed AFTER DELETE ON docs BEGIN
    INSERT INTO lexical(lexical, rowid, text) VALUES ('delete', old.row, old.text);
    INSERT INTO deletions(row) VALUES (old.row);
END;
"""


def beam_width(size: int) -> int:
    """efSearch for a graph of `size` vectors: EF_SEARCH up to EF_SEARCH_SIZE, then 4x per tenfold growth.

    A fixed beam loses recall as the graph grows (measured at efSearch 128: recall@10 0.957 over 100,000 real
    embeddings, 0.897 over a million); this rule gives 512 at a million (benchmarks/README.md, "Search")."""
    return min(MAX_EF_SEARCH, round(EF_SEARCH * 4 ** math.log10(max(1.0, size / EF_SEARCH_SIZE))))


def new_graph(dim: int):
    """An empty HNSW graph of the store's layout: float16 vectors, HNSW_LINKS links, inner product."""
    import faiss

    index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    return index


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    # NORMAL under WAL: a process crash loses nothing committed; only a power cut can lose the last commits.
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def _chunks(items: list, size: int = _SQL_VARIABLES):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class DirectoryStore:
    """Collections as subdirectories of `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def collections(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if (d / DATABASE_FILE).is_file())

    def resident_mib(self) -> int:
        """The HNSW graphs a searching process holds for every collection as it is now: per vector its float16s,
        2 x HNSW_LINKS neighbour ids on the base layer, and the row/mask arrays (faiss's upper layers add ~3%)."""
        per_vector = 0.0
        for name in self.collections():
            db = sqlite3.connect(f"file:{self.root / name / DATABASE_FILE}?mode=ro", uri=True)
            try:
                (model,) = db.execute("SELECT value FROM meta WHERE key = 'model'").fetchone() or ("{}",)
                (rows,) = db.execute("SELECT COALESCE(MAX(row), 0) FROM docs").fetchone()
            except sqlite3.DatabaseError:
                continue  # not a whole collection: it will be reported when searched
            finally:
                db.close()
            dim = json.loads(model).get("dim", 0)
            per_vector += rows * (dim * 2 + 2 * HNSW_LINKS * 4 + 9) * 1.05
        return int(per_vector / 2**20) + 1

    def open(self, name: str) -> "EmbeddedCollection":
        check_collection_name(name)
        path = self.root / name / DATABASE_FILE
        if not path.is_file():
            have = ", ".join(self.collections()) or "none"
            raise CollectionNotFoundError(f"store {self.uri} has no collection {name!r} (it has: {have})")
        return EmbeddedCollection(name, self.root / name)

    def create_or_open(self, name: str, model: ModelRecord) -> "EmbeddedCollection":
        """The collection `name`, created for `model` when new; ModelMismatchError when it holds another's."""
        check_collection_name(name)
        directory = self.root / name
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create collection {name!r} in {self.uri}: {exc}") from exc
        EmbeddedCollection.create(directory, model)
        collection = EmbeddedCollection(name, directory)
        collection.model.check_same_model(model, name)
        return collection

    def drop(self, name: str) -> None:
        check_collection_name(name)
        shutil.rmtree(self.root / name, ignore_errors=True)


class EmbeddedCollection:
    """One collection: SQLite for the documents, an in-memory HNSW graph (faiss, float16 vectors) for their
    vectors."""

    def __init__(self, name: str, directory: Path):
        import faiss  # the search extra; imported here so that the store module imports without it

        self._faiss = faiss
        self.name = name
        self.directory = directory
        self._lock = threading.RLock()
        try:
            self._db = _connect(directory / DATABASE_FILE)
            created = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
            row = created and self._db.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"collection {name!r} ({directory}): unreadable ({exc})") from exc
        if not row:  # no schema yet, or no model record: being created (or a crash left it half made)
            raise CollectionNotFoundError(f"collection {name!r} ({directory}) was never completely created")
        self.model = ModelRecord.from_json(json.loads(row[0]))
        self._data_version = None
        self._load_index()

    @staticmethod
    def create(directory: Path, model: ModelRecord) -> None:
        """The schema (idempotent), then the model record: a collection counts as created once its record
        exists (EmbeddedCollection checks), so a crash in between leaves nothing that looks whole."""
        db = _connect(directory / DATABASE_FILE)
        try:
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('model', ?)", (json.dumps(model.to_json()),))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot create collection in {directory}: {exc}") from exc
        finally:
            db.close()

    # -- the vector index -------------------------------------------------------------------------

    def _load_index(self) -> None:
        """The saved graph when it reads, else an empty one; then whatever SQLite has beyond it."""
        self._index, self._rows, self._live = new_graph(self.model.dim), np.empty(0, np.int64), np.empty(0, bool)
        self._last_row = self._last_deletion = 0
        path = self.directory / INDEX_FILE
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as saved:
                    index = self._faiss.deserialize_index(saved["index"])
                    rows, live = saved["rows"], saved["live"]
                    last_row, last_deletion = int(saved["last_row"]), int(saved["last_deletion"])
                if index.ntotal != len(rows) or index.d != self.model.dim:
                    raise ValueError("index and rows disagree")
                if type(index) is not type(self._index):  # noqa: E721 (a graph of another layout)
                    raise ValueError(f"a {type(index).__name__}, not a {type(self._index).__name__}")
                self._index, self._rows, self._live = index, rows, live
                self._last_row, self._last_deletion = last_row, last_deletion
            except Exception as exc:  # a cache: any problem means rebuild it from the truth
                log.warning("collection %s: rebuilding its vector index (%s unreadable: %s)", self.name, path, exc)
        self.refresh()

    def refresh(self) -> None:
        """Add the rows other connections committed since the last look; mask the deleted ones."""
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return
            self._db.execute("BEGIN")  # one snapshot: the new rows and the deletions agree
            try:
                self._add_new_rows()
                deleted = [r for (r,) in self._db.execute(
                    "SELECT row FROM deletions WHERE seq > ?", (self._last_deletion,))]
                self._last_deletion = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM deletions").fetchone()[0]
            finally:
                self._db.execute("COMMIT")
            if deleted:
                positions = np.searchsorted(self._rows, deleted)
                found = positions < len(self._rows)
                found[found] &= self._rows[positions[found]] == np.asarray(deleted)[found]
                self._live[positions[found]] = False
            self._data_version = version

    def _add_new_rows(self) -> None:
        cursor = self._db.execute("SELECT row, vector FROM docs WHERE row > ? ORDER BY row", (self._last_row,))
        while batch := cursor.fetchmany(16384):
            rows = np.fromiter((r for r, _ in batch), np.int64, len(batch))
            vectors = np.frombuffer(b"".join(v for _, v in batch), np.float32).reshape(len(batch), self.model.dim)
            self._index.add(vectors)
            self._rows = np.concatenate([self._rows, rows])
            self._live = np.concatenate([self._live, np.ones(len(rows), bool)])
            self._last_row = int(rows[-1])

    def save_index(self) -> None:
        """Write the graph beside the database (atomically), so the next reader loads instead of rebuilding."""
        with self._lock:
            self.refresh()
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".vectors.", suffix=".npz")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, index=self._faiss.serialize_index(self._index), rows=self._rows, live=self._live,
                             last_row=self._last_row, last_deletion=self._last_deletion)
                os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a server running as another user reads it
                os.replace(tmp, self.directory / INDEX_FILE)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    # -- writing ----------------------------------------------------------------------------------

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]

    def fingerprints(self, ids: list[str]) -> dict[str, str]:
        """id -> the fingerprint (a hash of text and metadata) stored for it, for the ids present."""
        found = {}
        for part in _chunks(list(ids)):
            marks = ",".join("?" * len(part))
            found.update(self._db.execute(f"SELECT id, fingerprint FROM docs WHERE id IN ({marks})", part))
        return found

    def upsert(self, ids: list[str], vectors: np.ndarray, texts: list[str], metadata: list[dict],
               fingerprints: list[str]) -> None:
        """Insert the documents, replacing any with the same id: one transaction."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.model.dim):
            raise StoreError(f"collection {self.name!r}: expected {len(ids)} vectors of dim {self.model.dim}, "
                             f"got shape {vectors.shape}")
        rows = [(i, t, json.dumps(m, ensure_ascii=False), f, v.tobytes())
                for i, t, m, f, v in zip(ids, texts, metadata, fingerprints, vectors)]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for part in _chunks(list(ids)):
                    self._db.execute(f"DELETE FROM docs WHERE id IN ({','.join('?' * len(part))})", part)
                self._db.executemany(
                    "INSERT INTO docs(id, text, metadata, fingerprint, vector) VALUES (?, ?, ?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._data_version = None  # our own commits do not move data_version: look again

    def delete(self, ids: list[str]) -> int:
        """Remove the documents with these ids (absent ids are ignored); how many were removed."""
        removed = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for part in _chunks(list(ids)):
                    removed += self._db.execute(
                        f"DELETE FROM docs WHERE id IN ({','.join('?' * len(part))})", part).rowcount
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._data_version = None
        return removed

    # -- searching --------------------------------------------------------------------------------

    def _allowed(self, filter: str | None) -> np.ndarray:
        """Per graph position: may it be returned (live, and passing the filter)."""
        if not filter:
            return self._live
        where, params = to_sql(parse_filter(filter))
        rows = np.fromiter((r for (r,) in self._db.execute(f"SELECT row FROM docs WHERE {where}", params)), np.int64)
        allowed = np.zeros(len(self._rows), bool)
        positions = np.searchsorted(self._rows, rows)
        inside = positions < len(self._rows)
        positions = positions[inside][self._rows[positions[inside]] == rows[inside]]
        allowed[positions] = True
        return allowed & self._live

    def search(self, vectors: np.ndarray, k: int, filter: str | None = None,
               exact: bool = False) -> list[list[Hit]]:
        """The k nearest documents of each query vector by cosine similarity, best first."""
        check_k(k)
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self.model.dim:
            raise StoreError(f"collection {self.name!r} holds dim-{self.model.dim} vectors; got dim {vectors.shape[1]}")
        with self._lock:
            self.refresh()
            allowed = self._allowed(filter)
            n_allowed = int(np.count_nonzero(allowed))  # 4x faster than sum() on a bool array
            if n_allowed == 0:
                return [[] for _ in vectors]
            faiss = self._faiss
            if n_allowed == len(allowed) and not exact and n_allowed > EXACT_SCAN_BELOW:  # nothing masked
                # the beam holds the candidates: at least k wide, or fewer than k come back
                params = faiss.SearchParametersHNSW(efSearch=max(beam_width(len(allowed)), k))
                _, positions = self._index.search(vectors, k, params=params)
                return self._hits(vectors, positions)
            bitmap = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
            if exact or n_allowed <= EXACT_SCAN_BELOW or n_allowed < 0.05 * len(allowed):
                storage = faiss.downcast_index(self._index.storage)
                _, positions = storage.search(vectors, min(k, n_allowed), params=faiss.SearchParameters(sel=selector))
            else:
                # A sparser mask needs a wider beam to find k allowed neighbours.
                ef = int(min(4096, max(beam_width(len(allowed)), k) * len(allowed) / n_allowed))
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
                _, positions = self._index.search(vectors, min(k, n_allowed), params=params)
            return self._hits(vectors, positions)

    def _hits(self, queries: np.ndarray, positions: np.ndarray) -> list[list[Hit]]:
        """The documents at graph `positions` (per query), scored against the query with their float32
        vectors (the graph's float16 ones only ranked them) and sorted by that score."""
        wanted = {int(self._rows[p]) for p in positions.ravel() if p >= 0}
        documents = self._documents(wanted)
        results = []
        for query, query_positions in zip(queries, positions):
            rows = [row for row in (int(self._rows[p]) for p in query_positions if p >= 0)
                    if row in documents]  # a row deleted since the last refresh is left out
            if not rows:
                results.append([])
                continue
            scores = (np.stack([documents[row][3] for row in rows]) @ query).tolist()
            hits = []
            for score, row in sorted(zip(scores, rows), key=lambda pair: -pair[0]):  # stable: ties keep graph order
                doc_id, text, metadata, _ = documents[row]
                hits.append(Hit(doc_id, score, text, metadata))
            results.append(hits)
        return results

    def _documents(self, rows) -> dict[int, tuple[str, str, dict, np.ndarray]]:
        found = {}
        for part in _chunks(sorted(rows)):
            for row, doc_id, text, metadata, vector in self._db.execute(
                    f"SELECT row, id, text, metadata, vector FROM docs WHERE row IN ({','.join('?' * len(part))})",
                    part):
                found[row] = (doc_id, text, json.loads(metadata), np.frombuffer(vector, np.float32))
        return found

    def search_text(self, queries: list[str], k: int, filter: str | None = None) -> list[list[Hit]]:
        """BM25 (SQLite FTS5: k1 1.2, b 0.75, Porter stemming) ranking of each query, best first."""
        check_k(k)
        where, params = to_sql(parse_filter(filter), column="docs.metadata") if filter else ("1", [])
        results = []
        with self._lock:
            for query in queries:
                match = match_expression(query)  # BM25 as the core defines it (embedline/lexical.py)
                if match is None:
                    results.append([])
                    continue
                rows = self._db.execute(
                    "SELECT docs.id, docs.text, docs.metadata, bm25(lexical) FROM lexical "
                    "JOIN docs ON docs.row = lexical.rowid "
                    f"WHERE lexical MATCH ? AND ({where}) ORDER BY bm25(lexical) LIMIT ?", [match, *params, k])
                # FTS5's bm25() is negative, lower is better: the hit's score is its negation.
                results.append([Hit(i, -float(s), t, json.loads(m)) for i, t, m, s in rows])
        return results

    def close(self) -> None:
        with self._lock:
            self._db.close()
