"""Search as the server runs it: query texts -> per query the k best documents of a collection.

The `search` model (model_repository/python/search) wraps one SearchService: it hands it the embedding
function (a call to the `embed` model inside the server) and the served model's record, and turns its
errors into Triton statuses. Kept here, free of Triton, so that it is tested and read as plain Python.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embedline.search.filters import FilterError
from embedline.search.store import (DEFAULT_COLLECTION, Collection, CollectionNotFoundError, Hit, ModelRecord,
                                    StoreError, check_collection_name, check_k, hybrid_search, open_store)

# Queries per call to the embedding function, unless the embed model takes fewer.
EMBED_BATCH = 64


class SearchRequestError(StoreError):
    """A request the caller must change: bad k, filter, query or collection (a 400, INVALID_ARGUMENT)."""


class SearchService:
    """Collections of one store, opened on first use and kept current by their own refresh."""

    def __init__(self, store_uri: str, embed: Callable[[list[str]], np.ndarray], embed_batch: int = EMBED_BATCH):
        self.store = open_store(store_uri)
        self.embed = embed
        self.embed_batch = embed_batch  # texts per call of `embed`: the embed model's max_batch_size
        self._collections: dict[str, Collection] = {}

    def collection(self, name: str | None) -> Collection:
        """The named collection; none named: `default`, or the store's only collection."""
        if not name:
            names = self.store.collections()
            name = DEFAULT_COLLECTION if DEFAULT_COLLECTION in names or len(names) != 1 else names[0]
        try:
            check_collection_name(name)
        except StoreError as exc:
            raise SearchRequestError(str(exc)) from None
        if name not in self._collections:
            self._collections[name] = self.store.open(name)  # CollectionNotFoundError when absent
        return self._collections[name]

    def search(self, queries: list[str], model: ModelRecord, default_prompt: str = "", k: int = 10,
               filter: str | None = None, collection: str | None = None, hybrid: bool = False) -> list[list[Hit]]:
        """The k best documents for each query. `model` is the served model: a collection indexed with another
        is refused (ModelMismatchError). Queries get the collection's query prompt, else `default_prompt`."""
        [result] = self.search_many([SearchRequest(queries, k, filter, collection, hybrid)], model, default_prompt)
        if isinstance(result, Exception):
            raise result
        return result

    def search_many(self, requests: list["SearchRequest"], model: ModelRecord,
                    default_prompt: str = "") -> list[list[list[Hit]] | Exception]:
        """Several requests (a dynamic batch) with one embedding call for all their queries; per request its hits,
        or the exception that request alone raised (the others are still answered)."""
        prepared: list[tuple[Collection, list[str]] | Exception] = []
        for request in requests:
            try:
                prepared.append(self._prepare(request, model, default_prompt))
            except Exception as exc:  # noqa: BLE001 (reported to that request's caller)
                prepared.append(exc)
        texts = [text for item in prepared if not isinstance(item, Exception) for text in item[1]]
        size = self.embed_batch
        vectors = (np.concatenate([self.embed(texts[i:i + size]) for i in range(0, len(texts), size)])
                   if texts else np.empty((0, model.dim), np.float32))
        results: list[list[list[Hit]] | Exception] = []
        start = 0
        for request, item in zip(requests, prepared):
            if isinstance(item, Exception):
                results.append(item)
                continue
            target, request_texts = item
            request_vectors, start = vectors[start:start + len(request_texts)], start + len(request_texts)
            try:
                results.append(self._rank(target, request, request_vectors))
            except FilterError as exc:
                results.append(SearchRequestError(str(exc)))
            except Exception as exc:  # noqa: BLE001
                results.append(exc)
        return results

    def _prepare(self, request: "SearchRequest", model: ModelRecord, default_prompt: str) -> tuple[Collection, list[str]]:
        """Checks that need no embedding, and the texts to embed (the queries with their prompt)."""
        try:
            check_k(request.k)
        except StoreError as exc:
            raise SearchRequestError(str(exc)) from None
        for index, query in enumerate(request.queries):
            if not isinstance(query, str) or not query.strip():
                raise SearchRequestError(f"query {index} is empty: a query needs some text")
        target = self.collection(request.collection)
        target.model.check_same_model(model, target.name)
        prompt = target.model.prompts.get(target.model.query_prompt or "", default_prompt)
        return target, [prompt + query for query in request.queries]

    @staticmethod
    def _rank(target: Collection, request: "SearchRequest", vectors: np.ndarray) -> list[list[Hit]]:
        if request.hybrid:
            return hybrid_search(target, vectors, request.queries, request.k, request.filter or None)
        return target.search(vectors, request.k, request.filter or None)


@dataclass(frozen=True)
class SearchRequest:
    """One caller's search: its queries and options."""

    queries: list[str]
    k: int = 10
    filter: str | None = None
    collection: str | None = None
    hybrid: bool = False


__all__ = ["CollectionNotFoundError", "SearchRequest", "SearchRequestError", "SearchService"]
