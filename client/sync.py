"""The synchronous gRPC client: `EmbeddingClient`.

It speaks the `embed` / `classify` wire contract of model_repository/README.md through
`tritonclient.grpc`, with one channel per server replica. Lists longer than the server's
max_batch_size are split into length-grouped requests sent concurrently from a small thread pool
(gRPC calls release the GIL while they wait), spread over the replicas, and put back in input
order. Every public call has one deadline that covers its config look-up, all its requests and
their retries and failovers; the routing and retry logic is `retry.Retrier`'s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, as_completed, wait
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from embedline import wire
from embedline.client import base, encoding, model_config, planning, results, retry
from embedline.client.errors import EmbeddingClientError, ModelNotFoundError
from embedline.client.results import EmbedResult, Hit, ModelInfo, Prediction

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EmbeddingClient(base.ClientBase):
    """Embeds and classifies texts through a Triton server's `embed` / `classify` models (gRPC).

    Example:

        from embedline.client import EmbeddingClient

        with EmbeddingClient("127.0.0.1:8001") as client:
            embeddings = client.embed(["A man is eating food.", "A man is riding a horse."])
            # embeddings: (2, 384) float32, L2-normalized rows, in input order
            print(client.info().dim, embeddings @ embeddings.T)

        # Replicas of one server, an API key and TLS:
        client = EmbeddingClient(["host1:8001", "host2:8001"], api_key="...", ssl=True,
                                 root_certificates="ca.pem")

    Args:
        url: the server's gRPC endpoint `host:port`, or a list / tuple of them: replicas serving the
            same models. Requests take turns over the replicas; one that fails with an unavailable
            or overloaded error is retried on another at once, and passed over by later requests for
            about a second. `client.urls` is the tuple of urls, `client.url` the first one.
        api_key: sent with every RPC as the gRPC header `authorization: Bearer <key>`. None (the
            default) reads the environment variable EMBEDLINE_API_KEY; an empty key sends none. It
            never appears in repr() or error messages.
        ssl, root_certificates: TLS, with an optional PEM file of the CA certificates to trust
            (default: the system's).
        timeout: default seconds one public call may take in all (its config look-up, every request
            it sends, their retries); each method also takes `timeout=` for that call alone. What is
            left of it also goes with each inference request as Triton's per-request timeout, so the
            server drops queued work whose caller has given up.
        max_retries, initial_backoff, max_backoff: an unavailable or overloaded server is retried;
            once every replica was tried the client waits a random time up to
            initial_backoff * 2**k (capped at max_backoff) before round k+1, at most `max_retries`
            times (default 100: in practice the deadline ends the retries, so a server restart within
            it is ridden out) and never past the deadline (see RetryPolicy). Authentication and input errors are never
            retried.
        max_concurrency: requests in flight at once when a list is split (shared by all the client's
            calls). Default: chosen from the server's config (`planning.plan_requests`): enough to keep its
            dynamic batcher fed, 2 x max_batch_size x instances / batch size (4 for a one-instance server).
        batch_size: texts per request (cap: the model's max_batch_size). Default: a list that fits in
            one request is sent as one; a longer one is cut into requests of the server's length group
            size (32 by default), sorted by length, which its dynamic batcher runs best; the longest go first.
        model: the name of a served model (`info().served_models`; a server started with several
            `--artifact`s serves each by name); default: the server's default model.
        embed_model, classify_model: Triton model names, for repositories not built by embedline.

    All methods are thread-safe. Failed calls raise subclasses of
    `embedline.client.errors.EmbeddingClientError` (AuthenticationError for a missing or wrong key,
    ServerOverloadedError for a full queue...); bad arguments raise TypeError / ValueError.
    """

    def _setup(self) -> None:
        # Creating a channel does not connect: a client can be built before the servers are up.
        self._tritons = [self._make_triton(url) for url in self.urls]
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _make_triton(self, url: str) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(url, **self._channel_kwargs(grpcclient))

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels and the request threads; later calls raise EmbeddingClientError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for triton in self._tritons:
            triton.close()

    # -- public API ------------------------------------------------------------------------------

    def embed(self, texts: Iterable[str], *, dimensions: int | None = None, prompt_name: str | None = None,
              timeout: float | None = None) -> np.ndarray:
        """Embed `texts`: an (n, dim) float32 array of L2-normalized rows, in input order.

        `embed([])` returns a (0, dim) array without an inference request. Texts longer than the
        model's max_seq_length are cut by the server; `embed_with_details` says which.

            vectors = client.embed(["first text", "second text"])   # (2, dim)
        """
        return self.embed_with_details(texts, dimensions=dimensions, prompt_name=prompt_name,
                                       timeout=timeout).embeddings

    def embed_with_details(self, texts: Iterable[str], *, dimensions: int | None = None,
                           prompt_name: str | None = None, timeout: float | None = None) -> EmbedResult:
        """Embed `texts` and report truncation: EmbedResult(embeddings (n, dim) float32, truncated (n,) bool).

        `dimensions=k` (1 <= k <= dim) keeps the first k components of each embedding, re-normalized to
        unit length (Matryoshka truncation, done here in the client): embeddings are then (n, k).
        `prompt_name` (one of `info().prompts`, e.g. "query") prepends that prompt to every text, as
        sentence-transformers' `encode(..., prompt_name=...)` does; None: the model's default prompt, if any.

            result = client.embed_with_details(["short", "a very long document ..."])
            result.embeddings.shape, result.truncated   # (2, 384), array([False,  True])
        """
        texts = planning.validate_texts(texts)
        deadline = self._deadline(timeout)
        spec = self._embed_spec(deadline)
        dim = model_config.spec_dim(spec, spec.url)
        dimensions = encoding.check_dimensions(dimensions, dim)
        texts = model_config.with_prompt(spec, texts, prompt_name)
        if not texts:
            return EmbedResult(np.empty((0, dimensions or dim), dtype=np.float32), np.empty(0, dtype=bool))
        chunks, parts = self._infer_chunks(
            spec, texts, encoding.EMBED_OUTPUTS, lambda result, n, url: encoding.parse_embed(result, n, url, spec.name), deadline)
        return encoding.truncate_dimensions(encoding.assemble_embeddings(len(texts), dim, chunks, parts), dimensions, dim)

    def classify(self, texts: Iterable[str], *, timeout: float | None = None) -> list[Prediction]:
        """Classify `texts` with the server's `classify` model: one Prediction per text, in input order.

        Raises ModelNotFoundError when the server has no `classify` model (embed keeps working).

            [p.label for p in client.classify(["I love it", "awful"])]   # ['positive', 'negative']
        """
        texts = planning.validate_texts(texts)
        deadline = self._deadline(timeout)
        spec = self._classify_spec(deadline)
        labels = model_config.spec_labels(spec, spec.url)
        outputs = encoding.classify_outputs(spec)
        if not texts:
            return []
        chunks, parts = self._infer_chunks(
            spec, texts, outputs,
            lambda result, n, url: encoding.parse_classify(result, n, labels, url, spec.name,
                                                  neighbours=wire.NEIGHBOURS_OUTPUT in outputs), deadline)
        return encoding.assemble_predictions(len(texts), chunks, parts)

    def search(self, queries: str | Iterable[str], *, k: int = 10, filter: str | None = None,
               collection: str | None = None, hybrid: bool = False, timeout: float | None = None) -> list[list[Hit]]:
        """The k best documents of the served index for each query: a list of Hit lists, one per query,
        best first (one string is one query). Needs a server started with `--index`.

        `filter` keeps documents whose metadata pass it (`year >= 1960 and lang == "en"`: docs/search.md);
        `collection`: one of the store's collections (default: `default`, or the only one); `hybrid=True`
        fuses BM25 and dense rankings (reciprocal rank fusion). Hit scores are cosine similarities, or the
        fused rank scores with hybrid.

            [hit.id for hit in client.search("how do wings stall?", k=3)[0]]   # ['12', '401', '7']
        """
        queries, parameters = encoding.search_parameters(queries, k, filter, collection, hybrid)
        deadline = self._deadline(timeout)
        spec = model_config.search_spec(self._embed_spec(deadline), self.url)
        queries = model_config.with_query_prompt(spec, queries)
        outputs = encoding.requested_outputs(grpcclient, (wire.HITS_OUTPUT,))
        hits: list[list[Hit]] = []
        for part in planning.blocks(queries, spec.max_batch_size):
            inputs = [encoding.text_input(grpcclient, part)]
            hits += self._call(
                lambda triton, attempt: encoding.parse_hits(
                    triton.infer(spec.name, inputs, outputs=outputs, parameters=parameters,
                                 headers=self._headers, timeout=attempt.server_timeout_us,
                                 client_timeout=attempt.timeout), len(part), attempt.url, spec.name),
                deadline, spec.name)
        return hits

    def info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model's name, dim, max_seq_length, variant, max_batch_size and labels (cached).

        Read from the first replica that answers (replicas serve the same models).

            client.info().dim   # 384
        """
        if self._info is None:
            deadline = self._deadline(timeout)
            embed = self._embed_spec(deadline)
            try:
                classify = self._spec(self.classify_model, deadline)
            except ModelNotFoundError:
                classify = None
            self._info = model_config.build_info(embed, classify, embed.url)
        return self._info

    def health(self, *, timeout: float | None = None) -> bool:
        """True when some replica is live and ready and its `embed` model is ready; False otherwise.

        Replicas are checked concurrently. Never raises for an unreachable or unhealthy server, and
        does not retry: it answers "now".
        """
        deadline = self._deadline(timeout)
        try:
            self._resolve_model(deadline)  # `model=`: which embed model to ask about
        except EmbeddingClientError:
            return False
        if len(self.urls) == 1:
            return self._replica_health(0, deadline)
        # One thread per replica (not the request pool, which may be busy or smaller): a hung
        # replica must not delay the answer of a healthy one.
        pool = ThreadPoolExecutor(len(self.urls), thread_name_prefix="embedline-health")
        futures = [pool.submit(self._replica_health, replica, deadline) for replica in range(len(self.urls))]
        try:
            return any(future.result() for future in as_completed(futures))  # stops at the first True
        finally:
            pool.shutdown(wait=False)  # checks still running end by the deadline

    # -- internals -------------------------------------------------------------------------------

    def _replica_health(self, replica: int, deadline: retry.Deadline) -> bool:
        triton = self._tritons[replica]

        def left() -> float:
            return max(deadline.remaining(), retry.MIN_ATTEMPT_S)

        try:
            return bool(
                triton.is_server_live(headers=self._headers, client_timeout=left())
                and triton.is_server_ready(headers=self._headers, client_timeout=left())
                and triton.is_model_ready(self.embed_model, headers=self._headers, client_timeout=left())
            )
        except InferenceServerException as exc:
            logger.debug("health check of %s failed: %s", self.urls[replica], exc)
            return False

    def _call(self, rpc: Callable[[Any, retry.Attempt], T], deadline: retry.Deadline, model: str | None) -> T:
        """Run `rpc(triton, attempt)` on a replica, failing over and retrying within the deadline.

        Raises the classified error when the Retrier gives up.
        """
        retrier = self._retrier(deadline, model)
        while True:
            attempt = retrier.next_attempt()
            try:
                result = rpc(self._tritons[attempt.replica], attempt)
            except InferenceServerException as exc:
                delay = retrier.backoff(exc)
            else:
                retrier.succeeded()
                return result
            logger.debug("%s failed, attempt %d: retrying in %.3f s", attempt.url, retrier.attempts, delay)
            if delay:
                time.sleep(delay)

    def _spec(self, model: str, deadline: retry.Deadline) -> results._ModelSpec:
        # Cached per model: the config (max_batch_size, dim, labels) is fixed while the server runs.
        spec = self._specs.get(model)
        if spec is None:
            spec = self._call(
                lambda triton, attempt: model_config.parse_model_config(
                    triton.get_model_config(model, headers=self._headers, client_timeout=attempt.timeout),
                    attempt.url),
                deadline, model)
            spec = self._specs.setdefault(model, spec)
        return spec

    def _resolve_model(self, deadline: retry.Deadline) -> None:
        """Turn `model=` into its Triton model names, from the server's catalog (once)."""
        name = self._model_to_resolve  # read once: concurrent calls may resolve it while this one waits
        if name is not None:
            default = self._spec(wire.EMBED_MODEL, deadline)
            self.embed_model, self.classify_model = model_config.resolve_model(default, name, default.url)
            self._model_to_resolve = None

    def _embed_spec(self, deadline: retry.Deadline) -> results._ModelSpec:
        self._resolve_model(deadline)
        return self._spec(self.embed_model, deadline)

    def _classify_spec(self, deadline: retry.Deadline) -> results._ModelSpec:
        self._resolve_model(deadline)
        try:
            return self._spec(self.classify_model, deadline)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(model_config.classify_missing_message(exc.url or self.url, self.classify_model),
                                     status=exc.status, url=exc.url) from exc

    def _executor(self, workers: int) -> ThreadPoolExecutor:
        """The request threads, shared by all calls; made at the first split list with `workers` threads
        (max_concurrency, or the in-flight count planned from the server's config)."""
        with self._lock:
            self._check_open()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="embedline-client")
            return self._pool

    def _infer_chunks(self, spec: results._ModelSpec, texts: list[str], outputs: tuple[str, ...],
                      parse: Callable[[Any, int, str], T], deadline: retry.Deadline) -> tuple[list[list[int]], list[T]]:
        """Send `texts` as length-grouped requests of <= batch size; -> (chunks of indices, parsed parts).

        `parse(result, n, url)` reads one response; url names the replica that sent it.
        """
        plan = self._plan(spec, len(texts))
        chunks = planning.plan_chunks(texts, plan.batch_size)

        def infer(indices: list[int]) -> T:
            inputs = [encoding.text_input(grpcclient, [texts[i] for i in indices])]
            requested = encoding.requested_outputs(grpcclient, outputs)
            return self._call(
                lambda triton, attempt: parse(
                    triton.infer(spec.name, inputs, outputs=requested, headers=self._headers,
                                 timeout=attempt.server_timeout_us, client_timeout=attempt.timeout),
                    len(indices), attempt.url),
                deadline, spec.name)

        if len(chunks) == 1:
            return chunks, [infer(chunks[0])]
        executor = self._executor(plan.in_flight)
        futures = [executor.submit(infer, indices) for indices in chunks]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future in done and future.exception() is not None:
                # Requests not yet sent are dropped; those in flight end by the shared deadline.
                for other in pending:
                    other.cancel()
                future.result()  # re-raises with its traceback
        return chunks, [future.result() for future in futures]
