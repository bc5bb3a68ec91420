"""The client's exception types, and the one function that classifies a server or transport error.

Both clients (sync and asyncio) classify a `tritonclient.utils.InferenceServerException` through
`from_triton_error`, so a failure means the same thing wherever it is raised:

    try:
        client.embed(texts)
    except ServerOverloadedError:    # the model's queue is full (retried already, still full)
        ...
    except ServerUnavailableError:   # nothing listening, shutting down, model process restarting
        ...
    except AuthenticationError:      # missing or wrong API key (never retried)
        ...
    except InvalidInputError:        # e.g. a text that is not valid UTF-8, too many texts
        ...
    except EmbeddingClientError:     # anything else the server or transport reported
        ...

How an error is classified (`error_type`): the server's message is checked first, in this order,
because Triton reports some conditions under a status that would mislead the table:

    message contains (any case)     status     -> exception
    "this protocol is restricted"   any        -> AuthenticationError     (Triton sends it as UNAVAILABLE)
    "has no available versions"     any        -> ServerUnavailableError  (the model is unloading while the
                                                                           server drains, or loading)
    "unknown model"                 any        -> ModelNotFoundError      (sent as INVALID_ARG or UNAVAILABLE)
    "has no collection"             any        -> CollectionNotFoundError (the search model's NOT_FOUND)
    "maximum queue size"            any        -> ServerOverloadedError   ("Exceeds maximum queue size")
    "timeout expired"               any        -> DeadlineExceededError   (the per-request timeout ran out
                                                                           while queued: "Request timeout expired")
    "is not healthy"                INTERNAL   -> ServerUnavailableError  (a python-backend stub died and
                                                                           Triton is restarting it)

then the status alone, through STATUS_TO_ERROR: UNAVAILABLE and CANCELLED (what gRPC's server sends
for calls still pending when it shuts down at the end of a drain) -> ServerUnavailableError,
RESOURCE_EXHAUSTED -> ServerOverloadedError, UNAUTHENTICATED / PERMISSION_DENIED ->
AuthenticationError, INVALID_ARGUMENT... -> InvalidInputError, NOT_FOUND -> ModelNotFoundError,
DEADLINE_EXCEEDED -> DeadlineExceededError; anything else (or absent) is ServerError.

Only ServerUnavailableError and its subclass ServerOverloadedError are retried (`is_retryable`, the
one predicate): the server did not serve the request, and embedding is idempotent, so sending it
again (to another replica when there is one) is safe.

Every type derives from `embedline.errors.EmbedlineError`, so the `embedline` CLI prints it as one line.
"""

from __future__ import annotations

from embedline.errors import EmbedlineError
from embedline.wire import API_KEY_ENV  # noqa: F401  (re-exported: the SDK and serving read it from here)



class EmbeddingClientError(EmbedlineError):
    """Base of every error the client SDK raises for a failed server call.

    `status` is the gRPC / Triton status name the server or transport reported (e.g. "UNAVAILABLE"),
    or None when the failure was detected on the client side. `url` is the server (replica) that
    reported it, when one did.
    """

    def __init__(self, message: str, status: str | None = None, url: str | None = None):
        super().__init__(message)
        self.status = status
        self.url = url


class ServerUnavailableError(EmbeddingClientError):
    """The server could not serve the request now (nothing listening, shutting down, model restarting)."""


class ServerOverloadedError(ServerUnavailableError):
    """The server turned the request away because the model's queue is full (retried like unavailable)."""


class AuthenticationError(EmbeddingClientError):
    """The server refused the request's credentials: the API key is missing or wrong. Never retried."""


class InvalidInputError(EmbeddingClientError):
    """The server rejected the request's input (invalid UTF-8, more texts than max_batch_size...)."""


class ModelNotFoundError(EmbeddingClientError):
    """The server does not serve the requested model (e.g. `classify` without a classifier head)."""


class CollectionNotFoundError(ModelNotFoundError):
    """The served search index has no collection of that name (a ModelNotFoundError: not found either way)."""


class DeadlineExceededError(EmbeddingClientError):
    """The call did not finish within its timeout."""


class ServerError(EmbeddingClientError):
    """The server failed while handling a valid request, or reported an unexpected status."""


# The one table: status name -> exception type. gRPC names come from tritonclient's
# `InferenceServerException.status()` ("StatusCode.UNAVAILABLE", prefix stripped); Triton's own
# TRITONSERVER_Error names (INVALID_ARG, UNSUPPORTED...) are listed too because the python backend
# and some server paths report them in that spelling. Anything absent maps to ServerError.
STATUS_TO_ERROR: dict[str, type[EmbeddingClientError]] = {
    "UNAVAILABLE": ServerUnavailableError,
    "RESOURCE_EXHAUSTED": ServerOverloadedError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": AuthenticationError,
    "INVALID_ARGUMENT": InvalidInputError,
    "INVALID_ARG": InvalidInputError,
    "OUT_OF_RANGE": InvalidInputError,
    "FAILED_PRECONDITION": InvalidInputError,
    "NOT_FOUND": ModelNotFoundError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "INTERNAL": ServerError,
    "UNKNOWN": ServerError,
    "UNIMPLEMENTED": ServerError,
    "UNSUPPORTED": ServerError,
    # gRPC's server cancels the calls it has not yet handed to a handler when it shuts down (the end
    # of a drain); the SDK never cancels a call itself, so CANCELLED means "not served here".
    "CANCELLED": ServerUnavailableError,
    "ABORTED": ServerError,
    "ALREADY_EXISTS": ServerError,
    "DATA_LOSS": ServerError,
}

# Server wordings that decide the type before the table, in order: (lower-case text, status or None
# for any status, exception type). See the module docstring for why each is here.
MESSAGE_RULES: tuple[tuple[str, str | None, type[EmbeddingClientError]], ...] = (
    ("this protocol is restricted", None, AuthenticationError),
    ("has no available versions", None, ServerUnavailableError),
    ("unknown model", None, ModelNotFoundError),
    ("has no collection", None, CollectionNotFoundError),
    ("maximum queue size", None, ServerOverloadedError),
    ("timeout expired", None, DeadlineExceededError),
    ("is not healthy", "INTERNAL", ServerUnavailableError),
)


def status_name(status: str | None) -> str | None:
    """'StatusCode.UNAVAILABLE' -> 'UNAVAILABLE'; None stays None (a client-side tritonclient error)."""
    if not status:
        return None
    return str(status).rsplit(".", 1)[-1].upper()


def error_type(status: str | None, message: str) -> type[EmbeddingClientError]:
    """The exception type for a status name and the server's message: MESSAGE_RULES, then the table."""
    lowered = message.lower()
    for text, rule_status, cls in MESSAGE_RULES:
        if text in lowered and rule_status in (None, status):
            return cls
    return STATUS_TO_ERROR.get(status or "", ServerError)


def status_and_message(exc: BaseException) -> tuple[str | None, str]:
    """A tritonclient exception's status name and its message on one line."""
    status = status_name(exc.status()) if callable(getattr(exc, "status", None)) else None
    raw = exc.message() if callable(getattr(exc, "message", None)) else None
    message = raw or str(exc) or type(exc).__name__
    # gRPC details can span lines; the CLI promises one-line errors.
    return status, " ".join(str(message).split())


def is_retryable(error: BaseException) -> bool:
    """The one retry predicate: a ServerUnavailableError (ServerOverloadedError included).

    Takes a classified error, or a raw tritonclient exception (classified first).
    """
    if not isinstance(error, EmbeddingClientError):
        error = from_triton_error(error, url="")
    return isinstance(error, ServerUnavailableError)


def from_triton_error(exc: BaseException, *, url: str, model: str | None = None) -> EmbeddingClientError:
    """Classify a tritonclient `InferenceServerException` into the client's exception type.

    The message names the server (and the model) because that is what a user needs to act on it;
    the server's own wording follows. No message ever contains the API key.
    """
    status, server_message = status_and_message(exc)
    cls = error_type(status, server_message)
    where = f"model '{model}' at {url}" if model else f"server at {url}"
    if cls is ServerOverloadedError:
        text = f"{where} is overloaded: its queue is full ({server_message})"
    elif cls is ServerUnavailableError:
        text = f"{where} is unavailable ({server_message})"
    elif cls is AuthenticationError:
        text = (f"{where} refused the request: it needs a valid API key (pass api_key= or set "
                f"{API_KEY_ENV}) ({status or 'error'}: {server_message})")
    elif cls is DeadlineExceededError:
        text = f"{where} did not answer in time ({server_message})"
    elif cls is CollectionNotFoundError:
        text = f"{where}: {server_message}"
    elif cls is ModelNotFoundError:
        text = f"{where} not found ({server_message})"
    else:
        text = f"{where}: {status or 'error'}: {server_message}"
    return cls(text, status=status, url=url or None)
