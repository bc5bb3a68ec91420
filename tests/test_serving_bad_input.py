"""Bad input sent past the client, with RAW tritonclient requests, to the REAL Triton server.

The server's promise (model_repository/README.md): a request whose text is not valid UTF-8 gets
INVALID_ARG for itself while its dynamic-batch mates succeed; a request with more texts than
max_batch_size is refused with INVALID_ARG; either way the server keeps serving.
"""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from embedline.client import EmbeddingClient

DIM = 384
# ~300 tokens each (over max_seq_length): a request of these keeps the model busy long enough for the
# requests sent after it to queue up and be batched together.
SLOW_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 35)


def raw_text_input(items: list[bytes]) -> grpcclient.InferInput:
    data = np.array(items, dtype=np.object_).reshape(-1, 1)
    infer_input = grpcclient.InferInput("text", list(data.shape), "BYTES")
    infer_input.set_data_from_numpy(data)
    return infer_input


def executions(triton: grpcclient.InferenceServerClient) -> int:
    return sum(s.execution_count for s in triton.get_inference_statistics("embed").model_stats)


@pytest.fixture(scope="module")
def triton(served_minilm):
    with grpcclient.InferenceServerClient(served_minilm.grpc_url) as client:
        yield client


@pytest.fixture(scope="module")
def client(served_minilm):
    with EmbeddingClient(served_minilm.grpc_url, timeout=60) as c:
        yield c


def test_invalid_utf8_fails_only_its_own_request_in_a_dynamic_batch(triton, client):
    # (request id, texts) — bad requests interleaved with good ones; one bad item poisons only its request.
    requests = [
        ("good-0", [b"A man is eating food."]),
        ("bad-0", [b"\xff\xfe"]),
        ("good-1", [b"The girl is carrying a baby.", "Le chat dort sur le canap\u00e9.".encode()]),
        ("bad-1", [b"valid text", b"truncated utf-8 \xe2\x82"]),
        ("good-2", [b"", b"A monkey is playing drums."]),
        ("bad-2", [b"\xc3\x28"]),
        ("good-3", [b"Two men pushed carts through the woods."]),
    ]
    outcomes: queue.Queue = queue.Queue()
    before = executions(triton)
    # A slow request first: while it runs, all the others arrive and wait in the dynamic batcher's
    # queue, so they are executed together as one batch (checked with the statistics below).
    # Different texts: the embed model computes each distinct text of a batch once.
    triton.async_infer("embed", [raw_text_input([f"{i} {SLOW_TEXT}".encode() for i in range(8)])],
                       callback=lambda result, error: outcomes.put(("slow", result, error)), request_id="slow")
    time.sleep(0.05)  # > the 1 ms batching delay: the slow request's batch is closed
    for request_id, items in requests:
        triton.async_infer("embed", [raw_text_input(items)], request_id=request_id,
                           callback=lambda result, error, rid=request_id: outcomes.put((rid, result, error)))
    results = dict()
    for _ in range(len(requests) + 1):
        request_id, result, error = outcomes.get(timeout=60)
        results[request_id] = (result, error)

    assert executions(triton) - before <= 2, "the requests were not batched together"
    assert results["slow"][1] is None
    for request_id, items in requests:
        result, error = results[request_id]
        if request_id.startswith("bad"):
            assert result is None and isinstance(error, InferenceServerException)
            assert error.status() == "StatusCode.INVALID_ARGUMENT", error
            assert "UTF-8" in error.message()
        else:
            assert error is None, error
            embeddings = result.as_numpy("sentence_embedding")
            assert embeddings.shape == (len(items), DIM)
            # Batch-mates of a failed request get their own, correct embeddings.
            expected = client.embed([item.decode("utf-8") for item in items])
            np.testing.assert_allclose(embeddings, expected, atol=1e-4)

    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("embed")
    assert client.embed(["still serving"]).shape == (1, DIM)


def test_more_texts_than_max_batch_size_is_refused_and_the_client_splits_them(triton, client, served_minilm):
    too_many = served_minilm.max_batch_size + 1
    texts = [f"text number {i}" for i in range(too_many)]
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("embed", [raw_text_input([t.encode() for t in texts])])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"<= {served_minilm.max_batch_size}" in caught.value.message()

    assert client.health() is True
    embeddings = client.embed(texts)
    assert embeddings.shape == (too_many, DIM)
    np.testing.assert_allclose(embeddings[[0, -1]], client.embed([texts[0], texts[-1]]), atol=1e-4)
