"""`embedline serve`: prepare an artifact, build its model repository and keep tritonserver serving it.

The launcher is a small supervisor around one tritonserver process:

    prepare artifact -> build repository -> start tritonserver -> watch (every 0.2 s):
        a model process (python-backend stub) died  -> kill tritonserver at once, restart it
        tritonserver itself died                    -> restart it
        SIGTERM / Ctrl-C                            -> drain: Triton turns not-ready, finishes queued and
                                                       in-flight requests (--drain-timeout), exit 0

Why restart the whole server when one model process dies: Triton keeps reporting a model whose stub was
killed (OOM killer, engine segfault) as ready while every request to it fails with INTERNAL, and a
graceful stop of such a server hangs. Killing it closes its ports at once, so load balancers see it
not-ready and clients get a retryable UNAVAILABLE until the new server is up (docs/architecture.md,
"Crash recovery"). Restarts back off exponentially; after --max-restarts in a row the launcher exits
non-zero so a supervisor (systemd, Kubernetes) can act. A server that stays up for RESTART_RESET_S
starts the count afresh.
"""

from __future__ import annotations

import argparse
import enum
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

from embedline.serving.settings import add_server_options, settings_from_args
from embedline.serving.triton import DEFAULT_PORTS, ServingError, TritonServer, is_loopback, port_in_use

log = logging.getLogger(__name__)

API_KEY_ENV = "EMBEDLINE_API_KEY"
WATCH_INTERVAL_S = 0.2
RESTART_BACKOFF_S = 0.5  # the first restart's wait; doubles per restart in a row
MAX_RESTART_BACKOFF_S = 30.0
RESTART_RESET_S = 60.0  # up this long without a fault: the next fault counts as the first again


class Event(enum.Enum):
    STOP_REQUESTED = "stop requested"
    SERVER_DIED = "tritonserver exited"
    MODEL_DIED = "a model process died"


def prepare_artifact(artifact_dir: str | None):
    """The artifact to serve: the given one (exported first if needed) or the bundled model's."""
    from embedline import artifact as art
    from embedline.export.variants import ensure_exported

    if artifact_dir is None:
        target = art.default_artifact_dir()
        if not (target / art.METADATA_FILE).is_file():
            log.info("importing the bundled all-MiniLM-L6-v2 into %s", target)
            art.import_model_dir(art.bundled_model_dir(), target, name="all-MiniLM-L6-v2")
        artifact_dir = str(target)
    return ensure_exported(artifact_dir)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", default=None,
                        help="artifact directory (default: the bundled all-MiniLM-L6-v2); exported first if needed")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0 to expose; needs an API key or --insecure)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"])
    parser.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"])
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"])
    parser.add_argument("--repository", default=None,
                        help="where to build the model repository (default: a temporary directory)")
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
        key = os.environ.get(API_KEY_ENV, "").strip() or None
    if key is not None and (not key.isascii() or not key.isprintable() or " " in key):
        raise ServingError("the API key must be printable ASCII without spaces (it travels in an HTTP header)")
    return key


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


class Supervisor:
    """Keeps one TritonServer running: watches it, restarts it after a crash, drains it on a stop signal."""

    def __init__(self, server: TritonServer, max_restarts: int):
        self.server = server
        self.max_restarts = max_restarts
        self.stop_requested: list[int] = []
        self.restarts_in_a_row = 0

    def request_stop(self, signum, _frame=None) -> None:
        self.stop_requested.append(signum)

    def watch(self) -> Event:
        """Block until the server or one of its model processes dies, or a stop is requested."""
        stubs = self.server.model_process_ids()
        up_since = time.monotonic()
        while True:
            if self.stop_requested:
                return Event.STOP_REQUESTED
            if self.server.process.poll() is not None:
                return Event.SERVER_DIED
            if stubs and not stubs <= self.server.model_process_ids():
                return Event.MODEL_DIED
            if self.restarts_in_a_row and time.monotonic() - up_since > RESTART_RESET_S:
                self.restarts_in_a_row = 0
            time.sleep(WATCH_INTERVAL_S)

    def run(self, on_ready=None) -> int:
        """Serve until stopped (0) or until the restarts run out (ServingError)."""
        self.server.start()
        while True:
            if on_ready is not None:
                on_ready(self.server)
            event = self.watch()
            if event is Event.STOP_REQUESTED:
                log.info("draining: queued and in-flight requests finish (up to %d s)", self.server.exit_timeout_s)
                self.server.stop()
                return 0
            detail = (f"code {self.server.process.returncode}" if event is Event.SERVER_DIED
                      else "its python-backend stub is gone")
            log.error("%s (%s); last log lines:\n%s", event.value, detail, self.server.log_tail(15))
            self.server.kill()
            if self.restarts_in_a_row >= self.max_restarts:
                raise ServingError(f"{event.value} and {self.max_restarts} restarts in a row are used up; "
                                   f"giving up (log: {self.server.log_file})")
            delay = min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2 ** self.restarts_in_a_row)
            self.restarts_in_a_row += 1
            log.warning("restarting tritonserver in %.1f s (restart %d of at most %d in a row)",
                        delay, self.restarts_in_a_row, self.max_restarts)
            if self._sleep_unless_stopped(delay):
                return 0
            self.server.start()

    def _sleep_unless_stopped(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.stop_requested:
                return True
            time.sleep(min(WATCH_INTERVAL_S, end - time.monotonic()))
        return bool(self.stop_requested)


def run(args: argparse.Namespace) -> int:
    from embedline.export.variants import available_device
    from embedline.serving.repository import build_repository

    api_key = read_api_key(args.api_key_file)
    check_exposure(args.host, api_key, args.insecure)
    tls_cert, tls_key = check_tls(args.tls_cert, args.tls_key)
    if args.max_restarts < 0 or args.drain_timeout < 0:
        raise ServingError("--max-restarts and --drain-timeout must be >= 0")
    for name in ("grpc", "http", "metrics"):
        port = getattr(args, f"{name}_port")
        if port_in_use(args.host, port):
            raise ServingError(f"{name} port {port} on {args.host} is already in use; "
                               f"choose another with --{name}-port")
    artifact = prepare_artifact(args.artifact)
    device = available_device()
    settings = settings_from_args(args, artifact, device)
    log_file = Path(tempfile.gettempdir()) / f"embedline-serve-{args.grpc_port}.log"
    log_file.write_bytes(b"")  # restarts append to it: one log per launcher run
    with tempfile.TemporaryDirectory(prefix="embedline-serve-") as tmp:
        repository = build_repository(artifact, args.repository or Path(tmp) / "models", settings)
        server = TritonServer(
            repository, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
            metrics_port=args.metrics_port, log_verbose=args.log_verbose, log_file=log_file,
            api_key=api_key, restrict_admin=not is_loopback(args.host), tls_cert=tls_cert, tls_key=tls_key,
            exit_timeout_s=args.drain_timeout)
        supervisor = Supervisor(server, args.max_restarts)
        signal.signal(signal.SIGTERM, supervisor.request_stop)
        signal.signal(signal.SIGINT, supervisor.request_stop)
        announced = []

        def banner(server: TritonServer) -> None:
            if announced:
                print(f"embedline: tritonserver restarted, serving again on {server.grpc_url}", flush=True)
                return
            announced.append(True)
            print(f"embedline: serving {artifact.name} ({settings.variant}, {device}) from {artifact.path}")
            print(f"  gRPC     {server.grpc_url}{' (TLS)' if tls_cert else ''}")
            print(f"  HTTP     http://{server.http_url}")
            print(f"  metrics  {server.metrics_url}")
            print(f"  log      {server.log_file}")
            print(f"  auth     {'API key required (all but health)' if api_key else 'none'}; "
                  f"queue <= {settings.max_queue_size or 'unbounded'} requests per model")
            print("Ctrl-C to stop.", flush=True)

        try:
            code = supervisor.run(on_ready=banner)
        finally:
            server.kill()  # a no-op after a clean drain
        print("embedline: stopped", flush=True)
        return code
