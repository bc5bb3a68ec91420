"""search/service.py, the ranking step of the served `search` ensemble, without Triton: one request's error is
that request's alone, the query prompt is left out of BM25, and the model record is checked."""

from __future__ import annotations

from dataclasses import replace

import pytest

from test_search_store import MODEL, clustered, fill

from embedline.search.embedded import DirectoryStore
from embedline.search.service import SearchRequest, SearchRequestError, SearchService
from embedline.search.store import CollectionNotFoundError, ModelMismatchError


@pytest.fixture
def service(tmp_path):
    store = DirectoryStore(tmp_path / "store")
    collection = store.create_or_open("docs", replace(MODEL, prompts={"query": "query: "}, query_prompt="query"))
    fill(collection, clustered(50), texts=[f"wing {i}" if i == 3 else f"tail {i}" for i in range(50)])
    return SearchService(str(tmp_path / "store"))


def test_each_request_of_a_batch_is_answered_or_fails_alone(service):
    model = replace(MODEL, prompts={"query": "query: "}, query_prompt="query")
    vectors = clustered(1, seed=3)
    results = service.search_many([
        SearchRequest(["query: wing"], vectors, k=3, hybrid=True),
        SearchRequest(["query: wing"], vectors, k=0),
        SearchRequest(["query: wing"], vectors, filter="n >"),
        SearchRequest(["query: wing"], vectors, collection="nope"),
        SearchRequest(["query: "], vectors),
        SearchRequest(["query: wing"], vectors, k=2, filter="n < 10"),
    ], model)
    assert len(results[0][0]) == 3 and results[0][0][0].id == "3"  # BM25 saw "wing", not "query"
    assert isinstance(results[1], SearchRequestError) and "k must be" in str(results[1])
    assert isinstance(results[2], SearchRequestError) and "filter" in str(results[2])
    assert isinstance(results[3], CollectionNotFoundError)
    assert isinstance(results[4], SearchRequestError) and "empty" in str(results[4])
    assert all(h.metadata["n"] < 10 for h in results[5][0]) and len(results[5][0]) == 2


def test_no_collection_named_means_the_only_one_and_another_model_is_refused(service):
    model = replace(MODEL, prompts={"query": "query: "}, query_prompt="query")
    assert service.collection(None).name == "docs"
    with pytest.raises(ModelMismatchError):
        service.search(SearchRequest(["x"], clustered(1)), replace(model, fingerprint="sha256:other"))
