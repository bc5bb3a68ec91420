"""Infinity (`infinity-emb`, torch engine), the Python embedding server users compare us with.

It lives in its own virtual environment (default .bench/infinity-venv, git-ignored; see
benchmarks/README.md for the two install commands) so its pins (transformers 4.x, sentence-transformers
3.x) never touch embedline's. It serves the same local model directory, offline (HF_HUB_OFFLINE=1), with
the same pinned thread count, and is loaded by the same closed-loop scheme over its OpenAI-style HTTP API.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO

log = logging.getLogger(__name__)

DEFAULT_VENV = REPO / ".bench" / "infinity-venv"
SERVED_NAME = "bench-model"


class InfinityUnavailable(RuntimeError):
    """Infinity is not installed, or did not start."""


class InfinityServer:
    """`infinity_emb v2` on 127.0.0.1:port serving `model_dir` on CPU (context manager)."""

    def __init__(self, model_dir: Path, port: int, threads: int, venv: Path = DEFAULT_VENV, batch_size: int = 32):
        self.model_dir, self.port, self.threads, self.venv, self.batch_size = model_dir, port, threads, venv, batch_size
        self.process: subprocess.Popen | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"embedline-infinity-{port}.log"

    def version(self) -> str:
        out = subprocess.run([str(self.venv / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('infinity_emb'), m.version('torch'))"],
                             capture_output=True, text=True)
        return out.stdout.strip()

    def __enter__(self) -> "InfinityServer":
        binary = self.venv / "bin" / "infinity_emb"
        if not binary.is_file():
            raise InfinityUnavailable(f"{binary} not found: install Infinity in its own venv (benchmarks/README.md)")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(self.threads),
               "MKL_NUM_THREADS": str(self.threads), "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
        command = [str(binary), "v2", "--model-id", str(self.model_dir), "--served-model-name", SERVED_NAME,
                   "--engine", "torch", "--device", "cpu", "--batch-size", str(self.batch_size),
                   "--no-bettertransformer", "--no-vector-disk-cache", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning"]
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise InfinityUnavailable(f"infinity_emb exited with {self.process.returncode}: {self._tail()}")
            try:
                self.embed(["warm-up"])
                return self
            except OSError:
                time.sleep(1.0)
        self.__exit__()
        raise InfinityUnavailable(f"infinity_emb not ready after 180 s: {self._tail()}")

    def _tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-4:])
        except OSError:
            return ""

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def embed(self, texts: list[str], connection: http.client.HTTPConnection | None = None) -> np.ndarray:
        own = connection is None
        connection = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            body = json.dumps({"model": SERVED_NAME, "input": texts})
            connection.request("POST", "/embeddings", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            if response.status != 200:
                raise OSError(f"HTTP {response.status}: {payload[:200]!r}")
            return np.array([item["embedding"] for item in json.loads(payload)["data"]], dtype=np.float32)
        finally:
            if own:
                connection.close()

    def closed_loop(self, texts: list[str], tokens: np.ndarray, request_size: int, concurrency: int,
                    seconds: float, warmup: float = 0.5) -> dict:
        """Closed-loop load with `concurrency` keep-alive connections (threads: the HTTP client blocks),
        windowed like the Triton load (benchmarks/load.py)."""
        from benchmarks.load import Completion, make_requests, min_requests, summarise

        requests = make_requests(texts, tokens, request_size)
        completions: list[Completion] = []
        stop = threading.Event()
        warmed: set[int] = set()

        def worker(offset: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            k = offset
            while not stop.is_set():
                batch, batch_tokens = requests[k % len(requests)]
                k += concurrency
                started = time.perf_counter()
                try:
                    self.embed(batch, connection)
                    ok = True
                except OSError:
                    ok = False
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                completions.append(Completion(started, time.perf_counter(), len(batch), batch_tokens, ok))
                warmed.add(offset)
            connection.close()

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        give_up = time.perf_counter() + max(30.0, 3 * seconds)
        while len(warmed) < concurrency and time.perf_counter() < give_up:
            time.sleep(0.05)
        time.sleep(warmup)
        start = time.perf_counter()
        time.sleep(seconds)
        while (sum(1 for c in list(completions) if c.finished >= start) < min_requests(concurrency)
               and time.perf_counter() < start + max(3 * seconds, 10.0)):
            time.sleep(0.05)
        end = time.perf_counter()
        stop.set()
        for thread in threads:
            thread.join()
        return summarise(completions, (start, end), request_size, concurrency)
