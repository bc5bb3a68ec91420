"""Search as the server runs it: query texts -> per query the k best documents of a collection.

The `search` model (model_repository/python/search) wraps one SearchService: it hands it the embedding
function (a call to the `embed` model inside the server) and the served model's record, and turns its
errors into Triton statuses. Kept here, free of Triton, so that it is tested and read as plain Python.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from embedline.search.filters import FilterError
from embedline.search.store import (DEFAULT_COLLECTION, Collection, CollectionNotFoundError, Hit, ModelRecord,
                                    StoreError, check_collection_name, check_k, hybrid_search, open_store)

# Queries per call to the embedding function (under any served model's max_batch_size).
EMBED_BATCH = 32


class SearchRequestError(StoreError):
    """A request the caller must change: bad k, filter, query or collection (a 400, INVALID_ARGUMENT)."""


class SearchService:
    """Collections of one store, opened on first use and kept current by their own refresh."""

    def __init__(self, store_uri: str, embed: Callable[[list[str]], np.ndarray]):
        self.store = open_store(store_uri)
        self.embed = embed
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
        try:
            check_k(k)
        except StoreError as exc:
            raise SearchRequestError(str(exc)) from None
        for index, query in enumerate(queries):
            if not isinstance(query, str) or not query.strip():
                raise SearchRequestError(f"query {index} is empty: a query needs some text")
        target = self.collection(collection)
        target.model.check_same_model(model, target.name)
        prompt = target.model.prompts.get(target.model.query_prompt or "", default_prompt)
        texts = [prompt + query for query in queries]
        vectors = np.concatenate([self.embed(texts[i:i + EMBED_BATCH]) for i in range(0, len(texts), EMBED_BATCH)])
        try:
            if hybrid:
                return hybrid_search(target, vectors, queries, k, filter or None)
            return target.search(vectors, k, filter or None)
        except FilterError as exc:
            raise SearchRequestError(str(exc)) from None


__all__ = ["CollectionNotFoundError", "SearchRequestError", "SearchService"]
