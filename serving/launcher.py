"""`embedline serve`: prepare an artifact, build its model repository and keep tritonserver serving it.

The launcher is a small supervisor around one tritonserver process:

    prepare artifact -> build repository -> start tritonserver -> watch (every 0.2 s):
        a model process (python-backend stub) died  -> kill tritonserver at once, restart it
        tritonserver itself died                    -> kill what is left of its group, restart it
        the OpenAI route died                       -> restart it (tritonserver serves on)
        SIGTERM / Ctrl-C                            -> drain: the route answers new requests 503 with
                                                       Retry-After, Triton turns not-ready, both finish
                                                       queued and in-flight requests (--drain-timeout),
                                                       exit 0
        the launcher itself is killed               -> its children get SIGKILL from the kernel
                                                       (PR_SET_PDEATHSIG), the model processes see
                                                       tritonserver gone and kill themselves

Why restart the whole server when one model process dies: Triton keeps reporting a model whose stub was
killed (OOM killer, engine segfault) as ready while every request to it fails with INTERNAL, and a
graceful stop of such a server hangs. Killing it closes its ports at once, so load balancers see it
not-ready and clients get a retryable UNAVAILABLE until the new server is up (docs/architecture.md,
"Crash recovery"). Restarts back off exponentially; after --max-restarts in a row the launcher exits
non-zero so a supervisor (systemd, Kubernetes) can act. A server that stays up for RESTART_RESET_S
starts the count afresh. The route has a count of its own, with the same backoff and bound.
"""

from __future__ import annotations

import argparse
import enum
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from embedline import artifact as art
from embedline.serving.memory import SEARCH_STEP_MIB, MemoryPlan, cgroup_root, fit_to_memory, memory_limit_mib
from embedline.serving.repository import build_repository, served_names
from embedline.serving.settings import RepositorySettings, add_server_options, artifact_variants, settings_from_args
from embedline.serving.triton import (
    ServingError,
    TritonServer,
    check_api_key,
    check_ports_free,
    die_with_parent,
    is_loopback,
)
from embedline.variants import available_device, host_mismatch
from embedline.wire import API_KEY_ENV, DEFAULT_PORTS

# The launcher stays resident beside tritonserver, so what it imports costs memory for the whole run
# (docs/architecture.md, "Memory"): the export pipeline (torch), the OpenAI route (starlette, tokenizers)
# and `publish` (Triton's protobufs) are imported inside the functions that need them, only when they do.

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2
ROUTE_BACKLOG = 1024  # connections that wait for a restarting route (the kernel caps it at net.core.somaxconn)
LISTEN_PROBE_TIMEOUT_S = 0.2  # polled from the watch loop: never holds up the watch on tritonserver
HEALTH_PROBE_TIMEOUT_S = 3.0
RESTART_BACKOFF_S = 0.5  # the first restart's wait; doubles per restart in a row
MAX_RESTART_BACKOFF_S = 30.0
RESTART_RESET_S = 60.0  # up this long without a fault: the next fault counts as the first again


class Event(enum.Enum):
    STOP_REQUESTED = "stop requested"
    SERVER_DIED = "tritonserver exited"
    MODEL_DIED = "a model process died"


def prepare_artifact(artifact_dir: str | None):
    """The artifact to serve: the given one (exported first if needed) or the bundled model's."""
    from embedline.export.ensure import ensure_exported  # torch, only when an export is due

    if artifact_dir is None:
        target = art.default_artifact_dir()
        if not art.is_artifact(target):
            log.info("importing the bundled all-MiniLM-L6-v2 into %s", target)
            art.import_model_dir(art.bundled_model_dir(), target, name="all-MiniLM-L6-v2")
        artifact_dir = str(target)
    return ensure_exported(artifact_dir)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", default=None, action="append",
                        help="artifact directory (default: the bundled all-MiniLM-L6-v2); exported first if needed. "
                             "Repeat to serve several: the first is the default, the others are served by name")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0 to expose; needs an API key or --insecure)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"])
    parser.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"])
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"])
    parser.add_argument("--openai-port", type=int, default=DEFAULT_PORTS["openai"],
                        help="port of the OpenAI-compatible /v1/embeddings route (0: off)")
    parser.add_argument("--repository", default=None,
                        help="where to build the model repository (default: a temporary directory)")
    parser.add_argument("--watch", action="store_true",
                        help="load versions that `embedline publish` adds to --repository, without downtime")
    add_server_options(parser)
    parser.add_argument("--api-key-file", default=None,
                        help=f"file holding the API key every protocol but health then requires "
                             f"(or set {API_KEY_ENV})")
    parser.add_argument("--insecure", action="store_true",
                        help="allow binding a non-loopback address without an API key")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve gRPC over TLS (with --tls-key)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help="restarts in a row after a crash before giving up with a non-zero exit")
    parser.add_argument("--drain-timeout", type=int, default=30,
                        help="seconds queued and in-flight requests get to finish on SIGTERM")
    parser.add_argument("--index", default=None, metavar="URI",
                        help="serve search over this store's collections (`embedline index` fills them): a directory or milvus://HOST:PORT")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver log verbosity")


def read_api_key(path: str | None) -> str | None:
    """The API key from --api-key-file, else $EMBEDLINE_API_KEY, else None."""
    if path is not None:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ServingError(f"cannot read --api-key-file {path}: {exc.strerror or exc}") from exc
        if not key:
            raise ServingError(f"--api-key-file {path} is empty")
    else:
        key = os.environ.get(API_KEY_ENV)
    return check_api_key(key)


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    if not is_loopback(host) and api_key is None and not insecure:
        raise ServingError(
            f"refusing to serve on {host} without an API key: anyone who reaches the port could use it. "
            f"Pass --api-key-file (or set {API_KEY_ENV}), or --insecure to serve openly "
            "(the admin protocols stay closed)")


def check_tls(cert: str | None, key: str | None) -> tuple[Path, Path] | tuple[None, None]:
    if cert is None and key is None:
        return None, None
    if cert is None or key is None:
        raise ServingError("--tls-cert and --tls-key go together")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise ServingError(f"{flag} {path}: no such file")
    return Path(cert).resolve(), Path(key).resolve()


class VersionWatcher:
    """Loads the model versions `embedline publish` adds to the repository (explicit model control)."""

    POLL_S = 1.0

    def __init__(self, server: TritonServer, repository: Path):
        self.server = server
        self.repository = repository
        self.loaded = self._newest()  # what tritonserver loads at start: the newest version of each model
        self._next_poll = 0.0

    def _newest(self) -> dict[str, int]:
        from embedline.serving.publish import versions  # only with --watch

        newest = {}
        for model_dir in self.repository.iterdir():
            numbered = versions(model_dir) if model_dir.is_dir() else []
            if numbered:
                newest[model_dir.name] = numbered[-1]
        return newest

    def poll(self) -> None:
        if time.monotonic() < self._next_poll:
            return
        self._next_poll = time.monotonic() + self.POLL_S
        for model, version in self._newest().items():
            if version > self.loaded.get(model, 0):
                log.info("loading version %d of model %s", version, model)
                try:
                    self.server.load_model(model)
                except ServingError as exc:  # the old version keeps serving; the operator reads why
                    log.error("%s; version %d of %s is not served", exc, version, model)
                else:
                    print(f"embedline: model {model} now serves version {version}", flush=True)
                self.loaded[model] = version


class Restarts:
    """When to start a crashed child process again, and when to give up (tritonserver and the route alike).

    The wait doubles per restart in a row, from RESTART_BACKOFF_S up to MAX_RESTART_BACKOFF_S, so a child
    that cannot stay up does not spin; after `limit` restarts in a row there is none (the launcher exits
    non-zero for systemd or Kubernetes to act). A child up for RESTART_RESET_S since its last start makes
    its next crash count as the first again. `clock` is a seam for unit tests.
    """

    def __init__(self, limit: int, clock=time.monotonic):
        self.limit = limit
        self.clock = clock
        self.in_a_row = 0
        self.started_at = clock()

    def started(self) -> None:
        self.started_at = self.clock()

    def next_delay(self) -> float | None:
        """On a crash: seconds to wait before the next start, or None when the restarts are used up."""
        if self.clock() - self.started_at >= RESTART_RESET_S:
            self.in_a_row = 0
        if self.in_a_row >= self.limit:
            return None
        delay = min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2 ** self.in_a_row)
        self.in_a_row += 1
        return delay


class RouteProcess:
    """The OpenAI-compatible route (serving/openai_api.py) as a child process beside tritonserver.

    The launcher binds the route's listening socket once and hands it to every route process it starts
    (`--fd`): while a crashed route restarts, new connections wait in the accept queue rather than being
    refused, and are answered by the next process.
    """

    def __init__(self, command: list[str], api_key: str | None, port: int, host: str):
        self.command = command
        self.env = {**os.environ, API_KEY_ENV: api_key or ""}
        self.host, self.port = host, port
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{port}"
        self.listener: socket.socket | None = None
        self.process: subprocess.Popen | None = None

    def spawn(self) -> None:
        """Start the process without waiting for it to listen. Its own session: Ctrl-C reaches the launcher
        only, which stops the route itself on a drain."""
        if self.listener is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self.listener = socket.create_server((self.host, self.port), family=family, backlog=ROUTE_BACKLOG)
            self.listener.set_inheritable(True)
        fd = self.listener.fileno()
        self.process = subprocess.Popen([*self.command, "--fd", str(fd)], env=self.env, pass_fds=(fd,),
                                        start_new_session=True, preexec_fn=die_with_parent)

    def get(self, path: str, timeout_s: float) -> bytes | None:
        """The body of GET `path` (any status), or None when no route process answers: a connection to the
        held socket succeeds even while no process accepts, so only an HTTP answer counts."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
        try:
            connection.request("GET", path)
            return connection.getresponse().read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()

    def listening(self) -> bool:
        """A route process answers (an unknown path: a 404 that asks nothing of Triton)."""
        return self.get("/-", LISTEN_PROBE_TIMEOUT_S) is not None

    def start(self, timeout_s: float = 60.0) -> None:
        """Spawn, then wait until it answers."""
        self.spawn()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServingError(f"the OpenAI route exited with code {self.process.returncode} while starting")
            if self.listening():
                return
            time.sleep(0.1)
        raise ServingError(f"the OpenAI route did not answer on {self.url} within {timeout_s:.0f} s")

    def died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def drain(self, timeout_s: float) -> None:
        """SIGUSR1: new requests get 503 with Retry-After; wait until the requests in flight are done.
        The route keeps answering (503) until stop(), so callers never meet a refused port mid-drain."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            if drained(self.get("/health", HEALTH_PROBE_TIMEOUT_S)):
                return
            time.sleep(WATCH_INTERVAL_S)

    def stop(self, timeout_s: float) -> None:
        """SIGTERM: the route finishes the requests it has (uvicorn's graceful shutdown) and exits, killed if
        still there after `timeout_s`. The launcher's copy of the listening socket closes first, so the port
        closes as soon as the route stops accepting rather than queueing callers nobody will answer."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def drained(health_body: bytes | None) -> bool:
    """The route's /health says it is draining with no request in flight (serving/openai_api.py, Drain)."""
    try:
        health = json.loads(health_body or b"")
    except ValueError:
        return False
    return health.get("status") == "draining" and health.get("in_flight") == 0


class RouteKeeper:
    """Starts the OpenAI route again after it exits, with tritonserver's backoff and restart bound.

    Polled from the supervisor's watch loop, so a route restart never holds up the watch on tritonserver.
    While the route is down, new connections wait in the accept queue of the socket the launcher holds; the
    log says when it went down, when it is started again and when it answers again.
    """

    def __init__(self, route: RouteProcess, max_restarts: int, clock=time.monotonic):
        self.route = route
        self.clock = clock
        self.restarts = Restarts(max_restarts, clock)
        self.restart_at: float | None = None  # set while the route is down, waiting for its restart
        self.waiting_to_listen = False

    def poll(self) -> None:
        """ServingError when the route exited and its restarts in a row are used up."""
        if self.restart_at is not None:
            if self.clock() >= self.restart_at:
                self.restart_at = None
                self.route.spawn()
                self.restarts.started()
                self.waiting_to_listen = True
                log.info("the OpenAI route started again (pid %d)", self.route.process.pid)
        elif self.route.died():
            self._schedule_restart()
        elif self.waiting_to_listen and self.route.listening():
            self.waiting_to_listen = False
            log.info("the OpenAI route is serving again on %s", self.route.url)

    def _schedule_restart(self) -> None:
        code = self.route.process.returncode
        delay = self.restarts.next_delay()
        if delay is None:
            raise ServingError(f"the OpenAI route exited with code {code} and {self.restarts.limit} restarts "
                               "in a row are used up; giving up")
        log.error("the OpenAI route exited with code %s; starting it again in %.1f s "
                  "(restart %d of at most %d in a row)", code, delay, self.restarts.in_a_row, self.restarts.limit)
        self.restart_at = self.clock() + delay


class Supervisor:
    """Keeps one TritonServer running: watches it, restarts it after a crash, drains it on a stop signal.

    The OpenAI route, when there is one, is kept running beside it (RouteKeeper).
    """

    def __init__(self, server: TritonServer, max_restarts: int, watch_repository: Path | None = None,
                 route: RouteProcess | None = None):
        self.server = server
        self.route = route
        self.max_restarts = max_restarts
        self.stop_requested: list[int] = []
        self.restarts = Restarts(max_restarts)
        self.route_keeper = RouteKeeper(route, max_restarts) if route is not None else None
        self.watcher = VersionWatcher(server, watch_repository) if watch_repository else None

    def request_stop(self, signum, _frame=None) -> None:
        self.stop_requested.append(signum)

    def watch(self) -> Event:
        """Block until the server or one of its model processes dies, or a stop is requested."""
        stubs = self.server.model_process_ids()
        self.restarts.started()
        while True:
            if self.stop_requested:
                return Event.STOP_REQUESTED
            if self.server.process.poll() is not None:
                return Event.SERVER_DIED
            if stubs and not stubs <= self.server.model_process_ids():
                return Event.MODEL_DIED
            self._tend()
            time.sleep(WATCH_INTERVAL_S)

    def _tend(self) -> None:
        """The work beside watching tritonserver: the route's restarts and new model versions."""
        if self.route_keeper is not None:
            self.route_keeper.poll()
        if self.watcher is not None:
            self.watcher.poll()

    def run(self, on_ready=None) -> int:
        """Serve until stopped (0) or until the restarts run out (ServingError)."""
        self.server.start()
        if self.route is not None:
            self.route.start()
            self.route_keeper.restarts.started()
        while True:
            if on_ready is not None:
                on_ready(self.server)
            event = self.watch()
            if event is Event.STOP_REQUESTED:
                log.info("draining: queued and in-flight requests finish (up to %d s)", self.server.exit_timeout_s)
                if self.route is not None:  # first, so it forwards no new work to a draining server
                    self.route.drain(self.server.exit_timeout_s + 10)
                self.server.stop()
                if self.route is not None:
                    self.route.stop(10)
                return 0
            detail = (f"code {self.server.process.returncode}" if event is Event.SERVER_DIED
                      else "its python-backend stub is gone")
            log.error("%s (%s); last log lines:\n%s", event.value, detail, self.server.log_tail(15))
            self.server.kill()
            delay = self.restarts.next_delay()
            if delay is None:
                raise ServingError(f"{event.value} and {self.max_restarts} restarts in a row are used up; "
                                   f"giving up (log: {self.server.log_file})")
            log.warning("restarting tritonserver in %.1f s (restart %d of at most %d in a row)",
                        delay, self.restarts.in_a_row, self.max_restarts)
            if self._sleep_unless_stopped(delay):
                return 0
            self.server.start()

    def _sleep_unless_stopped(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.stop_requested:
                return True
            if self.route_keeper is not None:
                self.route_keeper.poll()
            time.sleep(max(0.0, min(WATCH_INTERVAL_S, end - time.monotonic())))
        return bool(self.stop_requested)


def check_serve_ports(args: argparse.Namespace) -> None:
    """Every port `serve` binds is free, or comes free within PORT_WAIT_S (a restart right after a crash)."""
    check_ports_free(args.host, {name: getattr(args, f"{name}_port") for name in ("grpc", "http", "metrics", "openai")})


@dataclass
class ServePlan:
    """What one `serve` runs, decided before anything starts."""

    artifacts: list
    names: list
    variants: list[str]
    device: str
    settings: RepositorySettings
    memory: MemoryPlan
    memory_limit: int | None
    api_key: str | None
    tls_cert: Path | None
    tls_key: Path | None


def search_memory_mib(index: str | None) -> int:
    """What ranking adds to one embed process for the store `index` as it is now (0 without an index)."""
    if not index:
        return 0
    from embedline.search.store import open_store  # the search extra: only when an index is served

    return SEARCH_STEP_MIB + open_store(index).resident_mib()


def plan_serve(args: argparse.Namespace) -> ServePlan:
    """Check the options and ports, prepare the artifacts, choose variants and settings that fit the memory."""
    api_key = read_api_key(args.api_key_file)
    check_exposure(args.host, api_key, args.insecure)
    tls_cert, tls_key = check_tls(args.tls_cert, args.tls_key)
    if args.max_restarts < 0 or args.drain_timeout < 0:
        raise ServingError("--max-restarts and --drain-timeout must be >= 0")
    if args.watch and not args.repository:
        raise ServingError("--watch needs --repository DIR: the directory `embedline publish` writes to")
    check_serve_ports(args)
    artifacts = [prepare_artifact(path) for path in (args.artifact or [None])]
    names = served_names(artifacts)  # fails early on two artifacts with one name
    device = available_device()
    variants = artifact_variants(args, artifacts, device)
    settings = settings_from_args(args, artifacts[0], device, variant=variants[0])
    memory_limit = memory_limit_mib(cgroup_root())
    settings, memory = fit_to_memory(settings, variants, sum(a.has_head() for a in artifacts), memory_limit,
                                     layout_chosen_by_serve=args.instances is None and args.threads is None,
                                     search_mib=search_memory_mib(args.index))
    return ServePlan(artifacts, names, variants, device, settings, memory, memory_limit, api_key, tls_cert, tls_key)


def print_banner(plan: ServePlan, args: argparse.Namespace, server: TritonServer, route: RouteProcess | None,
                 repository: Path) -> None:
    for artifact, model_names, variant in zip(plan.artifacts, plan.names, plan.variants):
        print(f"embedline: serving {artifact.name} as `{model_names.embed}` ({variant}, {plan.device}) "
              f"from {artifact.path}")
    if plan.device == "cpu":
        for artifact in plan.artifacts:
            warning = host_mismatch(artifact)
            if warning:
                print(f"  warning  {warning}")
    settings = plan.settings
    threads = settings.intra_op_threads or "one per core"
    print(f"  engine   {settings.instances} instance{'s' if settings.instances > 1 else ''} x "
          f"{threads} thread{'s' if threads != 1 else ''}")
    limit = f"{plan.memory_limit} MiB limit" if plan.memory_limit else "no memory limit set"
    print(f"  memory   up to {plan.memory.need_mib} MiB ({plan.memory.describe()}); {limit}")
    print(f"  gRPC     {server.grpc_url}{' (TLS)' if plan.tls_cert else ''}")
    print(f"  HTTP     http://{server.http_url}")
    print(f"  metrics  {server.metrics_url}")
    if route is not None:
        search = ", POST /v1/search" if args.index else ""
        print(f"  OpenAI   {route.url}/v1 (POST /v1/embeddings{search}, GET /v1/models)")
    if args.index:
        print(f"  search   collections of {args.index} (`search` model)")
    print(f"  log      {server.log_file}")
    print(f"  auth     {'API key required (all but health)' if plan.api_key else 'none'}; "
          f"queue <= {settings.max_queue_size or 'unbounded'} requests per model")
    if args.watch:
        print(f"  watching {repository} for `embedline publish`")
    print("Ctrl-C to stop.", flush=True)


def route_for(plan: ServePlan, args: argparse.Namespace, server: TritonServer) -> RouteProcess:
    from embedline.serving.openai_api import ServedModel, openai_command  # only with a route

    models = [ServedModel.from_artifact(artifact) for artifact in plan.artifacts]
    command = openai_command(server.grpc_url, models, host=args.host, port=args.openai_port,
                             grpc_root_certificates=plan.tls_cert, drain_timeout=args.drain_timeout,
                             insecure=args.insecure)
    return RouteProcess(command, plan.api_key, args.openai_port, args.host)


def run(args: argparse.Namespace) -> int:
    plan = plan_serve(args)
    log_file = Path(tempfile.gettempdir()) / f"embedline-serve-{args.grpc_port}.log"
    log_file.write_bytes(b"")  # restarts append to it: one log per launcher run
    with tempfile.TemporaryDirectory(prefix="embedline-serve-") as tmp:
        repository = build_repository(plan.artifacts, args.repository or Path(tmp) / "models", plan.settings,
                                      plan.variants, index=args.index)
        server = TritonServer(
            repository, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
            metrics_port=args.metrics_port, log_verbose=args.log_verbose, log_file=log_file,
            api_key=plan.api_key, restrict_admin=not is_loopback(args.host), tls_cert=plan.tls_cert,
            tls_key=plan.tls_key, exit_timeout_s=args.drain_timeout, explicit_model_control=args.watch)
        route = route_for(plan, args, server) if args.openai_port else None
        supervisor = Supervisor(server, args.max_restarts, repository if args.watch else None, route)
        signal.signal(signal.SIGTERM, supervisor.request_stop)
        signal.signal(signal.SIGINT, supervisor.request_stop)
        announced = []

        def on_ready(server: TritonServer) -> None:
            if announced:
                print(f"embedline: tritonserver restarted, serving again on {server.grpc_url}", flush=True)
            else:
                announced.append(True)
                print_banner(plan, args, server, route, repository)

        try:
            code = supervisor.run(on_ready=on_ready)
        finally:
            if route is not None:
                route.stop(5)
            server.kill()  # a no-op after a clean drain
        print("embedline: stopped", flush=True)
        return code
