"""Input validation and request planning: which texts go in which request, and how many requests fly at once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from embedline import wire
from embedline.client.errors import InvalidInputError, ServerError
from embedline.client.results import _ModelSpec


# `max_concurrency` as given by the callers that want the old fixed value; the default (None) is the
# automatic choice of `plan_requests`.
DEFAULT_MAX_CONCURRENCY = 4
# Automatic request planning for lists longer than one request (`plan_requests`): texts per request
# when the server does not say how many its length groups hold (the server's default
# length_group_size), and the bounds on requests in flight.
DEFAULT_GROUP_SIZE = 32
MIN_AUTO_IN_FLIGHT = 4
MAX_AUTO_IN_FLIGHT = 64


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


def blocks(items: list, size: int) -> list[list]:
    """`items` in consecutive lists of at most `size` (at least one item each)."""
    size = max(1, size)
    return [items[start:start + size] for start in range(0, len(items), size)]


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
