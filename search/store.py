"""What every vector store offers search, and `open_store(uri)`, which picks one by its URI.

A store holds named collections. A collection holds documents (id, text, metadata, vector) embedded by one
model, and records that model (`ModelRecord`): indexing into it or searching it with another model would
compare vectors from different spaces, so that is an error, not a silent wrong answer.

    a path, or file:///path   the embedded store (embedded.py): a directory, no other server
    milvus://host:port        a Milvus server (milvus.py; pymilvus, a token from $MILVUS_TOKEN)
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embedline.errors import EmbedlineError
# The prompt names of queries and passages (the core's: training records its prompts under them).
from embedline.retrieval import PASSAGE_PROMPTS, QUERY_PROMPT

DEFAULT_COLLECTION = "default"
# A collection's name is a directory name in the embedded store and a collection name in Milvus.
_COLLECTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
MAX_K = 1000


class StoreError(EmbedlineError):
    """A store or collection cannot be opened, read or written."""


class CollectionNotFoundError(StoreError):
    """The store has no collection of that name."""


class ModelMismatchError(StoreError):
    """A collection was indexed with another model than the one asked to search or extend it."""


@dataclass(frozen=True)
class ModelRecord:
    """The model a collection's vectors come from: what must match before its vectors are compared."""

    name: str
    dim: int
    fingerprint: str                 # a hash of the weights: two artifacts with the same name may differ
    normalized: bool = True          # vectors are L2-normalized: inner product is cosine similarity
    prompts: dict[str, str] = field(default_factory=dict)
    passage_prompt: str | None = None  # the prompt name documents were embedded with
    query_prompt: str | None = None    # the prompt name queries get

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelRecord":
        return cls(**{key: data.get(key) for key in cls.__dataclass_fields__ if key in data})

    @classmethod
    def for_model(cls, name: str, dim: int, fingerprint: str, prompts: dict[str, str]) -> "ModelRecord":
        """The record of a served model, with the prompts documents and queries get (when it has them)."""
        passage = next((p for p in PASSAGE_PROMPTS if p in prompts), None)
        query = QUERY_PROMPT if QUERY_PROMPT in prompts else None
        return cls(name=name, dim=dim, fingerprint=fingerprint, prompts=dict(prompts),
                   passage_prompt=passage, query_prompt=query)

    def check_same_model(self, other: "ModelRecord", collection: str) -> None:
        """ModelMismatchError unless `other` (the model in use) is the model the collection was indexed with."""
        differing = [key for key in ("name", "dim", "fingerprint", "normalized", "prompts")
                     if getattr(self, key) != getattr(other, key)]
        if differing:
            raise ModelMismatchError(
                f"collection {collection!r} was indexed with model {self.name!r} (dim {self.dim}, "
                f"weights {self.fingerprint}); the model in use is {other.name!r} (dim {other.dim}, weights "
                f"{other.fingerprint}): they differ in {', '.join(differing)}. Index it again with this model "
                "into a new collection, or serve the model it was indexed with")


@dataclass(frozen=True)
class Hit:
    """One ranked document."""

    id: str
    score: float
    text: str
    metadata: dict[str, Any]


class Collection(Protocol):
    name: str
    model: ModelRecord

    def count(self) -> int: ...
    def fingerprints(self, ids: list[str]) -> dict[str, str]: ...
    def upsert(self, ids: list[str], vectors: np.ndarray, texts: list[str], metadata: list[dict],
               fingerprints: list[str]) -> None: ...
    def delete(self, ids: list[str]) -> int: ...
    def search(self, vectors: np.ndarray, k: int, filter: str | None = None,
               exact: bool = False) -> list[list[Hit]]: ...
    def search_text(self, queries: list[str], k: int, filter: str | None = None) -> list[list[Hit]]: ...
    def refresh(self) -> None: ...
    def close(self) -> None: ...


class Store(Protocol):
    uri: str

    def collections(self) -> list[str]: ...
    def resident_mib(self) -> int: ...  # memory its collections take in a process that searches them
    def open(self, name: str) -> Collection: ...
    def create_or_open(self, name: str, model: ModelRecord) -> Collection: ...
    def drop(self, name: str) -> None: ...


def check_collection_name(name: str) -> str:
    if not isinstance(name, str) or not _COLLECTION_NAME.fullmatch(name):
        raise StoreError(f"collection name {name!r}: use a letter, then letters, digits or '_' (64 at most)")
    return name


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise StoreError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    return k


def default_store_uri() -> str:
    """The embedded store under $EMBEDLINE_HOME (default ~/.cache/embedline): search/."""
    home = os.environ.get("EMBEDLINE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "embedline")
    return str(Path(home) / "search")


def open_store(uri: str | None = None) -> Store:
    """The store `uri` names (default: the embedded store under $EMBEDLINE_HOME)."""
    uri = uri or default_store_uri()
    scheme, _, rest = uri.partition("://")
    if not rest:  # a plain path
        scheme, rest = "file", uri
    if scheme == "file":
        from embedline.search.embedded import DirectoryStore

        return DirectoryStore(Path(rest).expanduser())
    if scheme == "milvus":
        from embedline.search.milvus import MilvusStore

        return MilvusStore(uri)
    raise StoreError(f"store URI {uri!r}: expected a directory path, file:///path or milvus://host:port")


def reciprocal_rank_fusion(rankings: list[list[Hit]], k: int, constant: int = 60) -> list[Hit]:
    """Fuse ranked lists by reciprocal rank (Cormack et al. 2009): score = sum 1 / (constant + rank).

    Rank fusion needs no score calibration between BM25 and cosine similarity, which live on different
    scales; 60 is the paper's constant. A hit keeps the fused score.
    """
    scores: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (constant + rank)
            first.setdefault(hit.id, hit)
    ordered = sorted(scores, key=lambda doc_id: -scores[doc_id])[:k]
    return [Hit(doc_id, scores[doc_id], first[doc_id].text, first[doc_id].metadata) for doc_id in ordered]


def hybrid_search(collection: Collection, vectors: np.ndarray, queries: list[str], k: int,
                  filter: str | None = None) -> list[list[Hit]]:
    """Dense and BM25 rankings of each query, fused (each ranking is cut to a wider pool than k)."""
    pool = min(MAX_K, max(100, 2 * k))
    dense = collection.search(vectors, pool, filter)
    lexical = collection.search_text(queries, pool, filter)
    return [reciprocal_rank_fusion([d, s], k) for d, s in zip(dense, lexical)]
