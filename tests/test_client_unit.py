"""Unit tests of the client SDK without a server: the tritonclient client is replaced by a fake.

The fake sits exactly at the tritonclient seam (`InferenceServerClient` methods, real protobuf
configs, real `InferInput` objects, `InferenceServerException` errors), so everything above it —
validation, chunking, concurrency, reassembly, retries, the error table — runs for real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from embedline.client import (
    AsyncEmbeddingClient,
    AuthenticationError,
    DeadlineExceededError,
    EmbeddingClient,
    EmbeddingClientError,
    InvalidInputError,
    ModelInfo,
    ModelNotFoundError,
    RetryPolicy,
    ServerError,
    ServerOverloadedError,
    ServerUnavailableError,
)
from embedline.client import encoding, errors, planning, retry
from embedline.client import aio as aio_module
from embedline.client import sync as sync_module
from embedline.errors import EmbedlineError

REPO_ROOT = Path(__file__).resolve().parents[1]
DIM = 4
MAX_BATCH = 8
LABELS = ("negative", "positive")


# ----------------------------------------------------------------------------------------------
# The fake server behind the tritonclient seam


def _config(name: str, max_batch_size: int, **parameters: str) -> service_pb2.ModelConfigResponse:
    response = service_pb2.ModelConfigResponse()
    response.config.name = name
    response.config.max_batch_size = max_batch_size
    for key, value in parameters.items():
        response.config.parameters[key].string_value = value
    return response


EMBED_PARAMETERS = dict(model_name="fake-model", dim=str(DIM), max_seq_length="16", variant="fp32", pooling="mean")


def fake_embedding(text: str) -> np.ndarray:
    """A vector that identifies its text, so misplaced rows are caught."""
    return np.array([len(text), sum(text.encode()) % 997, hash(text) % 101, 1.0], dtype=np.float32)


class FakeResult:
    def __init__(self, outputs: dict[str, np.ndarray]):
        self._outputs = outputs

    def as_numpy(self, name):
        return self._outputs.get(name)


def unavailable(message="failed to connect to all addresses"):
    return InferenceServerException(msg=message, status="StatusCode.UNAVAILABLE")


class FakeTriton:
    """Stands in for tritonclient.grpc.InferenceServerClient: configs, infer, health, failures."""

    def __init__(self, *, classify=True, max_batch_size=MAX_BATCH):
        self.configs = {"embed": _config("embed", max_batch_size, **EMBED_PARAMETERS)}
        if classify:
            self.configs["classify"] = _config("classify", max_batch_size, **EMBED_PARAMETERS,
                                               labels=json.dumps(list(LABELS)))
        self.infer_calls: list[tuple[str, list[str]]] = []
        self.config_calls: list[str] = []
        self.client_timeouts: list[float] = []
        self.server_timeouts: list[int | None] = []  # infer's `timeout=`, microseconds
        self.headers: list[tuple[str, dict | None]] = []  # (rpc name, headers) of every RPC
        # Exceptions to raise, in order, before infer / get_model_config succeed.
        self.infer_failures: list[Exception] = []
        self.config_failures: list[Exception] = []
        self.fail_texts: dict[str, Exception] = {}
        self.live = True
        self.infer_delay = 0.0
        self.closed = False
        self._lock = threading.Lock()
        self.concurrent = 0
        self.max_concurrent = 0

    def get_model_config(self, model_name, headers=None, client_timeout=None):
        self.headers.append(("get_model_config", headers))
        self.config_calls.append(model_name)
        if self.config_failures:
            raise self.config_failures.pop(0)
        if model_name not in self.configs:
            raise InferenceServerException(msg=f"Request for unknown model: '{model_name}' is not found",
                                           status="StatusCode.NOT_FOUND")
        return self.configs[model_name]

    def infer(self, model_name, inputs, outputs=None, timeout=None, client_timeout=None, headers=None):
        (text_input,) = inputs
        assert text_input.name() == "text" and text_input.datatype() == "BYTES"
        n = text_input.shape()[0]
        assert text_input.shape() == [n, 1]
        texts = [b.decode("utf-8") for b in deserialize_bytes_tensor(text_input._get_content())]
        assert len(texts) == n
        with self._lock:
            self.headers.append(("infer", headers))
            self.client_timeouts.append(client_timeout)
            self.server_timeouts.append(timeout)
            self.infer_calls.append((model_name, texts))
            if self.infer_failures:
                raise self.infer_failures.pop(0)
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.infer_delay:
                time.sleep(self.infer_delay)
            for text in texts:
                if text in self.fail_texts:
                    raise self.fail_texts[text]
            if n > self.configs[model_name].config.max_batch_size:
                raise InferenceServerException(msg="inference request batch-size must be <= 8",
                                               status="StatusCode.INVALID_ARGUMENT")
            truncated = np.array([[len(t) > 16] for t in texts], dtype=bool)
            if model_name == "embed":
                return FakeResult({"sentence_embedding": np.stack([fake_embedding(t) for t in texts]),
                                   "truncated": truncated})
            probabilities = np.array([[0.8, 0.2] if "bad" in t else [0.1, 0.9] for t in texts], dtype=np.float32)
            labels = np.array([[b"negative" if "bad" in t else b"positive"] for t in texts], dtype=np.object_)
            return FakeResult({"label": labels, "probabilities": probabilities, "truncated": truncated})
        finally:
            with self._lock:
                self.concurrent -= 1

    def _health(self):
        if not self.live:
            raise unavailable()
        return True

    def is_server_live(self, headers=None, client_timeout=None):
        self.headers.append(("is_server_live", headers))
        return self._health()

    def is_server_ready(self, headers=None, client_timeout=None):
        self.headers.append(("is_server_ready", headers))
        return self._health()

    def is_model_ready(self, model_name, headers=None, client_timeout=None):
        self.headers.append(("is_model_ready", headers))
        return self._health() and model_name in self.configs

    def close(self):
        self.closed = True


class AsyncFakeTriton:
    """The same fake behind tritonclient.grpc.aio's coroutine interface."""

    def __init__(self, fake: FakeTriton):
        self.fake = fake

    async def get_model_config(self, model_name, headers=None, client_timeout=None):
        return self.fake.get_model_config(model_name, headers=headers, client_timeout=client_timeout)

    async def infer(self, model_name, inputs, outputs=None, timeout=None, client_timeout=None, headers=None):
        await asyncio.sleep(0)  # let the other requests of a split list start: they run concurrently
        return self.fake.infer(model_name, inputs, outputs=outputs, timeout=timeout,
                               client_timeout=client_timeout, headers=headers)

    async def is_server_live(self, headers=None, client_timeout=None):
        return self.fake.is_server_live(headers=headers, client_timeout=client_timeout)

    async def is_server_ready(self, headers=None, client_timeout=None):
        return self.fake.is_server_ready(headers=headers, client_timeout=client_timeout)

    async def is_model_ready(self, model_name, headers=None, client_timeout=None):
        return self.fake.is_model_ready(model_name, headers=headers, client_timeout=client_timeout)

    async def close(self):
        self.fake.close()


def make_client(fake: FakeTriton | None = None, **kwargs) -> tuple[EmbeddingClient, FakeTriton]:
    fake = fake or FakeTriton()
    client = EmbeddingClient("fake:1", **kwargs)
    for triton in client._tritons:
        triton.close()
    client._tritons = [fake]
    return client, fake


def make_async_client(fake: FakeTriton | None = None, **kwargs) -> tuple[AsyncEmbeddingClient, FakeTriton]:
    fake = fake or FakeTriton()
    client = AsyncEmbeddingClient("fake:1", **kwargs)
    client._make_triton = lambda url: AsyncFakeTriton(fake)  # what tritonclient.grpc.aio would return
    return client, fake


class TopOfRange(random.Random):
    """A random source whose uniform(a, b) is always b: the longest jittered wait, deterministic."""

    def uniform(self, a, b):
        return b


def longest_jitter(client):
    """Make the client's backoff waits their caps, so tests can state them exactly."""
    client.retry_policy = dataclasses.replace(client.retry_policy, rng=TopOfRange())
    return client


def mixed_texts(n: int) -> list[str]:
    """Unique texts of very different lengths, in an order unrelated to length."""
    rng = np.random.default_rng(0)
    return [f"t{i} " + "word " * int(rng.integers(0, 30)) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Chunking, grouping, reassembly


def test_plan_chunks_groups_by_length_and_covers_every_index_once():
    texts = mixed_texts(50)
    chunks = planning.plan_chunks(texts, 8)
    assert [len(c) for c in chunks] == [8] * 6 + [2]
    flat = [i for chunk in chunks for i in chunk]
    assert sorted(flat) == list(range(50))
    lengths = [len(texts[i]) for i in flat]
    # each request holds texts of neighbouring lengths, and the longest (costliest) go out first
    assert lengths == sorted(lengths, reverse=True)


def test_plan_chunks_is_stable_for_equal_lengths_and_rejects_bad_sizes():
    assert planning.plan_chunks(["bb", "a", "cc", "d"], 3) == [[0, 2, 1], [3]]
    assert planning.plan_chunks([], 4) == []
    with pytest.raises(ValueError):
        planning.plan_chunks(["a"], 0)


def test_sync_embed_splits_by_max_batch_size_and_restores_input_order():
    texts = mixed_texts(37)
    client, fake = make_client()
    embeddings = client.embed(texts)
    assert embeddings.dtype == np.float32 and embeddings.shape == (37, DIM)
    np.testing.assert_array_equal(embeddings, np.stack([fake_embedding(t) for t in texts]))
    sizes = [len(batch) for _, batch in fake.infer_calls]
    assert sorted(sizes) == [5, 8, 8, 8, 8] and max(sizes) <= MAX_BATCH
    for _, batch in fake.infer_calls:  # every request is one contiguous band of lengths
        lengths = sorted(len(t) for t in batch)
        others = [len(t) for _, b in fake.infer_calls if b is not batch for t in b]
        assert not any(lengths[0] < x < lengths[-1] for x in others)
    assert fake.config_calls == ["embed"]  # config fetched once, cached


def test_sync_requests_of_a_split_list_run_concurrently():
    fake = FakeTriton()
    fake.infer_delay = 0.05
    client, _ = make_client(fake, max_concurrency=3)
    client.embed(mixed_texts(6 * MAX_BATCH))
    assert fake.max_concurrent == 3


def test_user_batch_size_is_capped_by_the_servers_max_batch_size():
    client, fake = make_client(batch_size=3)
    client.embed(mixed_texts(7))
    assert sorted(len(b) for _, b in fake.infer_calls) == [1, 3, 3]
    client, fake = make_client(batch_size=1000)
    client.embed(mixed_texts(9))
    assert sorted(len(b) for _, b in fake.infer_calls) == [1, 8]


def test_embed_with_details_reports_truncation_in_input_order():
    texts = ["short", "x" * 40, "mid text", "y" * 17] * 3
    client, _ = make_client()
    result = client.embed_with_details(texts)
    assert result.truncated.dtype == bool
    assert result.truncated.tolist() == [len(t) > 16 for t in texts]
    assert len(result) == len(texts)


def test_async_client_splits_gathers_and_restores_order():
    texts = mixed_texts(37)

    async def main():
        client, fake = make_async_client(max_concurrency=2)
        async with client:
            embeddings = await client.embed(texts)
            predictions = await client.classify(["good", "bad", "fine"] * 5)
        return embeddings, predictions, fake

    embeddings, predictions, fake = asyncio.run(main())
    np.testing.assert_array_equal(embeddings, np.stack([fake_embedding(t) for t in texts]))
    assert sorted(len(b) for m, b in fake.infer_calls if m == "embed") == [5, 8, 8, 8, 8]
    assert fake.max_concurrent <= 2
    assert [p.label for p in predictions] == ["positive", "negative", "positive"] * 5
    assert fake.closed


def test_async_client_survives_a_new_event_loop():
    made = []
    fake = FakeTriton()
    client = AsyncEmbeddingClient("fake:1")
    client._make_triton = lambda url: made.append(1) or AsyncFakeTriton(fake)
    first = asyncio.run(client.embed(["a", "b"]))
    second = asyncio.run(client.embed(["a", "b"]))  # a second asyncio.run: a fresh channel, same results
    np.testing.assert_array_equal(first, second)
    assert len(made) == 2 and fake.config_calls == ["embed"]  # the config cache outlives the loop


def test_classify_predictions_follow_input_order_and_label_order():
    client, _ = make_client()
    predictions = client.classify(["good one", "bad one"] * 6)
    first, second = predictions[:2]
    assert (first.label, second.label) == ("positive", "negative")
    assert first.score == pytest.approx(0.9) and second.score == pytest.approx(0.8)
    assert list(first.probabilities) == list(LABELS)
    assert sum(first.probabilities.values()) == pytest.approx(1.0)
    assert [p.label for p in predictions] == ["positive", "negative"] * 6


# ----------------------------------------------------------------------------------------------
# Input validation and the empty list


@pytest.mark.parametrize("bad", ["a single string", b"bytes", [1, "a"], ["a", None], ["a", b"b"], 42])
def test_non_string_input_raises_type_error_before_anything_is_sent(bad):
    client, fake = make_client()
    with pytest.raises(TypeError):
        client.embed(bad)
    with pytest.raises(TypeError):
        client.classify(bad)
    assert fake.infer_calls == [] and fake.config_calls == []


def test_unencodable_text_is_refused_client_side():
    client, fake = make_client()
    with pytest.raises(InvalidInputError, match=r"texts\[1\]"):
        client.embed(["ok", "lone surrogate \ud800"])
    assert fake.infer_calls == []


def test_empty_list_returns_0_by_dim_without_inference():
    client, fake = make_client()
    embeddings = client.embed([])
    assert embeddings.shape == (0, DIM) and embeddings.dtype == np.float32
    assert client.embed_with_details([]).truncated.shape == (0,)
    assert client.classify([]) == []
    assert fake.infer_calls == []

    async def main():
        async_client, async_fake = make_async_client()
        result = await async_client.embed([])
        return result, async_fake

    result, async_fake = asyncio.run(main())
    assert result.shape == (0, DIM) and async_fake.infer_calls == []


def test_embed_accepts_any_iterable_of_str():
    client, _ = make_client()
    assert client.embed(("a", "b")).shape == (2, DIM)
    assert client.embed(t for t in ["a", "b", "c"]).shape == (3, DIM)


def test_text_input_is_n_by_1_utf8_bytes():
    import tritonclient.grpc as grpcclient

    infer_input = encoding.text_input(grpcclient, ["héllo", "", "日本"])
    assert infer_input.shape() == [3, 1] and infer_input.datatype() == "BYTES"
    decoded = deserialize_bytes_tensor(infer_input._get_content())
    assert list(decoded) == ["héllo".encode(), b"", "日本".encode()]


@pytest.mark.parametrize("url", ["http://localhost:8001", "", "   "])
def test_bad_url_is_a_value_error(url):
    with pytest.raises(ValueError):
        EmbeddingClient(url)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        EmbeddingClient("h:1", timeout=0)
    with pytest.raises(ValueError):
        EmbeddingClient("h:1", batch_size=0)
    with pytest.raises(ValueError):
        EmbeddingClient("h:1", max_concurrency=0)
    with pytest.raises(ValueError):
        EmbeddingClient("h:1", max_retries=-1)


# ----------------------------------------------------------------------------------------------
# The error table


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("StatusCode.UNAVAILABLE", ServerUnavailableError),
        ("StatusCode.CANCELLED", ServerUnavailableError),  # gRPC's server shutting down
        ("StatusCode.INVALID_ARGUMENT", InvalidInputError),
        ("StatusCode.NOT_FOUND", ModelNotFoundError),
        ("StatusCode.DEADLINE_EXCEEDED", DeadlineExceededError),
        ("StatusCode.INTERNAL", ServerError),
        ("StatusCode.UNKNOWN", ServerError),
        ("StatusCode.UNIMPLEMENTED", ServerError),
        ("StatusCode.RESOURCE_EXHAUSTED", ServerOverloadedError),
        ("StatusCode.UNAUTHENTICATED", AuthenticationError),
        ("StatusCode.PERMISSION_DENIED", AuthenticationError),
        ("INVALID_ARG", InvalidInputError),  # Triton's own spelling
        ("UNAVAILABLE", ServerUnavailableError),
        ("StatusCode.SOMETHING_NEW", ServerError),
        (None, ServerError),  # raised by tritonclient itself, without a status
    ],
)
def test_error_table_maps_each_status(status, expected):
    exc = InferenceServerException(msg="details\nover two lines", status=status)
    error = errors.from_triton_error(exc, url="h:1", model="embed")
    assert type(error) is expected
    assert isinstance(error, EmbeddingClientError) and isinstance(error, EmbedlineError)
    assert "h:1" in str(error) and "embed" in str(error)
    assert "\n" not in str(error)  # the CLI prints one line
    assert errors.is_retryable(exc) == issubclass(expected, ServerUnavailableError)
    assert errors.is_retryable(error) == errors.is_retryable(exc)  # classified or raw: one predicate


def test_unknown_model_wording_means_model_not_found_whatever_the_status():
    for status in ("StatusCode.INVALID_ARGUMENT", "StatusCode.UNAVAILABLE"):
        exc = InferenceServerException(msg="Request for unknown model: 'classify' is not found", status=status)
        assert type(errors.from_triton_error(exc, url="h:1")) is ModelNotFoundError
        assert not errors.is_retryable(exc)


def test_every_table_entry_is_a_client_error_subclass():
    assert set(errors.STATUS_TO_ERROR.values()) <= {
        ServerUnavailableError, ServerOverloadedError, AuthenticationError, InvalidInputError,
        ModelNotFoundError, DeadlineExceededError, ServerError}
    retryable = {name for name, cls in errors.STATUS_TO_ERROR.items() if errors.is_retryable(cls("x"))}
    assert retryable == {"UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED"}


def test_server_error_in_one_request_of_a_split_list_raises_typed_error():
    texts = mixed_texts(30)
    client, fake = make_client()
    fake.fail_texts[texts[7]] = InferenceServerException(msg="invalid UTF-8", status="StatusCode.INVALID_ARGUMENT")
    with pytest.raises(InvalidInputError, match="invalid UTF-8"):
        client.embed(texts)


def test_classify_on_a_server_without_classify_is_model_not_found_and_embed_still_works():
    client, fake = make_client(FakeTriton(classify=False))
    with pytest.raises(ModelNotFoundError, match="no 'classify' model.*embed still works"):
        client.classify(["a"])
    assert client.embed(["a"]).shape == (1, DIM)
    assert client.info().labels == ()

    async def main():
        async_client, _ = make_async_client(FakeTriton(classify=False))
        with pytest.raises(ModelNotFoundError):
            await async_client.classify(["a"])
        return await async_client.info()

    assert asyncio.run(main()).labels == ()


def test_info_reads_the_config_parameters_and_is_cached():
    client, fake = make_client()
    info = client.info()
    assert info == ModelInfo(model_name="fake-model", dim=DIM, max_seq_length=16, variant="fp32", pooling="mean",
                             max_batch_size=MAX_BATCH, labels=LABELS, served_models=("fake-model",))
    assert client.info() is info
    assert fake.config_calls == ["embed", "classify"]
    with pytest.raises(Exception):
        info.dim = 3  # frozen


def test_missing_config_parameter_is_a_clear_server_error():
    fake = FakeTriton()
    fake.configs["embed"] = _config("embed", MAX_BATCH, model_name="m")
    client, _ = make_client(fake)
    with pytest.raises(ServerError, match="no config parameter 'dim'"):
        client.embed(["a"])


# ----------------------------------------------------------------------------------------------
# Retries, backoff, deadlines


def test_retry_policy_delay_caps_grow_exponentially_and_are_capped():
    policy = RetryPolicy(max_retries=6, initial_backoff=0.1, max_backoff=0.5)
    assert [policy.delay_cap(k) for k in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert policy.delay_cap(5000) == 0.5  # no overflow for a huge retry count


def test_unavailable_is_retried_with_backoff_then_succeeds(monkeypatch):
    sleeps = []
    monkeypatch.setattr(sync_module.time, "sleep", sleeps.append)
    client, fake = make_client(max_retries=3, initial_backoff=0.01)
    longest_jitter(client)
    fake.infer_failures = [unavailable(), unavailable()]
    assert client.embed(["a", "b"]).shape == (2, DIM)
    assert len(fake.infer_calls) == 3
    assert sleeps == pytest.approx([0.01, 0.02])


def test_unavailable_gives_up_after_max_retries(monkeypatch):
    sleeps = []
    monkeypatch.setattr(sync_module.time, "sleep", sleeps.append)
    client, fake = make_client(max_retries=3, initial_backoff=0.01)
    longest_jitter(client)
    fake.infer_failures = [unavailable() for _ in range(10)]
    with pytest.raises(ServerUnavailableError, match="gave up after 4 attempt") as caught:
        client.embed(["a"])
    assert len(fake.infer_calls) == 4 and sleeps == pytest.approx([0.01, 0.02, 0.04])
    assert isinstance(caught.value.__cause__, InferenceServerException)
    assert caught.value.status == "UNAVAILABLE"


def test_retries_stop_before_the_deadline_instead_of_sleeping_past_it():
    client, fake = make_client(timeout=0.3, max_retries=50, initial_backoff=0.1, max_backoff=10)
    longest_jitter(client)
    fake.config_failures = [unavailable() for _ in range(100)]
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError):
        client.embed(["a"])
    elapsed = time.monotonic() - started
    # Waits 0.1 s, then the 0.2 s wait would reach the 0.3 s deadline: gives up after 2 attempts.
    assert len(fake.config_calls) == 2
    assert elapsed < 0.3


def test_each_attempt_gets_what_is_left_of_the_calls_timeout():
    client, fake = make_client(timeout=5.0)
    client.embed(mixed_texts(20))
    assert fake.client_timeouts and all(0 < t <= 5.0 for t in fake.client_timeouts)
    client.embed(["a"], timeout=0.5)  # per-call override
    assert fake.client_timeouts[-1] <= 0.5


@pytest.mark.parametrize("status", ["StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL", "StatusCode.NOT_FOUND"])
def test_other_errors_are_not_retried(status, monkeypatch):
    monkeypatch.setattr(sync_module.time, "sleep", lambda s: pytest.fail("must not retry"))
    client, fake = make_client()
    fake.infer_failures = [InferenceServerException(msg="no", status=status)]
    with pytest.raises(errors.STATUS_TO_ERROR[status.split(".")[1]]):
        client.embed(["a"])
    assert len(fake.infer_calls) == 1


def test_deadline_exceeded_names_the_timeout():
    client, fake = make_client(timeout=2.5)
    fake.infer_failures = [InferenceServerException(msg="Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")]
    with pytest.raises(DeadlineExceededError, match="2.5 s timeout"):
        client.embed(["a"])
    assert len(fake.infer_calls) == 1


def test_async_retries_use_asyncio_sleep_and_the_same_bounds(monkeypatch):
    sleeps = []

    async def fake_sleep(delay):
        if delay:  # the fake's own sleep(0) yields are not retries
            sleeps.append(delay)

    monkeypatch.setattr(aio_module.asyncio, "sleep", fake_sleep)

    async def main():
        client, fake = make_async_client(max_retries=2, initial_backoff=0.01)
        longest_jitter(client)
        fake.infer_failures = [unavailable() for _ in range(10)]
        with pytest.raises(ServerUnavailableError):
            await client.embed(["a"])
        return fake

    fake = asyncio.run(main())
    assert len(fake.infer_calls) == 3 and sleeps == pytest.approx([0.01, 0.02])


def test_deadline_object():
    now = [100.0]
    deadline = retry.Deadline(2.0, clock=lambda: now[0])
    assert deadline.remaining() == pytest.approx(2.0)
    now[0] = 101.5
    assert deadline.remaining() == pytest.approx(0.5)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            retry.Deadline(bad)


# ----------------------------------------------------------------------------------------------
# Health, lifecycle


def test_health_is_false_not_an_exception_when_the_server_is_down():
    client, fake = make_client()
    assert client.health() is True
    fake.live = False
    assert client.health() is False
    fake.live = True
    del fake.configs["embed"]
    assert client.health() is False  # server up, model not ready


def test_closed_client_refuses_calls_and_closes_its_channel():
    with make_client()[0] as client:
        client.embed(mixed_texts(20))  # starts the thread pool
    assert client._tritons[0].closed
    with pytest.raises(EmbeddingClientError, match="closed"):
        client.embed(["a"])
    client.close()  # idempotent


def test_real_client_against_a_closed_port_is_unavailable_quickly():
    """No fake: tritonclient's real gRPC channel to a port nobody listens on."""
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with EmbeddingClient(f"127.0.0.1:{port}", timeout=1.0) as client:
        assert client.health() is False
        started = time.monotonic()
        # Retried (10 back-offs by default) until the deadline stops it: reported as unavailable,
        # not as a timeout, and not later than the deadline (plus scheduling slack).
        with pytest.raises(ServerUnavailableError, match=f"127.0.0.1:{port}"):
            client.embed(["a"])
        assert time.monotonic() - started < 1.0 + 0.3


# ----------------------------------------------------------------------------------------------
# Dependencies: the client needs numpy + tritonclient only

HEAVY_MODULES = ("torch", "transformers", "onnx", "tokenizers", "onnxruntime")


@pytest.mark.processes
def test_client_imports_and_constructs_without_heavy_packages():
    script = textwrap.dedent(f"""
        import sys

        BLOCKED = {HEAVY_MODULES!r}

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked import of {{name}}")
                return None

        sys.meta_path.insert(0, Blocker())
        import embedline.client as client
        from embedline.client import cli, cli_classify, errors
        sync_client = client.EmbeddingClient("127.0.0.1:1")
        sync_client.close()
        client.AsyncEmbeddingClient("127.0.0.1:1")
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_client_sources_do_not_import_heavy_packages():
    import ast

    for path in (REPO_ROOT / "client").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in HEAVY_MODULES, f"{path.name} imports {name}"


def test_base_dependencies_are_numpy_and_tritonclient_only():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower()
             for dep in project["dependencies"]}
    assert not names & {"torch", "transformers", "onnx", "tokenizers", "onnxruntime", "onnxruntime-gpu",
                        "sentence-transformers", "optimum"}
    assert "tritonclient" in names and "numpy" in names


# ----------------------------------------------------------------------------------------------
# CLI helpers


def test_cli_reads_one_text_per_line(tmp_path):
    from embedline.client.cli import read_texts

    path = tmp_path / "in.txt"
    path.write_bytes("first\r\n\nthird with \x0b inside\nlast".encode() + b"\n")
    assert read_texts(str(path)) == ["first", "", "third with \x0b inside", "last"]
    path.write_bytes(b"")
    assert read_texts(str(path)) == []


def test_cli_rejects_invalid_utf8_and_bad_output(tmp_path):
    from embedline.client import cli

    path = tmp_path / "in.txt"
    path.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(EmbedlineError, match="not valid UTF-8"):
        cli.read_texts(str(path))
    args = type("Args", (), dict(output=str(tmp_path / "out.txt"), input=str(path), url="h:1",
                                 timeout=1.0, batch_size=None))()
    with pytest.raises(EmbedlineError, match=r"\.npy or \.jsonl"):
        cli.run(args)


def test_concurrent_first_calls_that_name_a_model_all_resolve_it():
    """Several first calls wait on the catalog look-up together; each must still find its model."""

    class YieldingTriton(AsyncFakeTriton):
        async def get_model_config(self, *args, **kwargs):
            await asyncio.sleep(0)  # as a real RPC does: the other calls run meanwhile
            return await super().get_model_config(*args, **kwargs)

    fake = FakeTriton()
    client = AsyncEmbeddingClient("fake:1", model="fake-model")
    client._make_triton = lambda url: YieldingTriton(fake)

    async def main():
        try:
            return await asyncio.gather(*(client.embed(["a", "b"]) for _ in range(4)))
        finally:
            await client.close()

    assert [vectors.shape for vectors in asyncio.run(main())] == [(2, DIM)] * 4
