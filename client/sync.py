"""The synchronous gRPC client: `EmbeddingClient`.

It speaks the `embed` / `classify` wire contract of model_repository/README.md through
`tritonclient.grpc`. Lists longer than the server's max_batch_size are split into length-grouped
requests sent concurrently from a small thread pool (gRPC calls release the GIL while they wait),
and put back in input order. Every public call has one deadline that covers its config look-up,
all its requests and their retries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from embedline.client._common import (
    CLASSIFY_MODEL,
    NEIGHBOURS_OUTPUT,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    EMBED_MODEL,
    EMBED_OUTPUTS,
    MIN_ATTEMPT_S,
    Deadline,
    EmbedResult,
    ModelInfo,
    Prediction,
    Retrier,
    RetryPolicy,
    _ModelSpec,
    assemble_embeddings,
    assemble_predictions,
    build_info,
    channel_args,
    classify_missing_message,
    classify_outputs,
    effective_batch_size,
    parse_classify,
    parse_embed,
    parse_model_config,
    plan_chunks,
    requested_outputs,
    resolve_timeout,
    spec_dim,
    spec_labels,
    text_input,
    validate_batch_size,
    validate_texts,
    validate_url,
)
from embedline.client.errors import EmbeddingClientError, ModelNotFoundError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EmbeddingClient:
    """Embeds and classifies texts through a Triton server's `embed` / `classify` models (gRPC).

    Example:

        from embedline.client import EmbeddingClient

        with EmbeddingClient("127.0.0.1:8001") as client:
            embeddings = client.embed(["A man is eating food.", "A man is riding a horse."])
            # embeddings: (2, 384) float32, L2-normalized rows, in input order
            print(client.info().dim, embeddings @ embeddings.T)

    Args:
        url: the server's gRPC endpoint, `host:port`.
        timeout: default seconds one public call may take in all (its config look-up, every request
            it sends, their retries); each method also takes `timeout=` for that call alone.
        max_retries, initial_backoff, max_backoff: UNAVAILABLE is retried up to `max_retries` times,
            waiting initial_backoff * 2**k (capped at max_backoff) and never past the deadline.
        max_concurrency: requests in flight at once when a list is split.
        batch_size: texts per request (default and cap: the model's max_batch_size).
        embed_model, classify_model: model names on the server.

    All methods are thread-safe. Failed calls raise subclasses of
    `embedline.client.errors.EmbeddingClientError`; bad arguments raise TypeError / ValueError.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 3,
        initial_backoff: float = 0.05,
        max_backoff: float = 1.0,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        batch_size: int | None = None,
        embed_model: str = EMBED_MODEL,
        classify_model: str = CLASSIFY_MODEL,
    ):
        self.url = validate_url(url)
        self.timeout = resolve_timeout(timeout, DEFAULT_TIMEOUT_S)
        self.retry_policy = RetryPolicy(max_retries=max_retries, initial_backoff=initial_backoff,
                                        max_backoff=max_backoff)
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self.batch_size = validate_batch_size(batch_size)
        self.embed_model = embed_model
        self.classify_model = classify_model
        # Creating the channel does not connect: a client can be built before the server is up.
        self._triton = grpcclient.InferenceServerClient(self.url, channel_args=channel_args(grpcclient))
        self._specs: dict[str, _ModelSpec] = {}
        self._info: ModelInfo | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and the request threads; later calls raise EmbeddingClientError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._triton.close()

    def __repr__(self) -> str:
        return f"EmbeddingClient(url={self.url!r}, timeout={self.timeout:g})"

    # -- public API ------------------------------------------------------------------------------

    def embed(self, texts: Iterable[str], *, timeout: float | None = None) -> np.ndarray:
        """Embed `texts`: an (n, dim) float32 array of L2-normalized rows, in input order.

        `embed([])` returns a (0, dim) array without an inference request. Texts longer than the
        model's max_seq_length are cut by the server; `embed_with_details` says which.

            vectors = client.embed(["first text", "second text"])   # (2, dim)
        """
        return self.embed_with_details(texts, timeout=timeout).embeddings

    def embed_with_details(self, texts: Iterable[str], *, timeout: float | None = None) -> EmbedResult:
        """Embed `texts` and report truncation: EmbedResult(embeddings (n, dim) float32, truncated (n,) bool).

            result = client.embed_with_details(["short", "a very long document ..."])
            result.embeddings.shape, result.truncated   # (2, 384), array([False,  True])
        """
        texts = validate_texts(texts)
        deadline = self._deadline(timeout)
        spec = self._spec(self.embed_model, deadline)
        dim = spec_dim(spec, self.url)
        if not texts:
            return EmbedResult(np.empty((0, dim), dtype=np.float32), np.empty(0, dtype=bool))
        chunks, parts = self._infer_chunks(
            spec, texts, EMBED_OUTPUTS, lambda result, n: parse_embed(result, n, self.url, spec.name), deadline)
        return assemble_embeddings(len(texts), dim, chunks, parts)

    def classify(self, texts: Iterable[str], *, timeout: float | None = None) -> list[Prediction]:
        """Classify `texts` with the server's `classify` model: one Prediction per text, in input order.

        Raises ModelNotFoundError when the server has no `classify` model (embed keeps working).

            [p.label for p in client.classify(["I love it", "awful"])]   # ['positive', 'negative']
        """
        texts = validate_texts(texts)
        deadline = self._deadline(timeout)
        spec = self._classify_spec(deadline)
        labels = spec_labels(spec, self.url)
        outputs = classify_outputs(spec)
        if not texts:
            return []
        chunks, parts = self._infer_chunks(
            spec, texts, outputs,
            lambda result, n: parse_classify(result, n, labels, self.url, spec.name,
                                             neighbours=NEIGHBOURS_OUTPUT in outputs), deadline)
        return assemble_predictions(len(texts), chunks, parts)

    def info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model's name, dim, max_seq_length, variant, max_batch_size and labels (cached).

            client.info().dim   # 384
        """
        if self._info is None:
            deadline = self._deadline(timeout)
            embed = self._spec(self.embed_model, deadline)
            try:
                classify = self._spec(self.classify_model, deadline)
            except ModelNotFoundError:
                classify = None
            self._info = build_info(embed, classify, self.url)
        return self._info

    def health(self, *, timeout: float | None = None) -> bool:
        """True when the server is live and ready and its `embed` model is ready; False otherwise.

        Never raises for an unreachable or unhealthy server, and does not retry: it answers "now".
        """
        self._check_open()
        deadline = self._deadline(timeout)

        def left() -> float:
            return max(deadline.remaining(), MIN_ATTEMPT_S)

        try:
            return bool(
                self._triton.is_server_live(client_timeout=left())
                and self._triton.is_server_ready(client_timeout=left())
                and self._triton.is_model_ready(self.embed_model, client_timeout=left())
            )
        except InferenceServerException as exc:
            logger.debug("health check of %s failed: %s", self.url, exc)
            return False

    # -- internals -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EmbeddingClientError(f"client for {self.url} is closed")

    def _deadline(self, timeout: float | None) -> Deadline:
        self._check_open()
        return Deadline(resolve_timeout(timeout, self.timeout))

    def _call(self, rpc: Callable[[float], T], deadline: Deadline, model: str | None) -> T:
        """Run `rpc(client_timeout)` retrying UNAVAILABLE within the deadline; raise the typed error."""
        retrier = Retrier(self.retry_policy, deadline, self.url, model)
        while True:
            client_timeout = retrier.attempt_timeout()
            try:
                return rpc(client_timeout)
            except InferenceServerException as exc:
                delay = retrier.backoff(exc)
            logger.debug("%s unavailable, retry %d in %.3f s", self.url, retrier.attempts, delay)
            time.sleep(delay)

    def _spec(self, model: str, deadline: Deadline) -> _ModelSpec:
        # Cached per model: the config (max_batch_size, dim, labels) is fixed while the server runs.
        spec = self._specs.get(model)
        if spec is None:
            response = self._call(
                lambda client_timeout: self._triton.get_model_config(model, client_timeout=client_timeout),
                deadline, model)
            spec = self._specs.setdefault(model, parse_model_config(response))
        return spec

    def _classify_spec(self, deadline: Deadline) -> _ModelSpec:
        try:
            return self._spec(self.classify_model, deadline)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(classify_missing_message(self.url, self.classify_model),
                                     status=exc.status) from exc

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            self._check_open()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="embedline-client")
            return self._pool

    def _infer_chunks(self, spec: _ModelSpec, texts: list[str], outputs: tuple[str, ...],
                      parse: Callable[[Any, int], T], deadline: Deadline) -> tuple[list[list[int]], list[T]]:
        """Send `texts` as length-grouped requests of <= batch size; -> (chunks of indices, parsed parts)."""
        chunks = plan_chunks(texts, effective_batch_size(spec, self.batch_size, self.url))

        def infer(indices: list[int]) -> T:
            inputs = [text_input(grpcclient, [texts[i] for i in indices])]
            requested = requested_outputs(grpcclient, outputs)
            result = self._call(
                lambda client_timeout: self._triton.infer(spec.name, inputs, outputs=requested,
                                                          client_timeout=client_timeout),
                deadline, spec.name)
            return parse(result, len(indices))

        if len(chunks) == 1:
            return chunks, [infer(chunks[0])]
        futures = [self._executor().submit(infer, indices) for indices in chunks]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future in done and future.exception() is not None:
                # Requests not yet sent are dropped; those in flight end by the shared deadline.
                for other in pending:
                    other.cancel()
                future.result()  # re-raises with its traceback
        return chunks, [future.result() for future in futures]
