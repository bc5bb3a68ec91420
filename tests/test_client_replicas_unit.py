"""Unit tests of the client's error rules, retries, API key, TLS settings, per-request timeout and
replica failover, without a server: fakes stand in at the tritonclient seam (see test_client_unit.py).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
from test_client_unit import (
    DIM,
    AsyncFakeTriton,
    FakeTriton,
    TopOfRange,
    longest_jitter,
    make_async_client,
    make_client,
    mixed_texts,
    unavailable,
)
from tritonclient.utils import InferenceServerException

from embedline.client import (
    AsyncEmbeddingClient,
    AuthenticationError,
    DeadlineExceededError,
    EmbeddingClient,
    EmbeddingClientError,
    InvalidInputError,
    RetryPolicy,
    ServerError,
    ServerOverloadedError,
    ServerUnavailableError,
)
from embedline.client import __all__ as public_names
from embedline.client import errors, retry
from embedline.client import aio as aio_module
from embedline.client import sync as sync_module

KEY = "s3cret-key-42"
BEARER = {"authorization": f"Bearer {KEY}", "triton-grpc-protocol-authorization": f"Bearer {KEY}"}


def triton_error(message: str, status: str | None) -> InferenceServerException:
    return InferenceServerException(msg=message, status=status)


def queue_full():
    return triton_error("Exceeds maximum queue size", "StatusCode.UNAVAILABLE")


def restricted():
    return triton_error("This protocol is restricted, expecting header 'authorization'", "StatusCode.UNAVAILABLE")


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch):
    monkeypatch.delenv("EMBEDLINE_API_KEY", raising=False)


# ----------------------------------------------------------------------------------------------
# Classification: the table plus the message rules


@pytest.mark.parametrize(
    ("message", "status", "expected"),
    [
        ("Exceeds maximum queue size", "StatusCode.UNAVAILABLE", ServerOverloadedError),
        ("exceeds MAXIMUM QUEUE SIZE of 64", "StatusCode.UNAVAILABLE", ServerOverloadedError),
        ("quota", "StatusCode.RESOURCE_EXHAUSTED", ServerOverloadedError),
        ("This protocol is restricted, expecting header 'authorization'", "StatusCode.UNAVAILABLE",
         AuthenticationError),
        ("This protocol is restricted, expecting header 'authorization'", None, AuthenticationError),
        ("missing credentials", "StatusCode.UNAUTHENTICATED", AuthenticationError),
        ("wrong key", "StatusCode.PERMISSION_DENIED", AuthenticationError),
        ("Stub process 'embed_0_0' is not healthy.", "StatusCode.INTERNAL", ServerUnavailableError),
        ("Stub process 'embed_0_0' is not healthy.", "INTERNAL", ServerUnavailableError),
        ("field 'x' is not healthy", "StatusCode.INVALID_ARGUMENT", InvalidInputError),  # INTERNAL only
        ("out of memory", "StatusCode.INTERNAL", ServerError),
        ("Request timeout expired", "StatusCode.UNAVAILABLE", DeadlineExceededError),
        ("Request timeout expired", "StatusCode.INTERNAL", DeadlineExceededError),
        ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", ServerUnavailableError),
        # a draining server unloads its models: retry elsewhere or later, it is no unknown model
        ("Request for unknown model: 'embed' has no available versions", "StatusCode.NOT_FOUND",
         ServerUnavailableError),
        ("Server is stopping, scheduler for model has stopped accepting new inference requests",
         "StatusCode.UNAVAILABLE", ServerUnavailableError),
    ],
)
def test_message_rules_then_the_table(message, status, expected):
    exc = triton_error(message, status)
    error = errors.from_triton_error(exc, url="h:1", model="embed")
    assert type(error) is expected
    assert "h:1" in str(error)
    assert errors.is_retryable(error) == issubclass(expected, ServerUnavailableError)


def test_overloaded_is_a_kind_of_unavailable_and_auth_is_not():
    assert issubclass(ServerOverloadedError, ServerUnavailableError)
    assert issubclass(AuthenticationError, EmbeddingClientError)
    assert not issubclass(AuthenticationError, ServerUnavailableError)
    assert {"ServerOverloadedError", "AuthenticationError"} <= set(public_names)


def test_authentication_error_says_how_to_pass_a_key():
    error = errors.from_triton_error(restricted(), url="h:1")
    assert "api_key=" in str(error) and "EMBEDLINE_API_KEY" in str(error)
    assert error.status == "UNAVAILABLE" and error.url == "h:1"


def test_the_module_docstring_lists_every_message_rule():
    for text, _status, cls in errors.MESSAGE_RULES:
        assert text in errors.__doc__ and cls.__name__ in errors.__doc__


# ----------------------------------------------------------------------------------------------
# Retries: one predicate, full jitter, the deadline


def test_retry_policy_full_jitter_is_deterministic_with_a_seeded_rng():
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.5, rng=random.Random(3))
    delays = [policy.delay(k) for k in range(6)]
    reference = random.Random(3)
    assert delays == [reference.uniform(0, policy.delay_cap(k)) for k in range(6)]
    assert all(0 <= d <= policy.delay_cap(k) for k, d in enumerate(delays))
    assert len(set(delays)) == 6  # random, not the caps
    assert RetryPolicy().max_retries == 100


def test_overload_is_retried_with_jittered_backoff_then_succeeds(monkeypatch):
    sleeps = []
    monkeypatch.setattr(sync_module.time, "sleep", sleeps.append)
    client, fake = make_client(initial_backoff=0.1, max_backoff=0.3)
    client.retry_policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.3, rng=random.Random(11))
    fake.infer_failures = [queue_full(), queue_full(), queue_full()]
    assert client.embed(["a"]).shape == (1, DIM)
    assert len(fake.infer_calls) == 4
    reference = random.Random(11)
    assert sleeps == [reference.uniform(0, cap) for cap in (0.1, 0.2, 0.3)]


def test_overload_retries_stop_inside_the_deadline_and_keep_the_type(monkeypatch):
    sleeps = []
    real_sleep = time.sleep
    monkeypatch.setattr(sync_module.time, "sleep", lambda s: sleeps.append(s) or real_sleep(s))
    client, fake = make_client(timeout=0.3)
    client.retry_policy = RetryPolicy(max_retries=50, initial_backoff=0.05, max_backoff=10, rng=random.Random(5))
    fake.infer_failures = [queue_full() for _ in range(1000)]
    started = time.monotonic()
    with pytest.raises(ServerOverloadedError, match="gave up after") as caught:
        client.embed(["a"])
    assert time.monotonic() - started < 0.3 + 0.2  # the deadline, plus scheduling slack
    assert sleeps and sum(sleeps) <= 0.3 - retry.MIN_ATTEMPT_S  # no wait reaches past the deadline
    reference = random.Random(5)
    assert sleeps == [reference.uniform(0, 0.05 * 2 ** k) for k in range(len(sleeps))]  # full jitter
    assert len(fake.infer_calls) == len(sleeps) + 1
    assert "fake:1" in str(caught.value) and "queue is full" in str(caught.value)


@pytest.mark.parametrize("make_error", [
    restricted,
    lambda: triton_error("no key", "StatusCode.UNAUTHENTICATED"),
    lambda: triton_error("bad key", "StatusCode.PERMISSION_DENIED"),
])
def test_authentication_errors_are_never_retried(make_error, monkeypatch):
    monkeypatch.setattr(sync_module.time, "sleep", lambda s: pytest.fail("must not retry"))
    client, fake = make_client()
    fake.config_failures = [make_error() for _ in range(5)]
    with pytest.raises(AuthenticationError):
        client.embed(["a"])
    assert len(fake.config_calls) == 1
    client, fake = make_client()
    fake.infer_failures = [make_error() for _ in range(5)]
    with pytest.raises(AuthenticationError):
        client.embed(["a"])
    assert len(fake.infer_calls) == 1


def test_stub_not_healthy_is_retried_and_queue_timeout_is_not(monkeypatch):
    sleeps = []
    monkeypatch.setattr(sync_module.time, "sleep", sleeps.append)
    client, fake = make_client()
    fake.infer_failures = [triton_error("Stub process 'embed_0_0' is not healthy.", "StatusCode.INTERNAL")]
    assert client.embed(["a"]).shape == (1, DIM)
    assert len(fake.infer_calls) == 2 and len(sleeps) == 1

    client, fake = make_client(timeout=2.5)
    fake.infer_failures = [triton_error("Request timeout expired", "StatusCode.UNAVAILABLE")]
    with pytest.raises(DeadlineExceededError, match=r"2.5 s timeout \(Request timeout expired\)"):
        client.embed(["a"])
    assert len(fake.infer_calls) == 1


def test_retrier_uses_the_single_retry_predicate(monkeypatch):
    seen = []
    real = retry.is_retryable
    monkeypatch.setattr(retry, "is_retryable", lambda error: seen.append(type(error)) or real(error))
    client, fake = make_client()
    longest_jitter(client)
    monkeypatch.setattr(sync_module.time, "sleep", lambda s: None)
    fake.infer_failures = [queue_full(), unavailable(), triton_error("no", "StatusCode.INVALID_ARGUMENT")]
    with pytest.raises(InvalidInputError):
        client.embed(["a"])
    assert seen == [ServerOverloadedError, ServerUnavailableError, InvalidInputError]


def test_a_wait_that_overruns_the_deadline_reports_the_retryable_error():
    now = [0.0]
    deadline = retry.Deadline(1.0, clock=lambda: now[0])
    policy = RetryPolicy(initial_backoff=0.5, rng=TopOfRange())
    retrier = retry.Retrier(policy, deadline, retry.Replicas(["h:1"]), "embed")
    retrier.next_attempt()
    try:
        raise queue_full()
    except InferenceServerException as exc:
        assert retrier.backoff(exc) == 0.5
    now[0] = 0.995  # the sleep overran: no time is left for the retry
    with pytest.raises(ServerOverloadedError, match="gave up after 1 attempt"):
        retrier.next_attempt()
    untried = retry.Retrier(policy, deadline, retry.Replicas(["h:1"]), "embed")
    with pytest.raises(DeadlineExceededError, match="1 s timeout"):  # no time left before any attempt
        untried.next_attempt()


# ----------------------------------------------------------------------------------------------
# The per-request server-side timeout


def test_infer_sends_the_remaining_deadline_as_tritons_timeout_in_microseconds():
    client, fake = make_client(timeout=5.0)
    client.embed(mixed_texts(20))
    assert len(fake.server_timeouts) == 3
    for server_us, client_s in zip(fake.server_timeouts, fake.client_timeouts):
        assert isinstance(server_us, int)
        assert 0 < server_us <= client_s * 1e6 <= 5e6
        assert server_us == pytest.approx(client_s * 1e6, abs=1)
    client.embed(["a"], timeout=0.5)
    assert 0 < fake.server_timeouts[-1] <= 500_000


def test_attempt_server_timeout_rounds_down():
    assert retry.Attempt(0, "h:1", 1.2345678).server_timeout_us == 1_234_567
    assert retry.Attempt(0, "h:1", 1e-9).server_timeout_us == 1


def test_async_infer_sends_the_timeout_too():
    async def main():
        client, fake = make_async_client(timeout=3.0)
        async with client:
            await client.embed(mixed_texts(12))
        return fake

    fake = asyncio.run(main())
    assert len(fake.server_timeouts) == 2
    assert all(isinstance(t, int) and 0 < t <= c * 1e6 <= 3e6
               for t, c in zip(fake.server_timeouts, fake.client_timeouts))


# ----------------------------------------------------------------------------------------------
# API key


def exercise_every_rpc(client: EmbeddingClient) -> None:
    client.embed(mixed_texts(20))
    client.classify(["good"])
    client.info()
    assert client.health() is True


ALL_RPCS = {"get_model_config", "infer", "is_server_live", "is_server_ready", "is_model_ready"}


def test_api_key_header_goes_with_every_rpc():
    client, fake = make_client(api_key=KEY)
    exercise_every_rpc(client)
    assert {name for name, _ in fake.headers} == ALL_RPCS
    assert all(headers == BEARER for _, headers in fake.headers)


def test_no_key_no_header():
    client, fake = make_client()
    exercise_every_rpc(client)
    assert {name for name, _ in fake.headers} == ALL_RPCS
    assert all(not headers for _, headers in fake.headers)


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("EMBEDLINE_API_KEY", KEY)
    client, fake = make_client()
    client.embed(["a"])
    assert fake.headers and all(headers == BEARER for _, headers in fake.headers)

    client, fake = make_client(api_key="explicit")  # the argument wins
    client.embed(["a"])
    assert all(headers == {"authorization": "Bearer explicit",
                                "triton-grpc-protocol-authorization": "Bearer explicit"} for _, headers in fake.headers)

    client, fake = make_client(api_key="")  # an explicit empty key: none, whatever the environment says
    client.embed(["a"])
    assert all(not headers for _, headers in fake.headers)

    monkeypatch.setenv("EMBEDLINE_API_KEY", "")
    client, fake = make_client()
    client.embed(["a"])
    assert all(not headers for _, headers in fake.headers)


def test_api_key_never_in_repr_or_errors(monkeypatch):
    client, fake = make_client(api_key=KEY)
    assert KEY not in repr(client) and "api_key=***" in repr(client)
    assert "api_key" not in repr(make_client()[0])
    fake.infer_failures = [triton_error("invalid credentials", "StatusCode.UNAUTHENTICATED")]
    with pytest.raises(AuthenticationError) as caught:
        client.embed(["a"])
    assert KEY not in str(caught.value) and "api_key=" in str(caught.value)
    client.close()
    with pytest.raises(EmbeddingClientError) as closed:
        client.embed(["a"])
    assert KEY not in str(closed.value)
    bad = "é" + KEY
    with pytest.raises(ValueError) as refused:
        EmbeddingClient("h:1", api_key=bad)
    assert bad not in str(refused.value)
    with pytest.raises(TypeError):
        EmbeddingClient("h:1", api_key=42)


def test_async_api_key_header_goes_with_every_rpc(monkeypatch):
    monkeypatch.setenv("EMBEDLINE_API_KEY", KEY)

    async def main():
        client, fake = make_async_client()
        async with client:
            await client.embed(mixed_texts(20))
            await client.classify(["good"])
            await client.info()
            assert await client.health() is True
        return client, fake

    client, fake = asyncio.run(main())
    assert {name for name, _ in fake.headers} == ALL_RPCS
    assert all(headers == BEARER for _, headers in fake.headers)
    assert KEY not in repr(client)


# ----------------------------------------------------------------------------------------------
# TLS settings reach tritonclient


class RecordingTriton:
    made: list[tuple[str, dict]] = []

    def __init__(self, url, **kwargs):
        RecordingTriton.made.append((url, kwargs))

    def close(self):
        pass


def test_tls_arguments_are_passed_to_tritonclient(monkeypatch, tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    RecordingTriton.made = []
    monkeypatch.setattr(sync_module.grpcclient, "InferenceServerClient", RecordingTriton)
    EmbeddingClient(["a:1", "b:1"], ssl=True, root_certificates=str(pem))
    assert [url for url, _ in RecordingTriton.made] == ["a:1", "b:1"]
    assert all(kw["ssl"] is True and kw["root_certificates"] == str(pem) and kw["channel_args"]
               for _, kw in RecordingTriton.made)

    RecordingTriton.made = []
    monkeypatch.setattr(aio_module.grpcaio, "InferenceServerClient", RecordingTriton)

    async def main():
        client = AsyncEmbeddingClient("a:1", ssl=True, root_certificates=str(pem))
        client._clients()

    asyncio.run(main())
    assert RecordingTriton.made[0][0] == "a:1"
    assert RecordingTriton.made[0][1]["ssl"] is True and RecordingTriton.made[0][1]["root_certificates"] == str(pem)


def test_plaintext_by_default_and_bad_tls_settings_are_value_errors(tmp_path):
    assert make_client()[0]._tls == {"ssl": False, "root_certificates": None}
    with pytest.raises(ValueError, match="ssl=True"):
        EmbeddingClient("h:1", root_certificates=str(tmp_path / "x.pem"))
    with pytest.raises(ValueError, match="no such file"):
        AsyncEmbeddingClient("h:1", ssl=True, root_certificates=str(tmp_path / "missing.pem"))
    EmbeddingClient("127.0.0.1:1", ssl=True).close()  # a real TLS channel: system roots, no connection yet


# ----------------------------------------------------------------------------------------------
# Replicas


class DownTriton(FakeTriton):
    """A replica whose every RPC fails with `error()` (unavailable by default)."""

    def __init__(self, error=unavailable):
        super().__init__()
        self.error = error
        self.live = False
        self.attempts: list[str] = []
        self._attempts_lock = threading.Lock()

    def _fail(self, name):
        with self._attempts_lock:
            self.attempts.append(name)
        raise self.error()

    def get_model_config(self, model_name, headers=None, client_timeout=None):
        self._fail("get_model_config")

    def infer(self, model_name, inputs, outputs=None, timeout=None, client_timeout=None, headers=None):
        self._fail("infer")


def make_replica_client(fakes: dict[str, FakeTriton], now=None, **kwargs) -> EmbeddingClient:
    client = EmbeddingClient(list(fakes), **kwargs)
    for triton in client._tritons:
        triton.close()
    client._tritons = [fakes[url] for url in client.urls]
    if now is not None:  # a clock the test moves: cool-downs end only when it says so
        client._replicas._clock = lambda: now[0]
    return client


def make_async_replica_client(fakes: dict[str, FakeTriton], now=None, **kwargs) -> AsyncEmbeddingClient:
    client = AsyncEmbeddingClient(list(fakes), **kwargs)
    client._make_triton = lambda url: AsyncFakeTriton(fakes[url])
    if now is not None:
        client._replicas._clock = lambda: now[0]
    return client


def test_urls_list_validation_and_compatibility():
    client = EmbeddingClient(["a:1", " b:2 "])
    assert client.url == "a:1" and client.urls == ("a:1", "b:2")
    assert EmbeddingClient(("a:1",)).urls == ("a:1",)
    assert EmbeddingClient("a:1").urls == ("a:1",)
    assert "['a:1', 'b:2']" in repr(client)
    for bad in ([], (), ["a:1", "http://b:2"], ["a:1", ""], ["a:1", "a:1"], ["a:1", None]):
        with pytest.raises(ValueError):
            EmbeddingClient(bad)
    with pytest.raises(ValueError):
        AsyncEmbeddingClient([])


@pytest.mark.parametrize("error", [unavailable, queue_full])
def test_failover_every_call_succeeds_on_the_healthy_replica(error, monkeypatch):
    sleeps = []
    monkeypatch.setattr(sync_module.time, "sleep", sleeps.append)
    down, up = DownTriton(error), FakeTriton()
    client = make_replica_client({"down:1": down, "up:1": up}, now=[0.0])
    for _ in range(10):
        texts = mixed_texts(20)  # 3 requests each, sent concurrently
        assert client.embed(texts).shape == (20, DIM)
    assert len(up.infer_calls) == 30
    assert down.attempts == ["get_model_config"]  # failed once, then skipped while cooling down
    assert sleeps == []  # failing over to an untried replica does not wait


def test_a_cooled_down_replica_is_tried_again():
    now = [0.0]
    down, up = DownTriton(), FakeTriton()
    client = make_replica_client({"down:1": down, "up:1": up}, now=now)
    client.info()
    assert down.attempts == ["get_model_config"]
    now[0] += 0.5
    for _ in range(4):
        client.embed(["a"])
    assert down.attempts == ["get_model_config"]
    now[0] += retry.REPLICA_COOLDOWN_S
    for _ in range(4):
        client.embed(["a"])
    assert down.attempts == ["get_model_config", "infer"]  # back in turn, failed, cooling again
    assert len(up.infer_calls) == 8


def test_all_replicas_down_backs_off_per_round_and_names_the_replicas(monkeypatch):
    sleeps = []
    monkeypatch.setattr(sync_module.time, "sleep", sleeps.append)
    a, b = DownTriton(), DownTriton()
    client = make_replica_client({"a:1": a, "b:1": b}, max_retries=2, initial_backoff=0.01)
    longest_jitter(client)
    with pytest.raises(ServerUnavailableError, match=r"gave up after 6 attempt\(s\) on 2 replicas") as caught:
        client.embed(["a"])
    assert len(a.attempts) == 3 and len(b.attempts) == 3  # each round tries both
    assert sleeps == pytest.approx([0.01, 0.02])  # one wait per round, not per attempt
    assert caught.value.url in ("a:1", "b:1") and caught.value.url in str(caught.value)


def test_non_retryable_errors_do_not_fail_over_and_name_the_replica():
    good, bad = FakeTriton(), FakeTriton()
    bad.fail_texts["x"] = triton_error("invalid UTF-8", "StatusCode.INVALID_ARGUMENT")
    client = make_replica_client({"good:1": good, "bad:1": bad})
    refused = []
    for _ in range(2):  # the two requests take turns: one lands on bad:1
        try:
            client.embed(["x"])
        except InvalidInputError as exc:
            refused.append(exc)
    assert len(refused) == 1 and refused[0].url == "bad:1" and "bad:1" in str(refused[0])
    assert len(bad.infer_calls) == 1 and len(good.infer_calls) == 1  # neither retried nor failed over


def test_requests_are_spread_over_healthy_replicas():
    a, b = FakeTriton(), FakeTriton()
    client = make_replica_client({"a:1": a, "b:1": b})
    client.embed(mixed_texts(40))  # 5 requests
    assert a.infer_calls and b.infer_calls
    assert len(a.infer_calls) + len(b.infer_calls) == 5
    for _ in range(6):
        client.embed(["one"])
    assert abs(len(a.infer_calls) - len(b.infer_calls)) <= 1


def test_info_comes_from_the_first_replica_that_answers():
    client = make_replica_client({"down:1": DownTriton(), "up:1": FakeTriton()})
    assert client.info().dim == DIM
    assert client._specs["embed"].url == "up:1"


def test_health_is_true_when_any_replica_is_ready():
    a, b = FakeTriton(), FakeTriton()
    client = make_replica_client({"a:1": a, "b:1": b})
    assert client.health() is True
    a.live = False
    assert client.health() is True
    del b.configs["embed"]  # b live but its embed model not ready
    assert client.health() is False
    b.live = False
    assert client.health() is False


class HungTriton(FakeTriton):
    """A replica whose health check hangs until released (a blackholed host)."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def is_server_live(self, headers=None, client_timeout=None):
        self.release.wait(client_timeout)
        return True


def test_a_hung_replica_does_not_delay_health():
    hung = HungTriton()
    client = make_replica_client({"hung:1": hung, "up:1": FakeTriton()}, max_concurrency=1)
    try:
        started = time.monotonic()
        assert client.health(timeout=10) is True
        assert time.monotonic() - started < 5
    finally:
        hung.release.set()


def test_replicas_choose_in_turn_and_skip_cooling_ones():
    now = [0.0]
    replicas = retry.Replicas(["a", "b", "c"], cooldown=1.0, clock=lambda: now[0])
    assert [replicas.choose() for _ in range(4)] == [0, 1, 2, 0]
    replicas.failed(2)
    assert [replicas.choose() for _ in range(3)] == [1, 0, 1]
    assert replicas.has_fresh({0, 1}) is False and replicas.has_fresh({0}) is True
    assert replicas.choose({1}) == 0
    replicas.failed(0)
    replicas.failed(1)
    assert sorted(replicas.choose() for _ in range(3)) == [0, 1, 2]  # all cooling: plain turns
    replicas.succeeded(1)
    assert {replicas.choose() for _ in range(3)} == {1}
    now[0] = 1.5
    assert sorted(replicas.choose() for _ in range(3)) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# Replicas, asyncio


@pytest.fixture
def async_sleeps(monkeypatch) -> list[float]:
    """The asyncio client's back-off waits, recorded instead of slept (failovers wait 0: not recorded)."""
    sleeps: list[float] = []

    async def fake_sleep(delay):
        if delay:
            sleeps.append(delay)

    monkeypatch.setattr(aio_module.asyncio, "sleep", fake_sleep)
    return sleeps


def test_async_failover_spreading_and_health(async_sleeps):
    sleeps = async_sleeps
    async def main():
        down, up = DownTriton(queue_full), FakeTriton()
        client = make_async_replica_client({"down:1": down, "up:1": up}, now=[0.0])
        async with client:
            for _ in range(5):
                assert (await client.embed(mixed_texts(20))).shape == (20, DIM)
            healthy = await client.health()
        assert len(up.infer_calls) == 15 and down.attempts == ["get_model_config"] and healthy

        a, b = FakeTriton(), FakeTriton()
        client = make_async_replica_client({"a:1": a, "b:1": b})
        async with client:
            await client.embed(mixed_texts(40))
            assert a.infer_calls and b.infer_calls
            a.live = False
            assert await client.health() is True
            b.live = False
            assert await client.health() is False

    asyncio.run(main())
    assert sleeps == []


def test_async_all_replicas_down_gives_up_with_backoff_per_round(async_sleeps):
    sleeps = async_sleeps
    async def main():
        a, b = DownTriton(), DownTriton()
        client = make_async_replica_client({"a:1": a, "b:1": b}, max_retries=1, initial_backoff=0.01)
        client.retry_policy = RetryPolicy(max_retries=1, initial_backoff=0.01, rng=TopOfRange())
        with pytest.raises(ServerUnavailableError, match="on 2 replicas"):
            await client.embed(["a"])
        with pytest.raises(AuthenticationError):
            a.error = b.error = restricted
            await client.embed(["a"])
        return a, b

    a, b = asyncio.run(main())
    assert sleeps == pytest.approx([0.01])
    assert len(a.attempts) + len(b.attempts) == 4 + 1  # 2 rounds of 2, then one refused, not retried
