"""The asyncio gRPC client: `AsyncEmbeddingClient`, the coroutine twin of `EmbeddingClient`.

Same methods, same chunking, deadlines, retries and exceptions (the logic lives in `_common`);
requests of a split list run concurrently with `asyncio.gather`, at most `max_concurrency` at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
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


class AsyncEmbeddingClient:
    """Embeds and classifies texts through a Triton server's `embed` / `classify` models (gRPC, asyncio).

    Example:

        import asyncio
        from embedline.client import AsyncEmbeddingClient

        async def main():
            async with AsyncEmbeddingClient("127.0.0.1:8001") as client:
                embeddings = await client.embed(["A man is eating food.", "A man is riding a horse."])
                return embeddings.shape   # (2, 384)

        asyncio.run(main())

    Arguments and exceptions are those of `EmbeddingClient`. The gRPC channel is opened on first use
    and belongs to the event loop running then; a client used under a later event loop (a second
    `asyncio.run`) opens a new channel there. Not for use from several threads at once.
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
        self._triton: grpcaio.InferenceServerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._specs: dict[str, _ModelSpec] = {}
        self._info: ModelInfo | None = None
        self._semaphore = asyncio.Semaphore(max_concurrency)  # remade with the channel, per loop
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; later calls raise EmbeddingClientError."""
        self._closed = True
        triton, self._triton = self._triton, None
        if self._loop is not asyncio.get_running_loop():
            return  # made on an earlier loop, already gone with it
        if triton is not None:
            await triton.close()

    def __repr__(self) -> str:
        return f"AsyncEmbeddingClient(url={self.url!r}, timeout={self.timeout:g})"

    # -- public API ------------------------------------------------------------------------------

    async def embed(self, texts: Iterable[str], *, timeout: float | None = None) -> np.ndarray:
        """Embed `texts`: an (n, dim) float32 array of L2-normalized rows, in input order.

            vectors = await client.embed(["first text", "second text"])   # (2, dim)
        """
        return (await self.embed_with_details(texts, timeout=timeout)).embeddings

    async def embed_with_details(self, texts: Iterable[str], *, timeout: float | None = None) -> EmbedResult:
        """Embed `texts` and report truncation: EmbedResult(embeddings (n, dim) float32, truncated (n,) bool).

            result = await client.embed_with_details(["short", "a very long document ..."])
        """
        texts = validate_texts(texts)
        deadline = self._deadline(timeout)
        spec = await self._spec(self.embed_model, deadline)
        dim = spec_dim(spec, self.url)
        if not texts:
            return EmbedResult(np.empty((0, dim), dtype=np.float32), np.empty(0, dtype=bool))
        chunks, parts = await self._infer_chunks(
            spec, texts, EMBED_OUTPUTS, lambda result, n: parse_embed(result, n, self.url, spec.name), deadline)
        return assemble_embeddings(len(texts), dim, chunks, parts)

    async def classify(self, texts: Iterable[str], *, timeout: float | None = None) -> list[Prediction]:
        """Classify `texts` with the server's `classify` model: one Prediction per text, in input order.

        Raises ModelNotFoundError when the server has no `classify` model (embed keeps working).

            predictions = await client.classify(["I love it", "awful"])
        """
        texts = validate_texts(texts)
        deadline = self._deadline(timeout)
        spec = await self._classify_spec(deadline)
        labels = spec_labels(spec, self.url)
        outputs = classify_outputs(spec)
        if not texts:
            return []
        chunks, parts = await self._infer_chunks(
            spec, texts, outputs,
            lambda result, n: parse_classify(result, n, labels, self.url, spec.name,
                                             neighbours=NEIGHBOURS_OUTPUT in outputs), deadline)
        return assemble_predictions(len(texts), chunks, parts)

    async def info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model's name, dim, max_seq_length, variant, max_batch_size and labels (cached)."""
        if self._info is None:
            deadline = self._deadline(timeout)
            embed = await self._spec(self.embed_model, deadline)
            try:
                classify = await self._spec(self.classify_model, deadline)
            except ModelNotFoundError:
                classify = None
            self._info = build_info(embed, classify, self.url)
        return self._info

    async def health(self, *, timeout: float | None = None) -> bool:
        """True when the server is live and ready and its `embed` model is ready; False otherwise (never raises)."""
        deadline = self._deadline(timeout)
        triton = self._client()

        def left() -> float:
            return max(deadline.remaining(), MIN_ATTEMPT_S)

        try:
            return bool(
                await triton.is_server_live(client_timeout=left())
                and await triton.is_server_ready(client_timeout=left())
                and await triton.is_model_ready(self.embed_model, client_timeout=left())
            )
        except InferenceServerException as exc:
            logger.debug("health check of %s failed: %s", self.url, exc)
            return False

    # -- internals -------------------------------------------------------------------------------

    def _client(self) -> grpcaio.InferenceServerClient:
        """The tritonclient aio client of the running event loop (a new loop gets a new channel)."""
        if self._closed:
            raise EmbeddingClientError(f"client for {self.url} is closed")
        loop = asyncio.get_running_loop()
        if self._triton is None or self._loop is not loop:
            # A grpc.aio channel only works on the loop it was made on; after asyncio.run() ends,
            # the old one is unusable (and cannot be closed from here), so it is dropped.
            self._triton = self._make_triton()
            self._loop = loop
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        return self._triton

    def _make_triton(self) -> grpcaio.InferenceServerClient:
        return grpcaio.InferenceServerClient(self.url, channel_args=channel_args(grpcclient))

    def _deadline(self, timeout: float | None) -> Deadline:
        if self._closed:
            raise EmbeddingClientError(f"client for {self.url} is closed")
        return Deadline(resolve_timeout(timeout, self.timeout))

    async def _call(self, rpc: Callable[[float], Awaitable[T]], deadline: Deadline, model: str | None) -> T:
        """Await `rpc(client_timeout)` retrying UNAVAILABLE within the deadline; raise the typed error."""
        retrier = Retrier(self.retry_policy, deadline, self.url, model)
        while True:
            client_timeout = retrier.attempt_timeout()
            try:
                return await rpc(client_timeout)
            except InferenceServerException as exc:
                delay = retrier.backoff(exc)
            logger.debug("%s unavailable, retry %d in %.3f s", self.url, retrier.attempts, delay)
            await asyncio.sleep(delay)

    async def _spec(self, model: str, deadline: Deadline) -> _ModelSpec:
        spec = self._specs.get(model)
        if spec is None:
            triton = self._client()
            response = await self._call(
                lambda client_timeout: triton.get_model_config(model, client_timeout=client_timeout),
                deadline, model)
            spec = self._specs.setdefault(model, parse_model_config(response))
        return spec

    async def _classify_spec(self, deadline: Deadline) -> _ModelSpec:
        try:
            return await self._spec(self.classify_model, deadline)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(classify_missing_message(self.url, self.classify_model),
                                     status=exc.status) from exc

    async def _infer_chunks(self, spec: _ModelSpec, texts: list[str], outputs: tuple[str, ...],
                            parse: Callable[[Any, int], T], deadline: Deadline) -> tuple[list[list[int]], list[T]]:
        """Send `texts` as length-grouped requests of <= batch size; -> (chunks of indices, parsed parts)."""
        chunks = plan_chunks(texts, effective_batch_size(spec, self.batch_size, self.url))
        triton = self._client()
        semaphore = self._semaphore

        async def infer(indices: list[int]) -> T:
            inputs = [text_input(grpcclient, [texts[i] for i in indices])]
            requested = requested_outputs(grpcclient, outputs)
            async with semaphore:
                result = await self._call(
                    lambda client_timeout: triton.infer(spec.name, inputs, outputs=requested,
                                                        client_timeout=client_timeout),
                    deadline, spec.name)
            return parse(result, len(indices))

        if len(chunks) == 1:
            return chunks, [await infer(chunks[0])]
        tasks = [asyncio.ensure_future(infer(indices)) for indices in chunks]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            # One request failed (or we were cancelled): stop the others and collect them, so no
            # task is left running or with an exception nobody retrieves.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return chunks, list(parts)
