"""The OpenAI-compatible route beside gRPC on the same server: added latency and throughput.

The bundled model is served by tritonserver (server defaults, CPU variant chosen as `serve` does) and the
route (`python -m embedline.serving.openai_api`, one uvicorn worker) runs in front of it. Measured:

    latency     one short text per request, sequential: the sync SDK over gRPC vs the route called with
                httpx (float JSON) and with the `openai` package (its default: base64, decoded by it);
                rounds alternate between the three so drift on the shared machine hits all alike.
                Added latency = route p50 - gRPC p50.
    throughput  16 concurrent callers sending 32-text requests, closed loop: the async SDK directly vs the
                route through httpx (base64 and float JSON) and through AsyncOpenAI (base64, which the
                package decodes and validates into Python lists: client CPU on the same 2 cores);
                each round runs every way once (order rotating); "vs gRPC" is the median over rounds of
                the ratio to that round's gRPC run, so drift between rounds cancels. The route's and the
                server's CPU ms per request are recorded too: they depend less than texts/s on what else
                the shared machine runs.

    flock /tmp/embedline-heavy.lock .venv/bin/python -m benchmarks.openai_route \\
        [--requests 200] [--seconds 3] [--rounds 5]

Writes benchmarks/results/openai_route.json and prints a table. The target: route throughput >= 0.8x gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import cpu_flags, data_dir, load_average, markdown_table, measured_settings, percentile
from benchmarks.experiment import Experiment

CONCURRENCY = 16
REQUEST_TEXTS = 32
MODEL_NAME = "all-MiniLM-L6-v2"


def sentences(n: int = 2000, seed: int = 13) -> tuple[list[str], str]:
    """Short real sentences: STS-B dev, else WikiText-2 sentences of 5-40 words, else the built-in texts."""
    data = data_dir(required=False)
    if data is not None:
        sts = data / "sts" / "stsb_dev.tsv.gz"
        if sts.is_file():
            from benchmarks.common import stsb_dev_sentences

            texts, source = stsb_dev_sentences(data), "STS-B dev sentences"
        else:
            with gzip.open(data / "corpus" / "wikitext2_valid_test_sentences.txt.gz", "rt", encoding="utf-8") as f:
                texts = [line.strip() for line in f if 5 <= len(line.split()) <= 40]
            source = "WikiText-2 sentences of 5-40 words"
    else:
        from embedline.export.parity import SHORT_TEXTS

        texts, source = [t for t in SHORT_TEXTS if t], "built-in parity texts"
    random.Random(seed).shuffle(texts)
    return [texts[i % len(texts)] for i in range(n)], source


def httpx_module():
    """httpx2, the HTTP client current `openai` versions depend on, else httpx (older ones)."""
    try:
        import httpx2

        return httpx2
    except ImportError:
        import httpx

        return httpx


def wait_listening(base_url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    httpx = httpx_module()

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the route exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/health", timeout=3).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the route at {base_url} was not healthy within {timeout} s")


def latency(grpc_url: str, base_url: str, texts: list[str], requests: int, rounds: int = 4) -> dict[str, list[float]]:
    """Seconds per single-text request, sequential, per way of calling; rounds alternate."""
    httpx = httpx_module()
    import openai

    from embedline.client import EmbeddingClient

    sdk = EmbeddingClient(grpc_url)
    http = httpx.Client(base_url=base_url, timeout=30)
    oai = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    calls = {
        "gRPC SDK": lambda text: sdk.embed([text]),
        "route, httpx float": lambda text: http.post("/v1/embeddings", json={"model": MODEL_NAME, "input": text,
                                                                           "encoding_format": "float"}).json(),
        "route, openai base64": lambda text: oai.embeddings.create(model=MODEL_NAME, input=text),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up: connections, config look-ups, first-run allocations
        for text in texts[:10]:
            call(text)
    per_round = max(1, requests // rounds)
    for r in range(rounds):
        for name, call in (calls.items() if r % 2 == 0 else reversed(calls.items())):
            for i in range(per_round):
                text = texts[(r * per_round + i) % len(texts)]
                start = time.perf_counter()
                call(text)
                times[name].append(time.perf_counter() - start)
    sdk.close()
    http.close()
    oai.close()
    return times


async def _closed_loop(send, batches: list[list[str]], seconds: float) -> tuple[int, float]:
    """CONCURRENCY callers, each sending its next batch as soon as the last one returns -> (texts, seconds)."""
    done = 0
    end = time.monotonic() + seconds

    async def caller(offset: int) -> None:
        nonlocal done
        i = offset
        while time.monotonic() < end:
            await send(batches[i % len(batches)])
            done += REQUEST_TEXTS
            i += CONCURRENCY

    start = time.monotonic()
    await asyncio.gather(*(caller(k) for k in range(CONCURRENCY)))
    return done, time.monotonic() - start


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (tritonserver runs the model in a stub process)."""
    import psutil

    process = psutil.Process(pid)
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


async def throughput(grpc_url: str, base_url: str, texts: list[str], seconds: float, rounds: int,
                     route_pid: int, server_pid: int) -> dict[str, dict[str, list[float]]]:
    """Per way of calling: texts/s and the route's and the server's CPU ms per request, one value per round.

    Rounds alternate in order and direction, so drift on the shared machine hits every way alike.
    """
    import openai

    from embedline.client import AsyncEmbeddingClient

    httpx = httpx_module()
    batches = [texts[i:i + REQUEST_TEXTS] for i in range(0, len(texts) - REQUEST_TEXTS + 1, REQUEST_TEXTS)]
    sdk = AsyncEmbeddingClient(grpc_url, max_concurrency=CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    http = httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits)
    oai = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                             http_client=httpx.AsyncClient(timeout=60, limits=limits))

    def via_http(encoding_format: str):
        async def send(batch):
            response = await http.post("/v1/embeddings", json={"model": MODEL_NAME, "input": batch,
                                                               "encoding_format": encoding_format})
            response.raise_for_status()
            body = response.json()
            if encoding_format == "base64":  # what a client does with it: one frombuffer per vector
                return [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in body["data"]]
            return body
        return send

    senders = {
        "async SDK (gRPC)": lambda batch: sdk.embed(batch),
        "route, httpx base64": via_http("base64"),
        "route, httpx float": via_http("float"),
        "route, AsyncOpenAI (base64)": lambda batch: oai.embeddings.create(model=MODEL_NAME, input=batch),
    }
    for send in senders.values():  # warm-up
        await _closed_loop(send, batches, 1.0)
    measured: dict[str, dict[str, list[float]]] = {
        name: {"texts_per_s": [], "vs_grpc": [], "route_cpu_ms": [], "server_cpu_ms": []} for name in senders}
    grpc = next(iter(senders))
    for r in range(rounds):
        order = list(senders.items())
        order = order[r % len(order):] + order[:r % len(order)]
        for name, send in (order if r % 2 == 0 else order[::-1]):
            route_cpu, server_cpu = _cpu_seconds(route_pid), _cpu_seconds(server_pid)
            count, elapsed = await _closed_loop(send, batches, seconds)
            requests = count / REQUEST_TEXTS
            entry = measured[name]
            entry["texts_per_s"].append(count / elapsed)
            entry["route_cpu_ms"].append((_cpu_seconds(route_pid) - route_cpu) / requests * 1000)
            entry["server_cpu_ms"].append((_cpu_seconds(server_pid) - server_cpu) / requests * 1000)
            print(f"  round {r + 1} {name}: {count / elapsed:.1f} texts/s", flush=True)
        # Each round's ratio to the gRPC run of the same round: the machine's drift between rounds cancels out.
        for entry in measured.values():
            entry["vs_grpc"].append(entry["texts_per_s"][-1] / measured[grpc]["texts_per_s"][-1])
    await sdk.close()
    await http.aclose()
    await oai.close()
    return measured


def measure(artifact, variant: str, requests: int, seconds: float, rounds: int, threads: int = 0) -> dict:
    """The route beside gRPC on one server: latency of single texts, throughput at c16 (the suite's stage too)."""
    from embedline.serving.openai_api import ServedModel, openai_command
    from embedline.serving.repository import build_repository
    from embedline.serving.triton import TritonServer, free_port

    texts, source = sentences()
    settings = measured_settings(variant, threads)
    with tempfile.TemporaryDirectory() as tmp:
        repository = build_repository(artifact, Path(tmp) / "models", settings)
        with TritonServer(repository, grpc_port=free_port(), http_port=free_port(),
                          metrics_port=free_port()) as server:
            port = free_port()
            argv = openai_command(server.grpc_url, [ServedModel.from_artifact(artifact, name=MODEL_NAME, embed_model="embed")], port=port)
            env = {k: v for k, v in os.environ.items() if k != "EMBEDLINE_API_KEY"}
            route = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            base_url = f"http://127.0.0.1:{port}"
            try:
                wait_listening(base_url, route)
                print(f"serving {MODEL_NAME} ({variant}); latency, {requests} sequential single-text "
                      "requests each ...", flush=True)
                lat = latency(server.grpc_url, base_url, texts, requests)
                print(f"throughput, {CONCURRENCY} callers x {REQUEST_TEXTS}-text requests ...", flush=True)
                rates = asyncio.run(throughput(server.grpc_url, base_url, texts, seconds, rounds,
                                               route.pid, server.process.pid))
            finally:
                route.send_signal(signal.SIGTERM)
                route.wait(30)

    grpc_p50 = percentile(lat["gRPC SDK"], 50) * 1000
    results: dict = {"variant": variant, "texts": source, "concurrency": CONCURRENCY,
                     "request_texts": REQUEST_TEXTS, "seconds_per_round": seconds, "rounds": rounds,
                     "load_average": load_average(), "cpu_flags": cpu_flags(), "latency_ms": {}, "throughput": {}}
    for name, values in lat.items():
        p50, p99 = percentile(values, 50) * 1000, percentile(values, 99) * 1000
        results["latency_ms"][name] = {"p50": round(p50, 2), "p99": round(p99, 2), "n": len(values),
                                       "added_p50": round(p50 - grpc_p50, 2)}
    for name, entry in rates.items():
        results["throughput"][name] = {
            "texts_per_s_median": round(float(np.median(entry["texts_per_s"])), 1),
            "vs_grpc_median_of_rounds": round(float(np.median(entry["vs_grpc"])), 3),
            "route_cpu_ms_per_request": round(float(np.median(entry["route_cpu_ms"])), 2),
            "server_cpu_ms_per_request": round(float(np.median(entry["server_cpu_ms"])), 2),
            "rounds": {key: [round(v, 2) for v in values] for key, values in entry.items()}}
    return results


def markdown(results: dict) -> str:
    """The table of one measurement (this script's output and the suite report's section)."""
    rows = [[f"1 text, sequential: {name}", f"{r['p50']:.2f}", f"{r['p99']:.2f}", f"{r['added_p50']:+.2f}",
             "", "", "", ""] for name, r in results["latency_ms"].items()]
    rows += [[f"c{results['concurrency']} x {results['request_texts']} texts: {name}", "", "", "",
              f"{r['texts_per_s_median']:.1f}", f"{r['vs_grpc_median_of_rounds']:.2f}x",
              f"{r['route_cpu_ms_per_request']:.2f}", f"{r['server_cpu_ms_per_request']:.1f}"]
             for name, r in results["throughput"].items()]
    return markdown_table(["workload: client", "p50 ms", "p99 ms", "added p50 ms", "texts/s (median)",
                           "vs gRPC (median of rounds)", "route CPU ms/req", "server CPU ms/req"], rows)


def main() -> None:
    def options(parser) -> None:
        parser.add_argument("--requests", type=int, default=200, help="single-text requests per way of calling")
        parser.add_argument("--seconds", type=float, default=3.0, help="length of one throughput window")

    experiment = Experiment.from_command_line(__doc__, rounds=5, options=options)
    args = experiment.args
    results = measure(experiment.artifact, experiment.variant, args.requests, args.seconds, experiment.rounds,
                      threads=experiment.threads)
    record = experiment.record(**results)
    experiment.save("openai_route", record)
    print(f"\n{MODEL_NAME} ({experiment.variant}), {results['texts']}; CPU flags: "
          f"{' '.join(record['cpu_flags']) or 'none'}; load {record['load_after']}\n\n{markdown(results)}")


if __name__ == "__main__":
    main()
