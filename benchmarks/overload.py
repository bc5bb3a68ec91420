"""Overload: what callers see at 4x the server's capacity, per `--max-queue-size` (the default comes from here).

For each queue bound the bundled model is served, its closed-loop capacity measured, then requests are sent
open-loop at 4x that rate for 10 s, each with a 2 s deadline that also travels to Triton as the request's
timeout (as the SDK sends it). Every request ends as: ok, refused at once (queue full), dropped by the server
when its timeout passed in the queue, or a client-side deadline. No retries: this is the raw server.

    .venv/bin/python -m benchmarks.overload [--seconds 10] [--factor 4] [--sizes 0,8,32,128]

Writes benchmarks/results/overload.json and the "overload" table in benchmarks/README.md.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, measured_settings, percentile, sts_sentences
from benchmarks.experiment import Experiment

DEADLINE_S = 2.0
REQUEST_TEXTS = 8


def _inputs(grpcaio, texts):
    data = np.array([[t.encode()] for t in texts], dtype=np.object_)
    text = grpcaio.InferInput("text", list(data.shape), "BYTES")
    text.set_data_from_numpy(data)
    return [text]


def _outcome(exc: Exception) -> str:
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    if "maximum queue size" in message:
        return "refused"
    if "timeout expired" in message.lower():
        return "dropped"
    if "DEADLINE_EXCEEDED" in str(exc.status() if callable(getattr(exc, "status", None)) else ""):
        return "deadline"
    return "other"


async def capacity(url: str, requests: list[list[str]], seconds: float = 5.0, concurrency: int = 8) -> float:
    """Requests/s the server completes in a closed loop."""
    import tritonclient.grpc.aio as grpcaio

    client = grpcaio.InferenceServerClient(url)
    done = 0
    end = time.monotonic() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        i = offset
        while time.monotonic() < end:
            await client.infer("embed", _inputs(grpcaio, requests[i % len(requests)]))
            done += 1
            i += concurrency

    start = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    rate = done / (time.monotonic() - start)
    await client.close()
    return rate


async def open_loop(url: str, requests: list[list[str]], rate: float, seconds: float) -> list[tuple[str, float]]:
    """Send at `rate` requests/s for `seconds`; -> (outcome, latency s) per request."""
    import tritonclient.grpc.aio as grpcaio

    client = grpcaio.InferenceServerClient(url)
    results: list[tuple[str, float]] = []

    async def one(texts: list[str]) -> None:
        start = time.monotonic()
        try:
            await client.infer("embed", _inputs(grpcaio, texts), client_timeout=DEADLINE_S,
                               timeout=int(DEADLINE_S * 1e6))
            results.append(("ok", time.monotonic() - start))
        except Exception as exc:  # classified below; nothing is retried
            results.append((_outcome(exc), time.monotonic() - start))

    tasks = []
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(requests[i % len(requests)])))
    await asyncio.gather(*tasks)
    await client.close()
    return results


def summarise(results: list[tuple[str, float]], seconds: float) -> dict:
    by = {k: [lat for outcome, lat in results if outcome == k] for k in ("ok", "refused", "dropped", "deadline", "other")}

    def pct(values, q):
        return round(percentile(values, q) * 1000, 1) if values else None

    return {
        "sent": len(results),
        **{k: len(v) for k, v in by.items()},
        "goodput_rps": round(len(by["ok"]) / seconds, 1),
        "ok_p50_ms": pct(by["ok"], 50), "ok_p99_ms": pct(by["ok"], 99),
        "refused_p50_ms": pct(by["refused"], 50),
        "deadline_share": round(len(by["deadline"]) / max(1, len(results)), 3),
    }


def main() -> None:
    def options(parser) -> None:
        parser.add_argument("--seconds", type=float, default=10.0)
        parser.add_argument("--factor", type=float, default=4.0, help="offered load as a multiple of capacity")
        parser.add_argument("--sizes", default="0,8,32,128", help="max queue sizes to compare (0 = unbounded)")

    experiment = Experiment.from_command_line(__doc__, options=options)
    args, artifact, variant = experiment.args, experiment.artifact, experiment.variant
    from embedline.serving.repository import build_repository
    from embedline.serving.triton import TritonServer, free_port

    sentences = sts_sentences(REQUEST_TEXTS * 200)
    requests = [sentences[i:i + REQUEST_TEXTS] for i in range(0, len(sentences), REQUEST_TEXTS)]
    rows, results = [], {}
    for size in [int(s) for s in args.sizes.split(",")]:
        settings = measured_settings(variant, experiment.threads, max_queue_size=size)  # serve's layout
        with tempfile.TemporaryDirectory() as tmp:
            repository = build_repository(artifact, Path(tmp) / "models", settings)
            with TritonServer(repository, grpc_port=free_port(), http_port=free_port(),
                              metrics_port=free_port()) as server:
                rate = asyncio.run(capacity(server.grpc_url, requests))
                outcomes = asyncio.run(open_loop(server.grpc_url, requests, rate * args.factor, args.seconds))
        summary = {"capacity_rps": round(rate, 1), "offered_rps": round(rate * args.factor, 1),
                   **summarise(outcomes, args.seconds)}
        results[str(size)] = summary
        print(f"max_queue_size={size or 'unbounded'}: {summary}", flush=True)
        rows.append([size or "unbounded", summary["capacity_rps"], summary["offered_rps"], summary["sent"],
                     summary["ok"], summary["refused"], summary["dropped"], summary["deadline"], summary["other"],
                     summary["ok_p50_ms"], summary["ok_p99_ms"], summary["refused_p50_ms"]])
    record = experiment.record(deadline_s=DEADLINE_S, request_texts=REQUEST_TEXTS, factor=args.factor,
                               seconds=args.seconds, by_queue_size=results)
    experiment.save("overload", record)
    table = markdown_table(
        ["max queue", "capacity req/s", "offered req/s", "sent", "ok", "refused at once", "dropped by timeout",
         "client deadline", "other", "ok p50 ms", "ok p99 ms", "refusal p50 ms"], rows)
    experiment.report("overload", (
        "## Overload: the queue bound\n\n"
        f"Open-loop load at {args.factor:g}x capacity for {args.seconds:g} s, {REQUEST_TEXTS}-text STS-B requests, "
        f"{DEADLINE_S:g} s deadlines sent as Triton's request timeout, no retries; bundled model, {variant}, "
        f"CPU flags: {' '.join(record['cpu_flags']) or 'none'}. `{record['command']}`\n\n{table}"))


if __name__ == "__main__":
    main()
