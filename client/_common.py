"""What the sync and asyncio clients share: result types, input validation, request planning,
the wire encoding of the `embed` / `classify` contract, and the retry/deadline policy.

Nothing here does I/O, so both clients run exactly the same logic and it is unit-testable without a
server. The wire contract is model_repository/README.md:

    embed     in  text [n, 1] BYTES (UTF-8)   out  sentence_embedding [n, dim] FP32, truncated [n, 1] BOOL
    classify  in  text [n, 1] BYTES (UTF-8)   out  label [n, 1] BYTES, probabilities [n, num_labels] FP32,
                                                   truncated [n, 1] BOOL (+ neighbour_labels [n, k] BYTES
                                                   when the config's `neighbours` parameter k > 0)
    config parameters (strings): model_name, dim, max_seq_length, variant, pooling (+ labels: JSON list)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedline.client.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ServerError,
    ServerUnavailableError,
    from_triton_error,
)

EMBED_MODEL = "embed"
CLASSIFY_MODEL = "classify"
TEXT_INPUT = "text"
EMBEDDING_OUTPUT = "sentence_embedding"
TRUNCATED_OUTPUT = "truncated"
LABEL_OUTPUT = "label"
PROBABILITIES_OUTPUT = "probabilities"
NEIGHBOURS_OUTPUT = "neighbour_labels"

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_CONCURRENCY = 4


# ----------------------------------------------------------------------------------------------
# Public result types


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about the model it serves (read once from the model configs, then cached).

    `labels` is the `classify` model's label order, empty when the server has no `classify` model.
    """

    model_name: str
    dim: int
    max_seq_length: int
    variant: str
    pooling: str
    max_batch_size: int
    labels: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class EmbedResult:
    """Embeddings plus, per text, whether the server cut it to max_seq_length tokens.

    embeddings: (n, dim) float32, L2-normalized, in input order
    truncated:  (n,) bool
    """

    embeddings: np.ndarray
    truncated: np.ndarray

    def __len__(self) -> int:
        return len(self.embeddings)


@dataclass(frozen=True)
class Prediction:
    """One text's classification: the top label, its probability, all probabilities by label."""

    label: str
    score: float
    probabilities: dict[str, float] = field(hash=False)
    truncated: bool = False
    # Labels of the k training examples nearest to the text, nearest first, when the server keeps them
    # (an artifact trained with `--neighbours K`); mixed labels flag a doubtful prediction. Else ().
    neighbour_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class _ModelSpec:
    """The parts of one model's config the client uses."""

    name: str
    max_batch_size: int
    parameters: dict[str, str] = field(hash=False)


# ----------------------------------------------------------------------------------------------
# Input validation and request planning


def validate_url(url: str) -> str:
    """gRPC urls are `host:port`; a scheme is the usual mistake of passing the HTTP url."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"url must be 'host:port', got {url!r}")
    url = url.strip()
    if "://" in url:
        raise ValueError(f"url must be the gRPC 'host:port' without a scheme, got {url!r}")
    return url


def validate_texts(texts: Iterable[str]) -> list[str]:
    """A list of str, checked before anything is sent.

    A bare str is refused because iterating it would embed its characters one by one. A str that
    cannot be encoded as UTF-8 (a lone surrogate) is refused here too: the server would only reject
    the whole request with a vaguer message.
    """
    if isinstance(texts, (str, bytes, bytearray)):
        raise TypeError(f"texts must be a list of str, got a single {type(texts).__name__}; wrap it in a list")
    try:
        items = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}") from None
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    for i, text in enumerate(items):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"texts[{i}] cannot be encoded as UTF-8 ({exc.reason})") from None
    return items


def plan_chunks(texts: list[str], batch_size: int) -> list[list[int]]:
    """Split indices of `texts` into requests of at most `batch_size`, grouped by text length.

    The server pads each batch to its longest text, so sorting by length first keeps a short text
    from paying for a long one's padding. The sort is stable (equal lengths keep input order) and
    the caller puts results back with the returned indices. Character length stands in for token
    count: it orders texts the same way closely enough, without a tokenizer on the client.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def effective_batch_size(spec: _ModelSpec, requested: int | None, url: str) -> int:
    """Texts per request: the caller's choice, never more than the model's max_batch_size."""
    if spec.max_batch_size < 1:
        raise ServerError(f"model '{spec.name}' at {url} has max_batch_size {spec.max_batch_size}; "
                          "embedline models batch texts, was the repository built by `embedline build-repo`?")
    return spec.max_batch_size if requested is None else max(1, min(requested, spec.max_batch_size))


def validate_batch_size(batch_size: int | None) -> int | None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return batch_size


# ----------------------------------------------------------------------------------------------
# Wire encoding (tritonclient objects are passed in as a module so sync and aio share this code)


def text_input(grpcclient: Any, texts: list[str]) -> Any:
    """The `text` input: shape [n, 1], BYTES, each element the text's UTF-8 bytes."""
    data = np.empty((len(texts), 1), dtype=np.object_)
    for i, text in enumerate(texts):
        data[i, 0] = text.encode("utf-8")
    infer_input = grpcclient.InferInput(TEXT_INPUT, list(data.shape), "BYTES")
    infer_input.set_data_from_numpy(data)
    return infer_input


def requested_outputs(grpcclient: Any, names: tuple[str, ...]) -> list[Any]:
    return [grpcclient.InferRequestedOutput(name) for name in names]


EMBED_OUTPUTS = (EMBEDDING_OUTPUT, TRUNCATED_OUTPUT)
CLASSIFY_OUTPUTS = (LABEL_OUTPUT, PROBABILITIES_OUTPUT, TRUNCATED_OUTPUT)


def _output(result: Any, name: str, n: int, model: str, url: str) -> np.ndarray:
    array = result.as_numpy(name)
    if array is None or len(array) != n:
        got = "nothing" if array is None else f"{len(array)} rows"
        raise ServerError(f"model '{model}' at {url} returned {got} for output '{name}', expected {n} rows")
    return array


def parse_embed(result: Any, n: int, url: str, model: str = EMBED_MODEL) -> tuple[np.ndarray, np.ndarray]:
    """-> embeddings (n, dim) float32, truncated (n,) bool."""
    embeddings = _output(result, EMBEDDING_OUTPUT, n, model, url)
    truncated = _output(result, TRUNCATED_OUTPUT, n, model, url)
    return np.asarray(embeddings, dtype=np.float32).reshape(n, -1), np.asarray(truncated, dtype=bool).reshape(n)


def classify_outputs(spec: _ModelSpec) -> tuple[str, ...]:
    """The outputs to request from `classify`: neighbour labels too when its config says it has them."""
    try:
        neighbours = int(spec.parameters.get("neighbours", "0") or 0)
    except ValueError:
        neighbours = 0
    return CLASSIFY_OUTPUTS + ((NEIGHBOURS_OUTPUT,) if neighbours > 0 else ())


def _decode(raw: Any) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)


def parse_classify(result: Any, n: int, labels: tuple[str, ...], url: str,
                   model: str = CLASSIFY_MODEL, neighbours: bool = False) -> list[Prediction]:
    raw_labels = _output(result, LABEL_OUTPUT, n, model, url).reshape(n)
    neighbour_rows = _output(result, NEIGHBOURS_OUTPUT, n, model, url).reshape(n, -1) if neighbours else None
    probabilities = np.asarray(_output(result, PROBABILITIES_OUTPUT, n, model, url), dtype=np.float32).reshape(n, -1)
    truncated = np.asarray(_output(result, TRUNCATED_OUTPUT, n, model, url), dtype=bool).reshape(n)
    if probabilities.shape[1] != len(labels):
        raise ServerError(f"model '{model}' at {url} returned {probabilities.shape[1]} probabilities "
                          f"but its config lists {len(labels)} labels")
    predictions = []
    for i, (row, raw, cut) in enumerate(zip(probabilities, raw_labels, truncated)):
        label = _decode(raw)
        by_label = {name: float(p) for name, p in zip(labels, row)}
        # The server names the label; its probability is the score (argmax if the names disagree).
        score = by_label.get(label, float(row.max()))
        near = tuple(_decode(x) for x in neighbour_rows[i]) if neighbour_rows is not None else ()
        predictions.append(Prediction(label=label, score=score, probabilities=by_label, truncated=bool(cut),
                                      neighbour_labels=near))
    return predictions


def assemble_embeddings(n: int, dim: int, chunks: list[list[int]],
                        parts: list[tuple[np.ndarray, np.ndarray]]) -> EmbedResult:
    """Put per-request results back in input order."""
    embeddings = np.empty((n, dim), dtype=np.float32)
    truncated = np.zeros(n, dtype=bool)
    for indices, (chunk_embeddings, chunk_truncated) in zip(chunks, parts):
        if chunk_embeddings.shape[1] != dim:
            raise ServerError(f"server returned {chunk_embeddings.shape[1]}-d embeddings, config says {dim}")
        embeddings[indices] = chunk_embeddings
        truncated[indices] = chunk_truncated
    return EmbedResult(embeddings=embeddings, truncated=truncated)


def assemble_predictions(n: int, chunks: list[list[int]], parts: list[list[Prediction]]) -> list[Prediction]:
    predictions: list[Prediction | None] = [None] * n
    for indices, chunk_predictions in zip(chunks, parts):
        for i, prediction in zip(indices, chunk_predictions):
            predictions[i] = prediction
    return predictions  # type: ignore[return-value]  # every index is covered by exactly one chunk


# ----------------------------------------------------------------------------------------------
# Model config -> ModelSpec / ModelInfo


def parse_model_config(response: Any) -> _ModelSpec:
    """A tritonclient ModelConfigResponse (protobuf) -> the parts the client needs."""
    config = response.config
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    return _ModelSpec(name=config.name, max_batch_size=int(config.max_batch_size), parameters=parameters)


def _parameter(spec: _ModelSpec, key: str, url: str) -> str:
    try:
        return spec.parameters[key]
    except KeyError:
        raise ServerError(f"model '{spec.name}' at {url} has no config parameter '{key}'; "
                          "was its repository built by `embedline build-repo`?") from None


def spec_dim(spec: _ModelSpec, url: str) -> int:
    return int(_parameter(spec, "dim", url))


def spec_labels(spec: _ModelSpec, url: str) -> tuple[str, ...]:
    raw = _parameter(spec, "labels", url)
    try:
        labels = json.loads(raw)
    except json.JSONDecodeError:
        labels = None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ServerError(f"model '{spec.name}' at {url}: parameter 'labels' is not a JSON list of strings: {raw!r}")
    return tuple(labels)


def build_info(embed: _ModelSpec, classify: _ModelSpec | None, url: str) -> ModelInfo:
    return ModelInfo(
        model_name=_parameter(embed, "model_name", url),
        dim=spec_dim(embed, url),
        max_seq_length=int(_parameter(embed, "max_seq_length", url)),
        variant=_parameter(embed, "variant", url),
        pooling=embed.parameters.get("pooling", ""),
        max_batch_size=embed.max_batch_size,
        labels=spec_labels(classify, url) if classify is not None else (),
    )


def classify_missing_message(url: str, model: str = CLASSIFY_MODEL) -> str:
    return (f"server at {url} has no '{model}' model: it serves an artifact without a classifier head "
            "(train one with `embedline train-classifier`); embed still works")


# ----------------------------------------------------------------------------------------------
# Deadlines and retries


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for UNAVAILABLE.

    Retry k (0-based) waits min(max_backoff, initial_backoff * multiplier**k). A retry is skipped,
    and the UNAVAILABLE error raised, when its wait would not leave the next attempt any time before
    the call's deadline: a call never outlives its timeout to retry.
    """

    max_retries: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError(f"invalid retry policy: {self}")

    def delay(self, retry: int) -> float:
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** retry)


# The smallest time worth giving an attempt: below it a retry can only fail with DEADLINE_EXCEEDED.
MIN_ATTEMPT_S = 0.01


class Deadline:
    """The end of one public call; every RPC of the call (config, chunks, retries) shares it."""

    def __init__(self, timeout: float, clock=time.monotonic):
        if not timeout or timeout <= 0 or math.isnan(timeout):
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self._clock = clock
        self._end = clock() + self.timeout

    def remaining(self) -> float:
        return self._end - self._clock()


class Retrier:
    """The retry state of one RPC within a call; the sync and async loops drive it the same way:

        retrier = Retrier(policy, deadline, url, model)
        while True:
            try:
                return rpc(client_timeout=retrier.attempt_timeout())
            except InferenceServerException as exc:
                sleep(retrier.backoff(exc))      # or raises the classified error
    """

    def __init__(self, policy: RetryPolicy, deadline: Deadline, url: str, model: str | None):
        self.policy = policy
        self.deadline = deadline
        self.url = url
        self.model = model
        self.attempts = 0

    def attempt_timeout(self) -> float:
        """The gRPC client_timeout of the next attempt: what is left of the call's deadline."""
        remaining = self.deadline.remaining()
        if remaining < MIN_ATTEMPT_S:
            raise DeadlineExceededError(self._timeout_text(), status=None)
        self.attempts += 1
        return remaining

    def backoff(self, exc: BaseException) -> float:
        """Seconds to wait before retrying `exc`; raises the classified error when not retrying.

        Must be called inside the `except` block so the raised error chains to `exc`.
        """
        error = from_triton_error(exc, url=self.url, model=self.model)
        if isinstance(error, DeadlineExceededError):
            raise DeadlineExceededError(self._timeout_text(), status=error.status) from exc
        if not isinstance(error, ServerUnavailableError):
            raise error from exc
        retry = self.attempts - 1
        delay = self.policy.delay(retry)
        if retry >= self.policy.max_retries or delay + MIN_ATTEMPT_S > self.deadline.remaining():
            raise ServerUnavailableError(
                f"{error} [gave up after {self.attempts} attempt(s) within the "
                f"{self.deadline.timeout:g} s timeout]", status=error.status) from exc
        return delay

    def _timeout_text(self) -> str:
        where = f"model '{self.model}' at {self.url}" if self.model else f"server at {self.url}"
        return f"{where} did not answer within the {self.deadline.timeout:g} s timeout"


def resolve_timeout(timeout: float | None, default: float) -> float:
    value = default if timeout is None else timeout
    if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {value!r}")
    return float(value)



def channel_args(grpcclient: Any) -> list[tuple[str, Any]]:
    """gRPC channel options: tritonclient's defaults plus a faster reconnect schedule.

    tritonclient uses these exact defaults when `channel_args` is not given; passing our own list
    replaces them all, so they are restated. gRPC waits 1 s (growing to 120 s) before reconnecting
    to a server it failed to reach, failing calls immediately meanwhile; our retries back off on a
    50 ms..1 s scale, so the channel must be willing to reconnect on that scale too. (Not
    `grpc.min_reconnect_backoff_ms`: despite the name it is the connect timeout.)
    """
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
