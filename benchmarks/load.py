"""Closed-loop load against the `embed` model through embedline's own asyncio client, plus what the server
says about it (Triton metrics) and what it costs (RSS of tritonserver and its python-backend stubs).

Closed loop: `concurrency` workers each send a request, wait for its answer and send the next. After a
warm-up (every worker answered once, then a fixed time) a window opens; what finishes inside it is
counted. The window closes after `seconds`, or later when too few requests have finished yet. One asyncio event loop drives all
workers (64 threads would spend the 2 cores on the GIL instead of the server).

Average dynamic batch size = delta(nv_inference_count) / delta(nv_inference_exec_count) over the window.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import urllib.request
from dataclasses import dataclass

import numpy as np

from benchmarks.common import percentile

_METRIC = re.compile(r'^(\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$')


def scrape_metrics(metrics_url: str, model: str = "embed") -> dict[str, float]:
    """Triton's Prometheus metrics for `model` (summed over versions), plus GPU memory when reported."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC.match(line.strip())
        if not match:
            continue
        name, labels, value = match.groups()
        if f'model="{model}"' in labels or name.startswith("nv_gpu_memory_used_bytes"):
            values[name] = values.get(name, 0.0) + float(value)
    return values


def server_rss_mb(pid: int) -> float:
    """Resident memory of tritonserver and its children (the python-backend stub processes), MiB."""
    import psutil

    try:
        process = psutil.Process(pid)
        processes = [process, *process.children(recursive=True)]
        return round(sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20, 1)
    except psutil.Error:
        return float("nan")


@dataclass
class Completion:
    started: float
    finished: float
    texts: int
    tokens: int
    ok: bool


def summarise(completions: list[Completion], window: tuple[float, float], request_size: int,
              concurrency: int) -> dict:
    """Rates and latency percentiles of the requests that finished inside the measurement window.

    Counting completions in a fixed window (not whole request cycles) keeps the rate unbiased when a
    request takes longer than the window itself (32 texts at high concurrency on 2 cores).
    """
    start, end = window
    done = [c for c in completions if start <= c.finished <= end]
    ok = [c for c in done if c.ok]
    seconds = max(end - start, 1e-9)
    lat = np.array([1000 * (c.finished - c.started) for c in ok] or [float("nan")])
    return {
        "request_size": request_size,
        "concurrency": concurrency,
        "sentences_per_s": round(sum(c.texts for c in ok) / seconds, 1),
        "tokens_per_s": round(sum(c.tokens for c in ok) / seconds, 1),
        "requests_per_s": round(len(ok) / seconds, 1),
        "p50_ms": round(percentile(lat, 50), 3),
        "p95_ms": round(percentile(lat, 95), 3),
        "p99_ms": round(percentile(lat, 99), 3),
        "mean_ms": round(float(statistics.fmean(lat)), 3),
        "requests": len(ok),
        "errors": len(done) - len(ok),
        "window_s": round(seconds, 2),
    }


def min_requests(concurrency: int) -> int:
    """Completions a window needs before it may close (each worker finishing at least once)."""
    return max(5, concurrency)


def make_requests(texts: list[str], tokens: np.ndarray, request_size: int) -> list[tuple[list[str], int]]:
    return [(texts[i : i + request_size], int(tokens[i : i + request_size].sum()))
            for i in range(0, len(texts) - request_size + 1, request_size)]


async def _closed_loop(url: str, requests: list[tuple[list[str], int]], concurrency: int,
                       seconds: float, warmup: float) -> dict:
    from embedline.client import AsyncEmbeddingClient, EmbeddingClientError

    completions: list[Completion] = []
    stop = asyncio.Event()
    warm = asyncio.Event()
    warmed: set[int] = set()
    # max_concurrency caps requests in flight per client: it must not throttle the workers
    async with AsyncEmbeddingClient(url, timeout=120.0, max_concurrency=max(1, concurrency)) as client:
        await client.embed(requests[0][0])  # channel + config look-up, outside the timed window

        async def worker(offset: int) -> None:
            k = offset
            while not stop.is_set():
                texts, tokens = requests[k % len(requests)]
                k += concurrency
                started = time.perf_counter()
                try:
                    await client.embed(texts)
                    ok = True
                except EmbeddingClientError:
                    ok = False
                completions.append(Completion(started, time.perf_counter(), len(texts), tokens, ok))
                warmed.add(offset)
                if len(warmed) == concurrency:
                    warm.set()

        async def monitor() -> tuple[float, float]:
            # Warm-up: every worker has had an answer (the pipeline is full), then `warmup` more seconds.
            try:
                await asyncio.wait_for(warm.wait(), timeout=max(30.0, 3 * seconds))
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(warmup)
            start = time.perf_counter()
            await asyncio.sleep(seconds)
            hard_end = start + max(3 * seconds, 10.0)
            while (sum(1 for c in completions if c.finished >= start) < min_requests(concurrency)
                   and time.perf_counter() < hard_end):
                await asyncio.sleep(0.05)
            end = time.perf_counter()
            stop.set()
            return start, end

        *_, window = await asyncio.gather(*(worker(i) for i in range(concurrency)), monitor())
    return summarise(completions, window, len(requests[0][0]), concurrency)


def closed_loop(url: str, texts: list[str], tokens: np.ndarray, request_size: int, concurrency: int,
                seconds: float, warmup: float = 0.5) -> dict:
    """Closed-loop load of `request_size`-text requests cut from `texts`, `concurrency` in flight."""
    return asyncio.run(_closed_loop(url, make_requests(texts, tokens, request_size), concurrency, seconds, warmup))


def sequential_latency(url: str, texts: list[str], tokens: np.ndarray, seconds: float,
                       warmup: float = 0.5) -> dict:
    """One 1-text request at a time through the SDK's blocking client, the way a service that embeds a
    query before answering calls it.

    This is the latency number: the asyncio closed loop above is built to keep many requests in flight
    from one thread, and at concurrency 1 its event loop added 0-1 ms of client time per call on 2 shared
    cores (against the blocking client on the same server, varying from run to run); that time is not the
    server's.
    """
    from embedline.client import EmbeddingClient, EmbeddingClientError

    requests = make_requests(texts, tokens, 1)
    completions: list[Completion] = []
    with EmbeddingClient(url, timeout=120.0) as client:
        client.embed(requests[0][0])  # channel + config look-up, outside the timed window
        warm_until = time.perf_counter() + warmup
        k = 0
        while time.perf_counter() < warm_until:
            client.embed(requests[k % len(requests)][0])
            k += 1
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(completions) < min_requests(1):
            batch, count = requests[k % len(requests)]
            k += 1
            started = time.perf_counter()
            try:
                client.embed(batch)
                ok = True
            except EmbeddingClientError:
                ok = False
            completions.append(Completion(started, time.perf_counter(), 1, count, ok))
    return {"client": "sync", **summarise(completions, (start, time.perf_counter()), 1, 1)}


def measure_point(server, texts: list[str], tokens: np.ndarray, request_size: int, concurrency: int,
                  seconds: float, warmup: float = 0.5) -> dict:
    """One load point with the server's view of it: avg dynamic batch, RSS, GPU memory."""
    before = scrape_metrics(server.metrics_url)
    summary = closed_loop(server.grpc_url, texts, tokens, request_size, concurrency, seconds, warmup)
    after = scrape_metrics(server.metrics_url)
    inferences = after.get("nv_inference_count", 0) - before.get("nv_inference_count", 0)
    executions = after.get("nv_inference_exec_count", 0) - before.get("nv_inference_exec_count", 0)
    summary["avg_dynamic_batch"] = round(inferences / executions, 2) if executions else None
    summary["server_rss_mb"] = server_rss_mb(server.process.pid)
    if "nv_gpu_memory_used_bytes" in after:
        summary["gpu_memory_mb"] = round(after["nv_gpu_memory_used_bytes"] / 2**20, 1)
    return summary
