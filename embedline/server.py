"""Run the real NVIDIA Triton Inference Server (the `tritonserver` binary shipped in nvidia-pytriton).

`TritonServer` starts tritonserver on a model repository, waits until it is ready and stops it; tests and
benchmarks use it directly. `embedline serve` (the `run` verb below) prepares the artifact (imports the
bundled model, exports ONNX if missing), builds the repository, serves until Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from embedline.errors import EmbedlineError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"grpc": 8001, "http": 8000, "metrics": 8002}


class ServerError(EmbedlineError):
    """tritonserver could not be started, or stopped unexpectedly."""


def _pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise ServerError("serving needs nvidia-pytriton (pip install 'embedline[serve]')") from exc
    return Path(pytriton.__file__).parent / "tritonserver"


def _pytriton_libs() -> Path:
    return _pytriton_dir().parent.parent / "nvidia_pytriton.libs"


def prepare_backend_directory(dest: Path) -> Path:
    """A backend directory with the python backend and the stub matching this Python (see DESIGN.md)."""
    dist = _pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no python backend stub for Python {version} ({stub})")
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


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TritonServer:
    """A tritonserver process serving `repository`. Use as a context manager or start()/stop()."""

    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = DEFAULT_PORTS["grpc"]
    http_port: int = DEFAULT_PORTS["http"]
    metrics_port: int = DEFAULT_PORTS["metrics"]
    log_verbose: int = 0
    log_file: Path | None = None

    def __post_init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

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
        return [
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
        ]

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        for name, port in (("gRPC", self.grpc_port), ("HTTP", self.http_port), ("metrics", self.metrics_port)):
            if port_in_use(self.host, port):
                raise ServerError(
                    f"{name} port {port} on {self.host} is already in use; "
                    f"choose another with --{name.lower()}-port"
                )
        self._workdir = tempfile.TemporaryDirectory(prefix="embedline-triton-")
        workdir = Path(self._workdir.name)
        backend_dir = prepare_backend_directory(workdir / "backends")
        self.log_file = self.log_file or workdir / "tritonserver.log"
        log_handle = open(self.log_file, "wb")
        log.info("starting tritonserver (log: %s)", self.log_file)
        self.process = subprocess.Popen(
            self.command(backend_dir),
            env=server_environment(),
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C is handled here; tritonserver gets a clean SIGTERM
        )
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
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting:\n{tail}")
            if self.is_ready():
                return
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{tail}")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s; killing it", timeout_s)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
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


# ---- `embedline serve` ------------------------------------------------------------------------------


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
    from embedline.export.repository import RepositorySettings
    from embedline.export.variants import SERVABLE_VARIANTS

    parser.add_argument("--artifact", default=None,
                        help="artifact directory (default: the bundled all-MiniLM-L6-v2); exported first if needed")
    parser.add_argument("--variant", choices=SERVABLE_VARIANTS, default=None,
                        help="ONNX variant, or openvino (default: fp16 on GPU; on CPU the fastest within tolerance)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to expose)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"])
    parser.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"])
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"])
    parser.add_argument("--repository", default=None,
                        help="where to build the model repository (default: a temporary directory)")
    parser.add_argument("--max-batch-size", type=int, default=RepositorySettings.max_batch_size)
    parser.add_argument("--queue-delay-us", type=int, default=RepositorySettings.queue_delay_us)
    parser.add_argument("--instances", type=int, default=RepositorySettings.instances)
    parser.add_argument("--threads", type=int, default=RepositorySettings.intra_op_threads,
                        help="ONNX Runtime intra-op threads per instance (0: one per core)")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver log verbosity")


def run(args: argparse.Namespace) -> int:
    from embedline.export.repository import build_repository, settings_from_args
    from embedline.export.variants import available_device

    for name in ("grpc", "http", "metrics"):
        port = getattr(args, f"{name}_port")
        if port_in_use(args.host, port):
            raise ServerError(f"{name} port {port} on {args.host} is already in use; choose another with --{name}-port")
    artifact = prepare_artifact(args.artifact)
    device = available_device()
    settings = settings_from_args(args, artifact, device)
    with tempfile.TemporaryDirectory(prefix="embedline-repo-") as tmp:
        repository = build_repository(artifact, args.repository or Path(tmp) / "models", settings)
        server = TritonServer(repository, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                              metrics_port=args.metrics_port, log_verbose=args.log_verbose)
        stop_requested = []

        def request_stop(signum, _frame):
            stop_requested.append(signum)

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        server.start()
        try:
            print(f"embedline: serving {artifact.name} ({settings.variant}, {device}) from {artifact.path}")
            print(f"  gRPC     {server.grpc_url}")
            print(f"  HTTP     http://{server.http_url}")
            print(f"  metrics  {server.metrics_url}")
            print(f"  log      {server.log_file}")
            print("Ctrl-C to stop.", flush=True)
            while not stop_requested:
                if server.process.poll() is not None:
                    raise ServerError(f"tritonserver stopped unexpectedly (code {server.process.returncode}):\n"
                                      f"{server.log_tail()}")
                time.sleep(0.5)
            print("embedline: stopping tritonserver", flush=True)
        finally:
            server.stop()
    return 0
