"""Failover across replicas: two real tritonservers, one killed with SIGKILL under load, no failed call."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np

from embedline.client import AsyncEmbeddingClient, EmbeddingClient

TEXTS = ["a man plays the guitar", "the cat sits on the red chair"]


def test_a_replica_killed_under_load_fails_no_call(start_server, tiny_fp32):
    first = start_server(tiny_fp32, intra_op_threads=1)
    second = start_server(tiny_fp32, intra_op_threads=1)
    urls = [first.grpc_url, second.grpc_url]
    with EmbeddingClient(first.grpc_url) as single:
        reference = single.embed(TEXTS)
    ok, errors = [0], []
    stop = threading.Event()

    with EmbeddingClient(urls, timeout=10) as client:
        def loop():
            while not stop.is_set():
                try:
                    np.testing.assert_allclose(client.embed(TEXTS), reference, atol=1e-5)
                    ok[0] += 1
                except Exception as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=loop) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        os.killpg(first.server.process.pid, signal.SIGKILL)  # tritonserver and its model process
        calls_at_kill = ok[0]
        time.sleep(2.0)
        assert client.health()  # one replica is enough
        stop.set()
        for thread in threads:
            thread.join(30)
    assert errors == [], errors[:3]
    assert ok[0] > calls_at_kill + 10  # the survivor kept answering


def test_requests_are_spread_over_the_replicas_and_health_needs_one(start_server, tiny_fp32):
    import asyncio
    import urllib.request

    first = start_server(tiny_fp32, intra_op_threads=1)
    second = start_server(tiny_fp32, intra_op_threads=1)

    def inference_count(served):
        with urllib.request.urlopen(f"http://{served.http_url}/v2/models/embed/stats", timeout=5) as response:
            import json

            stats = json.loads(response.read())["model_stats"][0]
        return int(stats["inference_stats"]["success"]["count"])

    before = [inference_count(first), inference_count(second)]
    with EmbeddingClient([first.grpc_url, second.grpc_url]) as client:
        for _ in range(10):
            client.embed(TEXTS)

    async def async_calls():
        async with AsyncEmbeddingClient([first.grpc_url, second.grpc_url]) as client:
            for _ in range(10):
                await client.embed(TEXTS)
            return await client.health()

    assert asyncio.run(async_calls())
    after = [inference_count(first), inference_count(second)]
    assert after[0] - before[0] >= 5 and after[1] - before[1] >= 5, (before, after)

    down = f"127.0.0.1:{_closed_port()}"
    with EmbeddingClient([down, first.grpc_url], timeout=5) as client:
        assert client.health()
        assert client.embed(TEXTS).shape == (2, 32)
    with EmbeddingClient([down, f"127.0.0.1:{_closed_port()}"], timeout=2) as client:
        assert not client.health()


def _closed_port() -> int:
    from embedline.serving.triton import free_port

    return free_port()
