"""What the sync and asyncio clients share: result types, input validation, request planning,
the wire encoding of the `embed` / `classify` contract, connection settings (replica urls, API key,
TLS), replica choice, and the retry/deadline policy.

Nothing here does I/O, so both clients run exactly the same logic and it is unit-testable without a
server. The wire contract (model and tensor names, config parameters) is embedline/wire.py.

How one RPC is sent (`Retrier`, driven the same way by both clients):

    * it goes to the next replica in round-robin order (`Replicas`), skipping one that failed in
      the last REPLICA_COOLDOWN_S seconds unless every replica did;
    * it carries what is left of the call's deadline twice: as gRPC's client_timeout (seconds) and
      as Triton's per-request `timeout` (microseconds), so the server can drop it from its queue
      once the caller has given up;
    * a retryable failure (`errors.is_retryable`: unavailable or overloaded) fails over at once to a
      replica this call has not tried yet; once every replica was tried it backs off (full jitter,
      `RetryPolicy`) and starts another round, never past the deadline;
    * anything else raises its classified error (`errors.from_triton_error`) at once.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedline import wire
from embedline.client.errors import (
    API_KEY_ENV,
    DeadlineExceededError,
    EmbeddingClientError,
    InvalidInputError,
    ModelNotFoundError,
    ServerError,
    from_triton_error,
    is_retryable,
    status_and_message,
)
from embedline.wire import (
    CLASSIFY_MODEL,
    EMBED_MODEL,
    EMBEDDING_OUTPUT,
    LABEL_OUTPUT,
    NEIGHBOURS_OUTPUT,
    PROBABILITIES_OUTPUT,
    TEXT_INPUT,
    TRUNCATED_OUTPUT,
)

DEFAULT_URL = f"127.0.0.1:{wire.DEFAULT_PORTS['grpc']}"
DEFAULT_TIMEOUT_S = 30.0
# `max_concurrency` as given by the callers that want the old fixed value; the default (None) is the
# automatic choice of `plan_requests`.
DEFAULT_MAX_CONCURRENCY = 4
# Automatic request planning for lists longer than one request (`plan_requests`): texts per request
# when the server does not say how many its length groups hold (the server's default
# length_group_size), and the bounds on requests in flight.
DEFAULT_GROUP_SIZE = 32
MIN_AUTO_IN_FLIGHT = 4
MAX_AUTO_IN_FLIGHT = 64
# Retries are bounded by the call's deadline: a server restart (a few seconds) or a burst that fills
# the queue is ridden out inside it. The count (about 50 s of waits with the default backoff) only
# caps calls given a very long timeout.
DEFAULT_MAX_RETRIES = 100
DEFAULT_INITIAL_BACKOFF_S = 0.05
DEFAULT_MAX_BACKOFF_S = 1.0
# How long a replica that just failed is passed over while another one is not cooling down.
REPLICA_COOLDOWN_S = 1.0


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
    # Every model the server serves, by name (the first is the default); `model=` takes one of these.
    served_models: tuple[str, ...] = ()
    # The dims a Matryoshka loss trained the model for (`embed(..., dimensions=k)` keeps quality at
    # these); empty when it was not trained for truncation, which then still works but loses more.
    matryoshka_dims: tuple[int, ...] = ()
    # Non-empty when the server's CPU has other int8 instructions than the one that exported the model
    # and chose its variant by speed: the variant may not be the fastest there.
    host_warning: str = ""


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
    url: str = ""  # the replica it was read from, named by errors about the config
    instances: int = 1       # model instances (instance_group counts summed): batches run side by side
    max_queue_size: int = 0  # the dynamic batcher's queue bound; 0: unbounded (or not said)


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


def validate_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """One `host:port`, or a list / tuple of them (replicas of the same server) -> a tuple of urls."""
    if not isinstance(url, (list, tuple)):
        return (validate_url(url),)
    if not url:
        raise ValueError("url is an empty list; give at least one 'host:port'")
    urls = tuple(validate_url(item) for item in url)
    if len(set(urls)) != len(urls):
        raise ValueError(f"url lists a replica more than once: {list(urls)}")
    return urls


def describe_urls(urls: Sequence[str]) -> str:
    """How messages name the server when no single replica is to blame."""
    return urls[0] if len(urls) == 1 else "replicas " + ", ".join(urls)


def resolve_api_key(api_key: str | None) -> str | None:
    """The API key: the argument, else $EMBEDLINE_API_KEY; empty (or blank) means no key.

    Messages here never quote the key, not even a malformed one.
    """
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV, "")
    if not isinstance(api_key, str):
        raise TypeError(f"api_key must be a str or None, got {type(api_key).__name__}")
    api_key = api_key.strip()
    if api_key and not (api_key.isascii() and api_key.isprintable()):
        raise ValueError(f"api_key (or {API_KEY_ENV}) must be printable ASCII: it is sent as a gRPC header")
    return api_key or None


def auth_headers(api_key: str | None) -> dict[str, str] | None:
    """The gRPC metadata every RPC carries with a key, or None without one.

    Triton's restricted protocols check a gRPC header under a `triton-grpc-protocol-` prefix (HTTP takes
    the plain name), so the key goes under both names: the prefixed one is what the embedline server
    checks, the plain one what a proxy or gateway in front of it would.
    """
    if not api_key:
        return None
    value = f"Bearer {api_key}"
    return {"authorization": value, "triton-grpc-protocol-authorization": value}


def tls_arguments(ssl: bool, root_certificates: str | None) -> dict[str, Any]:
    """tritonclient's `ssl` / `root_certificates` arguments, checked when the client is built.

    tritonclient reads the PEM file when it opens a channel, which the asyncio client does only at
    its first call: a missing file is reported here instead.
    """
    if root_certificates is not None:
        if not ssl:
            raise ValueError("root_certificates is only used with ssl=True")
        if not os.path.isfile(root_certificates):
            raise ValueError(f"root_certificates: no such file {root_certificates!r}")
    return {"ssl": bool(ssl), "root_certificates": root_certificates}


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
    """Split indices of `texts` into requests of at most `batch_size`, grouped by text length, longest first.

    The server pads each batch to its longest text, so sorting by length first keeps a short text
    from paying for a long one's padding. The requests go out in the returned order, and the costliest
    (longest texts) go first: the call ends when its last requests do, and short ones at the end
    leave an instance idle for less time while the other finishes (longest-processing-time-first
    scheduling; benchmarks/README.md, "Corpus call"). The sort is stable (equal lengths keep input
    order) and the caller puts results back with the returned indices. Character length stands in for
    token count: it orders texts the same way closely enough, without a tokenizer on the client.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class RequestPlan:
    """How one call's list is sent: texts per request and requests in flight at once."""

    batch_size: int
    in_flight: int


def plan_requests(n_texts: int, max_batch_size: int, *, instances: int = 1, group_size: int = DEFAULT_GROUP_SIZE,
                  max_queue_size: int = 0, batch_size: int | None = None,
                  max_concurrency: int | None = None) -> RequestPlan:
    """Texts per request and requests in flight for a call of `n_texts` texts, from the server's config.

    An explicit `batch_size` (capped at max_batch_size) or `max_concurrency` is kept as given.
    Otherwise:

    * a list that fits in one request (n <= max_batch_size) goes as one request;
    * a longer list is cut into requests of min(max_batch_size, group_size) texts: the size of one
      of the server's length groups (its `length_group_size`: 32, or 64 for OpenVINO), so each request
      is one engine run of texts of about the same length;
    * 2 x (the texts the server's instances batch at once: max_batch_size x instances) / batch size
      requests are kept in flight (at least 4, at most 64 and at most the server's queue bound): while
      one dynamic batch runs, the next one is already queued, and no more. Requests beyond that only
      wait in the server's queue, and on a machine where client and server share the cores, the
      client's extra threads took CPU from the server: measured on 2 shared cores with a
      one-instance server (max_batch_size 64), 32-text requests x 4 in flight beat 64 x 4, 32 x 8,
      32 x 16 and 64 x 16 (benchmarks/README.md, "Corpus call").
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if batch_size is not None:
        size = max(1, min(batch_size, max_batch_size))
    elif n_texts <= max_batch_size:
        size = max_batch_size
    else:
        size = max(1, min(max_batch_size, group_size))
    if max_concurrency is not None:
        return RequestPlan(size, max(1, max_concurrency))
    batched = 2 * max_batch_size * max(1, instances)
    in_flight = min(MAX_AUTO_IN_FLIGHT, max(MIN_AUTO_IN_FLIGHT, -(-batched // size)))
    if max_queue_size > 0:
        in_flight = min(in_flight, max_queue_size)
    return RequestPlan(size, max(1, in_flight))


def spec_group_size(spec: _ModelSpec) -> int:
    """The server's length group size (its `length_group_size` parameter), else DEFAULT_GROUP_SIZE."""
    try:
        value = wire.read(spec.parameters, "length_group_size", DEFAULT_GROUP_SIZE)
    except ValueError:
        value = DEFAULT_GROUP_SIZE
    return value if value >= 1 else DEFAULT_GROUP_SIZE


def plan_for_spec(spec: _ModelSpec, n_texts: int, batch_size: int | None, max_concurrency: int | None,
                  url: str) -> RequestPlan:
    """`plan_requests` for a call of `n_texts` texts to the model of `spec`."""
    effective_batch_size(spec, batch_size, url)  # a config without batching is refused here
    return plan_requests(n_texts, spec.max_batch_size, instances=spec.instances, group_size=spec_group_size(spec),
                         max_queue_size=spec.max_queue_size, batch_size=batch_size,
                         max_concurrency=max_concurrency)


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
        neighbours = wire.read(spec.parameters, "neighbours", 0)
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


def check_dimensions(dimensions: int | None, dim: int) -> int | None:
    """`dimensions` as an int from 1 to `dim` (None stays None), checked before anything is sent."""
    if dimensions is None:
        return None
    if isinstance(dimensions, bool) or not isinstance(dimensions, (int, np.integer)) or not 1 <= dimensions <= dim:
        raise ValueError(f"dimensions must be an int from 1 to the model's dim {dim}, got {dimensions!r}")
    return int(dimensions)


def truncate_dimensions(result: EmbedResult, dimensions: int | None, dim: int) -> EmbedResult:
    """Matryoshka truncation: the first `dimensions` components of each row, re-normalized to unit length.

    None keeps all `dim` components. Anything but an int from 1 to `dim` is a ValueError naming the
    model's dim. A row whose first components are all zero stays zero (no division by zero). How well
    a shortened vector works depends on the model: one trained with a Matryoshka loss keeps most of its
    quality at a fraction of its dim, others lose more.
    """
    dimensions = check_dimensions(dimensions, dim)
    if dimensions is None or dimensions == dim:
        return result
    head = result.embeddings[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    embeddings = (head / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return EmbedResult(embeddings=embeddings, truncated=result.truncated)


def assemble_predictions(n: int, chunks: list[list[int]], parts: list[list[Prediction]]) -> list[Prediction]:
    predictions: list[Prediction | None] = [None] * n
    for indices, chunk_predictions in zip(chunks, parts):
        for i, prediction in zip(indices, chunk_predictions):
            predictions[i] = prediction
    return predictions  # type: ignore[return-value]  # every index is covered by exactly one chunk


# ----------------------------------------------------------------------------------------------
# Model config -> ModelSpec / ModelInfo


def parse_model_config(response: Any, url: str = "") -> _ModelSpec:
    """A tritonclient ModelConfigResponse (protobuf) from replica `url` -> the parts the client needs."""
    config = response.config
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    instances = sum(max(1, int(group.count)) for group in config.instance_group) or 1
    max_queue_size = 0
    if config.HasField("dynamic_batching"):
        max_queue_size = int(config.dynamic_batching.default_queue_policy.max_queue_size)
    return _ModelSpec(name=config.name, max_batch_size=int(config.max_batch_size), parameters=parameters, url=url,
                      instances=instances, max_queue_size=max_queue_size)


def _parameter(spec: _ModelSpec, key: str, url: str, default: Any = None) -> Any:
    """The typed value of a config parameter (embedline/wire.py); `default` where an older server lacks
    it, ServerError where a required one is missing or does not parse."""
    try:
        value = wire.read(spec.parameters, key, default)
    except ValueError as exc:
        raise ServerError(f"model '{spec.name}' at {url}: {exc}") from None
    if value is None:
        raise ServerError(f"model '{spec.name}' at {url} has no config parameter '{key}'; "
                          "was its repository built by `embedline build-repo`?")
    return value


def spec_dim(spec: _ModelSpec, url: str) -> int:
    return _parameter(spec, "dim", url)


def spec_labels(spec: _ModelSpec, url: str) -> tuple[str, ...]:
    labels = _parameter(spec, "labels", url)
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ServerError(f"model '{spec.name}' at {url}: parameter 'labels' is not a JSON list of strings: "
                          f"{spec.parameters.get('labels')!r}")
    return tuple(labels)


def build_info(embed: _ModelSpec, classify: _ModelSpec | None, url: str) -> ModelInfo:
    return ModelInfo(
        model_name=_parameter(embed, "model_name", url),
        dim=spec_dim(embed, url),
        max_seq_length=_parameter(embed, "max_seq_length", url),
        variant=_parameter(embed, "variant", url),
        pooling=_parameter(embed, "pooling", url, default=""),
        max_batch_size=embed.max_batch_size,
        labels=spec_labels(classify, url) if classify is not None else (),
        served_models=tuple(served_catalog(embed)),
        matryoshka_dims=tuple(int(d) for d in _parameter(embed, "matryoshka_dims", url, default=[])),
        host_warning=_parameter(embed, "host_warning", url, default=""),
    )


def served_catalog(spec: _ModelSpec) -> dict[str, dict[str, str]]:
    """name -> {"embed": Triton model, "classify": Triton model or ""} of every artifact the server serves.

    Read from an embed model's `served_models` parameter; a server that predates it serves one artifact.
    """
    catalog = wire.read(spec.parameters, "served_models")
    if catalog:
        return catalog
    return {wire.read(spec.parameters, "model_name", spec.name): {"embed": spec.name, "classify": CLASSIFY_MODEL}}


def resolve_model(default_embed: _ModelSpec, name: str, url: str) -> tuple[str, str]:
    """The (embed, classify) Triton model names of the served model called `name`."""
    catalog = served_catalog(default_embed)
    if name not in catalog:
        raise ModelNotFoundError(f"server at {url} serves no model named {name!r}; it serves {', '.join(catalog)}",
                                 status=None, url=url)
    entry = catalog[name]
    # No classifier head: a name no model has, so classify() reports the missing model clearly.
    return entry["embed"], entry["classify"] or f"{entry['embed']}-classify"


def classify_missing_message(url: str, model: str = CLASSIFY_MODEL) -> str:
    return (f"server at {url} has no '{model}' model: it serves an artifact without a classifier head "
            "(train one with `embedline train-classifier`); embed still works")


# ----------------------------------------------------------------------------------------------
# Deadlines and retries


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, for the retryable errors (unavailable, overloaded).

    Retry k (0-based) waits a uniform random time in [0, min(max_backoff, initial_backoff *
    multiplier**k)]: the randomness keeps clients that failed together (say, all turned away by a
    full queue) from coming back together. A retry is skipped, and the error raised, when its wait
    would not leave the next attempt any time before the call's deadline: a call never outlives its
    timeout to retry. The deadline is what bounds a call: max_retries (default 100, about 50 s of
    waits with the default backoff) only caps a call given a very long timeout, so a server that
    restarts within the deadline is ridden out.

    With several replicas, a failed attempt first fails over at once (no wait) to a replica the call
    has not tried; it backs off only once every replica was tried, and only those back-offs count
    toward max_retries. `rng` is the random source (a `random.Random`; None: the `random` module's),
    injectable so tests are deterministic.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_backoff: float = DEFAULT_INITIAL_BACKOFF_S
    max_backoff: float = DEFAULT_MAX_BACKOFF_S
    multiplier: float = 2.0
    rng: random.Random | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError(f"invalid retry policy: {self}")

    def delay_cap(self, retry: int) -> float:
        """The longest wait before retry `retry` (0-based)."""
        try:
            grown = self.initial_backoff * self.multiplier ** retry
        except OverflowError:  # a huge max_retries: the cap has long been max_backoff
            grown = math.inf
        return min(self.max_backoff, grown)

    def delay(self, retry: int) -> float:
        """The wait before retry `retry`: uniform in [0, delay_cap(retry)] ("full jitter")."""
        source = random if self.rng is None else self.rng
        return source.uniform(0.0, self.delay_cap(retry))


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


class Replicas:
    """Which replica each attempt goes to; one per client, shared by all its calls (thread-safe).

    Requests take turns over the replicas (round-robin), so the requests of a split list and
    concurrent calls spread over all of them. A replica whose attempt just failed cools down for
    `cooldown` seconds: requests pass it over while some replica is not cooling down, so a dead
    replica costs one failed attempt per cool-down instead of one per call. When all are cooling
    down, they take turns as usual: a fleet that failed together is not locked out.
    """

    def __init__(self, urls: Sequence[str], cooldown: float = REPLICA_COOLDOWN_S, clock=time.monotonic):
        self.urls = tuple(urls)
        self.cooldown = cooldown
        self._clock = clock
        self._cooling_until = [-math.inf] * len(self.urls)
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.urls)

    def choose(self, tried: Collection[int] = ()) -> int:
        """The next replica in turn that this call has not `tried` and is not cooling down (unless all
        are); else simply the next in turn."""
        with self._lock:
            order = self._order()
            fresh = self._fresh(order, tried)
            replica = fresh[0] if fresh else order[0]
            self._next = (replica + 1) % len(self.urls)
            return replica

    def has_fresh(self, tried: Collection[int]) -> bool:
        """Whether `choose(tried)` has a failover target: a replica not tried, not cooling down (unless all are)."""
        with self._lock:
            return bool(self._fresh(self._order(), tried))

    def failed(self, replica: int) -> None:
        with self._lock:
            self._cooling_until[replica] = self._clock() + self.cooldown

    def succeeded(self, replica: int) -> None:
        with self._lock:
            self._cooling_until[replica] = -math.inf

    def _order(self) -> list[int]:
        n = len(self.urls)
        return [(self._next + k) % n for k in range(n)]

    def _fresh(self, order: list[int], tried: Collection[int]) -> list[int]:
        """Untried replicas, in turn, that are not cooling down, or all untried ones when every replica is."""
        now = self._clock()
        untried = [i for i in order if i not in tried]
        ready = [i for i in untried if self._cooling_until[i] <= now]
        everyone_cooling = all(until > now for until in self._cooling_until)
        return untried if everyone_cooling else ready


@dataclass(frozen=True)
class Attempt:
    """One try of an RPC: the replica it goes to and the time it may take."""

    replica: int     # index into the client's urls (and channels)
    url: str
    timeout: float   # seconds left of the call's deadline: gRPC's client_timeout

    @property
    def server_timeout_us(self) -> int:
        """The same budget as Triton's per-request `timeout` (integer microseconds, rounded down).

        The server drops the request if it is still queued when the caller has given up on it,
        instead of computing an answer nobody reads ("Request timeout expired").
        """
        return max(1, int(self.timeout * 1_000_000))


class Retrier:
    """The retry state of one RPC within a call; the sync and async loops drive it the same way:

        retrier = Retrier(policy, deadline, replicas, model)
        while True:
            attempt = retrier.next_attempt()     # raises DeadlineExceededError when no time is left
            try:
                result = rpc(channels[attempt.replica], attempt)
            except InferenceServerException as exc:
                delay = retrier.backoff(exc)     # or raises the classified error
            else:
                retrier.succeeded()
                return result
            sleep(delay)                         # 0: fail over to another replica at once
    """

    def __init__(self, policy: RetryPolicy, deadline: Deadline, replicas: Replicas, model: str | None):
        self.policy = policy
        self.deadline = deadline
        self.replicas = replicas
        self.model = model
        self.attempts = 0
        self.retries = 0                   # back-offs so far; failovers to an untried replica are free
        self._tried: set[int] = set()      # replicas tried since the last back-off
        self._used: set[int] = set()       # replicas tried by this RPC, for the give-up message
        self._attempt: Attempt | None = None
        self._retrying: tuple[EmbeddingClientError, BaseException] | None = None  # the last retryable failure

    def next_attempt(self) -> Attempt:
        """Where and with what timeout to send the next attempt."""
        remaining = self.deadline.remaining()
        if remaining < MIN_ATTEMPT_S:
            if self._retrying is not None:  # the wait overran a little: report why it was retrying
                error, exc = self._retrying
                raise self._give_up(error) from exc
            raise DeadlineExceededError(self._timeout_text(), status=None, url=self._last_url())
        replica = self.replicas.choose(self._tried)
        self._tried.add(replica)
        self._used.add(replica)
        self.attempts += 1
        self._attempt = Attempt(replica, self.replicas.urls[replica], remaining)
        return self._attempt

    def succeeded(self) -> None:
        assert self._attempt is not None
        self.replicas.succeeded(self._attempt.replica)

    def backoff(self, exc: BaseException) -> float:
        """Seconds to wait before the next attempt (0: fail over now); raises the classified error when not retrying.

        Must be called inside the `except` block so the raised error chains to `exc`.
        """
        attempt = self._attempt
        assert attempt is not None, "backoff() before next_attempt()"
        error = from_triton_error(exc, url=attempt.url, model=self.model)
        if isinstance(error, DeadlineExceededError):
            # A replica that let the deadline pass (hung, or its queue too long) is passed over by the next calls.
            self.replicas.failed(attempt.replica)
            _, detail = status_and_message(exc)
            raise DeadlineExceededError(f"{self._timeout_text(attempt.url)} ({detail})",
                                        status=error.status, url=attempt.url) from exc
        if not is_retryable(error):
            raise error from exc
        self.replicas.failed(attempt.replica)
        failover = self.replicas.has_fresh(self._tried)
        if not failover and self.retries >= self.policy.max_retries:
            raise self._give_up(error) from exc
        delay = 0.0 if failover else self.policy.delay(self.retries)
        if delay + MIN_ATTEMPT_S > self.deadline.remaining():
            raise self._give_up(error) from exc
        if not failover:  # every replica was tried: this wait starts a new round over all of them
            self.retries += 1
            self._tried.clear()
        self._retrying = (error, exc)
        return delay

    def _give_up(self, error: EmbeddingClientError) -> EmbeddingClientError:
        replicas = f" on {len(self._used)} replicas" if len(self._used) > 1 else ""
        return type(error)(f"{error} [gave up after {self.attempts} attempt(s){replicas} within the "
                           f"{self.deadline.timeout:g} s timeout]", status=error.status, url=error.url)

    def _last_url(self) -> str | None:
        return self._attempt.url if self._attempt else None

    def _timeout_text(self, url: str | None = None) -> str:
        server = url or self._last_url() or describe_urls(self.replicas.urls)
        where = f"model '{self.model}' at {server}" if self.model else f"server at {server}"
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


# ----------------------------------------------------------------------------------------------
# What both clients hold


class ClientBase:
    """The constructor, settings and I/O-free state that EmbeddingClient and AsyncEmbeddingClient share.

    A subclass opens its tritonclient channels in `_setup` (called last by the constructor) and
    sends every RPC through a `Retrier` from `_retrier`, with `_headers` as its gRPC metadata.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        model: str | None = None,
        api_key: str | None = None,
        ssl: bool = False,
        root_certificates: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        initial_backoff: float = DEFAULT_INITIAL_BACKOFF_S,
        max_backoff: float = DEFAULT_MAX_BACKOFF_S,
        max_concurrency: int | None = None,
        batch_size: int | None = None,
        embed_model: str = EMBED_MODEL,
        classify_model: str = CLASSIFY_MODEL,
    ):
        self.urls = validate_urls(url)
        self.url = self.urls[0]  # the first replica, for code written when there was only one
        self.timeout = resolve_timeout(timeout, DEFAULT_TIMEOUT_S)
        self.retry_policy = RetryPolicy(max_retries=max_retries, initial_backoff=initial_backoff,
                                        max_backoff=max_backoff)
        if max_concurrency is not None and (isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int)
                                            or max_concurrency < 1):
            raise ValueError(f"max_concurrency must be >= 1 (or None: chosen from the server), got {max_concurrency!r}")
        self.max_concurrency = max_concurrency
        self.batch_size = validate_batch_size(batch_size)
        self.embed_model = embed_model
        self.classify_model = classify_model
        # A served model chosen by name is looked up in the server's catalog on first use.
        self._model_to_resolve = model
        self._tls = tls_arguments(ssl, root_certificates)
        # The key is kept only inside this header, so repr() and error messages cannot show it.
        self._headers = auth_headers(resolve_api_key(api_key))
        self._replicas = Replicas(self.urls)
        self._specs: dict[str, _ModelSpec] = {}
        self._info: ModelInfo | None = None
        self._closed = False
        self._setup()

    def _setup(self) -> None:
        """Subclass hook: open channels (or prepare to) once the settings are valid."""

    def __repr__(self) -> str:
        url = self.url if len(self.urls) == 1 else list(self.urls)
        key = ", api_key=***" if self._headers else ""
        return f"{type(self).__name__}(url={url!r}, timeout={self.timeout:g}{key})"

    def _check_open(self) -> None:
        if self._closed:
            raise EmbeddingClientError(f"client for {describe_urls(self.urls)} is closed")

    def _deadline(self, timeout: float | None) -> Deadline:
        self._check_open()
        return Deadline(resolve_timeout(timeout, self.timeout))

    def _retrier(self, deadline: Deadline, model: str | None) -> Retrier:
        return Retrier(self.retry_policy, deadline, self._replicas, model)

    def _plan(self, spec: _ModelSpec, n_texts: int) -> RequestPlan:
        """Texts per request and requests in flight for a call of `n_texts` texts (`plan_requests`)."""
        return plan_for_spec(spec, n_texts, self.batch_size, self.max_concurrency, spec.url)

    def _channel_kwargs(self, grpcclient: Any) -> dict[str, Any]:
        """tritonclient InferenceServerClient keyword arguments (sync and aio take the same)."""
        return {"channel_args": channel_args(grpcclient), **self._tls}
