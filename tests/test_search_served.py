"""Search end to end: a real `embedline serve --index` process, `embedline index` run as a user runs it, and
the SDK clients and POST /v1/search as callers use them; bad input, a killed indexer, live indexing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from conftest import EMBEDLINE_CLI

try:
    import httpx2 as httpx  # the HTTP client current `openai` versions depend on
except ImportError:  # older `openai`
    import httpx
from embedline.client import (AsyncEmbeddingClient, CollectionNotFoundError, EmbeddingClient, InvalidInputError,
                              ModelNotFoundError)
from embedline.documents import CorpusFormat
from embedline.search.indexer import index_corpus
from embedline.search.store import CollectionNotFoundError as StoreCollectionNotFound
from embedline.search.store import ModelRecord, open_store

pytestmark = pytest.mark.processes

TOPICS = ["wing stall", "shock wave", "heat transfer", "boundary layer", "buckling shell", "rocket nozzle"]


def write_corpus(path, n: int, start: int = 0) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("doc_id\ttitle\ttext\tyear\ttopic\n")
        for i in range(start, start + n):
            topic = TOPICS[i % len(TOPICS)]
            f.write(f"d{i}\tstudy {i} of {topic}\tmeasurements of {topic} number {i} in a wind tunnel\t"
                    f"{1950 + i % 20}\t{topic}\n")
    return str(path)


@pytest.fixture(scope="module")
def served(launch_serve_for_module, tiny_fp32, tmp_path_factory):
    store = tmp_path_factory.mktemp("search") / "store"
    server = launch_serve_for_module("--artifact", str(tiny_fp32.path), "--variant", "fp32", "--index", str(store))
    server.store = str(store)
    return server


def index_command(served, *args, check=True):
    result = subprocess.run([*EMBEDLINE_CLI, "index", "--url", served.grpc_url, "--store", served.store, *args],
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def corpus(served, tmp_path_factory):
    path = write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.tsv", 300)
    result = index_command(served, "--input", path, "--title-field", "title", "--metadata-fields", "year,topic",
                           "--collection", "papers")
    assert "300 documents" in result.stdout
    return path


def test_the_banner_names_the_search_route(served):
    assert "POST /v1/search" in served.banner and served.store in served.banner


def test_search_through_the_sdk_equals_exact_search_of_the_store(served, corpus):
    query = "heat transfer measurements"
    with EmbeddingClient(served.grpc_url) as client:
        [hits] = client.search(query, k=10, collection="papers")
        vector = client.embed([query])
    collection = open_store(served.store).open("papers")
    [exact] = collection.search(vector, 10, exact=True)
    assert [h.id for h in hits] == [h.id for h in exact]
    assert [h.score for h in hits] == pytest.approx([h.score for h in exact], abs=1e-5)
    assert hits[0].text.startswith("study ") and set(hits[0].metadata) == {"year", "topic"}


def test_embedding_is_unchanged_on_a_server_that_ranks_and_both_share_a_batch(served, corpus):
    """The embed model ranks only requests that ask for `hits` alone: an embed call naming no outputs (as
    perf_analyzer and plain HTTP clients send) gets embeddings, and embed and search calls batched together
    each get their own answer."""
    import tritonclient.http as httpclient

    texts = [f"measurements of wing stall number {i}" for i in range(24)]
    with EmbeddingClient(served.grpc_url) as client:
        expected = client.embed(texts)
        http = httpclient.InferenceServerClient(served.http_url)
        request = httpclient.InferInput("text", [1, 1], "BYTES")
        request.set_data_from_numpy(np.array([[texts[0].encode()]], dtype=np.object_))
        result = http.infer("embed", [request])  # no outputs named: every output is requested
        np.testing.assert_allclose(result.as_numpy("sentence_embedding")[0], expected[0], atol=1e-5)
        failures: list[BaseException] = []

        def call(i: int) -> None:
            try:
                if i % 2:
                    [hits] = client.search(texts[i], k=3, collection="papers")
                    assert len(hits) == 3
                else:
                    np.testing.assert_allclose(client.embed([texts[i]])[0], expected[i], atol=1e-5)
            except BaseException as exc:  # noqa: BLE001 (reported below)
                failures.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures


def test_several_queries_filters_and_hybrid(served, corpus):
    with EmbeddingClient(served.grpc_url) as client:
        rows = client.search(["wing stall", "rocket nozzle", "shock wave"], k=5, collection="papers")
        assert [len(row) for row in rows] == [5, 5, 5]
        [hits] = client.search("wing", k=20, collection="papers", filter='topic == "shock wave" and year >= 1960')
        assert hits and all(h.metadata["topic"] == "shock wave" and int(h.metadata["year"]) >= 1960 for h in hits)
        [fused] = client.search("rocket nozzle", k=5, collection="papers", hybrid=True)
        assert fused[0].metadata["topic"] == "rocket nozzle"  # BM25 finds the exact words even with a random model


def test_the_async_client_searches_too(served, corpus):
    async def main():
        async with AsyncEmbeddingClient(served.grpc_url) as client:
            return await client.search(["boundary layer"], k=3, collection="papers")

    [hits] = asyncio.run(main())
    assert len(hits) == 3


def test_post_v1_search(served, corpus):
    url = f"http://127.0.0.1:{served.openai_port}/v1/search"
    response = httpx.post(url, json={"query": ["shock wave", "wing stall"], "k": 4, "collection": "papers",
                                     "filter": "year < 1960", "hybrid": True}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "tiny"
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all(len(item["hits"]) == 4 and set(item["hits"][0]) == {"id", "score", "text", "metadata"}
               for item in body["data"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("payload, status, param", [
    ({"query": "x", "k": 0, "collection": "papers"}, 400, "k"),
    ({"query": "x", "k": 1001, "collection": "papers"}, 400, "k"),
    ({"query": "x", "filter": "year >", "collection": "papers"}, 400, "filter"),
    ({"query": "x", "collection": "nope"}, 404, "collection"),
    ({"query": [], "collection": "papers"}, 400, "query"),
    ({"query": "   ", "collection": "papers"}, 400, "query"),
    ({"k": 3}, 400, "query"),
])
def test_bad_search_requests_get_a_4xx_and_the_server_keeps_serving(served, corpus, payload, status, param):
    url = f"http://127.0.0.1:{served.openai_port}/v1/search"
    response = httpx.post(url, json=payload, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert httpx.post(url, json={"query": "x", "collection": "papers"}, timeout=30).status_code == 200


def test_bad_sdk_searches_raise_typed_errors(served, corpus):
    with EmbeddingClient(served.grpc_url) as client:
        with pytest.raises(InvalidInputError, match="k must be"):
            client.search("x", k=0, collection="papers")
        with pytest.raises(InvalidInputError, match="filter"):
            client.search("x", filter="(year == 1", collection="papers")
        with pytest.raises(CollectionNotFoundError, match="has no collection 'nope'"):
            client.search("x", collection="nope")
        with pytest.raises(InvalidInputError, match="empty"):
            client.search([""], collection="papers")
        assert client.search("x", collection="papers")[0]


def test_a_collection_of_another_model_is_refused(served, corpus):
    other = ModelRecord(name="tiny", dim=32, fingerprint="sha256:0000000000000000")
    open_store(served.store).create_or_open("othermodel", other)
    with EmbeddingClient(served.grpc_url) as client:
        with pytest.raises(InvalidInputError, match="indexed with model"):
            client.search("x", collection="othermodel")
    result = index_command(served, "--input", corpus, "--collection", "othermodel", check=False)
    assert result.returncode == 1 and "indexed with model" in result.stderr


@pytest.mark.parametrize("content, error", [
    ("doc_id\ttext\nd1\tfine\nd2\t   \n", "corpus.tsv:3: empty text"),
    ("doc_id\ttext\nd1\tfine\nd1\tagain\n", "corpus.tsv:3: duplicate id 'd1'"),
    ("doc_id\ttext\nd1\tfine\n\tno id\n", "corpus.tsv:3"),
    (b"doc_id\ttext\nd1\tfine\nd2\t\xff\xfe\n", "corpus.tsv:3"),
])
def test_bad_corpus_files_fail_on_one_line_and_write_nothing(served, tmp_path, content, error):
    path = tmp_path / "corpus.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = index_command(served, "--input", str(path), "--collection", "badinput", check=False)
    assert result.returncode == 1
    assert error in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "badinput" not in open_store(served.store).collections()


def test_an_indexer_killed_mid_run_is_completed_by_running_it_again(served, tmp_path):
    total = 1200  # 75 blocks: the kill lands mid-run even when the check below is slow to look
    path = write_corpus(tmp_path / "corpus.tsv", total)
    args = [*EMBEDLINE_CLI, "index", "--url", served.grpc_url, "--store", served.store, "--input", path,
            "--collection", "killed", "--block-size", "16"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = open_store(served.store)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it once some blocks are in, before it is done
        try:
            if 0 < store.open("killed").count() < total // 2:
                break
        except StoreCollectionNotFound:  # not created yet, or being created
            pass
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = store.open("killed").count()
    assert partial < total
    result = index_command(served, "--input", path, "--collection", "killed", "--block-size", "16")
    assert f"{total} documents" in result.stdout and f"kept {partial} unchanged" in result.stdout
    assert store.open("killed").count() == total
    with EmbeddingClient(served.grpc_url) as client:
        [hits] = client.search("wind tunnel", k=1000, collection="killed")
    assert len(hits) == 1000 == len({h.id for h in hits})


def test_documents_indexed_while_serving_are_found_within_10_s_and_no_search_fails(served, corpus, tmp_path):
    failures, found_after = [], []
    stop = threading.Event()

    def search_continuously():
        with EmbeddingClient(served.grpc_url) as client:
            while not stop.is_set():
                try:
                    [hits] = client.search("late arrival", k=5, collection="papers", filter='topic == "late"')
                except Exception as exc:  # noqa: BLE001 (any failure fails the test)
                    failures.append(exc)
                    continue
                if hits and not found_after:
                    found_after.append(time.monotonic())

    searcher = threading.Thread(target=search_continuously)
    searcher.start()
    try:
        path = tmp_path / "late.jsonl"
        path.write_text("\n".join(json.dumps({"id": f"late{i}", "text": f"a late arrival {i}", "topic": "late"})
                                  for i in range(20)) + "\n")
        with EmbeddingClient(served.grpc_url) as client:
            index_corpus(client, open_store(served.store), "papers", str(path), CorpusFormat(metadata_fields=("topic",)))
        indexed = time.monotonic()
        deadline = indexed + 10
        while not found_after and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        searcher.join()
    assert not failures, failures[:3]
    assert found_after and found_after[0] - indexed < 10


def test_delete_removes_ids_from_the_served_index(served, tmp_path):
    path = write_corpus(tmp_path / "corpus.tsv", 30)
    index_command(served, "--input", path, "--collection", "deletions")
    ids = tmp_path / "ids.txt"
    ids.write_text("d0\nd1\nmissing\n")
    result = index_command(served, "--delete", str(ids), "--collection", "deletions")
    assert "removed 2 documents" in result.stdout
    with EmbeddingClient(served.grpc_url) as client:
        [hits] = client.search("wind tunnel", k=100, collection="deletions")
    assert len(hits) == 28 and {"d0", "d1"}.isdisjoint(h.id for h in hits)


def test_a_server_without_an_index_says_how_to_get_one(start_server, tiny_fp32):
    server = start_server(tiny_fp32, variant="fp32")
    with EmbeddingClient(server.grpc_url) as client:
        with pytest.raises(ModelNotFoundError, match="--index"):
            client.search("x")
        assert client.embed(["still embeds"]).shape == (1, 32)


def test_the_collection_records_the_served_model(served, corpus, tiny_fp32):
    record = open_store(served.store).open("papers").model
    assert (record.name, record.dim, record.fingerprint) == ("tiny", 32, tiny_fp32.fingerprint)
    assert np.isfinite(len(record.fingerprint))


def test_the_search_benchmarks_one_caller_measures_the_server_against_the_same_work_in_process(served, corpus,
                                                                                                tiny_fp32):
    from benchmarks.inprocess import named_engine
    from benchmarks.search import one_caller

    engine = named_engine(tiny_fp32, "onnxruntime fp32", 1)
    local = open_store(served.store).open("papers")
    try:
        result = one_caller(served.grpc_url, ["wing stall", "heat transfer in a tunnel", "rocket nozzle"], "papers",
                            engine, local, rounds=2)
    finally:
        local.close()
    assert len(result["rounds"]) == 2
    for key in ("embed", "search", "inprocess_engine", "inprocess_search"):
        assert 0 < result[f"{key}_50_ms"] <= max(r[f"{key}_90_ms"] for r in result["rounds"])
    for measured in result["rounds"]:
        in_process = measured["inprocess_engine_50_ms"] + measured["inprocess_search_50_ms"]
        assert measured["search_minus_inprocess_p50_ms"] == pytest.approx(measured["search_50_ms"] - in_process,
                                                                          abs=0.02)
