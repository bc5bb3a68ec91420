"""The embedded store (search/embedded.py): upsert by id, delete, ANN against exact, filters, BM25, persistence,
readers seeing a writer's work, the model record, and a writer killed mid-block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from embedline.search.embedded import INDEX_FILE, DirectoryStore
from embedline.search.filters import FilterError
from embedline.search.store import (CollectionNotFoundError, ModelMismatchError, ModelRecord, StoreError,
                                    hybrid_search, open_store, reciprocal_rank_fusion)

DIM = 32
MODEL = ModelRecord(name="tiny", dim=DIM, fingerprint="sha256:0123456789abcdef")


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """Vectors around 50 centres, spread in a 12-dimensional subspace: shaped like sentence embeddings (whose
    intrinsic dimension is far below their size), unlike uniform noise."""
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(1234)  # the same centres and subspace for every seed
    centres, basis = fixed.normal(size=(50, DIM)), fixed.normal(size=(12, DIM))
    return unit(centres[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, 12)) @ basis)


def fill(collection, vectors, metadata=None, texts=None):
    ids = [str(i) for i in range(len(vectors))]
    texts = texts or [f"document {i}" for i in ids]
    metadata = metadata or [{"n": i, "parity": "even" if i % 2 == 0 else "odd"} for i in range(len(vectors))]
    collection.upsert(ids, vectors, texts, metadata, ["f"] * len(ids))
    return ids


@pytest.fixture
def store(tmp_path):
    return DirectoryStore(tmp_path / "store")


def test_hnsw_recall_at_10_against_exact_search_is_at_least_095(store):
    collection = store.create_or_open("docs", MODEL)
    fill(collection, clustered(20000))
    queries = clustered(200, seed=1)
    approximate = collection.search(queries, 10)
    exact = collection.search(queries, 10, exact=True)
    recall = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(approximate, exact)])
    assert recall >= 0.95, recall
    assert all(len(row) == 10 for row in approximate)
    assert all(row[i].score >= row[i + 1].score for row in exact for i in range(9))


def test_hit_scores_are_the_exact_cosine_similarities_best_first(store):
    """The graph ranks with float16 vectors; the scores a caller sees come from the stored float32 ones."""
    collection = store.create_or_open("docs", MODEL)
    vectors = clustered(3000)
    fill(collection, vectors)
    query = clustered(1, seed=7)
    for exact in (False, True):
        [hits] = collection.search(query, 20, exact=exact)
        expected = vectors[[int(h.id) for h in hits]] @ query[0]
        assert [h.score for h in hits] == pytest.approx(expected.tolist(), abs=1e-6)
        assert all(hits[i].score >= hits[i + 1].score for i in range(19))


def test_upsert_replaces_by_id_and_delete_removes(store):
    collection = store.create_or_open("docs", MODEL)
    vectors = clustered(100)
    fill(collection, vectors)
    fill(collection, vectors)  # the same ids again: replaced, not added
    assert collection.count() == 100
    [hits] = collection.search(vectors[:1], 100, exact=True)
    assert len({h.id for h in hits}) == 100
    assert collection.delete(["0", "1", "missing"]) == 2
    assert collection.count() == 98
    for exact in (True, False):
        [hits] = collection.search(vectors[:1], 100, exact=exact)
        assert {"0", "1"}.isdisjoint(h.id for h in hits)


def test_a_filter_keeps_only_matching_documents_and_ranks_them_as_exact_search(store):
    collection = store.create_or_open("docs", MODEL)
    vectors = clustered(6000)
    fill(collection, vectors)
    queries = clustered(20, seed=2)
    for rule in ('parity == "even"', "n < 100", 'n >= 10 and parity != "odd"'):
        filtered = collection.search(queries, 10, filter=rule)
        for query, hits in zip(queries, filtered):
            assert hits and all(eval_rule(rule, h.metadata) for h in hits)
        if rule == "n < 100":  # 100 rows allowed: an exact scan, so exactly the brute-force answer
            scores = vectors[:100] @ queries.T
            assert [h.id for h in filtered[0]] == [str(i) for i in np.argsort(-scores[:, 0])[:10]]


def eval_rule(rule, metadata):
    from embedline.search.filters import matches, parse_filter

    return matches(parse_filter(rule), metadata)


def test_a_filter_that_does_not_parse_is_a_filter_error(store):
    collection = store.create_or_open("docs", MODEL)
    fill(collection, clustered(10))
    with pytest.raises(FilterError):
        collection.search(clustered(1), 5, filter="n >=")
    with pytest.raises(FilterError):
        collection.search_text(["document"], 5, filter="(n == 1")


@pytest.mark.parametrize("k", [0, -1, 1001, "3", True])
def test_k_out_of_range_is_a_store_error(store, k):
    collection = store.create_or_open("docs", MODEL)
    fill(collection, clustered(10))
    with pytest.raises(StoreError, match="k must be"):
        collection.search(clustered(1), k)


def test_bm25_ranks_documents_with_the_query_terms_first(store):
    collection = store.create_or_open("docs", MODEL)
    texts = ["the wing stalls at high angles of attack", "boundary layer transition on a flat plate",
             "heat transfer in hypersonic flow", "wings and their stall behaviour"] + [f"filler {i}" for i in range(20)]
    fill(collection, clustered(len(texts)), texts=texts)
    [hits] = collection.search_text(["when does a wing stall"], 3)
    assert {h.id for h in hits[:2]} == {"0", "3"}  # Porter stemming: wings ~ wing, stalls ~ stall
    assert collection.search_text(["the of and"], 3) == [[]]  # stop words only: nothing to rank by
    assert collection.search_text(['quote " inside'], 3) == [[]]


def test_reciprocal_rank_fusion_rewards_agreement(store):
    collection = store.create_or_open("docs", MODEL)
    vectors = clustered(30)
    fill(collection, vectors, texts=[f"alpha {i}" if i == 7 else f"beta {i}" for i in range(30)])
    dense = collection.search(vectors[7:8], 5)[0]
    [fused] = hybrid_search(collection, vectors[7:8], ["alpha"], 5)
    assert fused[0].id == "7" == dense[0].id  # first in both rankings: first fused
    assert reciprocal_rank_fusion([dense, dense], 5)[0].score == pytest.approx(2 / 61)


def test_the_saved_index_is_loaded_and_a_corrupt_one_rebuilt(store, tmp_path):
    collection = store.create_or_open("docs", MODEL)
    vectors = clustered(500)
    fill(collection, vectors)
    collection.delete(["3"])
    collection.save_index()
    expected = collection.search(vectors[:5], 10)
    collection.close()
    reopened = store.open("docs")
    assert [[h.id for h in row] for row in reopened.search(vectors[:5], 10)] == [[h.id for h in row] for row in expected]
    reopened.close()
    (tmp_path / "store" / "docs" / INDEX_FILE).write_bytes(b"not an index")
    rebuilt = store.open("docs")
    assert rebuilt.count() == 499
    assert all("3" not in {h.id for h in row} for row in rebuilt.search(vectors[:5], 10))


def test_a_saved_graph_of_another_layout_is_rebuilt_in_this_one(store, tmp_path):
    import faiss

    collection = store.create_or_open("docs", MODEL)
    vectors = clustered(500)
    fill(collection, vectors)
    collection.save_index()
    collection.close()
    path = tmp_path / "store" / "docs" / INDEX_FILE
    with np.load(path) as saved:
        fields = dict(saved)
    float32_graph = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    float32_graph.add(vectors)
    np.savez(path, **{**fields, "index": faiss.serialize_index(float32_graph)})
    reopened = store.open("docs")
    assert type(reopened._index) is faiss.IndexHNSWSQ
    assert [h.id for h in reopened.search(vectors[42:43], 1)[0]] == ["42"]


def test_a_reader_sees_a_writers_commits_at_its_next_search(store):
    writer = store.create_or_open("docs", MODEL)
    vectors = clustered(200)
    fill(writer, vectors[:100])
    reader = store.open("docs")
    assert reader.count() == 100
    writer.upsert(["new"], vectors[150:151], ["a new document"], [{}], ["f"])
    [hits] = reader.search(vectors[150:151], 1)
    assert hits[0].id == "new"
    writer.delete(["new"])
    [hits] = reader.search(vectors[150:151], 1)
    assert hits[0].id != "new"


def test_another_model_is_refused_and_unknown_collections_are_named(store):
    store.create_or_open("docs", MODEL)
    other = ModelRecord(name="tiny", dim=DIM, fingerprint="sha256:ffffffffffffffff")
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        store.create_or_open("docs", other)
    with pytest.raises(CollectionNotFoundError, match="it has: docs"):
        store.open("nope")
    with pytest.raises(StoreError, match="collection name"):
        store.open("../etc")
    assert store.collections() == ["docs"]


def test_open_store_takes_paths_and_file_uris_and_names_bad_ones(tmp_path):
    assert open_store(str(tmp_path)).uri == str(tmp_path)
    assert open_store(f"file://{tmp_path}").uri == str(tmp_path)
    with pytest.raises(StoreError, match="expected a directory"):
        open_store("ftp://host/x")


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from embedline.search.embedded import DirectoryStore
    from embedline.search.store import ModelRecord
    collection = DirectoryStore(sys.argv[1]).create_or_open("docs", ModelRecord("tiny", 32, "sha256:0123456789abcdef"))
    rng = np.random.default_rng(0)
    block = 0
    while True:
        ids = [f"{block}-{i}" for i in range(500)]
        vectors = rng.normal(size=(500, 32)).astype(np.float32)
        collection.upsert(ids, vectors, ["t"] * 500, [{}] * 500, ["f"] * 500)
        print(block, flush=True)
        block += 1
""")


@pytest.mark.processes
def test_a_writer_killed_mid_block_leaves_whole_blocks_only(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            process.stdout.readline()
        time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    collection = DirectoryStore(tmp_path).open("docs")
    count = collection.count()
    assert count >= 1500 and count % 500 == 0
    assert collection._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    [hits] = collection.search(np.ones((1, 32), np.float32), 1000, exact=True)
    assert len(hits) == min(count, 1000) == len({h.id for h in hits})


def test_resident_memory_grows_with_the_vectors_a_searching_process_holds(store):
    assert store.resident_mib() == 1
    collection = store.create_or_open("docs", MODEL)
    fill(collection, clustered(20000))
    expected = 20000 * (DIM * 2 + 2 * 32 * 4 + 9) / 2**20  # float16 vectors, 2 x 32 links
    assert expected <= store.resident_mib() <= expected * 1.1 + 1


def test_the_beam_widens_with_the_collection():
    from embedline.search.embedded import EF_SEARCH, MAX_EF_SEARCH, beam_width

    sizes = [10, 100_000, 200_000, 1_000_000, 10**7, 10**9]
    widths = [beam_width(n) for n in sizes]
    assert widths[:2] == [EF_SEARCH, EF_SEARCH] and widths == sorted(widths)
    assert beam_width(1_000_000) == 4 * EF_SEARCH and widths[-1] == MAX_EF_SEARCH


def test_a_k_wider_than_the_beam_still_returns_k_hits(store):
    from embedline.search.embedded import EXACT_SCAN_BELOW, beam_width

    collection = store.create_or_open("docs", MODEL)
    n = 3 * EXACT_SCAN_BELOW  # searched through the graph
    fill(collection, clustered(n))
    k = 1000
    assert k > beam_width(n)
    [hits] = collection.search(clustered(1, seed=5), k)
    assert len(hits) == k == len({h.id for h in hits})
