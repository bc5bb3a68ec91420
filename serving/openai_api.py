"""An OpenAI-compatible embeddings API in front of Triton: `POST /v1/embeddings`, `GET /v1/models`, `GET /health`.

Code written for OpenAI's embeddings endpoint (the `openai` package, LangChain, LlamaIndex...) works against
embedline by changing its base url:

    from openai import OpenAI

    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="<EMBEDLINE_API_KEY, or anything without one>")
    vectors = client.embeddings.create(model="all-MiniLM-L6-v2", input=["A man is eating food."]).data

Every request is forwarded to Triton over gRPC through the SDK's `AsyncEmbeddingClient` (one per served model,
created on startup and closed on shutdown), so splitting, deadlines, retries and the error classification stay
in one place (client/retry.py, client/planning.py, client/errors.py); `dimensions` is the SDK's Matryoshka truncation. `usage`
counts real tokens with the model's own tokenizer.json: special tokens included, cut at max_seq_length, as
the server's model sees them.

Stack: Starlette + uvicorn. Starlette is a small ASGI toolkit (routing, requests, responses, lifespan) with
no validation or DI layer to pay for per request, and uvicorn is the standard, well-maintained ASGI server
(graceful SIGTERM shutdown); together they add two pure-Python packages (+ h11, anyio) to the `serve` extra.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}:

    400  invalid JSON, wrong types, empty input, token-id input, bad `dimensions` / `encoding_format`,
         text the server rejects (InvalidInputError)
    401  missing or wrong `Authorization: Bearer <key>` (when an API key is set; /health is never guarded)
    404  unknown model (or path)
    413  a body over max_body_bytes (Content-Length, or the bytes actually streamed)
    429  Triton's queue stayed full through the SDK's retries (ServerOverloadedError), with Retry-After
    503  Triton unavailable through the SDK's retries (ServerUnavailableError), or the route is draining
         (see below), with Retry-After
    504  the SDK's deadline passed (DeadlineExceededError)
    500  anything else (details in the log, not in the response)

Run it as a process (the API key comes from the environment only, never from argv):

    EMBEDLINE_API_KEY=... python -m embedline.serving.openai_api --grpc-url 127.0.0.1:8001 --port 8080 \\
        --model all-MiniLM-L6-v2=/path/artifact/tokenizer.json [--model ...] [--default NAME]

The served models' Triton names and lengths come from the server (the SDK reads its catalog and configs),
so the command line carries only what the server cannot tell: public names and tokenizer files.

`openai_command(...)` builds that command line for a supervisor (serving/launcher.py). The supervisor owns
the listening socket and passes it down (`--fd`): while the route restarts after a crash, new connections wait
in the kernel's accept queue instead of being refused.

Draining (SIGUSR1, sent by the supervisor before it drains Triton): new requests get 503 with Retry-After and
`Connection: close`, /health answers 503 {"status": "draining", "in_flight": N}, and the requests in flight
finish. SIGTERM then stops the process once those are done (uvicorn's graceful shutdown).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tokenizers import Tokenizer

from embedline.client import (
    AsyncEmbeddingClient,
    CollectionNotFoundError,
    DeadlineExceededError,
    EmbeddingClientError,
    InvalidInputError,
    ModelNotFoundError,
    ServerOverloadedError,
    ServerUnavailableError,
)
from embedline.client.results import Hit
from embedline.serving.triton import check_api_key, is_loopback
from embedline.wire import API_KEY_ENV, DEFAULT_PORTS

MODULE = "embedline.serving.openai_api"
log = logging.getLogger(MODULE)  # not __name__: run with -m, that would be "__main__"

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_INPUTS = 2048            # OpenAI's limit on texts per request
MAX_SEARCH_K = 1000          # the most hits per query (the stores' limit)
RETRY_AFTER_S = 1            # the SDK's longest backoff: a retry sooner would meet the same full queue
HEALTH_TIMEOUT_S = 2.0
# Texts counted in a worker thread above this many (tokenizing thousands of texts would stall the event loop).
TOKENIZE_INLINE_MAX = 64
# Requests the route keeps in flight to Triton per model. Above the SDK's default of 4: the route multiplexes
# many HTTP callers, and Triton's bounded queue (not a hidden queue here) is what turns overload away.
DEFAULT_MAX_CONCURRENCY = 64


@dataclass(frozen=True)
class ServedModel:
    """One model the route serves.

    name: the public model name (`model` in requests, `id` in /v1/models); the SDK finds its Triton model
        in the server's catalog (the `served_models` parameter), and its max_seq_length in its config.
    tokenizer_path: the artifact's tokenizer.json, for the token counts of `usage`.
    client_kwargs: extra keyword arguments for its AsyncEmbeddingClient, e.g. {"embed_model": "embed"}
        (a Triton model name, for a repository not built by embedline or another public name for a
        model), {"timeout": 10.0}, {"ssl": True, "root_certificates": "ca.pem"}.
    """

    name: str
    tokenizer_path: str | os.PathLike
    client_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def from_artifact(cls, artifact: Any, name: str | None = None, **client_kwargs: Any) -> ServedModel:
        """The model of an `embedline.artifact.Artifact`, named after it unless `name` is given."""
        return cls(name=name or artifact.name, tokenizer_path=artifact.tokenizer_path, client_kwargs=client_kwargs)


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Drain:
    """Whether the route is draining, and how many embedding requests it has in flight."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0

    def begin(self, *_signal_args) -> None:
        self.draining = True

    def refusal(self) -> ApiError:
        return ApiError(503, "the server is shutting down; retry after a short wait (another replica will answer)",
                        "server_error", code="draining",
                        headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})


def sdk_error(exc: Exception) -> ApiError:
    """The HTTP answer for an exception the SDK raised while embedding (one table, tested on its own)."""
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(exc, ServerOverloadedError):
        return ApiError(429, "the embedding server is overloaded; retry after a short wait",
                        "rate_limit_error", code="server_overloaded", headers=retry)
    if isinstance(exc, ServerUnavailableError):
        return ApiError(503, "the embedding server is unavailable; retry after a short wait",
                        "server_error", code="server_unavailable", headers=retry)
    if isinstance(exc, DeadlineExceededError):
        return ApiError(504, "the embedding server did not answer in time", "server_error", code="timeout")
    if isinstance(exc, InvalidInputError):
        return ApiError(400, str(exc).replace("texts[", "input["), param="input")
    if isinstance(exc, ValueError):  # the SDK's own argument checks: dimensions, prompt_name
        param = next((p for p in ("dimensions", "prompt_name") if p in str(exc)), None)
        return ApiError(400, str(exc), param=param, code="unknown_prompt" if param == "prompt_name" else None)
    return ApiError(500, "the embedding server failed to handle the request", "server_error", code="internal_error")


# ----------------------------------------------------------------------------------------------
# Request parsing


def _invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_input(value: Any) -> list[str]:
    """`input`: a string or a non-empty list of strings; token ids get a message of their own."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _invalid("'input' must be a string or an array of strings", "input")
    if not value:
        raise _invalid("'input' must not be an empty array", "input")
    if all(isinstance(item, str) for item in value):
        if len(value) > MAX_INPUTS:
            raise _invalid(f"'input' has {len(value)} items; at most {MAX_INPUTS} per request", "input")
        return value

    def is_ids(item: Any) -> bool:
        return type(item) is int or (isinstance(item, list) and all(type(t) is int for t in item))

    if all(is_ids(item) for item in value):
        raise _invalid("token ids are not supported as 'input': send the text itself (a string or an array "
                       "of strings); the server tokenizes with the model's own tokenizer", "input",
                       "token_ids_not_supported")
    raise _invalid("'input' must be a string or an array of strings", "input")


def parse_dimensions(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise _invalid(f"'dimensions' must be a positive integer, got {json.dumps(value)}", "dimensions")
    return value


def parse_prompt_name(prompt_name: Any, input_type: Any) -> str | None:
    """The prompt a request names: `prompt_name`, or `input_type` (the name other embedding APIs use for
    "query" / "passage"); both given, they must agree."""
    for key, value in (("prompt_name", prompt_name), ("input_type", input_type)):
        if value is not None and not isinstance(value, str):
            raise _invalid(f"'{key}' must be a string", key)
    if prompt_name is not None and input_type is not None and prompt_name != input_type:
        raise _invalid("'prompt_name' and 'input_type' name different prompts", "prompt_name")
    return prompt_name if prompt_name is not None else input_type


def parse_search(payload: Any) -> tuple[list[str], dict[str, Any]]:
    """-> (queries, keyword arguments of client.search) of a POST /v1/search body; 400 for a bad field."""
    if not isinstance(payload, dict):
        raise _invalid("the request body must be a JSON object")
    if "query" not in payload:
        raise _invalid("'query' is required: a string or an array of strings", "query")
    query = payload["query"]
    queries = [query] if isinstance(query, str) else query
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
        raise _invalid("'query' must be a string or a non-empty array of strings", "query")
    if len(queries) > MAX_INPUTS:
        raise _invalid(f"'query' has {len(queries)} items; at most {MAX_INPUTS} per request", "query")
    k = payload.get("k", 10)
    if type(k) is not int or not 1 <= k <= MAX_SEARCH_K:
        raise _invalid(f"'k' must be an integer from 1 to {MAX_SEARCH_K}, got {json.dumps(k)}", "k")
    for key in ("filter", "collection"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            raise _invalid(f"'{key}' must be a string", key)
    if not isinstance(payload.get("hybrid", False), bool):
        raise _invalid("'hybrid' must be true or false", "hybrid")
    return queries, {"k": k, "filter": payload.get("filter"), "collection": payload.get("collection"),
                     "hybrid": payload.get("hybrid", False)}


def search_body(hits: list[list[Hit]], model: str, tokens: int) -> dict[str, Any]:
    return {"object": "list", "model": model,
            "data": [{"index": i, "hits": [{"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata}
                                           for h in row]} for i, row in enumerate(hits)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def search_error(exc: Exception) -> ApiError:
    """The HTTP answer for an exception client.search raised: 404s of its own, then sdk_error's table."""
    if isinstance(exc, CollectionNotFoundError):
        return ApiError(404, str(exc).split(": ", 1)[-1], param="collection", code="collection_not_found")
    if isinstance(exc, ModelNotFoundError):
        return ApiError(404, "this server serves no search index (start it with `embedline serve --index STORE`)",
                        code="search_not_served")
    if isinstance(exc, InvalidInputError):
        message = str(exc)
        param = next((p for p in ("filter", "k", "collection") if message.lower().find(p) >= 0), "query")
        return ApiError(400, message.split(": INVALID_ARG: ")[-1].split(": INVALID_ARGUMENT: ")[-1], param=param)
    return sdk_error(exc)


def parse_encoding_format(value: Any) -> str:
    if value is None:
        return "float"
    if value not in ("float", "base64"):
        raise _invalid(f"'encoding_format' must be 'float' or 'base64', got {json.dumps(value)}", "encoding_format")
    return value


def encode_vectors(embeddings: np.ndarray, encoding_format: str) -> list[Any]:
    """float: lists of numbers; base64: each vector's little-endian float32 bytes, as OpenAI sends them."""
    if encoding_format == "base64":
        little = np.ascontiguousarray(embeddings, dtype="<f4")
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    return embeddings.tolist()


def embeddings_body(vectors: list[Any], model: str, tokens: int) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)]
    body = {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The model's tokenizer without padding or truncation: len(ids) is the whole text's token count."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def count_tokens(tokenizer: Tokenizer, texts: list[str], max_seq_length: int) -> int:
    """The tokens the model sees: each text's, special tokens included, cut at max_seq_length (truncation
    keeps the special tokens inside that length)."""
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets: ~15% less CPU, same ids.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return sum(min(len(encoding.ids), max_seq_length) for encoding in encode(texts))


# ----------------------------------------------------------------------------------------------
# The app


def create_app(models: Mapping[str, ServedModel], default_model: str, grpc_url: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Starlette:
    """The ASGI app serving `models` (public name -> ServedModel) from the Triton server at `grpc_url`.

    default_model: the name used when a request has no `model`.
    api_key: required from callers as `Authorization: Bearer <key>` (compared in constant time) on every
        route but /health, and sent to Triton by the SDK clients (unless a model's client_kwargs name
        another). None: no key is asked for; the SDK then reads $EMBEDLINE_API_KEY for Triton as usual.
    max_body_bytes: larger request bodies get 413 without being read to the end.

    Tokenizers load here, so a bad path fails before anything is served; the gRPC clients are made on startup.
    Handlers raise ApiError; Starlette's exception handlers turn it, Starlette's own HTTP errors and any bug
    into OpenAI's error shape.
    """
    route = EmbeddingsRoute(models, default_model, grpc_url, api_key, max_body_bytes)
    routes = [
        Route("/v1/embeddings", route.embeddings, methods=["POST"]),
        Route("/v1/search", route.search, methods=["POST"]),
        Route("/v1/models", route.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", route.retrieve_model, methods=["GET"]),
        Route("/health", route.health, methods=["GET"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: internal_error}
    app = Starlette(routes=routes, lifespan=route.lifespan, exception_handlers=handlers)
    app.state.drain = route.drain
    return app


async def api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                    headers=exc.headers).response()


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug still answers in OpenAI's shape; the details go to the log, not to the caller."""
    log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal error", "server_error", code="internal_error").response()


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "embedline"}


class EmbeddingsRoute:
    """The route's state (served models, their tokenizers and SDK clients, the API key, the drain) and its
    handlers, one method each."""

    def __init__(self, models: Mapping[str, ServedModel], default_model: str, grpc_url: str, api_key: str | None,
                 max_body_bytes: int):
        self.models = dict(models)
        check_models(self.models, default_model)
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.default_model, self.grpc_url, self.max_body_bytes = default_model, grpc_url, max_body_bytes
        self.api_key = check_api_key(api_key)
        self.expected_auth = f"Bearer {self.api_key}".encode() if self.api_key else None
        self.tokenizers = {name: load_tokenizer(model.tokenizer_path) for name, model in self.models.items()}
        self.clients: dict[str, AsyncEmbeddingClient] = {}
        self.drain = Drain()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        for name, model in self.models.items():
            kwargs: dict[str, Any] = {"max_concurrency": DEFAULT_MAX_CONCURRENCY}
            if self.api_key:
                kwargs["api_key"] = self.api_key
            if "embed_model" not in model.client_kwargs:
                kwargs["model"] = name  # found in the server's catalog on first use
            self.clients[name] = AsyncEmbeddingClient(self.grpc_url, **{**kwargs, **model.client_kwargs})
        log.info("serving %s from %s (default %s)", ", ".join(self.models), self.grpc_url, self.default_model)
        try:
            yield
        finally:
            for client in self.clients.values():
                await client.close()
            self.clients.clear()

    def authorize(self, request: Request) -> None:
        if self.expected_auth is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # Normalized spelling of the scheme, then one constant-time comparison of the whole header.
        given_bytes = f"Bearer {token.strip()}".encode("utf-8", "replace") if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given_bytes, self.expected_auth):
            message = ("missing API key: send 'Authorization: Bearer <key>'" if not given
                       else "incorrect API key provided")
            raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        too_large = ApiError(413, f"request body is larger than {self.max_body_bytes} bytes",
                             code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise _invalid("invalid Content-Length header")
            if int(length) > self.max_body_bytes:
                raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def embeddings(self, request: Request) -> Response:
        if self.drain.draining:
            raise self.drain.refusal()
        self.drain.in_flight += 1
        try:
            self.authorize(request)
            name, texts, dimensions, encoding_format, prompt = self.parse_request(await self.read_body(request))
            vectors = await self.call_sdk(name, len(texts), self.clients[name].embed(
                texts, dimensions=dimensions, prompt_name=prompt))
            info = await self.call_sdk(name, len(texts), self.clients[name].info())
            prompt = prompt if prompt is not None else (info.default_prompt_name or None)
            seen = [info.prompts[prompt] + text for text in texts] if prompt else texts  # what the model saw
            if len(texts) > TOKENIZE_INLINE_MAX:
                tokens = await asyncio.to_thread(count_tokens, self.tokenizers[name], seen, info.max_seq_length)
            else:
                tokens = count_tokens(self.tokenizers[name], seen, info.max_seq_length)
            content = embeddings_body(encode_vectors(vectors, encoding_format), name, tokens)
            return Response(content, media_type="application/json")
        finally:
            self.drain.in_flight -= 1

    def parse_request(self, body: bytes) -> tuple[str, list[str], int | None, str, str | None]:
        """-> (model name, texts, dimensions, encoding_format, prompt name) of a POST /v1/embeddings body."""
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _invalid(f"the request body is not valid JSON ({exc})") from None
        if not isinstance(payload, dict):
            raise _invalid("the request body must be a JSON object")
        name = payload.get("model")
        if name is None:
            name = self.default_model
        elif not isinstance(name, str):
            raise _invalid("'model' must be a string", "model")
        if "input" not in payload:
            raise _invalid("'input' is required", "input")
        texts = parse_input(payload["input"])
        dimensions = parse_dimensions(payload.get("dimensions"))
        encoding_format = parse_encoding_format(payload.get("encoding_format"))
        prompt = parse_prompt_name(payload.get("prompt_name"), payload.get("input_type"))
        if name not in self.models:
            raise ApiError(404, f"the model '{name}' does not exist; served: {', '.join(sorted(self.models))}",
                           param="model", code="model_not_found")
        return name, texts, dimensions, encoding_format, prompt

    async def call_sdk(self, name: str, n_texts: int, call: Awaitable[Any]) -> Any:
        """An SDK call's result; its errors as OpenAI's (sdk_error). `info()` is cached by the client after
        its first answer, so the model's max_seq_length costs one look-up per model."""
        try:
            return await call
        except ModelNotFoundError as exc:
            raise ApiError(404, f"the model '{name}' is not served by the embedding server", param="model",
                           code="model_not_found") from exc
        except (EmbeddingClientError, ValueError) as exc:
            error = sdk_error(exc)
            log_at = logging.WARNING if error.status >= 500 else logging.DEBUG
            log.log(log_at, "embedding %d text(s) with %s failed: %s", n_texts, name, exc)
            raise error from exc

    async def search(self, request: Request) -> Response:
        """POST /v1/search: the served index's k best documents per query (the SDK's search)."""
        if self.drain.draining:
            raise self.drain.refusal()
        self.drain.in_flight += 1
        try:
            self.authorize(request)
            body = await self.read_body(request)
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise _invalid(f"the request body is not valid JSON ({exc})") from None
            queries, options = parse_search(payload)
            name = payload.get("model") or self.default_model
            if name != self.default_model:
                raise ApiError(404, f"search is served with the model '{self.default_model}', not '{name}'",
                               param="model", code="model_not_found")
            client = self.clients[name]
            try:
                hits = await client.search(queries, **options)
                info = await client.info()
            except (EmbeddingClientError, ValueError) as exc:
                error = search_error(exc)
                log.log(logging.WARNING if error.status >= 500 else logging.DEBUG, "search failed: %s", exc)
                raise error from exc
            tokens = count_tokens(self.tokenizers[name], queries, info.max_seq_length)
            return JSONResponse(search_body(hits, name, tokens))
        finally:
            self.drain.in_flight -= 1

    async def list_models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [model_object(name) for name in self.models]})

    async def retrieve_model(self, request: Request) -> Response:
        self.authorize(request)
        name = request.path_params["model"]
        if name not in self.models:
            raise ApiError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return JSONResponse(model_object(name))

    async def health(self, request: Request) -> Response:
        if self.drain.draining:
            return JSONResponse({"status": "draining", "in_flight": self.drain.in_flight}, status_code=503)
        checks = await asyncio.gather(*(client.health(timeout=HEALTH_TIMEOUT_S) for client in self.clients.values()))
        healthy = bool(self.clients) and all(checks)
        return JSONResponse({"status": "ok" if healthy else "unavailable"}, status_code=200 if healthy else 503)


def check_models(models: dict[str, ServedModel], default_model: str) -> None:
    if not models:
        raise ValueError("create_app needs at least one model")
    for name, model in models.items():
        if name != model.name:
            raise ValueError(f"models[{name!r}] is named {model.name!r}; key the mapping by ServedModel.name")
    if default_model not in models:
        raise ValueError(f"default model {default_model!r} is not one of the served models {sorted(models)}")


# ----------------------------------------------------------------------------------------------
# The process


def name_value(option: str, spec: str) -> tuple[str, str]:
    """NAME=VALUE -> (NAME, VALUE), for --model and --triton-model."""
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{option} {spec!r}: expected NAME=VALUE")
    return name, value


def model_arguments(model: ServedModel) -> list[str]:
    """The command-line form of one served model: --model NAME=TOKENIZER_JSON [--triton-model NAME=MODEL]."""
    extra = set(model.client_kwargs) - {"embed_model"}
    if extra:
        raise ValueError(f"model {model.name!r}: client_kwargs {sorted(extra)} have no command-line form "
                         "(only embed_model; timeout, retries and TLS are options of the whole process)")
    argv = ["--model", f"{model.name}={model.tokenizer_path}"]
    if "embed_model" in model.client_kwargs:
        argv += ["--triton-model", f"{model.name}={model.client_kwargs['embed_model']}"]
    return argv


def openai_command(grpc_url: str, models: Sequence[ServedModel], *, host: str = "127.0.0.1",
                   port: int = DEFAULT_PORTS["openai"], default_model: str | None = None, timeout: float | None = None,
                   max_retries: int | None = None, max_body_bytes: int | None = None,
                   grpc_root_certificates: str | os.PathLike | None = None, drain_timeout: float | None = None,
                   insecure: bool = False, access_log: bool = False, python: str = sys.executable) -> list[str]:
    """The argv that runs the route as a child process (`subprocess.Popen(argv, env=...)`).

    The API key is not part of it: pass it in the child's environment as EMBEDLINE_API_KEY.
    """
    if not models:
        raise ValueError("openai_command needs at least one model")
    argv = [python, "-m", MODULE, "--grpc-url", grpc_url, "--host", host, "--port", str(port)]
    for model in models:
        argv += model_arguments(model)
    options = {"--default": default_model, "--timeout": timeout, "--max-retries": max_retries,
               "--max-body-bytes": max_body_bytes, "--grpc-root-certificates": grpc_root_certificates,
               "--drain-timeout": drain_timeout}
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    if insecure:
        argv.append("--insecure")
    if access_log:
        argv.append("--access-log")
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="OpenAI-compatible embeddings API (POST /v1/embeddings) forwarding to Triton over gRPC. "
                    f"The API key, if any, is read from ${API_KEY_ENV}.")
    parser.add_argument("--grpc-url", required=True, help="the Triton server's gRPC host:port")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs a key or --insecure)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORTS["openai"])
    parser.add_argument("--fd", type=int, default=None,
                        help="serve on this inherited listening socket (bound by the supervisor) instead of "
                             "binding --host:--port")
    parser.add_argument("--model", dest="models", action="append", required=True, metavar="NAME=TOKENIZER_JSON",
                        type=lambda spec: name_value("--model", spec),
                        help="a served model: its public name (found in the server's catalog, which also gives "
                             "its max_seq_length) and its tokenizer.json; repeat for several")
    parser.add_argument("--triton-model", dest="triton_models", action="append", default=[],
                        metavar="NAME=TRITON_MODEL", type=lambda spec: name_value("--triton-model", spec),
                        help="the Triton model behind public name NAME, where the catalog does not say "
                             "(a repository not built by embedline, or a second name for a model)")
    parser.add_argument("--default", default=None, help="model for requests without one (default: the first)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one request may take in Triton, retries included (SDK default: 30)")
    parser.add_argument("--max-retries", type=int, default=None,
                        help="SDK retries of an overloaded or unavailable server within the timeout (default: SDK's)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--grpc-root-certificates", default=None,
                        help="PEM CA file: talk to Triton's gRPC over TLS")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish on SIGTERM")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def app_from_args(args: argparse.Namespace, api_key: str | None) -> Starlette:
    if not is_loopback(args.host) and api_key is None and not args.insecure:
        raise ValueError(f"refusing to serve on {args.host} without an API key: set {API_KEY_ENV}, "
                         "or pass --insecure to serve openly")
    names = [name for name, _ in args.models]
    if len(set(names)) != len(names):
        raise ValueError(f"--model names must be unique, got {names}")
    triton_models = dict(args.triton_models)
    if set(triton_models) - set(names):
        raise ValueError(f"--triton-model names no --model: {sorted(set(triton_models) - set(names))}")
    shared: dict[str, Any] = {}
    if args.timeout is not None:
        shared["timeout"] = args.timeout
    if args.max_retries is not None:
        shared["max_retries"] = args.max_retries
    if args.grpc_root_certificates is not None:
        shared.update(ssl=True, root_certificates=args.grpc_root_certificates)
    models = {name: ServedModel(name, path, {**shared, **({"embed_model": triton_models[name]}
                                                          if name in triton_models else {})})
              for name, path in args.models}
    return create_app(models, args.default or names[0], args.grpc_url, api_key=api_key,
                      max_body_bytes=args.max_body_bytes)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        api_key = check_api_key(os.environ.get(API_KEY_ENV))
        for name, path in args.models:
            if not Path(path).is_file():
                raise ValueError(f"--model {name}: no tokenizer file {path}")
        app = app_from_args(args, api_key)
    except Exception as exc:  # a bad option or tokenizer file (tokenizers raises plain Exception): one line
        log.error("%s", exc)
        return 2
    config = uvicorn.Config(app, host=args.host, port=args.port, workers=1, log_config=None, lifespan="on",
                            access_log=args.access_log, log_level=args.log_level, server_header=False,
                            timeout_graceful_shutdown=args.drain_timeout)
    server = uvicorn.Server(config)
    # uvicorn turns SIGTERM / SIGINT into a graceful shutdown, restores the handlers it found and re-raises the
    # signal it caught; with these no-op handlers in place that re-raise does not kill the process, so a
    # SIGTERM ends in exit 0 after in-flight requests finish.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    signal.signal(signal.SIGUSR1, app.state.drain.begin)
    server.run(sockets=[socket.socket(fileno=args.fd)] if args.fd is not None else None)
    if not server.started:
        log.error("the server did not start (is port %d on %s in use?)", args.port, args.host)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
