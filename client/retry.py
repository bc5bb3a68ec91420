"""Deadlines and retries: how one RPC is sent.

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
import random
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from embedline.client.errors import DeadlineExceededError, EmbeddingClientError, from_triton_error, is_retryable, status_and_message
from embedline.client.connection import describe_urls


# Retries are bounded by the call's deadline: a server restart (a few seconds) or a burst that fills
# the queue is ridden out inside it. The count (about 50 s of waits with the default backoff) only
# caps calls given a very long timeout.
DEFAULT_MAX_RETRIES = 100
DEFAULT_INITIAL_BACKOFF_S = 0.05
DEFAULT_MAX_BACKOFF_S = 1.0
# How long a replica that just failed is passed over while another one is not cooling down.
REPLICA_COOLDOWN_S = 1.0


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
