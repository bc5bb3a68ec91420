"""The OpenAI-compatible route (serving/openai_api.py) as real processes in front of real tritonservers.

Each app instance is `python -m embedline.serving.openai_api` started from `openai_command(...)` on a free
port; the tiny 32-d model is served by tritonserver (`start_server`). Clients are the official `openai`
package, as a user would call it, and raw httpx where the package cannot send what is tested (a token-id
array of arrays, an oversized or chunked body, a burst). Instances, started side by side:

    app         two public names for the tiny model ("tiny", the default, and "tiny-alias"), 64 KiB bodies
    keyed       the same behind an API key (EMBEDLINE_API_KEY in its environment)
    overloaded  in front of a server whose queue holds 1 request and whose batcher waits 300 ms, SDK retries
                off: a burst gets real 429s from Triton's "Exceeds maximum queue size"
    dead        pointed at a port nothing listens on, 0.5 s deadline: real 503s

The rest of the error table (504, 500, SDK input errors) is `sdk_error`, tested as a function.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

from embedline.client import (
    DeadlineExceededError,
    EmbeddingClient,
    InvalidInputError,
    ModelNotFoundError,
    ServerError,
    ServerOverloadedError,
    ServerUnavailableError,
)
from embedline.serving.openai_api import (
    ServedModel,
    build_parser,
    openai_command,
    sdk_error,
)
from embedline.serving.triton import free_port

try:
    import httpx2 as httpx  # the HTTP client current `openai` versions depend on
except ImportError:  # older `openai` versions use httpx
    import httpx

KEY = "test-route-key-0123"
BODY_LIMIT = 64 * 1024
TEXTS = [
    "A man is eating food.",
    "the quick brown fox jumps over the lazy dog",
    "a woman plays the guitar in the park at night",
    "short",
    # Over the tiny model's 64 tokens: usage counts it as 64, as the model sees it.
    " ".join(["the dog runs in the park with a ball"] * 12),
]


class App:
    """One route process and where it listens."""

    def __init__(self, argv: list[str], port: int, log_path: Path, env: dict[str, str], pass_fds=()):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds)

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"route exited {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                httpx.get(f"{self.base_url}/health", timeout=3)  # 200, or 503 for the dead instance
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"route not listening after {timeout} s:\n{self.log_path.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def servers(start_server, tiny_fp32):
    normal = start_server(tiny_fp32)
    # Queue of 1 and a 300 ms batching window: a request waits in the queue, the next ones are refused.
    overloaded = start_server(tiny_fp32, max_queue_size=1, queue_delay_us=300_000)
    return normal, overloaded


@pytest.fixture(scope="module")
def apps(servers, tiny_fp32, tmp_path_factory):
    normal, overloaded = servers
    logs = tmp_path_factory.mktemp("openai-route")
    tiny = ServedModel("tiny", tiny_fp32.tokenizer_path)  # Triton's catalog names it; its config gives the length
    alias = ServedModel("tiny-alias", tiny_fp32.tokenizer_path, {"embed_model": "embed"})
    base_env = {k: v for k, v in os.environ.items() if k != "EMBEDLINE_API_KEY"}
    specs = {
        "app": (normal.grpc_url, [tiny, alias], {"max_body_bytes": BODY_LIMIT}, {}),
        "keyed": (normal.grpc_url, [tiny], {}, {"EMBEDLINE_API_KEY": KEY}),
        "overloaded": (overloaded.grpc_url, [tiny], {"max_retries": 0, "timeout": 10.0}, {}),
        "dead": (f"127.0.0.1:{free_port()}", [tiny], {"timeout": 0.5}, {}),
    }
    started = {}
    for name, (grpc_url, models, options, env) in specs.items():
        port = free_port()
        argv = openai_command(grpc_url, models, port=port, **options)
        started[name] = App(argv, port, logs / f"{name}.log", {**base_env, **env})
    try:
        for app in started.values():
            app.wait_listening()
        yield started
    finally:
        for app in started.values():
            app.stop()


@pytest.fixture(scope="module")
def app(apps) -> App:
    return apps["app"]


@pytest.fixture(scope="module")
def client(app):
    with openai.OpenAI(base_url=f"{app.base_url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_reference(servers):
    with EmbeddingClient(servers[0].grpc_url, timeout=30) as sdk:
        yield sdk


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def vectors(response) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    assert all(item.object == "embedding" for item in response.data)
    return np.array([item.embedding for item in response.data], dtype=np.float32)


def raw_post(app: App, body, headers=None, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) or callable(getattr(body, "__next__", None)) else json.dumps(body)
    return httpx.post(f"{app.base_url}/v1/embeddings", content=content,
                      headers={"content-type": "application/json", **(headers or {})}, timeout=30, **kwargs)


def assert_error_shape(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# ----------------------------------------------------------------------------------------------
# Embeddings through the official openai package


def test_float_embeddings_match_the_grpc_sdk(client, grpc_reference, tiny_fp32):
    response = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    got = vectors(response)
    assert got.shape == (len(TEXTS), tiny_fp32.dim)
    assert cosines(got, grpc_reference.embed(TEXTS)).min() >= 0.9999
    assert response.object == "list" and response.model == "tiny"


def test_default_request_is_base64_decoded_by_the_openai_package(client, grpc_reference):
    # Recent openai versions ask for base64 when no format is given and decode it themselves to floats.
    response = client.embeddings.create(model="tiny", input=TEXTS)
    got = vectors(response)
    assert cosines(got, grpc_reference.embed(TEXTS)).min() >= 0.9999


def test_explicit_base64_is_little_endian_float32(client, grpc_reference, tiny_fp32):
    response = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="base64")
    # Asked for explicitly, the package hands the base64 strings through.
    encoded = [item.embedding for item in response.data]
    assert all(isinstance(item, str) for item in encoded)
    got = np.stack([np.frombuffer(base64.b64decode(item), dtype="<f4") for item in encoded])
    assert got.shape == (len(TEXTS), tiny_fp32.dim)
    assert cosines(got, grpc_reference.embed(TEXTS)).min() >= 0.9999


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_dimensions_truncates_and_renormalizes_like_the_sdk(client, grpc_reference, encoding_format):
    response = client.embeddings.create(model="tiny", input=TEXTS, dimensions=8, encoding_format=encoding_format)
    if encoding_format == "base64":
        got = np.stack([np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in response.data])
    else:
        got = vectors(response)
    assert got.shape == (len(TEXTS), 8)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosines(got, grpc_reference.embed(TEXTS, dimensions=8)).min() >= 0.9999


def test_a_single_string_input(client, grpc_reference):
    response = client.embeddings.create(model="tiny", input="A man is eating food.", encoding_format="float")
    assert len(response.data) == 1
    assert cosines(vectors(response), grpc_reference.embed(["A man is eating food."]))[0] >= 0.9999


def test_usage_counts_the_models_tokens(client, tiny_fp32):
    tokenizer = Tokenizer.from_file(str(tiny_fp32.tokenizer_path))
    tokenizer.no_padding()
    full = [len(e.ids) for e in tokenizer.encode_batch(TEXTS)]
    assert max(full) > tiny_fp32.max_seq_length  # the long text is cut by the server
    expected = sum(min(n, tiny_fp32.max_seq_length) for n in full)
    response = client.embeddings.create(model="tiny", input=TEXTS)
    assert response.usage.prompt_tokens == expected == response.usage.total_tokens
    # [CLS] dog [SEP]: special tokens count, as the model sees them.
    assert client.embeddings.create(model="tiny", input="dog").usage.prompt_tokens == 3


def test_models_list_and_the_default_model(client, app):
    assert [(m.id, m.object, m.owned_by) for m in client.models.list()] == [
        ("tiny", "model", "embedline"), ("tiny-alias", "model", "embedline")]
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    listed = httpx.get(f"{app.base_url}/v1/models").json()
    assert listed == {"object": "list", "data": [
        {"id": "tiny", "object": "model", "created": 0, "owned_by": "embedline"},
        {"id": "tiny-alias", "object": "model", "created": 0, "owned_by": "embedline"}]}
    # No `model`: the default; `user` and unknown fields are accepted and ignored.
    body = raw_post(app, {"input": ["dog"], "user": "someone", "something_new": 1}).json()
    assert body["model"] == "tiny" and body["object"] == "list"
    assert body["data"][0]["object"] == "embedding" and body["data"][0]["index"] == 0
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert client.embeddings.create(model="tiny-alias", input="hello").model == "tiny-alias"


# ----------------------------------------------------------------------------------------------
# Errors


def test_token_id_input_is_a_clear_bad_request(client, app):
    with pytest.raises(openai.BadRequestError, match="token ids are not supported"):
        client.embeddings.create(model="tiny", input=[101, 2023, 102])
    error = assert_error_shape(raw_post(app, {"model": "tiny", "input": [[101, 2023], [7]]}), 400,
                               "token_ids_not_supported")
    assert error["param"] == "input" and error["type"] == "invalid_request_error"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.embeddings.create(model="no-such-model", input="hello")


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "input": []}, "input"),
    ({"model": "tiny", "input": ["ok", 3]}, "input"),
    ({"model": "tiny", "input": {"text": "x"}}, "input"),
    ({"model": "tiny"}, "input"),
    ({"model": 3, "input": "x"}, "model"),
    ({"model": "tiny", "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": "tiny", "input": "x", "dimensions": 33}, "dimensions"),   # the tiny model is 32-d
    ({"model": "tiny", "input": "x", "dimensions": 8.5}, "dimensions"),
    ({"model": "tiny", "input": "x", "dimensions": True}, "dimensions"),
    ({"model": "tiny", "input": "x", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_requests_are_400_in_openais_shape(app, body, param):
    error = assert_error_shape(raw_post(app, body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_dimensions_over_the_models_dim_names_it(client):
    with pytest.raises(openai.BadRequestError, match="dim 32"):
        client.embeddings.create(model="tiny", input="hello", dimensions=64)


def test_invalid_json_and_non_object_bodies_are_400(app):
    assert_error_shape(raw_post(app, b"{not json"), 400)
    assert_error_shape(raw_post(app, b"\xff\xfe garbage"), 400)
    assert_error_shape(raw_post(app, b'["a list"]'), 400)


def test_unknown_paths_and_methods_answer_in_openais_shape(app):
    assert_error_shape(httpx.get(f"{app.base_url}/v1/nothing-here"), 404)
    assert_error_shape(httpx.get(f"{app.base_url}/v1/embeddings"), 405)


def test_oversized_bodies_are_413(app):
    big = json.dumps({"model": "tiny", "input": ["word " * 1000] * 20}).encode()
    assert len(big) > BODY_LIMIT
    assert_error_shape(raw_post(app, big), 413, "request_too_large")  # refused on Content-Length

    def chunks():  # no Content-Length: chunked transfer, refused once the streamed bytes pass the limit
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    assert_error_shape(raw_post(app, chunks()), 413, "request_too_large")
    # Just under the limit is fine.
    small = json.dumps({"model": "tiny", "input": ["word " * 1000] * 2}).encode()
    assert len(small) < BODY_LIMIT and raw_post(app, small).status_code == 200


def test_api_key_is_required_and_compared(apps):
    keyed = apps["keyed"]
    with openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="wrong-key", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.embeddings.create(model="tiny", input="hello")
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    assert_error_shape(raw_post(keyed, {"input": "hello"}), 401, "invalid_api_key")  # no header at all
    assert_error_shape(raw_post(keyed, {"input": "hello"}, {"authorization": f"Basic {KEY}"}), 401)
    with openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=KEY, max_retries=0) as right:
        assert len(right.embeddings.create(model="tiny", input=["a", "b"]).data) == 2
    # Health stays open to probes, as on Triton.
    assert httpx.get(f"{keyed.base_url}/health").status_code == 200


def test_overload_is_429_with_retry_after(apps):
    overloaded = apps["overloaded"]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=overloaded.base_url, timeout=30) as http:
            body = {"model": "tiny", "input": [f"text number {i} in a burst" for i in range(8)]}
            return await asyncio.gather(*(http.post("/v1/embeddings", json=body) for _ in range(12)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses and 429 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert assert_error_shape(refused, 429, "server_overloaded")["type"] == "rate_limit_error"


def test_unavailable_server_is_503_with_retry_after_and_health_503(apps):
    dead = apps["dead"]
    response = raw_post(dead, {"input": "hello"})
    assert_error_shape(response, 503, "server_unavailable")
    assert response.headers["retry-after"] == "1"
    assert "127.0.0.1" not in response.text  # the internal gRPC address stays in the log
    assert httpx.get(f"{dead.base_url}/health").status_code == 503


def test_a_draining_route_answers_503_with_retry_after_and_serves_on_an_inherited_socket(servers, tiny_fp32,
                                                                                        tmp_path):
    """SIGUSR1 (the launcher's drain) turns new requests into 503 draining with Retry-After; the process
    serves on a socket it was handed (--fd), as under the launcher."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    tiny = ServedModel("tiny", tiny_fp32.tokenizer_path)
    argv = [*openai_command(servers[0].grpc_url, [tiny], port=port), "--fd", str(listener.fileno())]
    env = {k: v for k, v in os.environ.items() if k != "EMBEDLINE_API_KEY"}
    app = App(argv, port, tmp_path / "route.log", env, pass_fds=(listener.fileno(),))
    try:
        app.wait_listening()
        assert raw_post(app, {"input": "hello"}).status_code == 200
        app.process.send_signal(signal.SIGUSR1)
        response = raw_post(app, {"input": "hello"})
        assert_error_shape(response, 503, "draining")
        assert response.headers["retry-after"] == "1" and response.headers["connection"] == "close"
        health = httpx.get(f"{app.base_url}/health")
        assert (health.status_code, health.json()) == (503, {"status": "draining", "in_flight": 0})
        assert app.stop() == 0
    finally:
        listener.close()
        app.stop()


def test_a_prompt_the_model_lacks_or_two_names_that_disagree_are_400(app):
    error = assert_error_shape(raw_post(app, {"input": "hello", "prompt_name": "query"}), 400, "unknown_prompt")
    assert error["param"] == "prompt_name" and "'query'" in error["message"]
    assert_error_shape(raw_post(app, {"input": "hello", "input_type": "query"}), 400, "unknown_prompt")
    error = assert_error_shape(raw_post(app, {"input": "hello", "prompt_name": "query", "input_type": "passage"}), 400)
    assert error["param"] == "prompt_name"
    assert_error_shape(raw_post(app, {"input": "hello", "prompt_name": 3}), 400)
    assert raw_post(app, {"input": "hello"}).status_code == 200  # and the route serves on


def test_sdk_errors_map_to_http_statuses():
    cases = [
        (ServerOverloadedError("full"), 429),
        (ServerUnavailableError("down"), 503),
        (DeadlineExceededError("slow"), 504),
        (InvalidInputError("texts[2] cannot be encoded as UTF-8"), 400),
        (ValueError("dimensions must be an int from 1 to the model's dim 32, got 40"), 400),
        (ModelNotFoundError("model 'embed' at h:1 not found"), 500),
        (ServerError("boom"), 500),
    ]
    for exc, status in cases:
        assert sdk_error(exc).status == status, exc
    assert "input[2]" in sdk_error(InvalidInputError("texts[2] cannot be encoded as UTF-8")).message
    assert sdk_error(ValueError("dimensions must be ...")).param == "dimensions"


def test_lone_surrogate_text_is_400(app):
    # Valid JSON, but not encodable as UTF-8: the SDK's InvalidInputError.
    error = assert_error_shape(raw_post(app, b'{"model": "tiny", "input": ["ok", "\\ud800"]}'), 400)
    assert "input[1]" in error["message"]


# ----------------------------------------------------------------------------------------------
# The process: command line, SIGTERM


def test_openai_command_round_trips_the_models(tmp_path):
    models = [ServedModel("m1", "/a/tokenizer.json"),
              ServedModel("m2", "/b:odd=x/tokenizer.json", {"embed_model": "embed_b"})]
    argv = openai_command("h:8001", models, host="0.0.0.0", port=9000, default_model="m2", timeout=5,
                          python="py")
    assert argv[:3] == ["py", "-m", "embedline.serving.openai_api"]
    assert "EMBEDLINE_API_KEY" not in " ".join(argv)
    args = build_parser().parse_args(argv[3:])
    assert args.models == [("m1", "/a/tokenizer.json"), ("m2", "/b:odd=x/tokenizer.json")]
    assert args.triton_models == [("m2", "embed_b")]
    assert argv[argv.index("--default") + 1] == "m2" and argv[argv.index("--timeout") + 1] == "5"
    with pytest.raises(ValueError, match="no command-line form"):
        openai_command("h:1", [ServedModel("m", "t.json", {"batch_size": 4})])


@pytest.mark.processes
def test_process_refuses_an_exposed_address_without_a_key(tiny_fp32):
    argv = openai_command("127.0.0.1:1", [ServedModel("t", tiny_fp32.tokenizer_path)], host="0.0.0.0",
                          port=free_port())
    env = {k: v for k, v in os.environ.items() if k != "EMBEDLINE_API_KEY"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "without an API key" in result.stderr


def test_sigterm_stops_the_route_cleanly(apps):
    dead = apps["dead"]  # the last test to use it
    assert dead.stop() == 0
    assert "Traceback" not in dead.log_path.read_text()
