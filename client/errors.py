"""The client's exception types and the one table that maps gRPC / Triton status codes to them.

Both clients (sync and asyncio) classify a `tritonclient.utils.InferenceServerException` through
`from_triton_error`, so a status means the same thing wherever it is raised:

    try:
        client.embed(texts)
    except ServerUnavailableError:   # nothing listening, or the server is shutting down
        ...
    except InvalidInputError:        # e.g. a text that is not valid UTF-8, too many texts
        ...
    except EmbeddingClientError:     # anything else the server or transport reported
        ...

Every type derives from `embedline.errors.EmbedlineError`, so the `embedline` CLI prints it as one line.
"""

from __future__ import annotations

from embedline.errors import EmbedlineError


class EmbeddingClientError(EmbedlineError):
    """Base of every error the client SDK raises for a failed server call.

    `status` is the gRPC / Triton status name the server or transport reported (e.g. "UNAVAILABLE"),
    or None when the failure was detected on the client side.
    """

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


class ServerUnavailableError(EmbeddingClientError):
    """The server could not be reached (nothing listening, network down, shutting down)."""


class InvalidInputError(EmbeddingClientError):
    """The server rejected the request's input (invalid UTF-8, more texts than max_batch_size...)."""


class ModelNotFoundError(EmbeddingClientError):
    """The server does not serve the requested model (e.g. `classify` without a classifier head)."""


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
    "RESOURCE_EXHAUSTED": ServerError,
    "CANCELLED": ServerError,
    "ABORTED": ServerError,
    "ALREADY_EXISTS": ServerError,
    "DATA_LOSS": ServerError,
    "PERMISSION_DENIED": ServerError,
    "UNAUTHENTICATED": ServerError,
}

# Only these are worth retrying: the request never reached a model, so resending it is safe.
RETRYABLE_STATUSES = frozenset({"UNAVAILABLE"})


def status_name(status: str | None) -> str | None:
    """'StatusCode.UNAVAILABLE' -> 'UNAVAILABLE'; None stays None (a client-side tritonclient error)."""
    if not status:
        return None
    return str(status).rsplit(".", 1)[-1].upper()


def error_type(status: str | None, message: str) -> type[EmbeddingClientError]:
    """The exception type for a status name and the server's message (the table, plus one wording).

    Triton reports a model it does not serve as INVALID_ARG or UNAVAILABLE depending on the endpoint
    ("Request for unknown model: 'classify' is not found"); that wording means ModelNotFoundError
    whatever the status, so it is neither retried nor reported as bad input.
    """
    if "unknown model" in message.lower():
        return ModelNotFoundError
    return STATUS_TO_ERROR.get(status or "", ServerError)


def _status_and_message(exc: BaseException) -> tuple[str | None, str]:
    status = status_name(exc.status()) if callable(getattr(exc, "status", None)) else None
    raw = exc.message() if callable(getattr(exc, "message", None)) else None
    message = raw or str(exc) or type(exc).__name__
    # gRPC details can span lines; the CLI promises one-line errors.
    return status, " ".join(str(message).split())


def is_retryable(exc: BaseException) -> bool:
    """Whether a raw tritonclient exception is a transient transport failure worth retrying."""
    status, message = _status_and_message(exc)
    return status in RETRYABLE_STATUSES and error_type(status, message) is ServerUnavailableError


def from_triton_error(exc: BaseException, *, url: str, model: str | None = None) -> EmbeddingClientError:
    """Classify a tritonclient `InferenceServerException` into the client's exception type.

    The message names the server (and the model) because that is what a user needs to act on it;
    the server's own wording follows.
    """
    status, server_message = _status_and_message(exc)
    cls = error_type(status, server_message)
    where = f"model '{model}' at {url}" if model else f"server at {url}"
    if cls is ServerUnavailableError:
        text = f"{where} is unavailable ({server_message})"
    elif cls is DeadlineExceededError:
        text = f"{where} did not answer in time ({server_message})"
    elif cls is ModelNotFoundError:
        text = f"{where} not found ({server_message})"
    else:
        text = f"{where}: {status or 'error'}: {server_message}"
    return cls(text, status=status)
