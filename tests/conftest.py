"""Shared fixtures: a tiny model built in-process and its imported artifact."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Two shared cores: unpinned thread pools oversubscribe and collapse (docs/architecture.md, thread pinning).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialized 2-layer, 32-d BERT in sentence-transformers layout (mean pooling)."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tmp_path_factory):
    """The tiny model imported as an artifact (no ONNX export yet)."""
    from embedline import artifact as art

    return art.import_model_dir(tiny_model_dir, tmp_path_factory.mktemp("tiny-artifact") / "a", name="tiny")


@pytest.fixture(scope="session")
def tiny_fp32(tiny_artifact, tmp_path_factory):
    """A copy of the tiny artifact with its fp32 ONNX exported (read-only for the tests that share it).

    A complete export (with its record), so `embedline serve` on it finds nothing left to export and never
    writes into this shared directory.
    """
    import shutil

    from embedline import artifact as art
    from embedline.export.pipeline import export_artifact

    dest = tmp_path_factory.mktemp("tiny-fp32") / "a"
    shutil.copytree(tiny_artifact.path, dest)
    return export_artifact(art.load_artifact(dest), variants=("fp32",), show_progress=False, speed_seconds=0)


def _cuda_available() -> bool:
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


# Fixtures that start a tritonserver: a test using one (directly or through another fixture) is a
# `processes` test, left out of `make test-fast`.
SERVER_FIXTURES = {"start_server", "launch_serve", "launch_serve_for_module", "served_minilm", "milvus"}
# Fixtures that export the real all-MiniLM-L6-v2 (15 s on 2 cores): a test using one is `slow`.
MINILM_FIXTURES = {"minilm_artifact", "minilm_exported"}
# Set by `make test-fast`: a test outside the `processes` mark that starts a process fails, so the mark
# cannot drift from what the tests do.
FAST_ENV = "EMBEDLINE_TEST_FAST"


def pytest_collection_modifyitems(config, items):
    """Tests on a server fixture get the `processes` mark, tests on the real MiniLM export `slow`; `gpu` tests run where CUDA is present and are
    skipped (with the reason) elsewhere."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SERVER_FIXTURES & fixtures:
            item.add_marker(pytest.mark.processes)
        if MINILM_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (onnxruntime CUDAExecutionProvider)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_processes_in_the_fast_loop(request, monkeypatch):
    """Under `make test-fast`, starting a process outside a `processes` test is an error that names the fix."""
    if not os.environ.get(FAST_ENV) or "processes" in request.keywords:
        return
    import multiprocessing
    import subprocess

    def refuse(*_args, **_kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts a process: mark it `@pytest.mark.processes` "
                           "(it then runs in `make test` only)")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


@dataclass
class ServedModel:
    """A running tritonserver serving one artifact (what the server fixtures hand to tests)."""

    server: "object"
    artifact: "object"
    max_batch_size: int

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Factory: start_server(artifact, **RepositorySettings fields) -> ServedModel on free ports.

    Every server started through it is stopped when the test module that started it ends, so at most one
    module's servers (and their memory) are up at a time.
    """
    from embedline.serving.repository import RepositorySettings, build_repository
    from embedline.serving.triton import TritonServer, free_port

    started = []

    def start(artifact, **settings) -> ServedModel:
        settings.setdefault("intra_op_threads", 2)
        repo_settings = RepositorySettings(**settings)
        repository = build_repository(artifact, tmp_path_factory.mktemp("repository") / "models", repo_settings)
        server = TritonServer(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
        server.start()
        started.append(server)
        return ServedModel(server=server, artifact=artifact, max_batch_size=repo_settings.max_batch_size)

    yield start
    # Stopped side by side: each takes seconds to unload its models, and they do not depend on each other.
    with ThreadPoolExecutor() as pool:
        list(pool.map(lambda server: server.stop(), started))


@pytest.fixture(scope="session")
def minilm_artifact(tmp_path_factory):
    """The bundled all-MiniLM-L6-v2 imported as an artifact and exported once for the whole suite: every
    ONNX variant (fp32, fused, fp16, int8), threads pinned to 2. Read-only for the tests that share it."""
    from embedline import artifact as art
    from embedline.export.pipeline import export_artifact

    artifact = art.import_model_dir(
        art.bundled_model_dir(), tmp_path_factory.mktemp("minilm") / "artifact", name="all-MiniLM-L6-v2"
    )
    return export_artifact(artifact, show_progress=False, threads=2, speed_seconds=0.3)


@pytest.fixture(scope="module")
def served_minilm(start_server, minilm_artifact) -> ServedModel:
    """The real tritonserver serving all-MiniLM-L6-v2 (fp32 variant) on the python backend."""
    return start_server(minilm_artifact, variant="fp32")


# ---- few-shot classifier (tests/test_classifier*.py) --------------------------------------------------

CLASSIFIER_WORDS = {
    "positive": "good great happy love beautiful",
    "negative": "bad terrible sad hate cold",
    "neutral": "table chair door window road",
}


def write_labeled_tsv(path: Path, per_class: int = 10, seed: int = 0) -> Path:
    """A small text/label TSV: each class's texts use its own words (learnable by the tiny model)."""
    import random

    rng = random.Random(seed)
    nouns = "movie film song book game food coffee".split()
    rows = []
    for i in range(per_class):
        for label, words in CLASSIFIER_WORDS.items():
            rows.append(f"the {rng.choice(nouns)} is {rng.choice(words.split())} {rng.choice(words.split())}\t{label}")
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_classifier(tiny_model_dir, tmp_path_factory):
    """A tiny-model classifier artifact: contrastive body + head (3 labels, neighbours kept), fp32 ONNX."""
    from embedline.export.onnx_export import export_fp32
    from embedline.training.fewshot.classifier import ClassifierConfig, train_classifier

    root = tmp_path_factory.mktemp("tiny-classifier")
    train_file = write_labeled_tsv(root / "train.tsv")
    artifact = train_classifier(ClassifierConfig(
        train_file=str(train_file), output=str(root / "artifact"), model=str(tiny_model_dir), shots=6, seed=1,
        iterations=4, batch_size=8, lr=1e-3, head_c=10.0, neighbours=3, device="cpu",
    ))
    export_fp32(artifact)
    return artifact


# ---- `embedline serve` as a real process (tests/test_serving_*.py) -----------------------------------

EMBEDLINE_CLI = [sys.executable, "-m", "embedline.cli"]


@dataclass
class Launched:
    """A running `embedline serve` process and where it listens."""

    process: "object"
    grpc_port: int
    http_port: int
    metrics_port: int
    openai_port: int
    banner: str

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def tritonserver(self):
        """The psutil.Process of the tritonserver this launcher runs now."""
        import psutil

        servers = [p for p in psutil.Process(self.process.pid).children() if p.name() == "tritonserver"]
        assert len(servers) == 1, servers
        return servers[0]

    def model_processes(self):
        return [p for p in self.tritonserver().children() if "triton_python_backend_stub" in p.name()]

    def ready(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def read_until(self, needle: str, timeout: float) -> str:
        """Read the launcher's stdout until a line holds `needle`; returns everything read."""
        import time

        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                if self.process.poll() is not None:
                    break
                continue
            seen.append(line)
            if needle in line:
                return "".join(seen)
        raise AssertionError(f"no {needle!r} within {timeout}s; output:\n{''.join(seen)}")


def _launcher():
    """launch(*serve args, env=None, ports=None) -> Launched, once its banner is printed; and a stop() for all."""
    import signal
    import subprocess

    from embedline.serving.triton import free_port

    launched = []

    def launch(*args, env=None, wait=True, ports=None) -> Launched:
        ports = list(ports or [free_port() for _ in range(4)])
        process = subprocess.Popen(
            [*EMBEDLINE_CLI, "serve", "--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
             "--metrics-port", str(ports[2]), "--openai-port", str(ports[3]), "--threads", "1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        served = Launched(process, *ports[:3], openai_port=ports[3], banner="")
        launched.append(served)
        if wait:
            served.banner = served.read_until("Ctrl-C to stop", timeout=300)
        return served

    def stop_all() -> None:
        for served in launched:
            if served.process.poll() is None:
                served.process.send_signal(signal.SIGTERM)
                try:
                    served.process.wait(60)
                except subprocess.TimeoutExpired:
                    served.process.kill()
                    served.process.wait()

    return launch, stop_all


@pytest.fixture
def launch_serve():
    """Factory: launch_serve(*serve args, env=None, ports=None) -> Launched, once its banner is printed.

    ports: (grpc, http, metrics, openai), e.g. a crashed launcher's, to start another on the same ports
    (default: free ones). Every launcher still running at the end of the test gets SIGTERM, then SIGKILL.
    """
    launch, stop_all = _launcher()
    yield launch
    stop_all()


@pytest.fixture(scope="module")
def launch_serve_for_module():
    """launch_serve for a server the tests of one module share (stopped when the module ends)."""
    launch, stop_all = _launcher()
    yield launch
    stop_all()


@dataclass
class MilvusServer:
    process: "object"  # subprocess.Popen
    uri: str


def _wait_until_it_answers(process, uri: str, timeout: float = 60) -> None:
    import time

    from embedline.search.milvus import MilvusStore
    from embedline.search.store import StoreError

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"milvus-lite server exited ({process.returncode}): {process.stdout.read()}")
        try:
            MilvusStore(uri, timeout=2).collections()
            return
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    """A Milvus Lite server in a process of its own, on a free port, for this module's tests (the same
    pymilvus wire protocol a Milvus cluster speaks)."""
    from embedline.serving.triton import free_port

    port = free_port()
    import subprocess

    process = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path_factory.mktemp("milvus")),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = MilvusServer(process, f"milvus://127.0.0.1:{port}")
    try:
        _wait_until_it_answers(process, server.uri)
        yield server
    finally:
        process.kill()
        process.wait()
