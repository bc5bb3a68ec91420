"""What EmbeddingClient and AsyncEmbeddingClient share: the constructor, settings and I/O-free state.

Nothing here does I/O, so both clients run the same logic and it is unit-testable without a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from embedline.client.errors import EmbeddingClientError
from embedline.client.connection import DEFAULT_TIMEOUT_S, DEFAULT_URL, auth_headers, channel_args, describe_urls, resolve_api_key, resolve_timeout, tls_arguments, validate_urls
from embedline.client.planning import RequestPlan, plan_for_spec, validate_batch_size
from embedline.client.results import ModelInfo, _ModelSpec
from embedline.client.retry import DEFAULT_INITIAL_BACKOFF_S, DEFAULT_MAX_BACKOFF_S, DEFAULT_MAX_RETRIES, Deadline, Replicas, Retrier, RetryPolicy
from embedline.wire import CLASSIFY_MODEL, EMBED_MODEL


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
