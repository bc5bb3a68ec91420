"""The Milvus store (search/milvus.py) against a real Milvus Lite server process reached over gRPC: upsert by id,
delete, ANN against exact, filters against filters.matches, BM25, errors, and `serve --index milvus://...` end to
end."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from conftest import EMBEDLINE_CLI
from test_search_served import write_corpus
from test_search_store import DIM, MODEL, clustered, fill

from embedline.search.filters import FilterError, matches, parse_filter
from embedline.search.store import (CollectionNotFoundError, ModelMismatchError, ModelRecord, StoreError,
                                    hybrid_search, open_store)
from embedline.serving.triton import free_port

from embedline.search.milvus import MilvusCollection, MilvusStore

pytestmark = pytest.mark.processes


@pytest.fixture
def store(milvus):
    store = MilvusStore(milvus.uri)
    yield store
    store.close()


def matching(rule: str, metadata: dict) -> bool:
    return matches(parse_filter(rule), metadata)


def test_open_store_takes_milvus_uris_and_names_bad_ones(milvus):
    assert isinstance(open_store(milvus.uri), MilvusStore) and open_store(milvus.uri).uri == milvus.uri
    with pytest.raises(StoreError, match="expected milvus://host:port"):
        open_store("milvus://no-port")


def test_upsert_replaces_by_id_and_delete_removes(store):
    collection = store.create_or_open("upserts", MODEL)
    vectors = clustered(100)
    fill(collection, vectors)
    fill(collection, vectors[::-1].copy(), texts=[f"again {i}" for i in range(100)])  # the same ids: replaced
    assert collection.count() == 100
    [hits] = collection.search(vectors[99:100], 100, exact=True)
    assert len({h.id for h in hits}) == 100 and hits[0].id == "0" and hits[0].text == "again 0"
    assert collection.fingerprints(["0", "missing"]) == {"0": "f"}
    assert collection.delete(["0", "1", "missing"]) == 2
    assert collection.count() == 98
    for exact in (True, False):
        [hits] = collection.search(vectors[:1], 100, exact=exact)
        assert {"0", "1"}.isdisjoint(h.id for h in hits) and len(hits) == 98


def test_search_ranks_as_exact_search_and_another_client_sees_the_writes(store, milvus):
    collection = store.create_or_open("small", MODEL)
    vectors = clustered(300)
    fill(collection, vectors)
    reader = MilvusStore(milvus.uri).open("small")  # another store: what a server searching it sees
    queries = clustered(10, seed=3)
    approximate, exact = reader.search(queries, 10), reader.search(queries, 10, exact=True)
    assert [[h.id for h in row] for row in approximate] == [[h.id for h in row] for row in exact]
    scores = queries @ vectors.T
    assert [h.id for h in exact[0]] == [str(i) for i in np.argsort(-scores[0])[:10]]
    assert [h.score for h in exact[0]] == pytest.approx(np.sort(scores[0])[::-1][:10], abs=1e-5)


def test_hnsw_recall_at_10_against_exact_search_is_at_least_095(store):
    collection = store.create_or_open("recall", MODEL)
    vectors = clustered(3000)
    fill(collection, vectors)
    collection.save_index()
    queries = clustered(100, seed=1)
    approximate, exact = collection.search(queries, 10), collection.search(queries, 10, exact=True)
    recall = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(approximate, exact)])
    assert recall >= 0.95, recall
    assert all(len(row) == 10 for row in approximate)
    assert all(row[i].score >= row[i + 1].score for row in exact for i in range(9))


def test_the_beam_follows_the_collections_size_counted_at_most_every_30_s(store, monkeypatch):
    from embedline.search import milvus as milvus_module

    collection = store.create_or_open("beam", MODEL)
    fill(collection, clustered(50))
    counts = []
    monkeypatch.setattr(collection, "count", lambda: counts.append(1) or 1_000_000)
    assert collection._beam(10) == 512 and collection._beam(1000) == 1000  # a million: 512, never below k
    assert len(counts) == 1  # counted once, not per search
    collection._sized_at -= milvus_module.SIZE_REFRESH_S + 1  # the count is older than that
    collection._beam(10)
    assert len(counts) == 2


RULES = ['parity == "even"', "n < 100", 'n >= 10 and parity != "odd"', 'tag in ["a", "c"]', 'tag not in ["a"]',
         "not (n < 150)", "not (x > 1)", 'x == 1 or x == "1"', "flag", "not flag", "n in [3, 7.0, 11]"]


def odd_metadata(i: int) -> dict:
    """Keys missing, null or of another type on some documents: where Milvus's own semantics would differ."""
    metadata = {"n": i, "parity": "even" if i % 2 == 0 else "odd"}
    if i % 3:
        metadata["tag"] = "abc"[i % 3]
    metadata["x"] = [1, "1", True, None][i % 4]
    if i % 5 == 0:
        metadata["flag"] = i % 10 == 0
    elif i % 5 == 1:
        metadata["flag"] = 1  # a number, not true
    return metadata


def test_filters_keep_exactly_the_documents_filters_matches_keeps(store):
    collection = store.create_or_open("filters", MODEL)
    metadata = [odd_metadata(i) for i in range(400)]
    vectors = clustered(400)
    fill(collection, vectors, metadata=metadata)
    query = clustered(1, seed=2)
    for rule in RULES:
        expected = {str(i) for i, m in enumerate(metadata) if matching(rule, m)}
        for exact in (True, False):
            [hits] = collection.search(query, 1000, filter=rule, exact=exact)
            assert {h.id for h in hits} == expected, (rule, exact)
        [few] = collection.search(query, 5, filter=rule)
        assert all(matching(rule, h.metadata) for h in few) and len(few) == min(5, len(expected))


def test_a_bad_filter_is_a_filter_error_before_anything_is_sent():
    unreachable = MilvusStore(f"milvus://127.0.0.1:{free_port()}", timeout=2)
    collection = MilvusCollection(unreachable, "docs", MODEL)
    with pytest.raises(FilterError):
        collection.search(clustered(1), 5, filter="n >=")
    with pytest.raises(FilterError):
        collection.search_text(["wing"], 5, filter="(n == 1")


def test_bm25_ranks_documents_with_the_query_terms_first_and_hybrid_fuses(store):
    collection = store.create_or_open("lexical", MODEL)
    texts = ["the wing stalls at high angles of attack", "boundary layer transition on a flat plate",
             "heat transfer in hypersonic flow", "a wing and its stall behaviour"] + [f"filler {i}" for i in range(20)]
    vectors = clustered(len(texts))
    fill(collection, vectors, texts=texts)
    [hits] = collection.search_text(["when does a wing stall"], 3)
    assert {h.id for h in hits[:2]} == {"0", "3"} and hits[0].score >= hits[1].score > 0
    assert collection.search_text(["the of and", "  "], 3) == [[], []]  # stop words only: nothing to rank by
    [filtered] = collection.search_text(["wing stall"], 3, filter='parity == "even"')
    assert [h.id for h in filtered] == ["0"]
    [fused] = hybrid_search(collection, vectors[3:4], ["wing stall"], 5)
    assert fused[0].id == "3"  # first in both rankings


@pytest.mark.parametrize("k", [0, -1, 1001, "3", True])
def test_k_out_of_range_is_a_store_error(store, k):
    collection = store.create_or_open("small_k", MODEL)
    with pytest.raises(StoreError, match="k must be"):
        collection.search(clustered(1), k)
    with pytest.raises(StoreError, match="k must be"):
        collection.search_text(["wing"], k)


def test_another_model_is_refused_and_unknown_collections_are_named(store):
    store.create_or_open("modelled", MODEL)
    other = ModelRecord(name="tiny", dim=DIM, fingerprint="sha256:ffffffffffffffff")
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        store.create_or_open("modelled", other)
    assert store.open("modelled").model == MODEL
    with pytest.raises(CollectionNotFoundError, match="has no collection 'nope' \\(it has: .*modelled"):
        store.open("nope")
    with pytest.raises(StoreError, match="collection name"):
        store.open("../etc")
    with pytest.raises(StoreError, match="dim-32"):
        store.open("modelled").search(np.ones((1, 8), np.float32), 3)
    store.drop("modelled")
    store.drop("modelled")  # dropping what is not there is no error
    assert "modelled" not in store.collections()


def test_an_unreachable_server_is_a_one_line_store_error_naming_it_quickly():
    uri = f"milvus://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StoreError) as raised:
        open_store(uri).collections()
    assert time.monotonic() - started < 10
    assert uri in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(StoreError, match="connecting"):
        MilvusStore(uri, timeout=2).open("docs")
    assert open_store(uri).resident_mib() > 0  # `serve --index` plans its memory without asking the server


# -- end to end: `embedline serve --index milvus://...`, `embedline index --store milvus://...`, the SDK ----------


def test_serve_index_and_search_through_a_milvus_store(launch_serve_for_module, tiny_fp32, milvus, tmp_path):
    from embedline.client import EmbeddingClient

    served = launch_serve_for_module("--artifact", str(tiny_fp32.path), "--variant", "fp32", "--index", milvus.uri)
    assert milvus.uri in served.banner
    corpus = write_corpus(tmp_path / "corpus.tsv", 120)
    result = subprocess.run([*EMBEDLINE_CLI, "index", "--url", served.grpc_url, "--store", milvus.uri, "--input",
                             corpus, "--title-field", "title", "--metadata-fields", "year,topic", "--collection",
                             "papers"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "120 documents" in result.stdout, result.stderr
    with EmbeddingClient(served.grpc_url) as client:
        [hits] = client.search("heat transfer", k=10, collection="papers")
        [filtered] = client.search("wing", k=50, collection="papers", filter='topic == "shock wave" and year >= 1960')
        [fused] = client.search("rocket nozzle", k=5, collection="papers", hybrid=True)
        vector = client.embed(["heat transfer"])
    [exact] = open_store(milvus.uri).open("papers").search(vector, 10, exact=True)
    assert [h.id for h in hits] == [h.id for h in exact] and set(hits[0].metadata) == {"year", "topic"}
    expected = {f"d{i}" for i in range(120) if i % 6 == 1 and 1950 + i % 20 >= 1960}
    assert {h.id for h in filtered} == expected
    assert fused[0].metadata["topic"] == "rocket nozzle"  # BM25 finds the exact words even with a random model


def test_a_search_while_the_store_is_unreachable_is_unavailable_and_embedding_goes_on(launch_serve, tiny_fp32):
    from embedline.client import EmbeddingClient, ServerUnavailableError

    try:
        import httpx2 as httpx  # the HTTP client current `openai` versions depend on
    except ImportError:  # older `openai`
        import httpx

    uri = f"milvus://127.0.0.1:{free_port()}"  # nothing listens there: the server still starts
    served = launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32", "--index", uri)
    with EmbeddingClient(served.grpc_url, timeout=15) as client:
        with pytest.raises(ServerUnavailableError, match="store"):
            client.search("wing stall", collection="papers")
        assert client.embed(["still embeds"]).shape == (1, 32)
    response = httpx.post(f"http://127.0.0.1:{served.openai_port}/v1/search",
                          json={"query": "wing stall", "collection": "papers"}, timeout=60)
    assert response.status_code == 503 and response.json()["error"]["code"] == "server_unavailable"
