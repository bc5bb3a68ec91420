"""Search as the server runs it: query embeddings (and texts) -> per query the k best documents of a collection.

The public `search` model is an ensemble of one step: the served `embed` model turns the query texts into
vectors (queries carry the model's query prompt, prepended by the SDK as for `embed(..., prompt_name=...)`)
and, in the same process, ranks them with one SearchService (model_repository/python/embed/1/search_step.py,
which turns its errors into Triton statuses). Kept here, free of Triton, so that it is tested and read as
plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedline.search.filters import FilterError
from embedline.search.store import (DEFAULT_COLLECTION, Collection, CollectionNotFoundError, Hit, ModelRecord,
                                    StoreError, check_collection_name, check_k, hybrid_search, open_store)


class SearchRequestError(StoreError):
    """A request the caller must change: bad k, filter, query or collection (a 400, INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class SearchRequest:
    """One caller's search: its query texts (as the caller wrote them, prompt included), their vectors and
    its options."""

    queries: list[str]
    vectors: np.ndarray
    k: int = 10
    filter: str | None = None
    collection: str | None = None
    hybrid: bool = False


class SearchService:
    """Collections of one store, opened on first use and kept current by their own refresh."""

    def __init__(self, store_uri: str):
        self.store = open_store(store_uri)
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

    def search_many(self, requests: list[SearchRequest], model: ModelRecord,
                    default_prompt: str = "") -> list[list[list[Hit]] | Exception]:
        """Each request's hits (a dynamic batch), or the exception that request alone raised. `model` is the
        served model: a collection indexed with another is refused (ModelMismatchError). `default_prompt`: the
        text queries carry when the model has no query prompt (its default prompt), left out of BM25 queries."""
        results: list[list[list[Hit]] | Exception] = []
        for request in requests:
            try:
                results.append(self.search(request, model, default_prompt))
            except FilterError as exc:
                results.append(SearchRequestError(str(exc)))
            except Exception as exc:  # noqa: BLE001 (reported to that request's caller)
                results.append(exc)
        return results

    def search(self, request: SearchRequest, model: ModelRecord, default_prompt: str = "") -> list[list[Hit]]:
        try:
            check_k(request.k)
        except StoreError as exc:
            raise SearchRequestError(str(exc)) from None
        target = self.collection(request.collection)
        target.model.check_same_model(model, target.name)
        prompt = target.model.prompts.get(target.model.query_prompt or "", default_prompt)
        queries = [query[len(prompt):] if prompt and query.startswith(prompt) else query for query in request.queries]
        for index, query in enumerate(queries):
            if not query.strip():
                raise SearchRequestError(f"query {index} is empty: a query needs some text")
        if request.hybrid:
            return hybrid_search(target, request.vectors, queries, request.k, request.filter or None)
        return target.search(request.vectors, request.k, request.filter or None)


__all__ = ["CollectionNotFoundError", "SearchRequest", "SearchRequestError", "SearchService"]
