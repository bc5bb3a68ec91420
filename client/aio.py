"""The asyncio gRPC client: `AsyncEmbeddingClient`, the coroutine twin of `EmbeddingClient`.

Same constructor, methods, chunking, replicas, deadlines, retries and exceptions (the logic lives in
`base`, `planning`, `encoding`, `model_config` and `retry`); requests of a split list run concurrently with `asyncio.gather`, at most
`max_concurrency` at once (default: planned from the server's config, `planning.plan_requests`), spread
over the replicas.
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

from embedline import wire
from embedline.client import base, encoding, model_config, planning, results, retry
from embedline.client.errors import EmbeddingClientError, ModelNotFoundError
from embedline.client.results import EmbedResult, Hit, ModelInfo, Prediction

logger = logging.getLogger(__name__)

T = TypeVar("T")


class AsyncEmbeddingClient(base.ClientBase):
    """Embeds and classifies texts through a Triton server's `embed` / `classify` models (gRPC, asyncio).

    Example:

        import asyncio
        from embedline.client import AsyncEmbeddingClient

        async def main():
            async with AsyncEmbeddingClient("127.0.0.1:8001") as client:
                embeddings = await client.embed(["A man is eating food.", "A man is riding a horse."])
                return embeddings.shape   # (2, 384)

        asyncio.run(main())

    Arguments (url or a list of replica urls, api_key, ssl, root_certificates, timeout, retries...)
    and exceptions are those of `EmbeddingClient`. The gRPC channels are opened on first use and
    belong to the event loop running then; a client used under a later event loop (a second
    `asyncio.run`) opens new channels there. Not for use from several threads at once.
    """

    def _setup(self) -> None:
        self._tritons: list[grpcaio.InferenceServerClient] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Bounds requests in flight over all calls; made at the first split list (max_concurrency, or the
        # in-flight count planned from the server's config), and again for each new event loop.
        self._semaphore: asyncio.Semaphore | None = None

    def _make_triton(self, url: str) -> grpcaio.InferenceServerClient:
        return grpcaio.InferenceServerClient(url, **self._channel_kwargs(grpcclient))

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels; later calls raise EmbeddingClientError."""
        self._closed = True
        tritons, self._tritons = self._tritons, None
        if self._loop is not asyncio.get_running_loop():
            return  # made on an earlier loop, already gone with it
        for triton in tritons or ():
            await triton.close()

    # -- public API ------------------------------------------------------------------------------

    async def embed(self, texts: Iterable[str], *, dimensions: int | None = None, prompt_name: str | None = None,
                    timeout: float | None = None) -> np.ndarray:
        """Embed `texts`: an (n, dim) float32 array of L2-normalized rows, in input order.

            vectors = await client.embed(["first text", "second text"])   # (2, dim)
        """
        return (await self.embed_with_details(texts, dimensions=dimensions, prompt_name=prompt_name,
                                              timeout=timeout)).embeddings

    async def embed_with_details(self, texts: Iterable[str], *, dimensions: int | None = None,
                                 prompt_name: str | None = None, timeout: float | None = None) -> EmbedResult:
        """Embed `texts` and report truncation: EmbedResult(embeddings (n, dim) float32, truncated (n,) bool).

        `dimensions=k` (1 <= k <= dim) keeps the first k components of each embedding, re-normalized to
        unit length (Matryoshka truncation, done here in the client): embeddings are then (n, k).
        `prompt_name` (one of `info().prompts`, e.g. "query") prepends that prompt to every text, as
        sentence-transformers' `encode(..., prompt_name=...)` does; None: the model's default prompt, if any.

            result = await client.embed_with_details(["short", "a very long document ..."])
        """
        texts = planning.validate_texts(texts)
        deadline = self._deadline(timeout)
        spec = await self._embed_spec(deadline)
        dim = model_config.spec_dim(spec, spec.url)
        dimensions = encoding.check_dimensions(dimensions, dim)
        texts = model_config.with_prompt(spec, texts, prompt_name)
        if not texts:
            return EmbedResult(np.empty((0, dimensions or dim), dtype=np.float32), np.empty(0, dtype=bool))
        chunks, parts = await self._infer_chunks(
            spec, texts, encoding.EMBED_OUTPUTS, lambda result, n, url: encoding.parse_embed(result, n, url, spec.name), deadline)
        return encoding.truncate_dimensions(encoding.assemble_embeddings(len(texts), dim, chunks, parts), dimensions, dim)

    async def classify(self, texts: Iterable[str], *, timeout: float | None = None) -> list[Prediction]:
        """Classify `texts` with the server's `classify` model: one Prediction per text, in input order.

        Raises ModelNotFoundError when the server has no `classify` model (embed keeps working).

            predictions = await client.classify(["I love it", "awful"])
        """
        texts = planning.validate_texts(texts)
        deadline = self._deadline(timeout)
        spec = await self._classify_spec(deadline)
        labels = model_config.spec_labels(spec, spec.url)
        outputs = encoding.classify_outputs(spec)
        if not texts:
            return []
        chunks, parts = await self._infer_chunks(
            spec, texts, outputs,
            lambda result, n, url: encoding.parse_classify(result, n, labels, url, spec.name,
                                                  neighbours=wire.NEIGHBOURS_OUTPUT in outputs), deadline)
        return encoding.assemble_predictions(len(texts), chunks, parts)

    async def search(self, queries: str | Iterable[str], *, k: int = 10, filter: str | None = None,
                     collection: str | None = None, hybrid: bool = False,
                     timeout: float | None = None) -> list[list[Hit]]:
        """The k best documents of the served index for each query: a list of Hit lists, one per query,
        best first (one string is one query). Needs a server started with `--index`.

        `filter` keeps documents whose metadata pass it (`year >= 1960 and lang == "en"`: docs/search.md);
        `collection`: one of the store's collections (default: `default`, or the only one); `hybrid=True`
        fuses BM25 and dense rankings (reciprocal rank fusion). Hit scores are cosine similarities, or the
        fused rank scores with hybrid.

            [hit.id for hit in (await client.search("how do wings stall?", k=3))[0]]   # ['12', '401', '7']
        """
        queries, parameters = encoding.search_parameters(queries, k, filter, collection, hybrid)
        deadline = self._deadline(timeout)
        spec = model_config.search_spec(await self._embed_spec(deadline), self.url)
        queries = model_config.with_query_prompt(spec, queries)
        outputs = encoding.requested_outputs(grpcaio, (wire.HITS_OUTPUT,))
        hits: list[list[Hit]] = []
        for part in planning.blocks(queries, spec.max_batch_size):
            inputs = [encoding.text_input(grpcaio, part)]

            async def send(triton: grpcaio.InferenceServerClient, attempt: retry.Attempt,
                           inputs=inputs, n=len(part)) -> list[list[Hit]]:
                result = await triton.infer(spec.name, inputs, outputs=outputs, parameters=parameters,
                                            headers=self._headers, timeout=attempt.server_timeout_us,
                                            client_timeout=attempt.timeout)
                return encoding.parse_hits(result, n, attempt.url, spec.name)

            hits += await self._call(send, deadline, spec.name)
        return hits

    async def info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model's name, dim, max_seq_length, variant, max_batch_size and labels (cached)."""
        if self._info is None:
            deadline = self._deadline(timeout)
            embed = await self._embed_spec(deadline)
            try:
                classify = await self._spec(self.classify_model, deadline)
            except ModelNotFoundError:
                classify = None
            self._info = model_config.build_info(embed, classify, embed.url)
        return self._info

    async def health(self, *, timeout: float | None = None) -> bool:
        """True when some replica is live and ready and its `embed` model is ready; False otherwise.

        Replicas are checked concurrently; never raises for an unreachable or unhealthy server.
        """
        deadline = self._deadline(timeout)
        try:
            await self._resolve_model(deadline)  # `model=`: which embed model to ask about
        except EmbeddingClientError:
            return False
        tritons = self._clients()
        checks = [asyncio.ensure_future(self._replica_health(triton, url, deadline))
                  for triton, url in zip(tritons, self.urls)]
        try:
            for check in asyncio.as_completed(checks):
                if await check:
                    return True  # one healthy replica is enough: the others are cancelled below
            return False
        finally:
            for check in checks:
                check.cancel()
            await asyncio.gather(*checks, return_exceptions=True)

    # -- internals -------------------------------------------------------------------------------

    async def _replica_health(self, triton: grpcaio.InferenceServerClient, url: str, deadline: retry.Deadline) -> bool:
        def left() -> float:
            return max(deadline.remaining(), retry.MIN_ATTEMPT_S)

        try:
            return bool(
                await triton.is_server_live(headers=self._headers, client_timeout=left())
                and await triton.is_server_ready(headers=self._headers, client_timeout=left())
                and await triton.is_model_ready(self.embed_model, headers=self._headers, client_timeout=left())
            )
        except InferenceServerException as exc:
            logger.debug("health check of %s failed: %s", url, exc)
            return False

    def _clients(self) -> list[grpcaio.InferenceServerClient]:
        """The tritonclient aio clients (one per replica) of the running event loop; a new loop gets new channels."""
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._tritons is None or self._loop is not loop:
            # A grpc.aio channel only works on the loop it was made on; after asyncio.run() ends,
            # the old ones are unusable (and cannot be closed from here), so they are dropped.
            self._tritons = [self._make_triton(url) for url in self.urls]
            self._loop = loop
            self._semaphore = None
        return self._tritons

    async def _call(self, rpc: Callable[[Any, retry.Attempt], Awaitable[T]], deadline: retry.Deadline, model: str | None) -> T:
        """Await `rpc(triton, attempt)` on a replica, failing over and retrying within the deadline.

        Raises the classified error when the Retrier gives up.
        """
        tritons = self._clients()
        retrier = self._retrier(deadline, model)
        while True:
            attempt = retrier.next_attempt()
            try:
                result = await rpc(tritons[attempt.replica], attempt)
            except InferenceServerException as exc:
                delay = retrier.backoff(exc)
            else:
                retrier.succeeded()
                return result
            logger.debug("%s failed, attempt %d: retrying in %.3f s", attempt.url, retrier.attempts, delay)
            if delay:
                await asyncio.sleep(delay)

    async def _spec(self, model: str, deadline: retry.Deadline) -> results._ModelSpec:
        spec = self._specs.get(model)
        if spec is None:
            async def fetch(triton: grpcaio.InferenceServerClient, attempt: retry.Attempt) -> results._ModelSpec:
                response = await triton.get_model_config(model, headers=self._headers,
                                                         client_timeout=attempt.timeout)
                return model_config.parse_model_config(response, attempt.url)

            spec = self._specs.setdefault(model, await self._call(fetch, deadline, model))
        return spec

    async def _resolve_model(self, deadline: retry.Deadline) -> None:
        """Turn `model=` into its Triton model names, from the server's catalog (once)."""
        name = self._model_to_resolve  # read once: concurrent calls may resolve it while this one waits
        if name is not None:
            default = await self._spec(wire.EMBED_MODEL, deadline)
            self.embed_model, self.classify_model = model_config.resolve_model(default, name, default.url)
            self._model_to_resolve = None

    async def _embed_spec(self, deadline: retry.Deadline) -> results._ModelSpec:
        await self._resolve_model(deadline)
        return await self._spec(self.embed_model, deadline)

    async def _classify_spec(self, deadline: retry.Deadline) -> results._ModelSpec:
        await self._resolve_model(deadline)
        try:
            return await self._spec(self.classify_model, deadline)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(model_config.classify_missing_message(exc.url or self.url, self.classify_model),
                                     status=exc.status, url=exc.url) from exc

    async def _infer_chunks(self, spec: results._ModelSpec, texts: list[str], outputs: tuple[str, ...],
                            parse: Callable[[Any, int, str], T],
                            deadline: retry.Deadline) -> tuple[list[list[int]], list[T]]:
        """Send `texts` as length-grouped requests of <= batch size; -> (chunks of indices, parsed parts).

        `parse(result, n, url)` reads one response; url names the replica that sent it.
        """
        plan = self._plan(spec, len(texts))
        chunks = planning.plan_chunks(texts, plan.batch_size)
        self._clients()  # the semaphore below belongs to the running loop
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(plan.in_flight)
        semaphore = self._semaphore

        async def infer(indices: list[int]) -> T:
            inputs = [encoding.text_input(grpcclient, [texts[i] for i in indices])]
            requested = encoding.requested_outputs(grpcclient, outputs)

            async def send(triton: grpcaio.InferenceServerClient, attempt: retry.Attempt) -> T:
                result = await triton.infer(spec.name, inputs, outputs=requested, headers=self._headers,
                                            timeout=attempt.server_timeout_us, client_timeout=attempt.timeout)
                return parse(result, len(indices), attempt.url)

            async with semaphore:
                return await self._call(send, deadline, spec.name)

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
