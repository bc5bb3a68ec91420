"""Run the real NVIDIA Triton Inference Server (the `tritonserver` binary shipped in nvidia-pytriton).

`TritonServer` is one tritonserver process on a model repository: it builds the command line (ports,
API key, TLS, drain timeout), starts it, waits until it is ready, lists its model processes (the
python-backend stubs) and stops or kills it. Tests and benchmarks use it directly; `embedline serve`
(serving/launcher.py) supervises one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from embedline.errors import EmbedlineError
from embedline.wire import DEFAULT_PORTS

log = logging.getLogger(__name__)



class ServingError(EmbedlineError):
    """tritonserver could not be started, or stopped unexpectedly."""


def _pytriton_dir() -> Path:
    # Located, not imported: importing pytriton loads gevent, zmq and aiohttp into the resident launcher.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServingError("serving needs nvidia-pytriton (pip install 'embedline[serve]')")
    return Path(spec.origin).parent / "tritonserver"


def _pytriton_libs() -> Path:
    return _pytriton_dir().parent.parent / "nvidia_pytriton.libs"


def prepare_backend_directory(dest: Path) -> Path:
    """A backend directory with the python backend and the stub matching this Python.

    nvidia-pytriton ships one stub per Python version; the backend runs the one found next to
    libtriton_python.so, so the directory links the matching one in (docs/architecture.md, "Server").
    """
    dist = _pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServingError(f"nvidia-pytriton has no python backend stub for Python {version} ({stub})")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (
        dist / "backends" / "python" / "libtriton_python.so",
        dist / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        link = python_dir / source.name
        if not link.exists():
            link.symlink_to(source)
    return dest


def server_environment() -> dict[str, str]:
    """Environment for tritonserver and the python-backend stubs it spawns."""
    env = os.environ.copy()
    # The stub embeds libpython: it must load this interpreter's own libpython3.X.so.
    lib_dirs = [sysconfig.get_config_var("LIBDIR") or "", str(_pytriton_libs())]
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(d for d in lib_dirs if d)
    # The stub finds this environment's packages (numpy, tokenizers, onnxruntime) through PATH.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def die_with_parent() -> None:
    """preexec_fn for a child of the launcher: SIGKILL it when the launcher dies, even by SIGKILL (Linux
    prctl PR_SET_PDEATHSIG).

    SIGKILL, not SIGTERM: a launcher that died cannot run a drain (route first, then tritonserver), and a
    tritonserver draining on SIGTERM kept its ports for seconds, so a `serve` restarted at once found them
    in use (docs/architecture.md, "Crash recovery"). Callers' in-flight requests fail with a retryable
    UNAVAILABLE instead. The signal fires when the *thread* that started the child ends, so the launcher
    starts its children from its main thread only.
    """
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


PORT_WAIT_S = 5.0


def check_ports_free(host: str, ports: dict[str, int], wait_s: float = PORT_WAIT_S) -> None:
    """ServingError naming the first of `ports` (name -> port; 0: unused) still in use after `wait_s`.

    The wait lets a port come free that an exiting process still holds, e.g. the previous `serve` of a
    pod or systemd unit restarted right after a crash; a port some live process keeps fails after it.
    """
    deadline = time.monotonic() + wait_s
    for name, port in ports.items():
        while port and port_in_use(host, port):
            if time.monotonic() >= deadline:
                raise ServingError(f"{name} port {port} on {host} is already in use; "
                                   f"choose another with --{name.lower()}-port")
            time.sleep(0.1)


_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for tests and benchmarks), never one this process was given before:
    nothing binds a port until its server starts, so the kernel may offer the same free port to two calls in
    a row (a server's HTTP and metrics ports, say), and that server would refuse to start."""
    with _ports_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port


# Every Triton protocol but health: an API key guards all of them, so orchestrators can still probe health.
GUARDED_PROTOCOLS = ("metadata", "inference", "shared-memory", "model-config", "model-repository",
                     "statistics", "trace", "logging")
# The protocols that change or expose the server itself: never open on an exposed address.
ADMIN_PROTOCOLS = ("shared-memory", "model-repository", "trace", "logging")
# The header the key travels in. Triton checks it as-is on HTTP and with a `triton-grpc-protocol-`
# prefix on gRPC (gRPC metadata keys are lower case), so the SDK sends both spellings.
AUTH_HEADER = "authorization"
GRPC_AUTH_HEADER = "triton-grpc-protocol-authorization"
STUB_BINARY = "triton_python_backend_stub"


def check_api_key(api_key: str | None) -> str | None:
    """An API key as the server takes it: printable ASCII without spaces (it travels in an HTTP header and
    on Triton's command line); blank or None means no key."""
    if api_key is None or not api_key.strip():
        return None
    api_key = api_key.strip()
    if not api_key.isascii() or not api_key.isprintable() or " " in api_key:
        raise ServingError("the API key must be printable ASCII without spaces (it travels in an HTTP header)")
    return api_key


def is_loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


@dataclass
class TritonServer:
    """A tritonserver process serving `repository`. Use as a context manager or start()/stop().

    api_key: when set, every protocol but health needs `authorization: Bearer <api_key>`.
    restrict_admin: without a key, still close the admin protocols (to a key nobody is told).
    tls_cert, tls_key: PEM files that turn on TLS for gRPC.
    exit_timeout_s: on stop(), how long Triton lets queued and in-flight requests finish.
    explicit_model_control: load every model at start, and later only on `load_model` (model updates).
    """

    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = DEFAULT_PORTS["grpc"]
    http_port: int = DEFAULT_PORTS["http"]
    metrics_port: int = DEFAULT_PORTS["metrics"]
    log_verbose: int = 0
    log_file: Path | None = None
    api_key: str | None = None
    restrict_admin: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    exit_timeout_s: int = 30
    explicit_model_control: bool = False

    def __post_init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self._group_killed = False
        self._workdir: tempfile.TemporaryDirectory | None = None
        # Without an API key, closed admin protocols still need a key: this process's own, told to nobody
        # (the launcher uses it to load published model versions).
        self._admin_key = self.api_key or (secrets.token_urlsafe(32) if self.restrict_admin else None)

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self, backend_dir: Path) -> list[str]:
        binary = _pytriton_dir() / "bin" / "tritonserver"
        command = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]
        if self.explicit_model_control:
            command += ["--model-control-mode=explicit", "--load-model=*"]
        restricted = self._restricted_protocols()
        if restricted:
            protocols, value = restricted
            # Triton only takes the key on its command line (docs/architecture.md, "Authentication").
            command += [f"--grpc-restricted-protocol={protocols}:{AUTH_HEADER}={value}",
                        f"--http-restricted-api={protocols}:{AUTH_HEADER}={value}"]
        if self.tls_cert or self.tls_key:
            command += ["--grpc-use-ssl=true", f"--grpc-server-cert={self.tls_cert}",
                        f"--grpc-server-key={self.tls_key}"]
        return command

    def _restricted_protocols(self) -> tuple[str, str] | None:
        """(comma-separated protocols, expected header value), or None when everything is open."""
        if self.api_key:
            return ",".join(GUARDED_PROTOCOLS), f"Bearer {self.api_key}"
        if self._admin_key:
            return ",".join(ADMIN_PROTOCOLS), f"Bearer {self._admin_key}"
        return None

    def load_model(self, name: str, timeout_s: float = 300.0) -> None:
        """(Re)load model `name` from the repository: Triton loads its newest version beside the one serving,
        moves new requests to it once it is ready, and unloads the old one after its requests finish."""
        headers = {AUTH_HEADER: f"Bearer {self._admin_key}"} if self._admin_key else {}
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/models/{name}/load",
                                         method="POST", data=b"", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s):
                pass
        except urllib.error.HTTPError as exc:
            raise ServingError(f"loading model {name!r} failed: {exc.read().decode(errors='replace')}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ServingError(f"loading model {name!r} failed: {exc}") from exc

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        check_ports_free(self.host, {"gRPC": self.grpc_port, "HTTP": self.http_port, "metrics": self.metrics_port})
        self._workdir = tempfile.TemporaryDirectory(prefix="embedline-triton-")
        workdir = Path(self._workdir.name)
        backend_dir = prepare_backend_directory(workdir / "backends")
        self.log_file = self.log_file or workdir / "tritonserver.log"
        log_handle = open(self.log_file, "ab")  # a restarted server appends to the same log
        log.info("starting tritonserver (log: %s)", self.log_file)
        self.process = subprocess.Popen(
            self.command(backend_dir),
            env=server_environment(),
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C is handled here; tritonserver gets a clean SIGTERM
            preexec_fn=die_with_parent,
        )
        self._group_killed = False
        log_handle.close()
        self.wait_ready(timeout_s)
        return self

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file or not Path(self.log_file).is_file():
            return ""
        text = Path(self.log_file).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ServingError(f"tritonserver exited with code {self.process.returncode} while starting:\n{tail}")
            if self.is_ready():
                return
            time.sleep(0.25)
        tail = self.log_tail()
        self.kill()
        raise ServingError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{tail}")

    def model_process_ids(self) -> set[int]:
        """PIDs of the live python-backend stubs (one per model instance) tritonserver runs now."""
        if self.process is None or self.process.poll() is not None:
            return set()
        return {pid for pid in child_pids(self.process.pid) if _is_live_stub(pid)}

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM, then wait: Triton turns not-ready, lets queued and in-flight requests finish (up to
        exit_timeout_s) and exits. Killed if it is still there `timeout_s` later (default: 10 s past
        exit_timeout_s)."""
        timeout_s = self.exit_timeout_s + 10 if timeout_s is None else timeout_s
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s; killing it", timeout_s)
        self.kill()

    def kill(self) -> None:
        """SIGKILL tritonserver and its model processes at once (a server whose model died cannot drain).

        The whole process group, even when tritonserver itself has already exited: its model processes
        outlive it otherwise. Once per started server, right after it exits: while any member lives the
        group's id cannot be reused, but once the group is empty a later process might take it.
        """
        if self.process is not None and not self._group_killed:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:  # the group is empty: nothing is left of this server
                pass
            self.process.wait()
            self._group_killed = True
        self._release_workdir()

    def _release_workdir(self) -> None:
        if self._workdir is not None:
            # keep the log readable after stop() when it lives in the workdir
            if self.log_file and Path(self.log_file).parent == Path(self._workdir.name):
                kept = Path(tempfile.gettempdir()) / f"embedline-tritonserver-{self.grpc_port}.log"
                shutil.copy2(self.log_file, kept)
                self.log_file = kept
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from every thread's /proc children list (the stubs are forked by a
    backend thread, not always the main one)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(x) for x in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return children


def _is_live_stub(pid: int) -> bool:
    """A running (not zombie) python-backend stub."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and STUB_BINARY.encode() in command
